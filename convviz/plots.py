"""Figures shared by several steps. Every figure is titled and labelled so it stands alone."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # rules run headless

import matplotlib.pyplot as plt  # noqa: E402
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
