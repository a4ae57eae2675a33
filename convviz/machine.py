"""What the local machine offers the workflow (read by rules/common.smk, without importing torch)."""

from __future__ import annotations

import os

# Device files a GPU shows on Linux: NVIDIA's first card, ROCm's kernel driver.
GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/kfd")


def local_gpus() -> int:
    """1 when this machine shows a GPU device, else 0: the `gpu` units a GPU-able rule claims
    locally (profiles/default offers one, so one GPU job runs at a time)."""
    return int(any(os.path.exists(path) for path in GPU_DEVICE_FILES))
