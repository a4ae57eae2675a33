"""Invariance of the features to vertical translation, scale and rotation (paper Sec. 4.2, Fig. 5).

For each of N images and each amount of each sweep, the transformed image goes through the
network beside its original: we record the Euclidean distance between the two feature vectors at
every analysis layer, the probability of the true class and the predicted class.

Transforms are affine resamplings (``grid_sample``, bilinear) of the normalised image about its
centre, so a whole batch of (image, transform, amount) jobs is one resampling and one forward pass.
Pixels a translation, rotation or shrink leaves uncovered are filled with

- ``mean``: the dataset's mean colour (zero in normalised space), the same grey the occlusion and
  correspondence studies use, so the network sees "nothing" there rather than black or a copy;
- ``reflect``: the image mirrored at its border (no flat regions, but repeated content).

Amounts: translation in pixels (positive moves the content down), scale as a zoom ratio about the
centre (> 1 enlarges, as in the paper, and then nothing is uncovered), rotation in degrees
(positive turns the content clockwise on screen, as the synthetic data's rotations do).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convviz.analysis import load_for_analysis, open_split, resolve_device, seeded_sample, with_oom_retry
from convviz.layer_features import forward_features
from convviz.models.registry import get_spec

__all__ = [
    "TRANSFORMS",
    "UNITS",
    "FILLS",
    "sweep_amounts",
    "affine_theta",
    "transform_images",
    "invariance_sweep",
    "plot_invariance",
    "run_invariance",
]

TRANSFORMS = ("translation", "scale", "rotation")
UNITS = {"translation": "px", "scale": "ratio", "rotation": "deg"}
FILLS = {"mean": "zeros", "reflect": "reflection"}  # fill name -> grid_sample padding_mode
AXIS_LABELS = {
    "translation": "vertical translation (pixels)",
    "scale": "scale (ratio)",
    "rotation": "rotation (degrees)",
}
COLUMNS = ["model", "image_id", "label", "transform", "amount", "amount_unit", "layer", "distance", "p_true", "predicted"]


def sweep_amounts(settings: dict, image_size: int) -> dict[str, np.ndarray]:
    """The amounts of each sweep: evenly spaced over the configured range, ``steps`` of them.

    Translation ranges are fractions of the image size in the config and pixels here.
    """
    amounts = {}
    for transform in TRANSFORMS:
        lo, hi = settings[transform]["range"]
        values = np.linspace(float(lo), float(hi), int(settings[transform]["steps"]))
        amounts[transform] = values * image_size if transform == "translation" else values
    return amounts


def affine_theta(transform: str, amount: float, image_size: int) -> Tensor:
    """The [2, 3] ``affine_grid`` matrix mapping output to input coordinates (normalised to [-1, 1],
    y down) that applies one transform about the image centre."""
    if transform == "translation":
        # Content moves down by `amount` px: output row y samples input row y - amount.
        return torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, -2.0 * amount / image_size]])
    if transform == "scale":
        if amount <= 0:
            raise ValueError(f"scale amount must be > 0, got {amount}")
        return torch.tensor([[1.0 / amount, 0.0, 0.0], [0.0, 1.0 / amount, 0.0]])
    if transform == "rotation":
        # Clockwise on screen (y down) by `amount`: sample the input at R^T p.
        c, s = math.cos(math.radians(amount)), math.sin(math.radians(amount))
        return torch.tensor([[c, s, 0.0], [-s, c, 0.0]])
    raise ValueError(f"unknown transform {transform!r}; valid transforms are {list(TRANSFORMS)}")


def transform_images(images: Tensor, thetas: Tensor, fill: str = "mean") -> Tensor:
    """Resample normalised images [B, 3, S, S] by per-image affine matrices [B, 2, 3] (bilinear).

    Uncovered pixels get the dataset's mean colour (fill="mean", zero after normalisation) or the
    image reflected at its border (fill="reflect").
    """
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {list(FILLS)}, got {fill!r}")
    grid = F.affine_grid(thetas.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=FILLS[fill], align_corners=False)


@torch.no_grad()
def invariance_sweep(
    model: nn.Module,
    model_name: str,
    images: Tensor,
    labels: Tensor,
    amounts: dict[str, np.ndarray],
    fill: str = "mean",
    batch_size: int = 64,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Feature distances and class probabilities of transformed images (Fig. 5).

    images: [N, 3, S, S] normalised originals on the model's device; labels: [N] true classes.
    amounts: {transform: amounts} (see ``sweep_amounts``). Every (image, transform, amount) job is
    resampled and classified in batches of ``batch_size`` (one forward pass per batch).

    Returns one row per (image index, transform, amount, layer): ``distance`` = Euclidean norm of
    the difference of the flattened feature vectors of original and transformed image (the
    layer's own units), ``p_true`` = softmax probability of the true class of the transformed
    image, ``predicted`` = its arg-max class.
    """
    size = images.shape[-1]
    reference, _ = forward_features(model, model_name, images)
    jobs = [(i, t, float(a)) for t in TRANSFORMS for a in amounts[t] for i in range(len(images))]
    thetas = torch.stack([affine_theta(t, a, size) for _, t, a in jobs])
    index = torch.tensor([i for i, _, _ in jobs], device=images.device)
    rows: dict[str, list] = {k: [] for k in ("image", "transform", "amount", "layer", "distance", "p_true", "predicted")}
    start = time.perf_counter()
    for lo in range(0, len(jobs), batch_size):
        idx = index[lo : lo + batch_size]
        batch = transform_images(images[idx], thetas[lo : lo + batch_size], fill)
        features, logits = forward_features(model, model_name, batch)
        probs = logits.softmax(dim=1)
        p_true = probs.gather(1, labels.to(probs.device)[idx].unsqueeze(1)).squeeze(1).cpu().tolist()
        predicted = probs.argmax(dim=1).cpu().tolist()
        for layer, feats in features.items():
            distance = (feats - reference[layer][idx]).norm(dim=1).cpu().tolist()
            for k, (i, t, a) in enumerate(jobs[lo : lo + batch_size]):
                rows["image"].append(i)
                rows["transform"].append(t)
                rows["amount"].append(a)
                rows["layer"].append(layer)
                rows["distance"].append(distance[k])
                rows["p_true"].append(p_true[k])
                rows["predicted"].append(predicted[k])
        done = min(lo + batch_size, len(jobs))
        log(f"invariance: {done}/{len(jobs)} transformed images ({time.perf_counter() - start:.1f} s)")
    return pd.DataFrame(rows)


