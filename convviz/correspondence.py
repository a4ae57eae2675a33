"""Correspondence of object parts across images (paper Sec. 5, Table 1, Fig. 8).

Take N images of one class whose parts are annotated (the synthetic "face": left_eye, right_eye,
nose). Mask the same part in every image with a square of the dataset's mean colour, and as a
control mask a random square of the same size inside each image's object. At layer l, with
x_i the original's and x~_i the occluded image's feature vector,

    eps_i = x_i - x~_i,     Delta_l = mean over ordered pairs i != j of H(sign eps_i, sign eps_j) / D_l

with H the Hamming distance and D_l the layer's feature count (the paper's normalised sum). A
lower Delta means masking that part changes the representation the same way in every image.

Conventions (documented here because they change the numbers):

- sign(0) = 0, compared as a value of its own (numpy's sign): a unit the mask does not change in
  either image agrees; changed in one image but not the other disagrees. After a ReLU many units
  are zero in both images, and counting them as "+" or "-" would hide or invent agreement.
- |eps| <= zero_tolerance * max|x| of the layer (over the originals) counts as 0: a unit outside
  the mask's reach gets the same value up to float noise (~1e-7 relative) that depends on which
  batch the image was in, and that noise must not become a sign.
- The occluder is a square: side ``occluder_size`` px, or per image the longer side of the
  largest configured part box (so one image's part and random masks are the same size), centred
  on the part box and clipped to the image. Random squares lie inside the image's ``object`` box
  where the dataset has one (the paper's "random parts of the object"), else anywhere.
- Mean +- std: over ``image_sets`` seeded sets of N images (and, for random masks, over
  ``random_draws`` draws per set); std is the sample std (ddof=1).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from convviz import paper
from convviz.analysis import load_for_analysis, open_split, resolve_device, seeded_sample, with_oom_retry
from convviz.data.common import DatasetError, ImageDataset
from convviz.layer_features import forward_features
from convviz.models.registry import get_spec

__all__ = [
    "RANDOM",
    "PAPER_TABLE1",
    "sign_with_tolerance",
    "hamming_delta",
    "Occlusion",
    "part_pool",
    "occluder_side",
    "part_square",
    "random_square",
    "occlude",
    "correspondence_delta",
    "correspondence_table",
    "run_correspondence",
]

RANDOM = "random"
OBJECT_PART = "object"
# Table 1 (5 dog images): occluder -> {paper layer: (mean, std)}; RANDOM is its "random" row.
PAPER_TABLE1 = paper.TABLE1
COLUMNS = ["model", "layer", "occluder", "image_set", "draw", "delta", "images"]


# ------------------------------------------------------------------------------------ the measure


def sign_with_tolerance(eps: Tensor, atol: float | Tensor = 0.0) -> Tensor:
    """sign(eps) as int8 in {-1, 0, 1}, with |eps| <= atol counted as 0 (float noise is no change)."""
    signs = torch.sign(eps).to(torch.int8)
    if isinstance(atol, Tensor) or atol > 0:
        signs[eps.abs() <= atol] = 0
    return signs


def hamming_delta(signs: Tensor) -> float:
    """Delta of Table 1 from sign vectors [N, D] (values -1, 0, 1; N >= 2): the mean over ordered
    pairs i != j of the fraction of the D positions where sign_i and sign_j differ (0 = 0 agrees)."""
    n, d = signs.shape
    if n < 2:
        raise ValueError(f"Delta needs at least 2 images, got {n}")
    # H is symmetric: count each unordered pair once (exact integers), then average over ordered pairs.
    differing = sum(int((signs[i + 1 :] != signs[i]).sum()) for i in range(n - 1))
    return 2 * differing / (n * (n - 1) * d)


# ------------------------------------------------------------------------------------ the masks


@dataclass(frozen=True)
class Occlusion:
    """One occluded image: which original (``image``, a dataset index), the square (x0, y0, x1,
    y1; pixels, x1/y1 exclusive), and the Delta group it belongs to."""

    image: int
    box: tuple[int, int, int, int]
    occluder: str
    image_set: int
    draw: int


def part_pool(dataset: ImageDataset, class_name: str, parts: Sequence[str], where: str = "") -> list[int]:
    """Dataset indices of the images of ``class_name`` that carry every part in ``parts``.

    Raises DatasetError naming what is missing: the class, the dataset's part annotations, or
    the parts (listing those the class does have).
    """
    classes = list(dataset.meta["classes"])
    if class_name not in classes:
        raise DatasetError(
            f"correspondence.class_name {class_name!r} is not a class of the dataset {where}; its classes are {classes}"
        )
    if len(dataset.parts) == 0:
        raise DatasetError(
            f"the dataset {where} has no part annotations (parts.parquet is empty or missing); correspondence "
            "needs a dataset with parts.parquet (image_id, part, x0, y0, x1, y1), e.g. the synthetic one"
        )
    in_class = dataset.manifest.index[dataset.manifest["class_name"] == class_name]
    ids = dataset.manifest.loc[in_class, "image_id"]
    class_parts = dataset.parts[dataset.parts["image_id"].isin(set(ids))]
    available = sorted(set(class_parts["part"]) - {OBJECT_PART})
    missing = [p for p in parts if p not in available]
    if missing:
        raise DatasetError(
            f"correspondence.parts {missing} are not annotated on class {class_name!r} in the dataset {where}; "
            f"its parts are {available}"
        )
    having = class_parts[class_parts["part"].isin(parts)].groupby("image_id")["part"].nunique()
    complete = set(having.index[having == len(set(parts))])
    return [int(i) for i in in_class if dataset.manifest.at[i, "image_id"] in complete]


def _boxes(dataset: ImageDataset, index: int) -> dict[str, tuple[int, int, int, int]]:
    image_id = dataset.manifest.at[index, "image_id"]
    rows = dataset.parts[dataset.parts["image_id"] == image_id]
    return {r.part: (int(r.x0), int(r.y0), int(r.x1), int(r.y1)) for r in rows.itertuples()}


def occluder_side(boxes: dict, parts: Sequence[str], occluder_size: int | None) -> int:
    """The square's side in pixels: ``occluder_size``, or the longer side of the largest part box."""
    if occluder_size is not None:
        return int(occluder_size)
    return max(max(boxes[p][2] - boxes[p][0], boxes[p][3] - boxes[p][1]) for p in parts)


