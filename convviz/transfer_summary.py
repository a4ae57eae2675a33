"""Rule transfer_summary: every model x target's transfer rows in one table, the mean ± std
table beside the paper's numbers, the Fig. 9 / Table 7 style figures and the best model.

The best model is the one with the highest validation top-1 on the source dataset (the last
validation row of its history.parquet; ties go to the model listed first in the config). It is
listed first in every table and figure legend so the report can show it first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from convviz import paper
from convviz.transfer import PAPER_ACCURACY, PAPER_LAYER_SHOTS, PAPER_LAYERS, PAPER_VOC_MAP, TRANSFER_COLUMNS

TABLE_COLUMNS = ["target", "model", "best_model", "probe", "layer", "n_per_class", "mean_pct", "std_pct", "splits",
                 "paper_mean_pct", "paper_std_pct"]


def best_model(histories: Mapping[str, str | Path]) -> tuple[str, dict[str, float]]:
    """(model with the best final validation top-1, {model: that top-1}) from history.parquet files."""
    top1 = {}
    for model, path in histories.items():
        history = pd.read_parquet(path)
        val = history[history["split"] == "val"]
        if val.empty:
            raise ValueError(f"{path} has no validation rows; was {model} trained for at least one epoch?")
        top1[model] = float(val.sort_values("epoch")["top1"].iloc[-1])
    order = list(histories)
    return max(order, key=lambda m: (top1[m], -order.index(m))), top1


def _paper(target: str, probe: str, layer: str, n, penultimate: bool) -> tuple[float, float]:
    """The paper's (mean, std) for this row, NaN where it has none."""
    if target == "voc2012" and probe == "sigmoid":
        return PAPER_VOC_MAP, math.nan
    found = None
    if probe == "scratch" or (probe == "softmax" and penultimate):
        found = PAPER_ACCURACY.get((target, probe, int(n))) if n is not pd.NA else None
    if found is None and PAPER_LAYER_SHOTS.get(target) == n:
        found = PAPER_LAYERS.get((target, probe, layer))
    if found is None:
        return math.nan, math.nan
    mean, std = found
    return mean, math.nan if std is None else std


def accuracy_table(transfer: pd.DataFrame, best: str, penultimate: Mapping[str, str]) -> pd.DataFrame:
    """Mean ± std over splits (percent) per target, model, probe, layer and N, with the paper's
    numbers where it has them; VOC rows carry mAP. Best model first, then config order."""
    wanted = transfer[transfer["metric"].isin(["mean_class_accuracy", "map"])]
    rows = []
    keys = ["target", "model", "probe", "layer", "n_per_class"]
    for key, group in wanted.groupby(keys, sort=False, dropna=False):
        target, model, probe, layer, n = key
        values = 100 * group["value"].to_numpy(float)
        paper_mean, paper_std = _paper(target, probe, layer, n, layer == penultimate.get(model))
        rows.append({
            "target": target, "model": model, "best_model": model == best, "probe": probe, "layer": layer,
            "n_per_class": n, "mean_pct": float(np.mean(values)),
            "std_pct": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
            "splits": len(values), "paper_mean_pct": paper_mean, "paper_std_pct": paper_std,
        })
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    table["n_per_class"] = table["n_per_class"].astype("Int64")
    models = list(dict.fromkeys([best, *transfer["model"]]))
    table["_order"] = table["model"].map({m: i for i, m in enumerate(models)})
    return table.sort_values(["target", "_order"], kind="stable").drop(columns="_order").reset_index(drop=True)