def _example_montage(images: Tensor, transform: str, amounts: np.ndarray, fill: str, columns: int, denormalise) -> np.ndarray:
    """[N*S, columns*S, 3] float 0-1: each image (rows) at `columns` amounts spread over the sweep."""
    picks = amounts[np.unique(np.linspace(0, len(amounts) - 1, columns).round().astype(int))]
    tiles = []
    for a in picks:
        thetas = affine_theta(transform, float(a), images.shape[-1]).expand(len(images), 2, 3)
        tiles.append(denormalise(transform_images(images, thetas, fill).cpu()))
    grid = torch.stack(tiles, dim=1)  # [N, A, 3, S, S]
    n, a, _, s, _ = grid.shape
    return grid.permute(0, 3, 1, 4, 2).reshape(n * s, a * s, 3).numpy(), picks


def plot_invariance(
    table: pd.DataFrame, model_name: str, first_layer: str, last_layer: str, montages: dict, path, names: dict | None = None
) -> None:
    """Fig. 5: rows are the sweeps; columns are examples (``montages[transform]`` from
    ``_example_montage``), first-layer distance, last-hidden-layer distance and P(true class), one
    line per image (``names``: image_id -> true class name, for the legend)."""
    from convviz.plots import plt, save_figure

    fig, axes = plt.subplots(len(TRANSFORMS), 4, figsize=(16, 3.6 * len(TRANSFORMS)), gridspec_kw={"width_ratios": [1.1, 1, 1, 1]})
    images = list(dict.fromkeys(table["image_id"]))
    colours = dict(zip(images, plt.cm.tab10.colors))
    for row, transform in enumerate(TRANSFORMS):
        part = table[table["transform"] == transform]
        montage, picks = montages[transform]
        ax = axes[row, 0]
        ax.imshow(montage)
        ax.set_xticks([(k + 0.5) * montage.shape[1] / len(picks) for k in range(len(picks))])
        ax.set_xticklabels([f"{p:g}" for p in np.round(picks, 2)], fontsize=7)
        ax.set_yticks([])
        ax.set_xlabel(AXIS_LABELS[transform], fontsize=8)
        ax.set_title(f"{transform}: examples", fontsize=9)
        panels = [
            (axes[row, 1], part[part["layer"] == first_layer], "distance", f"Euclidean distance, {first_layer}"),
            (axes[row, 2], part[part["layer"] == last_layer], "distance", f"Euclidean distance, {last_layer}"),
            (axes[row, 3], part[part["layer"] == last_layer], "p_true", "P(true class)"),
        ]
        for ax, rows, column, title in panels:
            for image_id in images:
                line = rows[rows["image_id"] == image_id].sort_values("amount")
                label = f"{image_id} ({names[image_id]})" if names else image_id
                ax.plot(line["amount"], line[column], marker="o", ms=2.5, lw=1.2, color=colours[image_id], label=label)
            ax.set(xlabel=AXIS_LABELS[transform], title=title)
            ax.grid(alpha=0.3)
            if column == "p_true":
                ax.set_ylim(-0.02, 1.02)
    axes[0, 3].legend(fontsize=7, loc="best")
    fig.suptitle(f"{model_name}: invariance of features and prediction to translation, scale, rotation (cf. Fig. 5)")
    fig.tight_layout()
    save_figure(fig, path)