def _clip(x0: int, y0: int, side: int, size: int) -> tuple[int, int, int, int]:
    return max(x0, 0), max(y0, 0), min(x0 + side, size), min(y0 + side, size)


def part_square(box: tuple[int, int, int, int], side: int, image_size: int) -> tuple[int, int, int, int]:
    """A side x side square centred on a part box, clipped to the image."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return _clip(int(round(cx - side / 2)), int(round(cy - side / 2)), side, image_size)


def random_square(rng: random.Random, side: int, image_size: int, within: tuple[int, int, int, int] | None) -> tuple[int, int, int, int]:
    """A side x side square at a uniformly random position inside ``within`` (the object box; the
    whole image if None or smaller than the square along an axis)."""
    x0, y0, x1, y1 = within if within is not None else (0, 0, image_size, image_size)
    lo_x, hi_x = (x0, x1 - side) if x1 - x0 >= side else (0, image_size - side)
    lo_y, hi_y = (y0, y1 - side) if y1 - y0 >= side else (0, image_size - side)
    return _clip(rng.randint(lo_x, max(lo_x, hi_x)), rng.randint(lo_y, max(lo_y, hi_y)), side, image_size)


def occlude(images: Tensor, boxes: Sequence[tuple[int, int, int, int]]) -> Tensor:
    """Copies of normalised images [B, 3, S, S] with box b set to the dataset mean colour (0 after
    normalisation) in image b."""
    out = images.clone()
    for b, (x0, y0, x1, y1) in enumerate(boxes):
        out[b, :, y0:y1, x0:x1] = 0.0
    return out


def plan_occlusions(
    dataset: ImageDataset,
    image_sets: list[list[int]],
    parts: Sequence[str],
    random_draws: int,
    occluder_size: int | None,
    seed: int,
) -> list[Occlusion]:
    """Every occluded image the study needs: each configured part of each image of each set, and
    ``random_draws`` random squares of the same size per image and set."""
    size = dataset.image_size
    plan = []
    for k, members in enumerate(image_sets):
        for i in members:
            boxes = _boxes(dataset, i)
            side = occluder_side(boxes, parts, occluder_size)
            plan += [Occlusion(i, part_square(boxes[p], side, size), p, k, 0) for p in parts]
            for r in range(random_draws):
                rng = random.Random(f"{seed}:correspondence:{k}:{r}:{i}")
                plan.append(Occlusion(i, random_square(rng, side, size, boxes.get(OBJECT_PART)), RANDOM, k, r))
    return plan


# ------------------------------------------------------------------------------------ the study


@torch.no_grad()
def correspondence_delta(
    model: nn.Module,
    model_name: str,
    dataset: ImageDataset,
    plan: list[Occlusion],
    batch_size: int = 64,
    zero_tolerance: float = 1e-5,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Delta per (layer, occluder, image set, draw) for the occlusions of ``plan``.

    Originals and occluded images go through the network in batches of ``batch_size`` (one
    forward pass each); only sign(eps) is kept (int8), so memory is one byte per feature per
    occluded image. Returns columns layer, occluder, image_set, draw, delta, images.
    """
    start = time.perf_counter()
    originals = sorted({o.image for o in plan})
    position = {i: p for p, i in enumerate(originals)}
    reference: dict[str, list[Tensor]] = {}
    for lo in range(0, len(originals), batch_size):
        batch = dataset.normalise(dataset.raw_batch(originals[lo : lo + batch_size])).to(device)
        for layer, feats in forward_features(model, model_name, batch)[0].items():
            reference.setdefault(layer, []).append(feats)
    reference = {layer: torch.cat(chunks) for layer, chunks in reference.items()}
    atol = {layer: zero_tolerance * float(feats.abs().max()) for layer, feats in reference.items()}

    # Part masks repeat across image sets: each distinct (image, square) is forwarded once.
    distinct = list(dict.fromkeys((o.image, o.box) for o in plan))
    row_of = {key: r for r, key in enumerate(distinct)}
    signs: dict[str, Tensor] = {}
    for lo in range(0, len(distinct), batch_size):
        chunk = distinct[lo : lo + batch_size]
        images = dataset.normalise(dataset.raw_batch([i for i, _ in chunk])).to(device)
        feats, _ = forward_features(model, model_name, occlude(images, [box for _, box in chunk]))
        ref_rows = torch.tensor([position[i] for i, _ in chunk], device=images.device)
        for layer, occluded in feats.items():
            if layer not in signs:
                signs[layer] = torch.empty(len(distinct), occluded.shape[1], dtype=torch.int8)
            eps = reference[layer][ref_rows] - occluded
            signs[layer][lo : lo + len(chunk)] = sign_with_tolerance(eps, atol[layer]).cpu()
        log(f"correspondence: {lo + len(chunk)}/{len(distinct)} occluded images ({time.perf_counter() - start:.1f} s)")

    groups: dict[tuple[str, int, int], list[int]] = {}
    for o in plan:
        groups.setdefault((o.occluder, o.image_set, o.draw), []).append(row_of[(o.image, o.box)])
    rows = []
    for layer, layer_signs in signs.items():
        for (occluder, image_set, draw), members in groups.items():
            rows.append((layer, occluder, image_set, draw, hamming_delta(layer_signs[members]), len(members)))
    return pd.DataFrame(rows, columns=["layer", "occluder", "image_set", "draw", "delta", "images"])


