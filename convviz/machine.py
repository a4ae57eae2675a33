"""What the local machine offers: GPUs for the workflow (read by rules/common.smk, which must not
import torch), CPU threads for small ops on a busy machine, which of several equivalent ways
of computing something runs fastest here, and the allocator setting that spares training its
page faults."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping

# Device files a GPU shows on Linux: NVIDIA's first card, ROCm's kernel driver.
GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/kfd")


def local_gpus() -> int:
    """1 when this machine shows a GPU device, else 0: the `gpu` units a GPU-able rule claims
    locally (profiles/default offers one, so one GPU job runs at a time)."""
    return int(any(os.path.exists(path) for path in GPU_DEVICE_FILES))


def busy_machine_threads() -> int | None:
    """Threads for small ops (top-k bookkeeping, small training batches): 1 when the machine is
    oversubscribed, else None (keep torch's setting).

    Small ops gain from a second thread on a quiet machine; on one where more threads want to
    run than there are cores (1-minute load average above 1.5x the core count: our own job
    accounts for about 1x), every parallel region can wait a scheduler time slice for a
    descheduled thread, and one thread is far cheaper. Measured on 2 cores: top-9 mining costs
    1.04-1.17x a plain pass with torch's threads vs 1.15-1.25x with one when quiet, and
    1.3-1.5x vs 1.02-1.10x when busy (load 4-6); lenet's small training batches run at 65 vs
    285 img/s at load 10.
    """
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None
    return 1 if load > 1.5 * (os.cpu_count() or 1) else None


def device_name(device) -> str:
    """The machine a measurement ran on, for benchmark records: the GPU's name with the CUDA and
    torch versions, or the CPU with torch's thread count."""
    import torch  # here, not at the top: rules/common.smk imports this module without torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    return f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


def matmul_rate(device, size: int = 2048, repeats: int = 5) -> float:
    """The machine's arithmetic speed right now, for benchmark records: billions of float32
    multiply-adds per second in a size x size matrix product (best of `repeats`). On the shared
    2-core VMs of this project it moved between 54 and 91 within one session, and the speedup
    ratios against Captum move with it (our code is the more compute- and memory-bound side)."""
    import torch  # here, not at the top: rules/common.smk imports this module without torch

    device = torch.device(device)
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - tic)
    return round(size**3 / best / 1e9, 1)


@contextlib.contextmanager
def cpu_threads(device, threads: int | None) -> Iterator[None]:
    """Run the enclosed torch ops with `threads` intra-op threads if `device` is the CPU (None:
    unchanged). The count is process-wide: don't run other torch work in parallel Python
    threads meanwhile."""
    import torch  # here, not at the top: rules/common.smk imports this module without torch

    previous = torch.get_num_threads()
    if threads is None or torch.device(device).type != "cpu" or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fastest_way(ways: Mapping[str, Callable], x, repeats: int = 2) -> tuple[str, object]:
    """Run each way on `x` `repeats` times, in turn and in the mapping's order; return the name of
    the way with the shortest run and the last run's result (the ways must compute the same
    numbers up to rounding, so any result will do). CUDA work is synchronised around each run."""
    import torch  # here, not at the top: rules/common.smk imports this module without torch

    seconds: dict[str, float] = {}
    out = None
    for name in list(ways) * repeats:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        tic = time.perf_counter()
        out = ways[name](x)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        seconds[name] = min(seconds.get(name, float("inf")), time.perf_counter() - tic)
    return min(seconds, key=seconds.get), out


def full_precision_float32() -> None:
    """Have CUDA convolutions and matrix products compute float32 in float32, not TF32 (torch runs
    cuDNN convolutions in TF32 by default on Ampere and later GPUs: a 10-bit mantissa). Measured on
    an H100: TF32 moved occlusion P(true) by up to 2.1e-3 (the studies promise 1e-3 of an fp32
    loop) and flipped max-pool switches, so deconvnet projections differed from the CPU's by
    up to 12%. Process-wide; the analysis rules call it (through load_for_analysis), training does
    not. No effect on the CPU."""
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def keep_freed_memory() -> bool:
    """Have glibc's allocator keep freed memory for reuse instead of handing it back to the kernel.

    By default every tensor above glibc's (adaptive) mmap threshold gets fresh pages from the
    kernel, and each 4 KiB page costs a fault on first touch: lenet's training step of 32 images
    took 1,000-3,000 faults (measured: an epoch of 20 steps 310-453 ms with 25,000-78,000 faults,
    260-303 ms with at most a few hundred). Process-wide and irreversible, so only the
    jobs that gain call it (rule train); the process's memory stays at its peak until it exits.
    Returns False where it does not apply (not glibc: macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    return bool(
        mallopt(m_mmap_threshold, 32 << 20)  # the largest glibc accepts; bigger blocks are still mapped
        and mallopt(m_trim_threshold, 1 << 30)
        and mallopt(m_top_pad, 64 << 20)
    )
