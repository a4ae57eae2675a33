"""Top-k mining overhead: mining every analysis layer vs a plain inference pass.

Both run in one process on the same model, images, batch size and device. Images are random
64x64 tensors already in memory, so nothing but the model and the mining is timed (any data
loading would only dilute the overhead). Goal: mining costs at most 1.15x the plain pass.

    .venv/bin/python benchmarks/mine_overhead.py [--device cpu|cuda] [--models lenet resnet50]
                                                 [--images 2000] [--threads N]

On CUDA mine_top9 runs `convviz.graphed.GraphedMiner` (each batch's forward and mining as one
recorded CUDA graph): the batchwise measure keeps its recordings from repeat to repeat (recording
happens once per pass, on the first batch of each size), the whole passes record anew each time.
Three measurements per model:
  ratio             batch by batch: each batch goes through the plain model and through the
                    LayerMiner that mine_top9 runs, back to back (alternating which goes first);
                    per batch the best wall time over the repeats counts, plus the final merge
                    (`result`). On a shared machine load comes and goes within seconds; this
                    compares both at the machine's quietest, and is the goal's measure.
  whole_pass_ratio  best full mine_top9 pass / best full plain pass, wall time (repeats
                    interleaved): the end-to-end figure, as noisy as the machine.
  cpu_time_ratio    the same whole passes in process CPU time (all threads): insensitive to
                    time spent waiting for a busy machine, but it counts threads spinning.
Mining runs with mine_top9's default thread policy (`convviz.machine.busy_machine_threads`:
one thread for the mining ops when the machine is oversubscribed) unless --mining-threads says
otherwise; each row records the load average, which decides it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from convviz.io import write_json  # noqa: E402
from convviz.models.registry import build_model, resolve_layers  # noqa: E402
from convviz.machine import busy_machine_threads, device_name  # noqa: E402
from convviz.topk import make_miner, mine_top9  # noqa: E402

# As in config.yaml's `architecture` section.
ARCH = {"lenet": {}, "alexnet": {"fc_width": 512}, "zfnet": {"fc_width": 512}, "resnet50": {}}
GOAL = 1.15
MINING_THREADS: int | None | str = "auto"  # --mining-threads


def make_batches(images: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images [B, 3, S, S], image_index [B]) pairs covering `images` once."""
    ids = torch.arange(len(images))
    return [(images[i : i + batch_size], ids[i : i + batch_size]) for i in range(0, len(images), batch_size)]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, dev) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn()."""
    _sync(dev)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(dev)
    return time.perf_counter() - wall, time.process_time() - cpu


def _plain_batch(model, images) -> None:
    with torch.inference_mode():
        model(images)


def plain_pass(model, batches, dev) -> None:
    """One inference pass (same mode, context and transfers as mine_top9)."""
    model.eval()
    with torch.inference_mode():
        for images, ids in batches:
            ids.to(dev, non_blocking=True)
            model(images.to(dev, non_blocking=True))


def mine_pass(model, name, batches, dev, threads=MINING_THREADS) -> None:
    """mine_top9 over every analysis layer, results on the host included."""
    layers = resolve_layers(name, None)
    mine_top9(model, layers, batches, k=9, device=dev, log=lambda m: None, model_name=name, mining_threads=threads)


def _mine_batch(miner: LayerMiner, images, ids) -> None:
    # Hooks on for this batch only, so the plain batches run the model without them.
    with miner:
        miner.feed(images, ids)


def batchwise(model, name, batches, dev, repeats: int) -> tuple[float, float]:
    """(plain, mine) wall seconds for the pass: per batch the best of `repeats` back-to-back runs."""
    plain = [[] for _ in batches]
    mine = [[] for _ in batches]
    finish = []
    miner = None
    for r in range(repeats):
        if hasattr(miner, "reset"):
            miner.reset()  # CUDA: the graphs recorded in the first repeat are kept
        else:
            miner = make_miner(model, resolve_layers(name, None), k=9, model_name=name, mining_threads=MINING_THREADS, device=dev)
        for i, (images, ids) in enumerate(batches):
            images, ids = images.to(dev), ids.to(dev)
            runs = [(plain[i], lambda: _plain_batch(model, images)), (mine[i], lambda: _mine_batch(miner, images, ids))]
            for times, fn in runs if (i + r) % 2 == 0 else runs[::-1]:
                times.append(_timed(fn, dev)[0])
        finish.append(_timed(miner.result, dev)[0])
    return sum(map(min, plain)), sum(map(min, mine)) + min(finish)


def whole_passes(model, name, batches, dev, repeats: int) -> tuple[list, list]:
    """[(wall, cpu)] per repeat for plain and mining passes, alternating which runs first."""
    plain, mine = [], []
    for r in range(repeats):
        runs = [(plain, lambda: plain_pass(model, batches, dev)), (mine, lambda: mine_pass(model, name, batches, dev))]
        for times, fn in runs if r % 2 == 0 else runs[::-1]:
            times.append(_timed(fn, dev))
    return plain, mine


def measure(name: str, batches, dev, repeats: int, image_size: int) -> dict:
    load_before = _load()
    torch.manual_seed(0)
    model = build_model(name, 10, image_size, ARCH[name]).to(dev).eval()
    plain_pass(model, batches[:2], dev)  # warm-up: allocator, kernel selection
    mine_pass(model, name, batches[:2], dev)
    batch_plain, batch_mine = batchwise(model, name, batches, dev, repeats)
    plain, mine = whole_passes(model, name, batches, dev, repeats)
    plain_wall, plain_cpu = zip(*plain)
    mine_wall, mine_cpu = zip(*mine)
    ratio = batch_mine / batch_plain
    return {
        "model": name,
        "layers": resolve_layers(name, None),
        "batchwise_plain_s": round(batch_plain, 3),
        "batchwise_mine_s": round(batch_mine, 3),
        "ratio": round(ratio, 3),
        "plain_s": [round(t, 3) for t in plain_wall],
        "mine_s": [round(t, 3) for t in mine_wall],
        "whole_pass_ratio": round(min(mine_wall) / min(plain_wall), 3),
        "median_pair_ratio": round(statistics.median(m / p for m, p in zip(mine_wall, plain_wall)), 3),
        "cpu_time_ratio": round(min(mine_cpu) / min(plain_cpu), 3),
        "meets_goal": ratio <= GOAL,
        "mining_threads": MINING_THREADS,
        "auto_choice_now": busy_machine_threads(),
        "load_average_before_after": [load_before, _load()],
    }


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=list(ARCH))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--mining-threads", default="auto", help="auto (default), none (torch's), or a count")
    parser.add_argument("--out", default="results/benchmarks/mine_overhead.json")
    args = parser.parse_args()
    global MINING_THREADS
    MINING_THREADS = {"auto": "auto", "none": None}.get(args.mining_threads.lower(), None)
    if args.mining_threads.lower() not in ("auto", "none"):
        MINING_THREADS = int(args.mining_threads)
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    images = torch.rand(args.images, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    batches = make_batches(images, args.batch_size)
    summary = {
        "device": device_name(dev),
        "torch": torch.__version__,
        "images": args.images,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "goal_ratio": GOAL,
        "rows": [],
    }
    for name in args.models:
        row = measure(name, batches, dev, args.repeats, args.image_size)
        summary["rows"].append(row)
        write_json(summary, args.out)  # after every model: a long run that dies keeps what it measured
        print(
            f"{name}: ratio {row['ratio']} {'ok' if row['meets_goal'] else 'OVER ' + str(GOAL)} (batchwise plain "
            f"{row['batchwise_plain_s']:.2f}s, mine {row['batchwise_mine_s']:.2f}s); whole passes: wall "
            f"{row['whole_pass_ratio']} (plain {min(row['plain_s']):.2f}s), cpu time {row['cpu_time_ratio']}",
            flush=True,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