def correspondence_table(deltas: pd.DataFrame, model_name: str) -> pd.DataFrame:
    """Table 1: mean and std of Delta per (layer, occluder), with the paper's values beside ours
    on the layers that play the paper's roles (top conv layer = its layer 5, last hidden layer =
    its layer 7)."""
    spec = get_spec(model_name)
    paper_layer = {spec.top_conv: 5, spec.penultimate: 7}
    table = (
        deltas.groupby(["layer", "occluder"], sort=False)["delta"]
        .agg(delta_mean="mean", delta_std="std", repeats="size")
        .reset_index()
    )
    table.insert(0, "model", model_name)
    table["paper_layer"] = table["layer"].map(paper_layer).astype("Int64")
    paper = [PAPER_TABLE1.get(o, {}).get(p) if pd.notna(p) else None for o, p in zip(table["occluder"], table["paper_layer"])]
    table["paper_delta_mean"] = [v[0] if v else np.nan for v in paper]
    table["paper_delta_std"] = [v[1] if v else np.nan for v in paper]
    return table


# ------------------------------------------------------------------------------------ figures


def plot_delta_bars(table: pd.DataFrame, model_name: str, path) -> None:
    """Delta (mean +- std) per layer, one bar per occluder: parts vs random masks."""
    from convviz.plots import plt, save_figure

    layers = list(dict.fromkeys(table["layer"]))
    occluders = list(dict.fromkeys(table["occluder"]))
    width = 0.8 / len(occluders)
    fig, ax = plt.subplots(figsize=(1.3 * len(layers) + 3, 3.8))
    for k, occluder in enumerate(occluders):
        rows = table[table["occluder"] == occluder].set_index("layer").loc[layers]
        x = np.arange(len(layers)) + (k - (len(occluders) - 1) / 2) * width
        colour = "0.55" if occluder == RANDOM else plt.cm.tab10.colors[k]
        ax.bar(x, rows["delta_mean"], width, yerr=rows["delta_std"].fillna(0), capsize=2, label=occluder, color=colour)
    ax.set_xticks(np.arange(len(layers)), layers)
    ax.set(xlabel="layer", ylabel="Δ (mean normalised Hamming distance)", title=f"{model_name}: correspondence Δ by layer (lower = more consistent)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(occluders))
    fig.tight_layout()
    save_figure(fig, path)


def plot_table1(table: pd.DataFrame, model_name: str, path) -> None:
    """Table 1 as a figure: ours (top conv / last hidden layer) beside the paper's (layer 5 / 7)."""
    from convviz.plots import plt, save_figure

    spec = get_spec(model_name)
    occluders = list(dict.fromkeys(table["occluder"]))

    def cell(rows: pd.DataFrame, mean: str, std: str) -> str:
        if rows.empty or pd.isna(rows[mean].iloc[0]):
            return "–"
        s = rows[std].iloc[0]
        return f"{rows[mean].iloc[0]:.3f} ± {s:.3f}" if pd.notna(s) else f"{rows[mean].iloc[0]:.3f}"

    text = []
    for occluder in occluders:
        line = []
        for layer in (spec.top_conv, spec.penultimate):
            rows = table[(table["occluder"] == occluder) & (table["layer"] == layer)]
            line += [cell(rows, "delta_mean", "delta_std"), cell(rows, "paper_delta_mean", "paper_delta_std")]
        text.append(line)
    header = [f"ours {spec.top_conv}", "paper layer 5", f"ours {spec.penultimate}", "paper layer 7"]
    repeats = table.groupby("occluder", sort=False)["repeats"].max()
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(occluders) + 0.5))
    ax.axis("off")
    shown = ax.table(cellText=text, rowLabels=occluders, colLabels=header, loc="center", cellLoc="center")
    shown.scale(1, 1.4)
    ax.set_title(f"{model_name}: correspondence Δ, ours beside the paper's Table 1 (lower = more consistent)", fontsize=10)
    note = ", ".join(f"{o} {n}" for o, n in repeats.items())
    fig.text(0.5, -0.02, f"ours: mean ± std over repeats ({note}); paper: ZFNet on 5 dog images", ha="center", fontsize=8)
    save_figure(fig, path)


