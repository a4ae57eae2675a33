"""Architecture comparison across the trained models (paper Sec. 4.1 and Fig. 6).

The paper argues from pictures that AlexNet's first layer (11x11 filters, stride 4) is a mix of
extremely high- and low-frequency filters with little mid-frequency coverage, and that its second
layer shows aliasing, while ZFNet's smaller filters (7x7, stride 2) are cleaner and have fewer
dead features. This module measures those properties for every trained model:

- ``high_frequency_fraction``: per first-layer filter, the share of its spectral energy above a
  radial frequency of ``cutoff`` x Nyquist. Each filter's per-channel mean (DC) is removed, the
  filter is zero-padded to ``pad`` x ``pad``, and the power |FFT|^2 is summed over its input
  channels; radial frequency r = sqrt(fx^2 + fy^2) / 0.5 (cycles per pixel over Nyquist, so the
  corners of the spectrum reach r = 1.41). A filter is "mostly high-frequency" when that share
  exceeds 0.5. White noise puts about 80% of its energy above the default cutoff 0.5, a smooth
  blob or a low-frequency edge detector almost none; an all-zero filter counts as not
  high-frequency (it is dead instead, which `dead_share` of the first layer reports).
  ``aliasing_energy`` is the same share above 1/stride x Nyquist: the energy a stride-s first
  layer folds back (aliases), 0 for stride 1.
- ``ActivationStats``: streaming, over a split, which feature maps are ever active (> 0 at some
  position of some image; the others are "dead") and the share of zero activations (sparsity).
- ``count_macs``: multiply-accumulates of every Conv2d and Linear for one image at the model's
  input size, by forward hooks; forward FLOPs are reported as 2 x MACs.
- ``layer_geometry``: kernel, stride, pooling, receptive field and output size per analysis
  layer, read from the modules and `convviz.receptive`.

Entry point: ``compare_models`` (rule compare).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from convviz.analysis import image_batches, load_for_analysis, open_split, resolve_device, seeded_sample, with_oom_retry
from convviz.layer_features import observe_layers
from convviz.models.registry import get_spec
from convviz.receptive import receptive_fields

COMPARE_COLUMNS = ["model", "layer", "metric", "value"]
GEOMETRY_COLUMNS = ["model", "layer", "kernel", "conv_stride", "pooling", "rf_px", "jump_px", "output_size", "channels"]
WHOLE_MODEL = "all"  # the `layer` of whole-model metrics (accuracy, parameters, FLOPs)
MOSTLY = 0.5  # a filter is "mostly high-frequency" above this share of its energy


# ------------------------------------------------------------------------- first-layer filters


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The network's first Conv2d (the layer of Fig. 6(a)-(b))."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer")
    return conv


def first_layer_filters(model: nn.Module) -> torch.Tensor:
    """Weights [C_out, C_in, k, k] of the network's first Conv2d."""
    return first_conv(model).weight.detach().float().cpu()


def normalise_filters(filters: torch.Tensor) -> np.ndarray:
    """Each filter [C_in, k, k] min-max scaled to 0-255 on its own (as the paper displays them);
    a constant filter becomes mid-grey. Returns uint8 [C_out, 3, k, k] (C_in 1 is repeated)."""
    w = filters.float()
    if w.shape[1] == 1:
        w = w.repeat(1, 3, 1, 1)
    lo = w.flatten(1).amin(1)[:, None, None, None]
    hi = w.flatten(1).amax(1)[:, None, None, None]
    span = hi - lo
    shown = torch.where(span > 0, (w - lo) / span.clamp_min(1e-12), torch.full_like(w, 0.5))
    return (shown[:, :3] * 255).round().to(torch.uint8).numpy()