def summary_markdown(table: pd.DataFrame, best: str, top1: Mapping[str, float], layer_order: Mapping[str, list[str]] | None = None) -> str:
    """The transfer tables as Markdown: pretrained vs scratch per N (Tables 4-5, Fig. 9), layer-wise
    probes at the largest N (Table 7), VOC mAP (Table 6); paper columns beside ours where the
    target is one of the paper's. layer_order: {model: analysis layers bottom to top}."""
    lines = [
        f"Best model (validation top-1 on the source data): **{best}** ({100 * top1[best]:.1f}%); it is listed first.",
        "Accuracies are mean per-class accuracy in percent, mean ± std over the random splits. The paper's "
        "numbers are for its ImageNet-trained model on the same target where there is one (— otherwise).",
        "",
    ]
    for target, rows in table.groupby("target", sort=False):
        lines.append(f"### {target}")
        if target == "voc2012":
            lines += ["", "| model | mean AP (%) | paper |", "|---|---|---|"]
            for r in rows.itertuples(index=False):
                lines.append(f"| {r.model}{' (best)' if r.best_model else ''} | {paper.fmt((r.mean_pct, r.std_pct))} | {paper.fmt((r.paper_mean_pct, r.paper_std_pct))} |")
            lines.append("")
            continue
        main = rows[rows["probe"].isin(["softmax", "scratch"])]
        shots = sorted(int(n) for n in rows["n_per_class"].dropna().unique())
        has_paper = bool(rows["paper_mean_pct"].notna().any())  # paper columns only for the paper's targets
        heads = [f"N={n} | paper N={n}" if has_paper else f"N={n}" for n in shots]
        lines += ["", "Frozen features + softmax (pretrained) vs the same net trained from scratch:", "",
                  "| model | method | " + " | ".join(heads) + " |", "|---|---|" + ("---|---|" if has_paper else "---|") * len(shots)]
        for model in dict.fromkeys(rows["model"]):
            for probe, label in (("softmax", "pretrained"), ("scratch", "from scratch")):
                sel = main[(main["model"] == model) & (main["probe"] == probe)]
                if probe == "softmax":
                    penultimate_rows = sel.groupby("layer")["n_per_class"].nunique()
                    if penultimate_rows.empty:
                        continue
                    sel = sel[sel["layer"] == penultimate_rows.idxmax()]
                if sel.empty:
                    continue
                cells = []
                for n in shots:
                    hit = sel[sel["n_per_class"] == n]
                    cells.append(paper.fmt((hit["mean_pct"].iloc[0], hit["std_pct"].iloc[0])) if len(hit) else "—")
                    if has_paper:
                        cells.append(paper.fmt((hit["paper_mean_pct"].iloc[0], hit["paper_std_pct"].iloc[0])) if len(hit) else "—")
                best_mark = " (best)" if model == best else ""
                lines.append(f"| {model}{best_mark} | {label} | " + " | ".join(cells) + " |")
        layer_rows = rows[rows["probe"].isin(["softmax", "svm"])]
        if len(layer_rows):
            largest = int(layer_rows["n_per_class"].max())
            at = layer_rows[layer_rows["n_per_class"] == largest]
            heads = "| model | layer | softmax | paper softmax | SVM | paper SVM |" if has_paper else "| model | layer | softmax | SVM |"
            lines += ["", f"Layer-wise linear probes at N={largest} (cf. Table 7):", "", heads,
                      "|---|---|---|---|---|---|" if has_paper else "|---|---|---|---|"]
            for model in dict.fromkeys(at["model"]):
                sub = at[at["model"] == model]
                present = list(dict.fromkeys(sub["layer"]))
                order = [l for l in (layer_order or {}).get(model, []) if l in present] or present
                for layer in order:
                    cells = []
                    for probe in ("softmax", "svm"):
                        hit = sub[(sub["layer"] == layer) & (sub["probe"] == probe)]
                        cells.append(paper.fmt((hit["mean_pct"].iloc[0], hit["std_pct"].iloc[0])) if len(hit) else "—")
                        if has_paper:
                            cells.append(paper.fmt((hit["paper_mean_pct"].iloc[0], hit["paper_std_pct"].iloc[0])) if len(hit) else "—")
                    lines.append(f"| {model} | {layer} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------- figures


def plot_target(table: pd.DataFrame, target: str, layer_order: Mapping[str, list[str]], path) -> None:
    """Classification targets: accuracy vs images per class, pretrained (solid) vs from scratch
    (dashed) (cf. Fig. 9), and accuracy by layer at the largest N (cf. Table 7), one panel per
    model. VOC: average precision per model (mAP)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from convviz.io import save_figure

    rows = table[table["target"] == target]
    models = list(dict.fromkeys(rows["model"]))
    colours = {m: f"C{i}" for i, m in enumerate(models)}
    if target == "voc2012":
        fig, ax = plt.subplots(figsize=(1.2 * len(models) + 3, 3.6))
        ax.bar(models, rows.set_index("model").loc[models, "mean_pct"], color=[colours[m] for m in models])
        ax.axhline(PAPER_VOC_MAP, color="k", ls=":", label=f"paper {PAPER_VOC_MAP}")
        ax.set(ylabel="mean AP on val (%)", title=f"{target}: frozen features + sigmoids (cf. Table 6)", ylim=(0, 100))
        ax.legend()
        save_figure(fig, path)
        return
    fig = plt.figure(figsize=(max(10, 3.2 * len(models)), 7.5))
    grid = fig.add_gridspec(2, len(models))
    ax = fig.add_subplot(grid[0, :])
    for model in models:
        for probe, style, label in (("softmax", "-o", "pretrained"), ("scratch", "--s", "from scratch")):
            sel = rows[(rows["model"] == model) & (rows["probe"] == probe)]
            if probe == "softmax":
                sel = sel[sel["layer"] == layer_order[model][-1]]
            if sel.empty:
                continue
            sel = sel.sort_values("n_per_class")
            ax.errorbar(sel["n_per_class"].astype(float), sel["mean_pct"], yerr=sel["std_pct"].fillna(0), fmt=style,
                        color=colours[model], capsize=3, ms=4, label=f"{model}{' (best)' if rows[rows['model'] == model]['best_model'].iloc[0] else ''} {label}")
    ax.set(xlabel="training images per class", ylabel="mean per-class accuracy (%)", ylim=(0, 100),
           title=f"{target}: frozen features + softmax vs training from scratch (cf. Fig. 9)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    layer_rows = rows[rows["probe"].isin(["softmax", "svm"])]
    largest = layer_rows["n_per_class"].max()
    shared = None
    for i, model in enumerate(models):
        ax = fig.add_subplot(grid[1, i], sharey=shared)
        shared = shared or ax
        sub = layer_rows[(layer_rows["model"] == model) & (layer_rows["n_per_class"] == largest)]
        order = [layer for layer in layer_order[model] if layer in set(sub["layer"])]
        for probe, style in (("softmax", "-o"), ("svm", "--s")):
            sel = sub[sub["probe"] == probe].set_index("layer").reindex(order)
            ax.errorbar(range(len(order)), sel["mean_pct"], yerr=sel["std_pct"].fillna(0), fmt=style, color=colours[model],
                        capsize=3, ms=4, label=probe)
        ax.set_xticks(range(len(order)), order, rotation=45, fontsize=8)
        ax.set(title=f"{model} by layer, N={largest}", ylim=(0, 100))
        ax.grid(alpha=0.3)
        if i == 0:
            ax.set_ylabel("mean per-class accuracy (%)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------- the rule


@dataclass
class TransferSummaryOutputs:
    table: Path  # transfer.parquet: every row of every model x target
    accuracy: Path  # transfer_table.parquet: mean ± std with the paper's numbers
    markdown: Path
    summary_json: Path
    figures: dict[str, Path]  # target -> figure


def summarise_transfer(parts: Mapping[tuple[str, str], str | Path], histories: Mapping[str, str | Path],
                       outputs: TransferSummaryOutputs, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Concatenate the per-(model, target) tables (best model first) and write the summaries."""
    from convviz.compare import with_text
    from convviz.io import write_json, write_parquet
    from convviz.models.registry import get_spec

    best, top1 = best_model(histories)
    frames = [pd.read_parquet(path) for path in parts.values()]
    transfer = pd.concat(frames, ignore_index=True)[TRANSFER_COLUMNS] if frames else pd.DataFrame(columns=TRANSFER_COLUMNS)
    order = {m: i for i, m in enumerate(dict.fromkeys([best, *histories]))}
    transfer = transfer.sort_values("model", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    models = list(dict.fromkeys(transfer["model"]))
    penultimate = {m: get_spec(m).penultimate for m in models}
    table = accuracy_table(transfer, best, penultimate)
    for target, path in outputs.figures.items():
        plot_target(table, target, {m: list(get_spec(m).layers) for m in models}, path)
    summary = {
        "best_model": best,
        "val_top1": top1,
        "model_order": list(order),
        "targets": sorted(set(transfer["target"])),
    }
    write_parquet(table, outputs.accuracy)
    with_text(outputs.markdown, summary_markdown(table, best, top1, {m: list(get_spec(m).layers) for m in models}))
    write_json(summary, outputs.summary_json)
    write_parquet(transfer, outputs.table)
    log(f"done: {len(transfer)} transfer rows of {len(models)} models x {len(summary['targets'])} targets; best model {best}")
    return table