def plot_occluders(dataset: ImageDataset, plan: list[Occlusion], path, columns_random: int = 2) -> None:
    """Fig. 8: the first image set, originals and their part and random masks."""
    from convviz.plots import plt, save_figure

    first = [o for o in plan if o.image_set == 0 and (o.occluder != RANDOM or o.draw < columns_random)]
    images = list(dict.fromkeys(o.image for o in first))
    kinds = list(dict.fromkeys((o.occluder, o.draw) for o in first))
    fig, axes = plt.subplots(len(images), len(kinds) + 1, figsize=(1.5 * (len(kinds) + 1), 1.5 * len(images) + 0.5), squeeze=False)
    for r, i in enumerate(images):
        original = dataset.normalise(dataset.raw_batch([i]))
        axes[r, 0].imshow(dataset.denormalise(original)[0].permute(1, 2, 0).numpy())
        for c, (occluder, draw) in enumerate(kinds, start=1):
            box = next(o.box for o in first if o.image == i and (o.occluder, o.draw) == (occluder, draw))
            axes[r, c].imshow(dataset.denormalise(occlude(original, [box]))[0].permute(1, 2, 0).numpy())
    for c, title in enumerate(["original"] + [o if o != RANDOM else f"random {d + 1}" for o, d in kinds]):
        axes[0, c].set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("correspondence: occluded parts and random masks (first image set, cf. Fig. 8)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------ the rule


def run_correspondence(
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike,
    settings: dict,
    outputs: dict,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """The correspondence rule. ``outputs`` names the files: deltas, table (Parquet), table_figure,
    bars, examples (PNG)."""
    from convviz.io import write_parquet

    start = time.perf_counter()
    device = resolve_device(settings["device"])
    model, meta = load_for_analysis(checkpoint, device)
    model_name = meta["model"]
    split = None if settings["split"] == "all" else settings["split"]
    dataset = open_split(data_dir, split, meta["input_size"])
    parts = list(settings["parts"])
    pool = part_pool(dataset, settings["class_name"], parts, where=f"{data_dir} (split {settings['split']!r})")
    n = settings["images"]
    if len(pool) < 2:
        raise DatasetError(
            f"correspondence: split {settings['split']!r} of {data_dir} has {len(pool)} image(s) of class "
            f"{settings['class_name']!r} with parts {parts}; Delta needs at least 2 (set correspondence.split: all)"
        )
    if len(pool) < n:
        log(
            f"correspondence: NOTE split {settings['split']!r} has only {len(pool)} {settings['class_name']!r} images "
            f"with parts {parts}, fewer than the {n} asked for: every image set uses all {len(pool)}"
        )
    image_sets = [
        [pool[p] for p in seeded_sample(settings["seed"], len(pool), n, salt=f"correspondence:{k}")]
        for k in range(settings["image_sets"])
    ]
    plan = plan_occlusions(dataset, image_sets, parts, settings["random_draws"], settings["occluder_size"], settings["seed"])
    log(
        f"correspondence: {model_name}, {len(image_sets)} sets of {len(image_sets[0])} {settings['class_name']!r} images "
        f"(pool {len(pool)}), occluders {parts} + {settings['random_draws']} random draws: {len(plan)} occlusions"
    )
    deltas = with_oom_retry(
        lambda batch_size: correspondence_delta(
            model, model_name, dataset, plan, batch_size, settings["zero_tolerance"], device, log
        ),
        settings["analysis"]["batch_size"],
        log,
        what="correspondence",
    )
    deltas.insert(0, "model", model_name)
    deltas = deltas[COLUMNS]
    table = correspondence_table(deltas, model_name)
    write_parquet(deltas, outputs["deltas"])
    write_parquet(table, outputs["table"])
    plot_table1(table, model_name, outputs["table_figure"])
    plot_delta_bars(table, model_name, outputs["bars"])
    plot_occluders(dataset, plan, outputs["examples"])
    spec = get_spec(model_name)
    for layer in (spec.top_conv, spec.penultimate):
        rows = table[table["layer"] == layer]
        summary = ", ".join(f"{o} {m:.3f}±{s:.3f}" for o, m, s in zip(rows["occluder"], rows["delta_mean"], rows["delta_std"]))
        log(f"correspondence: {layer}: {summary}")
    log(f"correspondence: done in {time.perf_counter() - start:.1f} s: {len(deltas)} Delta values")
    return deltas
