"""Batched top-9 projection vs Captum's NeuronDeconvolution called once per feature map.

For one layer per model, the top-9 units (image, channel, y, x) of the first `--maps` feature maps
are mined over `--images` images; then every map's 9 units are projected to pixels
  ours:    convviz.deconv.project, all maps x 9 units at once (the method rule top9 uses: explicit
           for plain stacks, the graph deconvnet for resnet50), signal "one";
  captum:  NeuronDeconvolution(model, layer).attribute(the map's 9 images, neuron_selector = each
           image's unit) once per map, the model's parameters frozen as ours are.
Both produce the same [maps*9, 3, S, S] projections: the benchmark checks that (max relative
difference) before timing. Captum passes contrast normalisation (zfnet's LRN) by its gradient,
where our deconvnet passes it unchanged as the paper does; so on models with LRN the check
compares Captum with our general method in Captum's convention (contrast_norm="gradient"), and
that variant is timed too ("ours_captum_convention_s"). Timings are the best of --repeats runs, alternating which goes first,
in one process on the same data. Goal: ours at least 5x faster on CPU (10x on CUDA).

    .venv/bin/python benchmarks/projection_speed.py [--device cpu|cuda] [--models lenet ...]
        [--maps 64] [--images 300] [--threads 2]
Results go to results/benchmarks/projection_speed_<device>.json (the report's benchmarks section shows them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from convviz.deconv import project  # noqa: E402
from convviz.io import write_json  # noqa: E402
from convviz.machine import device_name, full_precision_float32, matmul_rate  # noqa: E402
from convviz.models.registry import build_model, layer_modules  # noqa: E402
from convviz.top9 import choose_method  # noqa: E402
from convviz.topk import mine_top9  # noqa: E402

ARCH = {"lenet": {}, "alexnet": {"fc_width": 512}, "zfnet": {"fc_width": 512}, "resnet50": {}}
LAYER = {"lenet": "conv2", "alexnet": "conv5", "zfnet": "conv5", "resnet50": "layer3"}
GOAL = {"cpu": 5.0, "cuda": 10.0}


def load_model(name: str, device: torch.device):
    """The trained model from results/ when the default run has made it, else a seeded random one."""
    path = Path(__file__).resolve().parent.parent / "results" / "models" / name / "final.pt"
    if path.exists():
        from convviz.analysis import load_for_analysis

        model, _ = load_for_analysis(path, device)
        return model, "trained"
    torch.manual_seed(0)
    return build_model(name, 10, 64, ARCH[name]).to(device).eval().requires_grad_(False), "random init"


def top9_units(model, name, layer, images, maps, device):
    mined = mine_top9(model, [layer], [(images, torch.arange(len(images)))], device=device, log=lambda m: None, model_name=name)
    _, index, ys, xs = (t[:maps] for t in mined[layer])
    return index, ys, xs


def ours(model, name, layer, images, index, ys, xs, method, contrast_norm="identity"):
    used, rows = torch.unique(index.flatten(), return_inverse=True)
    chan = torch.arange(index.shape[0]).repeat_interleave(index.shape[1])
    units = torch.stack([rows, chan, ys.flatten(), xs.flatten()], 1)
    return project(model, layer, images[used], units, method=method, spec=name, signal="one", contrast_norm=contrast_norm)


def captum(model, module, images, index, ys, xs):
    from captum.attr import NeuronDeconvolution

    deconv = NeuronDeconvolution(model, module)
    out = []
    for c in range(index.shape[0]):
        batch = images[index[c]]
        y, x = ys[c].to(images.device), xs[c].to(images.device)
        rows = torch.arange(len(batch), device=images.device)

        def selector(acts, c=c, y=y, x=x, rows=rows):
            return acts[rows, c, y, x]

        out.append(deconv.attribute(batch, neuron_selector=selector).detach())
    return torch.cat(out)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=list(LAYER))
    parser.add_argument("--maps", type=int, default=64)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON file (default results/benchmarks/projection_speed_<device>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    full_precision_float32()  # what the analysis rules run (no TF32 on CUDA), for Captum and us alike
    images = torch.randn(args.images, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    default_out = Path(__file__).resolve().parent.parent / "results" / "benchmarks" / f"projection_speed_{device.type}.json"
    out_path = Path(args.out) if args.out else default_out
    for name in args.models:
        model, weights = load_model(name, device)
        layer = LAYER[name]
        module = layer_modules(model, name, [layer])[layer]
        method = choose_method(name, "auto", model)
        index, ys, xs = top9_units(model, name, layer, images, args.maps, device)
        ours_fn = lambda: ours(model, name, layer, images, index, ys, xs, method)  # noqa: E731
        captum_fn = lambda: captum(model, module, images, index, ys, xs)  # noqa: E731
        has_lrn = any(isinstance(m, torch.nn.LocalResponseNorm) for m in model.modules())
        same_fn = (lambda: ours(model, name, layer, images, index, ys, xs, "general", "gradient")) if has_lrn else ours_fn  # noqa: E731
        rate_before = matmul_rate(device)
        a, b = same_fn(), captum_fn()
        rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
        best = {"ours": float("inf"), "captum": float("inf"), "same": float("inf")}
        for r in range(args.repeats):
            order = [("ours", ours_fn), ("captum", captum_fn)] + ([("same", same_fn)] if has_lrn else [])
            for key, fn in order if r % 2 == 0 else order[::-1]:
                best[key] = min(best[key], timed(fn, device)[0])
        units = index.numel()
        row = {
            "model": name,
            "weights": weights,
            "layer": layer,
            "method": method,
            "maps": int(index.shape[0]),
            "units": units,
            "ours_s": round(best["ours"], 4),
            "captum_s": round(best["captum"], 4),
            "speedup": round(best["captum"] / best["ours"], 2),
            "ours_captum_convention_s": round(best["same"], 4) if has_lrn else None,
            "max_rel_diff": rel,
            "goal": GOAL.get(device.type, 5.0),
            "matmul_gmac_per_s_before_after": [rate_before, matmul_rate(device)],
        }
        rows.append(row)
        print(
            f"{name:9s} {layer:7s} {method:8s} {units:5d} units: ours {best['ours']:.3f}s, captum {best['captum']:.3f}s, "
            f"speedup {row['speedup']:.2f}x (goal {row['goal']}x), max rel diff {rel:.1e}"
            + (f"; general+LRN-gradient {best['same']:.3f}s ({best['captum'] / best['same']:.2f}x)" if has_lrn else "")
            + f"; machine {'-'.join(map(str, row['matmul_gmac_per_s_before_after']))} GMAC/s",
            flush=True,
        )
        write_json({"device": device_name(device), "threads": args.threads, "images": args.images, "rows": rows}, out_path)


if __name__ == "__main__":
    main()