def filter_power_spectrum(filters: torch.Tensor, pad: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(power [C_out, pad, pad], radial frequency r [pad, pad] in units of Nyquist) of each
    filter with its per-channel mean removed, summed over input channels."""
    k = filters.shape[-1]
    if pad < k:
        raise ValueError(f"pad {pad} is smaller than the {k}x{k} filters")
    w = filters.float() - filters.float().mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(w, s=(pad, pad)).abs().pow(2).sum(dim=1)
    freq = torch.fft.fftfreq(pad)
    radius = torch.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2) / 0.5
    return power.numpy(), radius.numpy()


def high_frequency_fraction(filters: torch.Tensor, cutoff: float = 0.5, pad: int = 32) -> np.ndarray:
    """Share [C_out] of each filter's (DC-free) spectral energy at radial frequency > cutoff x
    Nyquist; 0 for an all-zero filter."""
    power, radius = filter_power_spectrum(filters, pad)
    total = power.sum(axis=(1, 2))
    high = power[:, radius > cutoff].sum(axis=1)
    return np.where(total > 1e-20, high / np.maximum(total, 1e-30), 0.0)


def aliasing_energy(filters: torch.Tensor, stride: int, pad: int = 32) -> np.ndarray:
    """Share [C_out] of each filter's (DC-free) energy above the Nyquist frequency of its
    output sampling (radial r > 1 / stride): what a stride-s convolution aliases (Sec. 4.1)."""
    return high_frequency_fraction(filters, 1.0 / stride, pad)


def radial_profile(filters: torch.Tensor, pad: int = 32, bins: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(bin centres in units of Nyquist, mean over filters of each filter's energy share per
    radial bin), for the spectrum figure. Bins cover r in [0, 1.5)."""
    power, radius = filter_power_spectrum(filters, pad)
    total = np.maximum(power.sum(axis=(1, 2), keepdims=True), 1e-30)
    share = power / total
    edges = np.linspace(0, 1.5, bins + 1)
    which = np.digitize(radius, edges) - 1
    profile = np.array([share[:, which == b].sum(axis=1).mean() for b in range(bins)])
    return (edges[:-1] + edges[1:]) / 2, profile


# ------------------------------------------------------------------------- activations


class ActivationStats:
    """Streaming per-layer statistics of post-ReLU feature maps over a split.

    add(layer, output [B, C, h, w] or [B, C]) per batch; result() gives, per layer, the number
    of channels, the share of dead channels (never > 0 at any position of any image seen) and
    the sparsity (share of activations <= 0 over all images, channels and positions).
    """

    def __init__(self) -> None:
        self._active: dict[str, torch.Tensor] = {}
        self._zeros: dict[str, int] = {}
        self._total: dict[str, int] = {}

    def add(self, layer: str, output: torch.Tensor) -> None:
        out = output.detach()
        positive = out > 0
        fired = positive.transpose(0, 1).flatten(1).any(dim=1).cpu()  # [C]
        if layer in self._active:
            self._active[layer] |= fired
        else:
            self._active[layer] = fired
        self._zeros[layer] = self._zeros.get(layer, 0) + int(out.numel() - positive.sum())
        self._total[layer] = self._total.get(layer, 0) + out.numel()

    def result(self) -> dict[str, dict[str, float]]:
        return {
            layer: {
                "channels": int(active.numel()),
                "dead_channels": int((~active).sum()),
                "dead_share": float((~active).float().mean()),
                "sparsity": self._zeros[layer] / self._total[layer],
            }
            for layer, active in self._active.items()
        }


def activation_pass(model: nn.Module, model_name: str, dataset, batch_size: int, device, log=print) -> tuple[dict, dict]:
    """One pass over ``dataset``: ({layer: ActivationStats result}, {"top1", "top5"} of the
    model's own predictions, fractions)."""

    def work(size: int):
        stats = ActivationStats()
        correct1 = correct5 = 0
        with torch.inference_mode(), observe_layers(model, model_name, None, stats.add):
            for images, index in image_batches(dataset, size):
                logits = model(images.to(device)).float().cpu()
                labels = dataset.labels[index]
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                correct1 += int((top[:, 0] == labels).sum())
                correct5 += int((top == labels[:, None]).any(dim=1).sum())
        return stats.result(), {"top1": correct1 / len(dataset), "top5": correct5 / len(dataset)}

    return with_oom_retry(work, batch_size, log, what=f"compare {model_name}")


# ------------------------------------------------------------------------- cost and geometry


def count_macs(model: nn.Module, input_size: int, in_channels: int = 3) -> dict[str, int]:
    """{"macs", "flops", "params"} of one forward pass of a [1, in_channels, S, S] image.

    MACs: for each Conv2d, output elements x (C_in / groups) x k_h x k_w; for each Linear,
    output elements x in_features. FLOPs = 2 x MACs (a multiply and an add). Other layers
    (ReLU, pooling, BatchNorm, normalisation) are not counted, as in the usual convention.
    """
    macs = 0

    def conv_hook(module: nn.Conv2d, _args, output):
        nonlocal macs
        kh, kw = module.kernel_size
        macs += output[0].numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _args, output):
        nonlocal macs
        macs += output[0].numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, input_size, input_size, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {"macs": int(macs), "flops": 2 * int(macs), "params": int(sum(p.numel() for p in model.parameters()))}


