"""Occlusion sensitivity (Zeiler & Fergus 2014, Sec. 4.2, Fig. 7).

A square of the dataset's mean colour slides over an image. For every occluder position the
paper records (b) the total activation of one top-layer feature map -- the one with the strongest
response on the unoccluded image --, (d) the classifier's probability of the true class and (e) its
most probable class; (c) shows that feature map projected to pixels by the deconvnet. We record the
same raw quantities per position: no differences to the unoccluded output, no averaging over
overlapping windows (Captum), and no window wraps around the image edge (zennit's `roll`):
occluder positions are the top-left corners 0, stride, 2*stride, ... <= image size - occluder size.

All positions of an image go through one batched sweep. `method="incremental"` runs it with
`convviz.incremental` (each layer recomputes only the region the occluder reaches, on top of the
unoccluded image's cached maps; exact up to float rounding); `method="batched"` forwards whole
occluded images; `method="graphed"` forwards whole occluded images too, but records each batch's
work once as a CUDA graph and replays it (`convviz.graphed`; on a GPU these small models are bound
by kernel launches, not arithmetic). `method="auto"` is "graphed" on CUDA and "incremental"
elsewhere. Models torch.fx cannot trace fall back from "incremental" to "batched".
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from convviz.analysis import load_for_analysis, open_split, resolve_device, seeded_sample, with_oom_retry
from convviz.data.common import load_image
from convviz.deconv import forward_to, project
from convviz.graphed import GraphedSweep
from convviz.incremental import IncrementalInference, Patched, total_per_channel
from convviz.models.registry import get_spec

METHODS = ("incremental", "batched", "graphed")
COLUMNS = ["model", "image_id", "label", "layer", "channel", "y", "x", "fmap_activation", "p_true", "top_class"]
LOCALISATION_COLUMNS = ["model", "images", "boxed_images", "inside", "share_inside", "chance_share"]


# ---------------------------------------------------------------------------------------- the sweep


def occluder_positions(image_size: int, size: int, stride: int) -> np.ndarray:
    """Top-left rows (= columns) of every occluder position: 0, stride, ... <= image_size - size."""
    if not 1 <= size <= image_size:
        raise ValueError(f"occluder size {size} must be between 1 and the image size {image_size}")
    if stride < 1:
        raise ValueError(f"occluder stride must be >= 1, got {stride}")
    return np.arange(0, image_size - size + 1, stride)


@dataclass
class OcclusionMaps:
    """One image's sweep. Maps are [len(ys), len(xs)], indexed by the occluder's top-left (y, x).

    fmap_activation: total activation of feature map `channel` of the top conv layer; p_true:
    softmax probability of class `label`; top_class: the most probable class. The `base_*`
    values are the unoccluded image's.
    """

    ys: np.ndarray
    xs: np.ndarray
    channel: int
    fmap_activation: np.ndarray
    p_true: np.ndarray
    top_class: np.ndarray
    base_fmap_activation: float
    base_p_true: float
    base_top_class: int


def _grid(ys: np.ndarray, xs: np.ndarray, device) -> tuple[Tensor, Tensor]:
    y0, x0 = torch.meshgrid(torch.as_tensor(ys), torch.as_tensor(xs), indexing="ij")
    return y0.flatten().to(device), x0.flatten().to(device)


def occlude(image: Tensor, y0: Tensor, x0: Tensor, size: int, fill: Tensor) -> Tensor:
    """Whole occluded copies [B, C, S, S] of `image` [1, C, S, S]: fill [C] in each square."""
    out = image.repeat(len(y0), 1, 1, 1)
    for b, (y, x) in enumerate(zip(y0.tolist(), x0.tolist())):
        out[b, :, y : y + size, x : x + size] = fill.view(-1, 1, 1)
    return out


def occlusion_sweep(
    model: nn.Module,
    model_name: str,
    image: Tensor,
    label: int,
    size: int,
    stride: int,
    batch_size: int,
    fill: Tensor | None = None,
    method: str = "incremental",
    engine: IncrementalInference | GraphedSweep | None = None,
) -> OcclusionMaps:
    """Slide the occluder over `image` [1, 3, S, S] (normalised) and record the Fig. 7 maps.

    size, stride: occluder side and step in pixels. fill: the occluder's colour, [3] in normalised
    units (default 0: the dataset's mean colour). batch_size: occluder positions per batch.
    engine: an IncrementalInference of `model` watching the top conv layer ("top") for
    method="incremental", a GraphedSweep for method="graphed", reused across images (one is built
    when None).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size (occluder positions per batch) must be at least 1, got {batch_size}")
    spec = get_spec(model_name)
    try:
        top = model.get_submodule(spec.layers[spec.top_conv])
    except AttributeError as err:
        raise ValueError(
            f"the model does not match the registry's {model_name}: it has no {spec.top_conv} at {spec.layers[spec.top_conv]!r} "
            "(pass the registry name of the model's architecture)"
        ) from err
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    classes = heads[-1].out_features if heads else None
    if label < 0 or classes is not None and label >= classes:
        which = f", which has {classes} (0..{classes - 1})" if classes is not None else ""
        raise ValueError(f"label {label} is not a class of the model{which}")
    device = image.device
    fill = torch.zeros(image.shape[1], device=device) if fill is None else fill.to(device)
    ys = occluder_positions(image.shape[-2], size, stride)
    xs = occluder_positions(image.shape[-1], size, stride)
    y0, x0 = _grid(ys, xs, device)
    with torch.no_grad():
        if method == "graphed":
            engine = engine or GraphedSweep(model, top)
            values = engine.run(image, fill, label, y0, x0, size, batch_size)
            # Fig. 7 (b): the feature map with the strongest response on the unoccluded image.
            channel = int(values.base_max.argmax())
            maps = (values.totals[:, channel], values.p_true, values.top_class)
            base_total, base_probs = values.base_totals[channel], values.base_probs
        else:
            if method == "incremental":
                if engine is None:
                    engine = IncrementalInference(model, {"top": spec.layers[spec.top_conv]})
                logits, watched = engine.prepare(image)
                base_map = watched["top"]
            else:
                base_map = forward_to(model, top, image)
                logits = model(image)
            channel = int(base_map[0].flatten(1).amax(1).argmax())  # as above
            base_total, base_probs = base_map[0, channel].sum(), logits.float().softmax(1)[0]
            batches = [
                _one_batch(model, top, image, fill, size, label, channel, method, engine, base_map, y0[s : s + batch_size], x0[s : s + batch_size])
                for s in range(0, len(y0), batch_size)
            ]
            maps = tuple(torch.cat(values) for values in zip(*batches))
        totals, p_true, top_class = (m.cpu() for m in maps)
    shape = (len(ys), len(xs))
    return OcclusionMaps(
        ys=ys,
        xs=xs,
        channel=channel,
        fmap_activation=totals.view(shape).numpy(),
        p_true=p_true.view(shape).numpy(),
        top_class=top_class.view(shape).numpy(),
        base_fmap_activation=float(base_total),
        base_p_true=float(base_probs[label]),
        base_top_class=int(base_probs.argmax()),
    )


def _one_batch(model, top, image, fill, size, label, channel, method, engine, base_map, by, bx):
    """(total activation of the watched map, P(label), most probable class) for occluders at (by, bx)."""
    if method == "incremental":
        window = fill.view(1, -1, 1, 1).expand(len(by), -1, size, size)
        logits, watched = engine.run(Patched(window, by, bx))
        total = total_per_channel(watched["top"], base_map, torch.tensor([channel], device=image.device))[:, 0]
    else:
        acts: list[Tensor] = []
        handle = top.register_forward_hook(lambda m, a, out: acts.append(out[:, channel]))
        try:
            logits = model(occlude(image, by, bx, size, fill))
        finally:
            handle.remove()
        total = acts[0].flatten(1).sum(1)
    probs = logits.float().softmax(1)
    return total.float(), probs[:, label], probs.argmax(1)


def make_engine(model: nn.Module, model_name: str, method: str, log: Callable[[str], None] = print):
    """(method, engine) for occlusion_sweep: an IncrementalInference watching the top conv layer,
    a GraphedSweep, or the batched sweep (engine None). "auto" is "graphed" for a model on a CUDA
    device and "incremental" elsewhere; "incremental" falls back to "batched" when torch.fx cannot
    trace the model."""
    if method not in (*METHODS, "auto"):
        raise ValueError(f"occlusion method must be one of {[*METHODS, 'auto']}, got {method!r}")
    spec = get_spec(model_name)
    if method == "auto":
        on_cuda = any(p.is_cuda for p in model.parameters())
        method = "graphed" if on_cuda else "incremental"
    if method == "batched":
        return "batched", None
    if method == "graphed":
        return "graphed", GraphedSweep(model, model.get_submodule(spec.layers[spec.top_conv]), log=log)
    reason = IncrementalInference.unsupported(model)
    if reason is not None:
        log(f"occlusion: incremental inference does not apply to {model_name} ({reason}); using whole occluded images")
        return "batched", None
    return "incremental", IncrementalInference(model, {"top": spec.layers[spec.top_conv]})


# --------------------------------------------------------------------------------------- the images


@dataclass
class Picked:
    """An image chosen for the study: its id, true class, uint8 pixels [3, S, S], object box or None."""

    image_id: str
    label: int
    raw: Tensor
    box: tuple[float, float, float, float] | None  # x0, y0, x1, y1 in input pixels


def _object_box(parts: pd.DataFrame, image_id: str, path: str, size: int):
    """The image's `object` part box mapped into the model's input (resize + centre crop), or None."""
    rows = parts[(parts["image_id"] == image_id) & (parts["part"] == "object")]
    if rows.empty:
        return None
    from PIL import Image

    with Image.open(path) as img:
        width, height = img.size
    scale = size / min(width, height)
    left, top = (round(width * scale) - size) // 2, (round(height * scale) - size) // 2
    if (width, height) == (size, size):
        scale, left, top = 1.0, 0, 0
    row = rows.iloc[0]
    return (row.x0 * scale - left, row.y0 * scale - top, row.x1 * scale - left, row.y1 * scale - top)


def pick_images(data_dir, settings: dict, image_size: int, log: Callable[[str], None] = print) -> list[Picked]:
    """`count` seeded images of the split, then each entry of `images` (an image_id of the dataset,
    or an image file: one listed in the manifest, or one in a folder named after its class)."""
    every = open_split(data_dir, None, image_size)
    manifest = every.manifest
    split = None if settings["split"] == "all" else settings["split"]
    pool = manifest.index.to_numpy() if split is None else manifest.index[manifest["split"] == split].to_numpy()
    chosen = [int(pool[i]) for i in seeded_sample(settings["seed"], len(pool), settings["count"], salt="occlusion")]
    if len(chosen) < settings["count"]:
        log(f"occlusion: split {settings['split']!r} has only {len(chosen)} images; using all of them")
    by_id = {str(v): i for i, v in enumerate(manifest["image_id"])}
    by_path = {str(Path(p).resolve()): i for i, p in enumerate(manifest["path"])}
    classes = list(every.meta["classes"])
    picked = [
        Picked(str(manifest.at[i, "image_id"]), int(manifest.at[i, "label"]), every.raw(i),
               _object_box(every.parts, str(manifest.at[i, "image_id"]), manifest.at[i, "path"], image_size))
        for i in chosen
    ]
    for n, entry in enumerate(settings["images"]):
        key = f"occlusion.images[{n}]"
        if str(entry) in by_id or str(Path(entry).resolve()) in by_path:
            i = by_id.get(str(entry), by_path.get(str(Path(entry).resolve())))
            image_id = str(manifest.at[i, "image_id"])
            if any(p.image_id == image_id for p in picked):
                log(f"occlusion: {key} {entry!r} is already among the chosen images")
                continue
            picked.append(Picked(image_id, int(manifest.at[i, "label"]), every.raw(i),
                                 _object_box(every.parts, image_id, manifest.at[i, "path"], image_size)))
            continue
        path = Path(entry)
        if not path.is_file():
            raise ValueError(
                f"config key '{key}': {entry!r} is neither an image_id of the dataset nor an image file; "
                f"give an id such as {manifest['image_id'].iloc[0]!r} or a path"
            )
        if path.parent.name not in classes:
            raise ValueError(
                f"config key '{key}': cannot tell the true class of {entry!r}: put it in a folder named "
                f"after its class (one of {classes}), or use an image_id of the dataset"
            )
        raw = torch.from_numpy(load_image(path, image_size)).permute(2, 0, 1).contiguous()
        picked.append(Picked(f"file:{path.name}", classes.index(path.parent.name), raw, None))
    return picked


# ---------------------------------------------------------------------------------------- the tables


def sweep_table(model_name: str, layer: str, image: Picked, maps: OcclusionMaps) -> pd.DataFrame:
    """Tidy rows, one per occluder position (y, x: the occluder's top-left pixel)."""
    y, x = np.meshgrid(maps.ys, maps.xs, indexing="ij")
    return pd.DataFrame(
        {
            "model": model_name,
            "image_id": image.image_id,
            "label": image.label,
            "layer": layer,
            "channel": maps.channel,
            "y": y.ravel().astype("int64"),
            "x": x.ravel().astype("int64"),
            "fmap_activation": maps.fmap_activation.ravel().astype("float64"),
            "p_true": maps.p_true.ravel().astype("float64"),
            "top_class": maps.top_class.ravel().astype("int64"),
        }
    )[COLUMNS]


def minimum_inside_box(maps: OcclusionMaps, size: int, box) -> tuple[bool, float]:
    """(whether the occluder position with the lowest P(true) has its centre inside `box`
    (x0, y0, x1, y1), the share of all positions whose centre is inside: the chance level)."""
    x0, y0, x1, y1 = box
    cy = maps.ys[:, None] + size / 2
    cx = maps.xs[None, :] + size / 2
    inside = (cy >= y0) & (cy <= y1) & (cx >= x0) & (cx <= x1)
    iy, ix = np.unravel_index(int(np.argmin(maps.p_true)), maps.p_true.shape)
    return bool(inside[iy, ix]), float(inside.mean())


def localisation_table(model_name: str, images: Sequence[Picked], maps: Sequence[OcclusionMaps], size: int) -> pd.DataFrame:
    """One row: over the images with an object box, how many have their P(true) minimum inside it."""
    hits = [minimum_inside_box(m, size, p.box) for p, m in zip(images, maps) if p.box is not None]
    inside = sum(h for h, _ in hits)
    return pd.DataFrame(
        [
            {
                "model": model_name,
                "images": len(images),
                "boxed_images": len(hits),
                "inside": int(inside),
                "share_inside": inside / len(hits) if hits else float("nan"),
                "chance_share": float(np.mean([c for _, c in hits])) if hits else float("nan"),
            }
        ]
    )[LOCALISATION_COLUMNS]


# --------------------------------------------------------------------------------------- the figure


def plot_occlusion(
    model_name: str,
    layer: str,
    image: Picked,
    maps: OcclusionMaps,
    projection: np.ndarray,
    class_names: Sequence[str],
    size: int,
    path,
) -> None:
    """Fig. 7 for one image: (a) input, (b) feature-map activation, (c) its projection, (d) P(true
    class), (e) most probable class, each map drawn at the occluder centres over the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch, Rectangle

    from convviz.display import contrast_normalise
    from convviz.io import save_figure

    side = image.raw.shape[-1]
    step = float(maps.ys[1] - maps.ys[0]) if len(maps.ys) > 1 else float(size)
    # Each map cell is centred on its occluder's centre.
    extent = (maps.xs[0] + size / 2 - step / 2, maps.xs[-1] + size / 2 + step / 2,
              maps.ys[-1] + size / 2 + step / 2, maps.ys[0] + size / 2 - step / 2)
    fig, axes = plt.subplots(1, 5, figsize=(19, 4.2), gridspec_kw={"width_ratios": [1, 1.2, 1, 1.2, 1.45]})
    true_name = class_names[image.label]

    ax = axes[0]
    ax.imshow(image.raw.permute(1, 2, 0).numpy())
    iy, ix = np.unravel_index(int(np.argmin(maps.p_true)), maps.p_true.shape)
    ax.add_patch(Rectangle((maps.xs[ix] - 0.5, maps.ys[iy] - 0.5), size, size, fill=False, ec="black", lw=1.5,
                           label="occluder at lowest P(true)"))
    if image.box is not None:
        bx0, by0, bx1, by1 = image.box
        ax.add_patch(Rectangle((bx0 - 0.5, by0 - 0.5), bx1 - bx0, by1 - by0, fill=False, ec="lime", lw=1, ls="--",
                               label="object box"))
    ax.legend(fontsize=6, loc="lower left", framealpha=0.7)
    ax.set_title(f"(a) {image.image_id}\ntrue class: {true_name}", fontsize=9)

    def show_map(ax, values, title, cmap, **kw):
        im = ax.imshow(values, extent=extent, cmap=cmap, interpolation="nearest", **kw)
        if image.box is not None:  # where the object is, for orientation
            ax.add_patch(Rectangle((bx0 - 0.5, by0 - 0.5), bx1 - bx0, by1 - by0, fill=False, ec="lime", lw=1, ls="--"))
        ax.set_xlim(-0.5, side - 0.5)
        ax.set_ylim(side - 0.5, -0.5)
        ax.set_title(title, fontsize=9)
        return im

    im = show_map(axes[1], maps.fmap_activation, f"(b) total activation of {layer} map {maps.channel}\n"
                  f"(unoccluded: {maps.base_fmap_activation:.3g})", "viridis")
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)

    axes[2].imshow(contrast_normalise(projection).transpose(1, 2, 0))
    axes[2].set_title(f"(c) {layer} map {maps.channel} projected\n(deconvnet, unoccluded image)", fontsize=9)

    # Scaled to what the map spans (a weak model's P(true) may move by a few thousandths only).
    im = show_map(axes[3], maps.p_true, f"(d) P({true_name}) by occluder centre\n(unoccluded: {maps.base_p_true:.3f})",
                  "RdBu", vmin=float(maps.p_true.min()), vmax=max(float(maps.p_true.max()), maps.base_p_true))
    fig.colorbar(im, ax=axes[3], fraction=0.046, pad=0.04)

    present = sorted(set(np.unique(maps.top_class).tolist()))
    palette = plt.get_cmap("tab20" if len(present) > 10 else "tab10")
    colours = [palette(i % palette.N) for i in range(len(present))]
    codes = np.searchsorted(present, maps.top_class)
    show_map(axes[4], codes, "(e) most probable class", ListedColormap(colours),
             norm=BoundaryNorm(np.arange(len(present) + 1) - 0.5, len(present)))
    handles = [Patch(color=c, label=class_names[k] if k < len(class_names) else str(k)) for c, k in zip(colours, present)]
    axes[4].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{model_name}: occlusion sensitivity, {size} px mean-colour square (cf. Fig. 7)", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------ the rule


@dataclass
class OcclusionOutputs:
    table: str | os.PathLike
    localisation: str | os.PathLike
    figures: str | os.PathLike  # a directory: one PNG per image


def _file_name(image_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in image_id) + ".png"


def run_occlusion(
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike,
    settings: dict,
    outputs: OcclusionOutputs,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """The occlusion rule: pick images, sweep each, write the tables and one figure per image."""
    from convviz.io import write_parquet

    start = time.perf_counter()
    device = resolve_device(settings["device"])
    model, meta = load_for_analysis(checkpoint, device)
    model_name, image_size = meta["model"], int(meta["input_size"])
    spec = get_spec(model_name)
    size, stride = int(settings["size"]), int(settings["stride"])
    if size > image_size:
        raise ValueError(f"config key 'occlusion.size': {size} px is larger than the {image_size} px images; "
                         f"allowed: 1..{image_size}")
    images = pick_images(data_dir, settings, image_size, log)
    if not images:
        raise ValueError("occlusion: no images to sweep; set occlusion.count >= 1 or list occlusion.images")
    dataset = open_split(data_dir, None, image_size)
    classes = list(dataset.meta["classes"])
    method, engine = make_engine(model, model_name, settings["method"], log)
    positions = len(occluder_positions(image_size, size, stride)) ** 2
    batch_size = settings.get("batch_size") or settings["analysis"]["batch_size"]
    log(f"occlusion: {model_name}, {len(images)} images x {positions} positions ({size} px occluder, stride "
        f"{stride}), method {method}, {batch_size} positions per batch, top conv layer {spec.top_conv}")
    normalised = [dataset.normalise(p.raw).unsqueeze(0).to(device) for p in images]

    def sweep_all(batch_size: int) -> list[OcclusionMaps]:
        done = []
        for picked, image in zip(images, normalised):
            tic = time.perf_counter()
            done.append(occlusion_sweep(model, model_name, image, picked.label, size, stride, batch_size,
                                        method=method, engine=engine))
            seconds = time.perf_counter() - tic
            log(f"  {picked.image_id}: {positions} positions in {seconds:.2f} s ({positions / seconds:.0f} positions/s); "
                f"P(true) {done[-1].base_p_true:.3f} unoccluded, min {done[-1].p_true.min():.3f}")
        return done

    maps = with_oom_retry(sweep_all, batch_size, log, what="occlusion")
    table = pd.concat([sweep_table(model_name, spec.top_conv, p, m) for p, m in zip(images, maps)], ignore_index=True)
    write_parquet(table, outputs.table)
    localisation = localisation_table(model_name, images, maps, size)
    write_parquet(localisation, outputs.localisation)

    # Fig. 7 (c): each image's chosen feature map, projected whole by the deconvnet.
    stacked = torch.cat(normalised)
    units = torch.tensor([[i, m.channel] for i, m in enumerate(maps)])
    projections = project(model, spec.top_conv, stacked, units, method="explicit" if spec.plain else "general",
                          spec=spec).cpu().numpy()
    figure_dir = Path(outputs.figures)
    figure_dir.mkdir(parents=True, exist_ok=True)
    for picked, m, projection in zip(images, maps, projections):
        plot_occlusion(model_name, spec.top_conv, picked, m, projection, classes, size, figure_dir / _file_name(picked.image_id))
    row = localisation.iloc[0]
    log(f"occlusion: done in {time.perf_counter() - start:.1f} s: {len(table)} rows, {len(images)} figures; "
        f"P(true) minimum inside the object box for {row.inside} of {row.boxed_images} boxed images "
        f"(chance {row.chance_share:.2f})")
    return table