def run_invariance(
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike,
    settings: dict,
    table_path: str | os.PathLike,
    figure_path: str | os.PathLike,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """The invariance rule: sample images, sweep, write ``invariance.parquet`` and the figure."""
    from convviz.io import write_parquet

    start = time.perf_counter()
    device = resolve_device(settings["device"])
    model, meta = load_for_analysis(checkpoint, device)
    model_name = meta["model"]
    spec = get_spec(model_name)
    split = None if settings["split"] == "all" else settings["split"]
    dataset = open_split(data_dir, split, meta["input_size"])
    chosen = seeded_sample(settings["seed"], len(dataset), settings["images"], salt="invariance")
    if len(chosen) < settings["images"]:
        log(f"invariance: split {settings['split']!r} has only {len(chosen)} images, fewer than the {settings['images']} asked for; using all")
    images = dataset.normalise(dataset.raw_batch(chosen)).to(device)
    labels = dataset.labels[chosen].to(device)
    amounts = sweep_amounts(settings, meta["input_size"])
    total = len(chosen) * sum(len(a) for a in amounts.values())
    log(f"invariance: {model_name}, {len(chosen)} images x {total // max(len(chosen), 1)} transforms = {total} images, fill {settings['fill']!r}")

    table = with_oom_retry(
        lambda batch_size: invariance_sweep(model, model_name, images, labels, amounts, settings["fill"], batch_size, log),
        settings["analysis"]["batch_size"],
        log,
        what="invariance",
    )
    ids = dataset.manifest["image_id"].to_numpy()[chosen]
    image = table["image"].to_numpy()
    table["model"] = model_name
    table["image_id"] = ids[image]
    table["label"] = labels.cpu().numpy()[image]
    table["amount_unit"] = table["transform"].map(UNITS)
    table = table[COLUMNS]
    write_parquet(table, table_path)

    montages = {
        t: _example_montage(images, t, amounts[t], settings["fill"], 5, dataset.denormalise) for t in TRANSFORMS
    }
    names = dict(zip(ids, dataset.manifest["class_name"].to_numpy()[chosen]))
    plot_invariance(table, model_name, spec.first_conv, spec.penultimate, montages, figure_path, names)
    log(
        f"invariance: done in {time.perf_counter() - start:.1f} s: {len(table)} rows "
        f"({len(chosen)} images, {total} transformed, {table['layer'].nunique()} layers)"
    )
    return table