def _square(value) -> int:
    return int(value[0] if isinstance(value, tuple) else value)


def _pooling(module: nn.Module, out_shape: tuple) -> str:
    """'max 3x3/2' for a pooling window, 'adaptive avg to 6x6' for adaptive pooling."""
    kind = "max" if isinstance(module, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)) else "avg"
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return f"adaptive {kind} to {out_shape[-2]}x{out_shape[-1]}"
    k = _square(module.kernel_size)
    return f"{kind} {k}x{k}/{_square(module.stride if module.stride is not None else module.kernel_size)}"


def layer_geometry(model: nn.Module, model_name: str, input_size: int) -> pd.DataFrame:
    """One row per analysis layer: the ops between the previous analysis layer and this one.

    kernel: the largest conv kernel of that segment ("11x11"), or "fc" for a fully connected
    layer; conv_stride: the stride of that conv; pooling: the pooling windows of the segment
    ("max 3x3/2"); rf_px: receptive field side; jump_px: input pixels between neighbouring
    units (0: every unit sees the whole image); output_size: "h x w"; channels.
    """
    events: list[tuple[str, nn.Module | str, tuple]] = []
    ops = (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)

    def op_hook(module, _args, output):
        events.append(("op", module, tuple(output.shape)))

    handles = [m.register_forward_hook(op_hook) for m in model.modules() if isinstance(m, ops)]
    param = next(model.parameters())
    shapes: dict[str, tuple] = {}

    def mark(layer, output):
        events.append(("layer", layer, tuple(output.shape)))
        shapes[layer] = tuple(output.shape)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), observe_layers(model, model_name, None, mark) as names:
            model(torch.zeros(1, 3, input_size, input_size, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    fields = receptive_fields(model, names, input_size, model_name)

    rows, segment = [], []
    for kind, what, shape in events:
        if kind == "op":
            segment.append((what, shape))
            continue
        layer = what
        convs = [m for m, _ in segment if isinstance(m, nn.Conv2d)]
        linears = [m for m, _ in segment if isinstance(m, nn.Linear)]
        if convs:
            k = max(_square(m.kernel_size) for m in convs)
            stride = max(_square(m.stride) for m in convs if _square(m.kernel_size) == k)
            kernel = f"{k}x{k}"
        elif linears:
            kernel, stride = "fc", 0
        else:
            kernel, stride = "-", 0
        pools = [_pooling(m, shape) for m, shape in segment if not isinstance(m, (nn.Conv2d, nn.Linear))]
        rf = fields[layer]
        h, w = rf.output_size
        rows.append(
            {
                "model": model_name,
                "layer": layer,
                "kernel": kernel,
                "conv_stride": int(stride),
                "pooling": ", ".join(pools),
                "rf_px": int(rf.size),
                "jump_px": int(rf.stride),
                "output_size": f"{h}x{w}",
                "channels": int(shapes[layer][1]),
            }
        )
        segment = []
    return pd.DataFrame(rows, columns=GEOMETRY_COLUMNS)


# ------------------------------------------------------------------------- top-9 panels


def top9_panel(arrays: Mapping[str, np.ndarray], layer: str, maps: int, seed: int, model_name: str) -> tuple[np.ndarray, int, int] | None:
    """(one HWC uint8 image of `maps` seeded feature maps' top-9 projections, each map a 3x3
    block, maps shown, maps projected) from a top9_arrays.npz mapping; None if the layer was
    not projected. The subset is seeded by (seed, model, layer), its size is the same for every
    model (fewer only where fewer maps were projected)."""
    from convviz.display import mosaic

    key = f"{layer}__projections"
    if key not in arrays:
        return None
    projections = np.asarray(arrays[key])  # [N, 9, 3, R, R]
    if projections.ndim != 5 or projections.shape[2] != 3:
        raise ValueError(f"{key} has shape {projections.shape}; expected [maps, 9, 3, R, R]")
    n, per_map = projections.shape[:2]
    picks = seeded_sample(seed, n, maps, salt=f"compare:{model_name}:{layer}")
    side = math.ceil(math.sqrt(per_map))
    blocks = np.stack([mosaic(projections[i], side, side, pad=1, fill=255).transpose(2, 0, 1) for i in picks])
    cols = math.ceil(math.sqrt(len(picks)))
    rows = math.ceil(len(picks) / cols)
    return mosaic(blocks, rows, cols, pad=4, fill=255), len(picks), n


# ------------------------------------------------------------------------- figures


def plot_first_layer_filters(filters: dict[str, torch.Tensor], geometry: pd.DataFrame, hf_share: dict[str, float], path) -> None:
    """Fig. 6(a)-(b) for every model: first-layer filters, each min-max normalised on its own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from convviz.display import mosaic
    from convviz.io import save_figure

    names = list(filters)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        tiles = normalise_filters(filters[name])
        cols = math.ceil(math.sqrt(len(tiles)))
        ax.imshow(mosaic(tiles, math.ceil(len(tiles) / cols), cols, pad=1, fill=255), interpolation="nearest")
        row = geometry[(geometry["model"] == name)].iloc[0]
        ax.set_title(
            f"{name} {row['layer']}: {len(tiles)} filters {row['kernel']}/{row['conv_stride']}\n"
            f"{100 * hf_share[name]:.0f}% mostly high-frequency",
            fontsize=10,
        )
        ax.axis("off")
    fig.suptitle("First-layer filters, each normalised on its own (cf. Fig. 6(a)-(b))")
    save_figure(fig, path)


def plot_filter_spectra(filters: dict[str, torch.Tensor], cutoff: float, pad: int, path) -> None:
    """Mean radial energy profile of each model's first-layer filters, with the cut-off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from convviz.io import save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, w in filters.items():
        centres, profile = radial_profile(w, pad)
        ax.plot(centres, profile, marker="o", ms=3, label=f"{name} ({w.shape[-1]}x{w.shape[-1]})")
    ax.axvline(cutoff, color="k", ls=":", label=f"cut-off {cutoff} x Nyquist")
    ax.set(xlabel="radial frequency (x Nyquist, 0.5 cycles/pixel)", ylabel="share of filter energy (mean over filters)",
           title="Spectral energy of first-layer filters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_top9_side_by_side(panels: dict[str, list[tuple[str, tuple | None]]], path) -> None:
    """Rows: models; columns: their first and second analysis layers; each cell the top-9
    projections of a seeded subset of feature maps (cf. Fig. 6(c)-(e))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from convviz.io import save_figure

    names = list(panels)
    cols = max(len(v) for v in panels.values())
    fig, axes = plt.subplots(len(names), cols, figsize=(5 * cols, 5 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(panels[name]):
                continue
            layer, panel = panels[name][c]
            if panel is None:
                ax.text(0.5, 0.5, f"{name} {layer}:\nnot in the top9 outputs\n(top9.layers)", ha="center", va="center")
                continue
            image, shown, projected = panel
            ax.imshow(image, interpolation="nearest")
            ax.set_title(f"{name} {layer}: top-9 of {shown} maps (seeded, of {projected} projected)", fontsize=10)
    fig.suptitle("Top-9 deconvnet projections, first and second layer of each model (cf. Fig. 6(c)-(e))")
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------- summary


def summarise(table: pd.DataFrame, cutoff: float) -> dict:
    """The comparison's verdict, derived from compare.parquet's numbers only."""
    def metric(name, layer=None):
        rows = table[table["metric"] == name]
        if layer is not None:
            rows = rows[rows["layer"] == layer]
        return rows.set_index("model")["value"]

    models = list(dict.fromkeys(table["model"]))
    first = {m: table[(table["model"] == m) & (table["metric"] == "hf_share")]["layer"].iloc[0] for m in models}
    per_layer = table[table["layer"] != WHOLE_MODEL]
    dead = {}
    for m in models:
        rows = per_layer[per_layer["model"] == m].pivot(index="layer", columns="metric", values="value")
        dead[m] = float(rows["dead_channels"].sum() / rows["channels"].sum())
    top1, hf = metric("val_top1", WHOLE_MODEL), metric("hf_share")
    summary = {
        "hf_cutoff_x_nyquist": cutoff,
        "models": {
            m: {
                "first_layer": first[m],
                "val_top1": float(top1[m]),
                "val_top5": float(metric("val_top5", WHOLE_MODEL)[m]),
                "params": int(metric("params", WHOLE_MODEL)[m]),
                "gflops": float(metric("flops", WHOLE_MODEL)[m]) / 1e9,
                "first_layer_hf_share": float(hf[m]),
                "first_layer_dead_share": float(metric("dead_share", first[m]).get(m, np.nan)),
                "dead_share_all_layers": dead[m],
            }
            for m in models
        },
        # Ties go to the model listed first in the config.
        "best_model": max(models, key=lambda m: (top1[m], -models.index(m))),
        "cleanest_first_layer": min(models, key=lambda m: (hf[m], models.index(m))),
        "fewest_dead_units": min(models, key=lambda m: (dead[m], models.index(m))),
    }
    if {"alexnet", "zfnet"} <= set(models):
        z, a = summary["models"]["zfnet"], summary["models"]["alexnet"]
        summary["zfnet_vs_alexnet"] = {
            "cleaner_first_layer": z["first_layer_hf_share"] < a["first_layer_hf_share"],
            "fewer_dead_units": z["dead_share_all_layers"] < a["dead_share_all_layers"],
        }
    return summary


def summary_markdown(summary: dict) -> str:
    """A few sentences and a table for the report, every number from `summary`."""
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    models = summary["models"]
    lines = [
        f"Best validation top-1: **{summary['best_model']}** ({pct(models[summary['best_model']]['val_top1'])}).",
        f"Cleanest first-layer filters: **{summary['cleanest_first_layer']}** "
        f"({pct(models[summary['cleanest_first_layer']]['first_layer_hf_share'])} of its filters put most of their "
        f"energy above {summary['hf_cutoff_x_nyquist']} x Nyquist).",
        f"Fewest dead feature maps (never active on the validation split, all analysis layers): "
        f"**{summary['fewest_dead_units']}** ({pct(models[summary['fewest_dead_units']]['dead_share_all_layers'])}).",
    ]
    if "zfnet_vs_alexnet" in summary:
        z, a = models["zfnet"], models["alexnet"]
        verdict = summary["zfnet_vs_alexnet"]

        def versus(key: str, better: str) -> str:
            if math.isclose(z[key], a[key]):
                return f"{pct(z[key])} vs {pct(a[key])} (no difference)"
            return f"{pct(z[key])} vs {pct(a[key])} (ZFNet {better if z[key] < a[key] else 'worse'})"

        outcome = ("holds here" if all(verdict.values()) else "holds only in part here" if any(verdict.values())
                   else "does not hold here")
        lines.append(
            "ZFNet vs AlexNet (the paper's Sec. 4.1 argument that ZFNet's smaller, less strided first layer gives "
            f"cleaner filters and fewer dead features): first-layer filters mostly high-frequency "
            f"{versus('first_layer_hf_share', 'cleaner')}, dead feature maps {versus('dead_share_all_layers', 'fewer')}; "
            f"the claim {outcome}."
        )
    lines += [
        "",
        "| model | val top-1 | val top-5 | parameters | GFLOPs | first-layer filters mostly high-frequency | dead maps (first layer) | dead maps (all layers) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, v in models.items():
        star = " (best)" if m == summary["best_model"] else ""
        lines.append(
            f"| {m}{star} | {pct(v['val_top1'])} | {pct(v['val_top5'])} | {v['params']:,} | {v['gflops']:.3f} | "
            f"{pct(v['first_layer_hf_share'])} | {pct(v['first_layer_dead_share'])} | {pct(v['dead_share_all_layers'])} |"
        )
    return "\n".join(lines) + "\n"


def geometry_markdown(geometry: pd.DataFrame) -> str:
    lines = ["| model | layer | kernel | conv stride | pooling | receptive field (px) | jump (px) | output | channels |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in geometry.itertuples(index=False):
        lines.append(f"| {row.model} | {row.layer} | {row.kernel} | {row.conv_stride or '-'} | {row.pooling or '-'} | "
                     f"{row.rf_px} | {row.jump_px or '-'} | {row.output_size} | {row.channels} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- the rule


@dataclass
class CompareOutputs:
    table: Path
    geometry: Path
    geometry_md: Path
    filters: Path
    spectra: Path
    top9: Path
    summary_md: Path
    summary_json: Path


def compare_models(
    checkpoints: Mapping[str, str | Path],
    top9_arrays: Mapping[str, str | Path],
    data_dir: str | Path,
    outputs: CompareOutputs,
    settings: dict,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Rule compare: measure every model, write compare.parquet, the geometry table, the figures
    and the summary. Returns compare.parquet's table (model, layer, metric, value)."""
    from convviz.io import write_json, write_parquet

    t0 = time.time()
    device = resolve_device(settings["device"])
    cutoff, pad = float(settings["hf_cutoff"]), int(settings["hf_pad"])
    split = None if settings["split"] == "all" else settings["split"]
    rows, geometries, filters, hf_share, panels = [], [], {}, {}, {}
    for name, checkpoint in checkpoints.items():
        t_model = time.time()
        model, meta = load_for_analysis(checkpoint, device)
        size = int(meta["input_size"])
        spec = get_spec(name)
        dataset = open_split(data_dir, split, size)
        stats, accuracy = activation_pass(model, name, dataset, settings["analysis"]["batch_size"], device, log)
        cost = count_macs(model, size)
        filters[name] = first_layer_filters(model)
        hf = high_frequency_fraction(filters[name], cutoff, pad)
        hf_share[name] = float((hf > MOSTLY).mean())
        aliased = aliasing_energy(filters[name], _square(first_conv(model).stride), pad)
        geometry = layer_geometry(model, name, size)
        geometries.append(geometry)
        for layer, values in stats.items():
            rows += [(name, layer, metric, float(values[metric])) for metric in ("channels", "dead_channels", "dead_share", "sparsity")]
        rows += [
            (name, spec.first_conv, "hf_share", hf_share[name]),
            (name, spec.first_conv, "hf_energy_mean", float(hf.mean())),
            (name, spec.first_conv, "aliasing_energy_mean", float(aliased.mean())),
            (name, WHOLE_MODEL, "val_top1", accuracy["top1"]),
            (name, WHOLE_MODEL, "val_top5", accuracy["top5"]),
            (name, WHOLE_MODEL, "params", float(cost["params"])),
            (name, WHOLE_MODEL, "macs", float(cost["macs"])),
            (name, WHOLE_MODEL, "flops", float(cost["flops"])),
            (name, WHOLE_MODEL, "input_size", float(size)),
        ]
        arrays = np.load(top9_arrays[name])
        layers = list(spec.layers)[:2]
        panels[name] = [(layer, top9_panel(arrays, layer, settings["top9_maps"], settings["seed"], name)) for layer in layers]
        dead = sum(v["dead_channels"] for v in stats.values())
        log(f"{name}: val top-1 {accuracy['top1']:.3f}, {cost['params']:,} parameters, {cost['flops'] / 1e9:.3f} GFLOPs "
            f"at {size}px, {hf_share[name]:.0%} of {len(hf)} first-layer filters mostly high-frequency, "
            f"{dead} dead feature maps over {len(dataset)} images ({time.time() - t_model:.1f}s)")
    table = pd.DataFrame(rows, columns=COMPARE_COLUMNS)
    geometry = pd.concat(geometries, ignore_index=True)

    plot_first_layer_filters(filters, geometry.groupby("model", sort=False).head(1), hf_share, outputs.filters)
    plot_filter_spectra(filters, cutoff, pad, outputs.spectra)
    plot_top9_side_by_side(panels, outputs.top9)
    summary = summarise(table, cutoff)
    write_parquet(geometry, outputs.geometry)
    with_text(outputs.geometry_md, geometry_markdown(geometry))
    write_json(summary, outputs.summary_json)
    with_text(outputs.summary_md, summary_markdown(summary))
    write_parquet(table, outputs.table)
    log(f"done: compared {len(checkpoints)} models in {time.time() - t0:.1f}s; best {summary['best_model']}, "
        f"cleanest first layer {summary['cleanest_first_layer']}, fewest dead units {summary['fewest_dead_units']}")
    return table


def with_text(path, text: str) -> None:
    """Write a text file atomically."""
    from convviz.io import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
