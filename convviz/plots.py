"""Figures shared by several steps. Every figure is titled and labelled so it stands alone."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # rules run headless

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from convviz.io import save_figure  # noqa: E402


def plot_training_curves(history: pd.DataFrame, model_name: str, path) -> None:
    """Loss and top-1/top-5 accuracy per epoch, train vs validation."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for split, style in (("train", "-"), ("val", "--")):
        rows = history[history["split"] == split]
        axes[0].plot(rows["epoch"], rows["loss"], style, marker="o", ms=3, label=split)
        axes[1].plot(rows["epoch"], 100 * rows["top1"], style, marker="o", ms=3, label=f"{split} top-1")
        axes[1].plot(rows["epoch"], 100 * rows["top5"], style, marker="x", ms=3, alpha=0.6, label=f"{split} top-5")
    axes[0].set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    axes[1].set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy", ylim=(0, 100))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{model_name}: training curves")
    save_figure(fig, path)


def plot_top9_layer(model_name: str, layer: str, shown, field_size: int, path, cols: int = 4, inactive=()) -> None:
    """Fig. 2 style: for each shown feature map, its 9 projections (3x3, contrast-normalised)
    beside the 9 receptive-field patches of the input images, labelled by layer and channel.

    shown: LayerProjections restricted to the maps to draw. inactive: channels that never
    activate on the split (their projections are blank and their images ties at 0), so labelled.
    """
    from convviz.display import mosaic

    n = len(shown.channels)
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 1.75 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, channel in enumerate(shown.channels):
        ax = axes.flat[i]
        proj = mosaic(shown.projections[i], 3, 3)
        patch = mosaic(shown.patches[i], 3, 3)
        gap = np.full((proj.shape[0], max(2, proj.shape[1] // 12), 3), 255, dtype=np.uint8)
        ax.imshow(np.concatenate([proj, gap, patch], axis=1), interpolation="nearest")
        ax.set_title(f"{layer} #{int(channel)}" + (": never active on this split" if int(channel) in inactive else ""), fontsize=8)
    fig.suptitle(
        f"{model_name} {layer}: top-9 deconvnet projections (left) and image patches (right), "
        f"receptive field {field_size} px",
        fontsize=9,
    )
    fig.tight_layout()
    save_figure(fig, path)


def plot_per_image(model_name: str, image_id: str, image, per_layer: dict, table: pd.DataFrame, path) -> None:
    """The per-image view: the input, and per layer (rows) its 9 strongest feature maps each
    projected alone (columns), labelled with channel and activation."""
    layers = list(per_layer)
    fig, axes = plt.subplots(len(layers), 10, figsize=(13, 1.45 * len(layers) + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(image.transpose(1, 2, 0))
    axes[0, 0].set_title("input", fontsize=8)
    for r, layer in enumerate(layers):
        axes[r, 0].text(-0.1, 0.5, layer, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=9)
        rows = table[table["layer"] == layer].sort_values("rank")
        for c, row in enumerate(rows.itertuples()):
            ax = axes[r, c + 1]
            ax.imshow(per_layer[layer][c].transpose(1, 2, 0), interpolation="nearest")
            ax.set_title(f"#{row.channel} ({row.activation:.2g})", fontsize=6)
    fig.suptitle(f"{model_name}, image {image_id}: the 9 strongest feature maps of each layer, each projected alone", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_evolution(model_name: str, epochs: list[int], per_layer: dict, path, cols: int = 4) -> None:
    """Fig. 4 style: one block per layer; in each block one row per feature map and one column per
    epoch, each cell that epoch's strongest activation of the map, projected to pixels.

    per_layer: {layer: (channels [maps], projections uint8 [maps, epochs, 3, R, R])}.
    """
    from convviz.display import mosaic

    layers = list(per_layer)
    cols = max(1, min(cols, len(layers)))
    rows = -(-len(layers) // cols)
    maps = max(len(ch) for ch, _ in per_layer.values())
    fig, axes = plt.subplots(rows, cols, figsize=(0.62 * len(epochs) * cols + 1.2 * cols, 0.62 * maps * rows + 1.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, layer in zip(axes.flat, layers):
        channels, proj = per_layer[layer]
        n, e, _, side, _ = proj.shape
        ax.axis("on")
        ax.imshow(mosaic(proj.reshape(n * e, 3, side, side), n, e, pad=max(1, side // 16)), interpolation="nearest")
        step = side + max(1, side // 16)
        ax.set_xticks([step * j + side / 2 for j in range(e)], [str(ep) for ep in epochs], fontsize=7)
        ax.set_yticks([step * i + side / 2 for i in range(n)], [f"#{int(c)}" for c in channels], fontsize=7)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("epoch", fontsize=7)
    fig.suptitle(f"{model_name}: feature evolution during training (Fig. 4)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
