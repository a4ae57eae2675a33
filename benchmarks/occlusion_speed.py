"""Occlusion sweep throughput: our sweep (three maps) vs Captum's Occlusion (one map).

Per model, on one image, with the same occluder window, stride, occluder colour (the dataset's
mean colour: 0 after normalisation) and batch (Captum's perturbations_per_eval = our positions per
batch), in one process:
  captum       Occlusion(model).attribute(image, sliding_window_shapes=(3, k, k), strides=(3, s, s),
               target=label, baselines=0, perturbations_per_eval=B): one attribution map;
  incremental  convviz.occlusion.occlusion_sweep(method="incremental"), what rule occlusion runs:
               the top conv map's total activation, P(true) and the most probable class per
               position, each layer recomputing only what the occluder reaches;
  batched      the same sweep forwarding whole occluded images (plain batching, for reference).
Before timing, the incremental maps are checked against the batched ones (max |P(true)
difference| is recorded). Throughput = occluder positions / second; per method the best wall time
of --repeats runs, alternating the order (`ratio`); also the median over repeats of Captum's time
over ours in the same repeat (`median_pair_ratio`, steadier on a shared machine) and the ratio of
the best process CPU times (`cpu_time_ratio`, insensitive to waiting for a busy CPU). Building the
incremental engine (tracing, folding) happens once per model, like constructing Captum's
Occlusion, and is reported separately (`engine_build_s`). On CUDA a fourth run:
  graphed      the batched sweep recorded once as a CUDA graph and replayed (method "graphed",
               what the rule's method "auto" runs on a GPU; recording time `graph_record_s`).
`ratio` is Captum's time over the time of the method "auto" picks on the device (incremental on
the CPU, graphed on CUDA). Every sweep's P(true) is also compared with the batched sweep run in fp32
on the CPU (`max_p_true_difference_<method>_vs_cpu_fp32`). Goal: ratio >= 2.

    .venv/bin/python benchmarks/occlusion_speed.py [--models lenet alexnet zfnet resnet50]
        [--size 16] [--stride 2] [--batch-size 64] [--threads N] [--repeats 5] [--device cpu]
Models are the trained ones in results/models/ when the default run has made them (else seeded
random ones); the image is a seeded val image of results/data/source (else random). Defaults
come from config.yaml. Results: results/benchmarks/occlusion_speed.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convviz.io import write_json  # noqa: E402
from convviz.machine import device_name, full_precision_float32, matmul_rate  # noqa: E402
from convviz.models.registry import build_model  # noqa: E402
from convviz.occlusion import make_engine, occluder_positions, occlusion_sweep  # noqa: E402

GOAL = 2.0


def load_model(name: str, arch: dict, image_size: int, device: torch.device):
    path = ROOT / "results" / "models" / name / "final.pt"
    if path.exists():
        from convviz.analysis import load_for_analysis

        model, _ = load_for_analysis(path, device)
        return model, "trained"
    torch.manual_seed(0)
    return build_model(name, 10, image_size, arch).to(device).eval().requires_grad_(False), "random init"


def load_image(image_size: int, seed: int, device: torch.device) -> tuple[torch.Tensor, str]:
    data = ROOT / "results" / "data" / "source"
    if (data / "manifest.parquet").exists():
        from convviz.analysis import open_split, seeded_sample

        val = open_split(data, "val", image_size)
        index = seeded_sample(seed, len(val), 1, salt="occlusion")[0]
        return val.normalise(val.raw(index)).unsqueeze(0).to(device), str(val.manifest.at[index, "image_id"])
    return torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed)).to(device), "random"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> tuple[float, float]:
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(name: str, args, config: dict, device: torch.device) -> dict:
    load_before, rate_before = _load(), matmul_rate(device)
    image_size = config["data"]["image_size"]
    model, origin = load_model(name, config["architecture"].get(name, {}), image_size, device)
    image, image_id = load_image(image_size, config["seed"], device)
    with torch.no_grad():
        label = int(model(image).argmax())
    size, stride, batch = args.size, args.stride, args.batch_size
    positions = len(occluder_positions(image_size, size, stride)) ** 2

    tic = time.perf_counter()
    method, engine = make_engine(model, name, "incremental", log=lambda m: None)
    engine.prepare(image)
    build_s = time.perf_counter() - tic
    graphed = device.type == "cuda"  # off CUDA "graphed" is the batched sweep run eagerly
    if graphed:
        graph_engine = make_engine(model, name, "graphed")[1]
        tic = time.perf_counter()
        occlusion_sweep(model, name, image, label, size, stride, batch, method="graphed", engine=graph_engine)
        _sync(device)
        record_s = time.perf_counter() - tic  # the first sweep records the graph

    from captum.attr import Occlusion

    occlusion = Occlusion(model)
    runs = {
        "captum": lambda: occlusion.attribute(
            image, sliding_window_shapes=(3, size, size), strides=(3, stride, stride), target=label,
            baselines=0.0, perturbations_per_eval=batch,
        ),
        "incremental": lambda: occlusion_sweep(model, name, image, label, size, stride, batch, method=method, engine=engine),
        "batched": lambda: occlusion_sweep(model, name, image, label, size, stride, batch, method="batched"),
    }
    if graphed:
        runs["graphed"] = lambda: occlusion_sweep(model, name, image, label, size, stride, batch, method="graphed", engine=graph_engine)
    ours = "graphed" if graphed else "incremental"  # what method "auto" (the rule) runs on this device
    sweeps = {key: runs[key]() for key in runs if key != "captum"}  # warm-up, and the agreement checks
    runs["captum"]()
    agreement = float(np.abs(sweeps["incremental"].p_true - sweeps["batched"].p_true).max())
    # The oracle: a plain fp32 loop on the CPU; here the batched sweep on the CPU in fp32
    # (on CUDA, convolutions run in TF32 by torch's default, for Captum and us alike).
    reference = sweeps["batched"]
    if device.type != "cpu":
        reference = occlusion_sweep(copy.deepcopy(model).cpu(), name, image.cpu(), label, size, stride, batch, method="batched")
    against_cpu = {f"max_p_true_difference_{key}_vs_cpu_fp32": float(np.abs(m.p_true - reference.p_true).max()) for key, m in sweeps.items()}
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    order = list(runs)
    for r in range(args.repeats):
        for key in order if r % 2 == 0 else order[::-1]:
            w, c = _timed(runs[key], device)
            wall[key].append(w)
            cpu[key].append(c)
    best = {k: min(v) for k, v in wall.items()}
    # Each repeat times Captum and ours back to back: on a shared machine their ratio is steadier
    # than the ratio of the two best times.
    pair_ratio = float(np.median([c / i for c, i in zip(wall["captum"], wall[ours])]))
    return {
        "model": name,
        "weights": origin,
        "image": image_id,
        "positions": positions,
        "method": method if ours == "incremental" else ours,
        "captum_s": round(best["captum"], 4),
        "incremental_s": round(best["incremental"], 4),
        "batched_s": round(best["batched"], 4),
        "captum_positions_per_s": round(positions / best["captum"], 1),
        "incremental_positions_per_s": round(positions / best["incremental"], 1),
        "batched_positions_per_s": round(positions / best["batched"], 1),
        "ratio": round(best["captum"] / best[ours], 2),
        "incremental_ratio": round(best["captum"] / best["incremental"], 2),
        "median_pair_ratio": round(pair_ratio, 2),
        "batched_ratio": round(best["captum"] / best["batched"], 2),
        "cpu_time_ratio": round(min(cpu["captum"]) / min(cpu[ours]), 2),
        "max_p_true_difference": agreement,
        **against_cpu,
        "engine_build_s": round(build_s, 3),
        **({"graphed_s": round(best["graphed"], 4), "graphed_positions_per_s": round(positions / best["graphed"], 1),
            "graphed_ratio": round(best["captum"] / best["graphed"], 2), "graph_record_s": round(record_s, 3)} if graphed else {}),
        "meets_goal": best["captum"] / best[ours] >= GOAL,
        "load_average_before_after": [load_before, _load()],
        "matmul_gmac_per_s_before_after": [rate_before, matmul_rate(device)],
    }


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def main() -> None:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    occ = config.get("occlusion", {})
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(config["models"]))
    parser.add_argument("--size", type=int, default=occ.get("size", 16))
    parser.add_argument("--stride", type=int, default=occ.get("stride", 4))
    parser.add_argument(
        "--batch-size", type=int, default=occ.get("batch_size") or config.get("analysis", {}).get("batch_size", 64)
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "occlusion_speed.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    full_precision_float32()  # what the analysis rules run (no TF32 on CUDA), for Captum and us alike
    summary = {
        "device": device_name(device),
        "torch": torch.__version__,
        "image_size": config["data"]["image_size"],
        "occluder_size": args.size,
        "stride": args.stride,
        "perturbations_per_eval": args.batch_size,
        "repeats": args.repeats,
        "goal_ratio": GOAL,
        "rows": [],
    }
    for name in args.models:
        row = measure(name, args, config, device)
        summary["rows"].append(row)
        write_json(summary, args.out)  # after every model: a long run that dies keeps what it measured
        print(
            f"{name}: {row['positions']} positions; captum {row['captum_positions_per_s']}/s, incremental "
            f"{row['incremental_positions_per_s']}/s (ratio {row['incremental_ratio']}), "
            + (f"graphed {row['graphed_positions_per_s']}/s (ratio {row['graphed_ratio']}), " if "graphed_s" in row else "")
            + f"{row['method']}: ratio {row['ratio']}, {'ok' if row['meets_goal'] else 'UNDER ' + str(GOAL)}; "
            f"median pair ratio {row['median_pair_ratio']}), "
            f"batched {row['batched_positions_per_s']}/s (ratio {row['batched_ratio']}); cpu-time ratio "
            f"{row['cpu_time_ratio']}; max |dP(true)| {row['max_p_true_difference']:.1e}; machine "
            f"{'-'.join(map(str, row['matmul_gmac_per_s_before_after']))} GMAC/s",
            flush=True,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
