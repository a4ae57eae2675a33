"""The report's sections, in the paper's order. Each renders from whatever its study produced and
returns None when the study did not run (the page then shows a one-line note instead)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from convviz import paper
from convviz.report.html import esc, figure, figure_uri, img_tag, markdown, markdown_sections, mean_std, table
from convviz.report.html import data_uri, png_bytes
from convviz.report.inputs import ReportInputs


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    paper_ref: str
    render: Callable[["Context"], str | None]
    absent_note: str


@dataclass
class Context:
    inputs: ReportInputs
    config: dict
    settings: dict  # config["report"]
    software: dict
    log: Callable[[str], None]

    def fig(self, path: Path, caption: str) -> str:
        return figure(figure_uri(path, self.settings["figure_max_px"]), caption)


# ------------------------------------------------------------------------------------------ helpers


def _label(path: Path) -> str:
    """A caption from a figure's file name: `figures/conv1.png` -> `conv1`."""
    return path.stem.replace("_", " ")


def _figures_by_model(ctx: Context, study: str, exclude: Callable[[Path], bool] = lambda p: False) -> str:
    """Every PNG figure of a study, grouped by model (cross-model figures first)."""
    figures = [f for f in ctx.inputs.study(study, suffix=".png") if not exclude(f)]
    parts = []
    shared = [f for f in figures if ctx.inputs.model_of(f) is None]
    if shared:
        parts.append('<div class="figs">' + "".join(ctx.fig(f, _label(f)) for f in shared) + "</div>")
    for model in ctx.inputs.models:
        mine = [f for f in figures if ctx.inputs.model_of(f) == model]
        if mine:
            figs = "".join(ctx.fig(f, f"{esc(model)} · {esc(_label(f))}") for f in mine)
            parts.append(f'<h3 id="{study}-{model}">{esc(model)}</h3><div class="figs">{figs}</div>')
    return "".join(parts)


def _tables_list(ctx: Context, study: str) -> str:
    """The study's tables: file, rows and columns, so a reader knows where the numbers are."""
    rows = []
    for path in ctx.inputs.study(study, suffix=".parquet"):
        df = pd.read_parquet(path)
        rows.append({"table": str(path), "rows": len(df), "columns": ", ".join(map(str, df.columns))})
    if not rows:
        return ""
    return '<details class="tables"><summary>Tables of this study</summary>' + table(pd.DataFrame(rows)) + "</details>"


def _history(ctx: Context, model: str) -> pd.DataFrame | None:
    path = ctx.inputs.find("models", "history.parquet", model)
    return pd.read_parquet(path) if path else None


def best_model(ctx: Context) -> str | None:
    """The model with the best final validation top-1 (issue 5: shown first, marked)."""
    scores = {}
    for model in ctx.inputs.models:
        history = _history(ctx, model)
        if history is not None and len(history[history["split"] == "val"]):
            val = history[history["split"] == "val"].sort_values("epoch")
            scores[model] = float(val["top1"].iloc[-1])
    return max(scores, key=scores.get) if scores else None


# -------------------------------------------------------------------------------------------- setup


def _dataset_samples(ctx: Context, manifest_path: Path, title: str) -> str:
    from convviz.data.common import load_image

    data_dir = manifest_path.parent
    meta_path = data_dir / "dataset.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    manifest = pd.read_parquet(manifest_path)
    per_class = ctx.settings["samples_per_class"]
    max_classes = ctx.settings["sample_classes"]
    split = "val" if (manifest["split"] == "val").any() else manifest["split"].iloc[0]
    rows = manifest[manifest["split"] == split]
    classes = list(dict.fromkeys(rows.sort_values("label")["class_name"]))
    size = meta.get("image_size")
    cells = []
    for name in classes[:max_classes]:
        thumbs = []
        for path in rows[rows["class_name"] == name]["path"].head(per_class):
            path = Path(path) if Path(path).is_absolute() else data_dir / path
            thumbs.append(img_tag(data_uri(png_bytes(load_image(path, size))), f"{name}: {path.name}", cls="thumb"))
        cells.append(f'<div class="sample"><div>{"".join(thumbs)}</div><span>{esc(name)}</span></div>')
    more = f"<p class='note'>{len(classes) - max_classes} more classes not shown.</p>" if len(classes) > max_classes else ""
    counts = ", ".join(f"{k}: {v}" for k, v in meta.get("counts", manifest["split"].value_counts().to_dict()).items())
    facts = (
        f"<p><strong>{esc(meta.get('name', ''))}</strong>, {len(classes)} classes, {esc(counts)} images"
        + (f", {size}×{size} px" if size else "")
        + f". Samples from the {esc(split)} split.</p>"
    )
    return f"<h3>{esc(title)}</h3>{facts}<div class='samples'>{''.join(cells)}</div>{more}"


def _models_table(ctx: Context) -> str:
    from convviz.models.checkpoint import load_checkpoint
    from convviz.models.registry import get_spec

    best = best_model(ctx)
    rows = []
    for model in ctx.inputs.models:
        spec = get_spec(model)
        row = {"model": model + (" ★" if model == best else ""), "analysis layers": ", ".join(spec.layers)}
        final = ctx.inputs.find("models", "final.pt", model)
        if final:
            checkpoint = load_checkpoint(final)
            row["parameters"] = f"{sum(t.numel() for t in checkpoint['state_dict'].values() if hasattr(t, 'numel')):,}"
            row["epochs"] = checkpoint.get("epoch")
        history = _history(ctx, model)
        if history is not None:
            val = history[history["split"] == "val"].sort_values("epoch")
            if len(val):
                row["val top-1 (%)"] = round(100 * float(val["top1"].iloc[-1]), 1)
                row["val top-5 (%)"] = round(100 * float(val["top5"].iloc[-1]), 1)
        rows.append(row)
    note = f"<p>★ best validation top-1: <strong>{esc(best)}</strong>.</p>" if best else ""
    return "<h3>Models</h3>" + table(pd.DataFrame(rows)) + note


def render_setup(ctx: Context) -> str:
    parts = []
    manifests = [f for f in ctx.inputs.study("data", suffix="manifest.parquet")]
    for manifest in manifests:
        kind = "Source dataset" if manifest.parent.name == "source" else f"Transfer target: {manifest.parent.name}"
        parts.append(_dataset_samples(ctx, manifest, kind))
    parts.append(_models_table(ctx))
    config_yaml = yaml.safe_dump(ctx.config, sort_keys=False, default_flow_style=None, width=100)
    parts.append(f"<h3>Configuration used</h3><details><summary>config (after defaults)</summary><pre>{esc(config_yaml)}</pre></details>")
    software = pd.DataFrame(list(ctx.software.items()), columns=["component", "version"])
    parts.append("<h3>Software and machine</h3>" + table(software))
    return "".join(parts)


# ----------------------------------------------------------------------------------------- training


def render_training(ctx: Context) -> str | None:
    curves = ctx.inputs.study("models", suffix="training_curves.png")
    if not curves:
        return None
    rows = []
    for model in ctx.inputs.models:
        history = _history(ctx, model)
        if history is None:
            continue
        for split in ("train", "val"):
            mine = history[history["split"] == split].sort_values("epoch")
            if len(mine):
                last = mine.iloc[-1]
                rows.append(
                    {
                        "model": model,
                        "split": split,
                        "epochs": int(last["epoch"]),
                        "loss": round(float(last["loss"]), 3),
                        "top-1 (%)": round(100 * float(last["top1"]), 1),
                        "top-5 (%)": round(100 * float(last["top5"]), 1),
                        "time (s)": round(float(mine["seconds"].sum()), 1),
                    }
                )
    figs = "".join(ctx.fig(f, f"{esc(ctx.inputs.model_of(f))}: loss and accuracy per epoch") for f in curves)
    return (table(pd.DataFrame(rows)) if rows else "") + f'<div class="figs">{figs}</div>'


# -------------------------------------------------------------------------------------------- top-9


def render_top9(ctx: Context) -> str | None:
    if not ctx.inputs.has("top9"):
        return None
    parts = [
        "<p>For each feature map: the 9 validation images on which it is most strongly active, their "
        "deconvnet projections to pixel space (left grids) and the receptive-field patches of the "
        "input (right grids), as in the paper's Fig. 2.</p>"
    ]
    for model in ctx.inputs.models:
        figures = ctx.inputs.study("top9", suffix=".png", model=model)
        if not figures:
            continue
        per_layer = [f for f in figures if "per_image" not in str(f)]
        per_image = [f for f in figures if "per_image" in str(f)]
        body = "".join(ctx.fig(f, f"{esc(model)} · {esc(_label(f))}") for f in per_layer)
        if per_image:
            body += "<h4>The 9 strongest feature maps of each layer, per image</h4>"
            body += "".join(ctx.fig(f, f"{esc(model)} · {esc(_label(f))}") for f in per_image)
        is_open = " open" if model == (best_model(ctx) or ctx.inputs.models[0]) else ""
        parts.append(f'<details class="model"{is_open}><summary id="top9-{model}">{esc(model)}</summary><div class="figs">{body}</div></details>')
    parts.append(_tables_list(ctx, "top9"))
    return "".join(parts)


def render_unit_browser(ctx: Context) -> str | None:
    """The browser's controls; its data sit in JSON script blocks written by `unit_data_blocks`."""
    if not [f for f in ctx.inputs.study("top9") if f.name == "top9_arrays.npz"]:
        return None
    return (
        "<p>Choose a model, a layer and a feature map: its 9 strongest activations as deconvnet "
        "projections and input patches, their activations, and how the feature map developed over "
        "the training epochs where the evolution study followed it. Keys: ← → step through feature maps.</p>"
        '<div id="unit-browser" class="unit-browser">'
        '<div class="ub-controls">'
        '<label>model <select id="ub-model"></select></label>'
        '<label>layer <select id="ub-layer"></select></label>'
        '<label>feature map <select id="ub-channel"></select></label>'
        '<button type="button" id="ub-prev" aria-label="previous feature map">◀</button>'
        '<button type="button" id="ub-next" aria-label="next feature map">▶</button>'
        '<span id="ub-count" class="note"></span>'
        "</div>"
        '<div id="ub-view" class="ub-view" aria-live="polite"></div>'
        "</div>"
    )


def unit_data_blocks(ctx: Context) -> str:
    """One JSON script block per model (parsed by the page only when that model is chosen)."""
    from convviz.report.units import model_units

    blocks = []
    for model in ctx.inputs.models:
        npz = ctx.inputs.find("top9", "top9_arrays.npz", model)
        if npz is None:
            continue
        top9 = ctx.inputs.find("top9", "top9.parquet", model)
        evo_table = ctx.inputs.find("evolution", "evolution.parquet", model)
        evo_npz = [f for f in ctx.inputs.study("evolution", suffix=".npz", model=model)]
        start = time.perf_counter()
        data = model_units(
            model,
            npz,
            pd.read_parquet(top9) if top9 else None,
            pd.read_parquet(evo_table) if evo_table else None,
            evo_npz[0] if evo_npz else None,
            units_per_layer=ctx.settings["units_per_layer"],
            tile_px=ctx.settings["unit_tile_px"],
            colours=ctx.settings["unit_colours"],
            seed=ctx.config.get("seed", 0),
        )
        text = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
        units = sum(len(layer["units"]) for layer in data["layers"])
        ctx.log(f"unit browser: {model}: {units} feature maps, {len(text) / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s")
        blocks.append(f'<script type="application/json" class="unit-data" data-model="{esc(model)}">{text}</script>')
    return "".join(blocks)


# ------------------------------------------------------------------------------- figure-only studies


def render_figures(study: str, intro: str) -> Callable[[Context], str | None]:
    def render(ctx: Context) -> str | None:
        if not ctx.inputs.has(study):
            return None
        return f"<p>{intro}</p>" + _figures_by_model(ctx, study) + _tables_list(ctx, study)

    return render


def render_occlusion(ctx: Context) -> str | None:
    if not ctx.inputs.has("occlusion"):
        return None
    parts = [
        "<p>A grey square slides over each image; per position: the total activation of the top "
        "convolutional layer's strongest feature map, P(true class) and the most probable class "
        "(Fig. 7).</p>"
    ]
    localisation = [pd.read_parquet(f) for f in ctx.inputs.study("occlusion", suffix="occlusion_localisation.parquet")]
    if localisation:
        parts.append("<h3>Does the occluder find the object?</h3>" + table(pd.concat(localisation, ignore_index=True)))
    parts.append(_figures_by_model(ctx, "occlusion"))
    parts.append(_tables_list(ctx, "occlusion"))
    return "".join(parts)


# ----------------------------------------------------------------------------------- architecture


def render_compare(ctx: Context) -> str | None:
    if not ctx.inputs.has("compare"):
        return None
    parts = ["<p>First-layer filters, early-layer projections and per-layer measures of every model (Fig. 6).</p>"]
    # The study's own summary (its verdict, from its numbers) first, then its other tables.
    for path in sorted(ctx.inputs.study("compare", suffix=".md"), key=lambda p: "summary" not in p.stem):
        heading = "" if "summary" in path.stem else f"<h3>{esc(_label(path).capitalize())}</h3>"
        parts.append(heading + markdown(path.read_text()))
    for path in ctx.inputs.study("compare", suffix="compare.parquet"):
        df = pd.read_parquet(path)
        if {"model", "layer", "metric", "value"} <= set(df.columns):
            wide = df.pivot_table(index=["model", "layer"], columns="metric", values="value", aggfunc="first", sort=False)
            parts.append("<details><summary>Every measure per model and layer</summary>" + table(wide.reset_index(), cls="wide") + "</details>")
    parts.append(_figures_by_model(ctx, "compare"))
    parts.append(_tables_list(ctx, "compare"))
    return "".join(parts)


# --------------------------------------------------------------------------------- correspondence


def _paper_occluder(name: str) -> str | None:
    name = str(name).lower()
    return "random" if name.startswith("random") else (name if name in paper.TABLE1 else None)


def table1(df: pd.DataFrame, model: str, top_conv: str, penultimate: str) -> pd.DataFrame:
    """The paper's Table 1 for one model: Δ mean ± std over draws for each occluder at the top
    conv layer ("layer 5") and the last hidden layer ("layer 7"), with the paper's values beside."""
    mine = df[df["model"] == model]
    rows = []
    for occluder, group in mine.groupby("occluder", sort=False):
        key = _paper_occluder(occluder)
        row = {"occluder": occluder}
        for ours, theirs in ((top_conv, 5), (penultimate, 7)):
            row[f"ours: {ours}"] = mean_std(group[group["layer"] == ours]["delta"])
            row[f"paper: layer {theirs}"] = paper.fmt(paper.TABLE1[key][theirs], 3) if key else "—"
        rows.append(row)
    return pd.DataFrame(rows)


def render_correspondence(ctx: Context) -> str | None:
    from convviz.models.registry import get_spec

    paths = ctx.inputs.study("correspondence", suffix="correspondence.parquet")
    if not paths and not ctx.inputs.has("correspondence"):
        return None
    parts = [
        "<p>Occluding the same part in different images of a class: Δ_l is the mean normalised "
        "Hamming distance between the signs of the feature-vector changes of every pair of images. "
        "Lower Δ than for random occluders means the network relates that part across images "
        "(Table 1).</p>"
    ]
    if paths:
        df = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
        for model in [m for m in ctx.inputs.models if m in set(df["model"])]:
            spec = get_spec(model)
            parts.append(f"<h3>{esc(model)}</h3>")
            parts.append(table(table1(df, model, spec.top_conv, spec.penultimate), cls="paper"))
            mine = df[df["model"] == model]
            layers = [l for l in spec.layers if l in set(mine["layer"])]
            wide = pd.DataFrame(
                [
                    {"occluder": occ, **{l: mean_std(g[g["layer"] == l]["delta"]) for l in layers}}
                    for occ, g in mine.groupby("occluder", sort=False)
                ]
            )
            parts.append(f"<details><summary>Δ at every layer</summary>{table(wide)}</details>")
    parts.append(_figures_by_model(ctx, "correspondence"))
    parts.append(_tables_list(ctx, "correspondence"))
    return "".join(parts)


# --------------------------------------------------------------------------------------- transfer

ACCURACY = "mean_class_accuracy"


def _acc_cell(values: pd.Series) -> str:
    """Accuracy in percent, mean ± std over the random splits (as the paper's tables)."""
    return mean_std(100 * values.astype(float), digits=1)


def _paper_layer_number(layer: str) -> int | None:
    """`conv3` -> 3, `fc7` -> 7: our layer names that are the paper's layer numbers."""
    m = re.fullmatch(r"(?:conv|fc)(\d)", layer)
    return int(m.group(1)) if m else None


def transfer_by_shots(df: pd.DataFrame, target: str, models: list[str], penultimate: dict[str, str], best: str | None) -> pd.DataFrame:
    """Tables 4/5: per model, the softmax on the frozen penultimate layer and the same network
    trained from scratch, by training images per class; the paper's rows below where the target
    is the paper's dataset."""
    acc = df[(df["target"] == target) & (df["metric"] == ACCURACY)]
    shots = sorted({int(n) for n in acc["n_per_class"].dropna()})
    reference = paper.TRANSFER_TABLES.get(target)
    if reference:
        shots = sorted(set(shots) | {n for per in reference[1].values() for n in per})
    rows = []
    for model in models:
        mine = acc[acc["model"] == model]
        for probe, label in (("softmax", f"frozen features: softmax on {penultimate[model]}"), ("scratch", "trained from scratch")):
            chosen = mine[(mine["probe"] == probe) & ((probe == "scratch") | (mine["layer"] == penultimate[model]))]
            if chosen.empty:
                continue
            row = {"model": model + (" ★" if model == best else ""), "method": label}
            for n in shots:
                values = chosen[chosen["n_per_class"] == n]["value"]
                row[f"{n} / class"] = _acc_cell(values) if len(values) else "—"
            rows.append(row)
    if reference:
        name, numbers = reference
        for method, per in numbers.items():
            label = "ImageNet-pretrained, softmax on layer 7" if method == "pretrained" else "trained from scratch"
            rows.append({"model": f"paper ({name}, ZFNet)", "method": label, **{f"{n} / class": paper.fmt(per.get(n)) for n in shots}})
    return pd.DataFrame(rows)


def transfer_by_layer(df: pd.DataFrame, target: str, model: str, layers: list[str]) -> pd.DataFrame:
    """Table 7: softmax and linear SVM on each layer's frozen features at the largest N (mean ±
    std over splits); the paper's rows where the target is its dataset and the layers are conv1-5/fc6/fc7."""
    acc = df[(df["target"] == target) & (df["metric"] == ACCURACY) & (df["model"] == model) & df["probe"].isin(["softmax", "svm"])]
    if acc.empty:
        return pd.DataFrame()
    largest = int(acc["n_per_class"].max())
    acc = acc[acc["n_per_class"] == largest]
    layers = [l for l in layers if l in set(acc["layer"])]
    rows = []
    for probe in ("softmax", "svm"):
        mine = acc[acc["probe"] == probe]
        if len(mine):
            rows.append({"": f"ours: {probe}, {largest} / class", **{l: _acc_cell(mine[mine["layer"] == l]["value"]) if (mine["layer"] == l).any() else "—" for l in layers}})
    if target in paper.TABLE7 and all(_paper_layer_number(l) for l in layers):
        ref = paper.TABLE7[target]
        for probe in ("softmax", "svm"):
            rows.append({"": f"paper: {probe}, {ref['shots']} / class", **{l: paper.fmt(ref[probe].get(_paper_layer_number(l))) for l in layers}})
    return pd.DataFrame(rows)


def transfer_multilabel(df: pd.DataFrame, target: str, models: list[str]) -> str:
    """Table 6: mean average precision (and per-class AP) on a multi-label target."""
    mine = df[(df["target"] == target) & ((df["metric"] == "map") | df["metric"].str.startswith("ap/"))]
    if mine.empty:
        return ""
    rows = [{"model": m, "mean AP (%)": f"{100 * float(mine[(mine['model'] == m) & (mine['metric'] == 'map')]['value'].mean()):.1f}"} for m in models if (mine["model"] == m).any()]
    if target == "voc2012":
        rows.append({"model": "paper (Table 6, ZFNet)", "mean AP (%)": f"{paper.TABLE6_MEAN_AP:.1f}"})
    per_class = mine[mine["metric"].str.startswith("ap/")].assign(
        cls=lambda d: d["metric"].str.slice(3), value=lambda d: (100 * d["value"].astype(float)).round(1)
    )
    wide = per_class.pivot_table(index="cls", columns="model", values="value", aggfunc="mean", sort=False).reset_index()
    return table(pd.DataFrame(rows), cls="paper") + f"<details><summary>AP per class (%)</summary>{table(wide)}</details>"


def render_transfer(ctx: Context) -> str | None:
    from convviz.models.registry import get_spec

    if not ctx.inputs.has("transfer"):
        return None
    paths = ctx.inputs.study("transfer", suffix="transfer.parquet")
    parts = [
        "<p>Frozen features of each trained model with a new classifier trained on N images per "
        "class of a target dataset, against the same architecture trained from scratch on the same "
        "images; mean per-class accuracy (%), mean ± std over random splits (Sec. 5.2, Tables 4-7). "
        "★ marks the model with the best validation top-1 on the source dataset; it is listed first.</p>"
    ]
    if paths:
        df = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
        best = best_model(ctx)
        models = [m for m in ctx.inputs.models if m in set(df["model"])]
        models = sorted(models, key=lambda m: m != best)
        penultimate = {m: get_spec(m).penultimate for m in models}
        for target in dict.fromkeys(df["target"]):
            parts.append(f"<h3>{esc(target)}</h3>")
            multilabel = transfer_multilabel(df, target, models)
            if multilabel:
                parts.append(multilabel)
                continue
            name = paper.TRANSFER_TABLES.get(target, ("", None))[0]
            parts.append(f"<h4>By training images per class{f' ({name})' if name else ''}</h4>")
            parts.append(table(transfer_by_shots(df, target, models, penultimate, best), cls="wide"))
            if target not in paper.TRANSFER_TABLES:
                parts.append("<p class='note'>The paper reports Caltech-101, Caltech-256 and PASCAL VOC 2012; this target has no paper numbers.</p>")
            for model in models:
                by_layer = transfer_by_layer(df, target, model, list(get_spec(model).layers))
                if not by_layer.empty:
                    parts.append(f"<h4>{esc(model)}: each layer's features (Table 7)</h4>" + table(by_layer, cls="wide"))
    parts.append(_figures_by_model(ctx, "transfer"))
    parts.append(_tables_list(ctx, "transfer"))
    return "".join(parts)


# ------------------------------------------------------------------------------------- benchmarks


def _json_benchmark(path: Path) -> str:
    data = json.loads(path.read_text())
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
    scalars = {k: v for k, v in data.items() if not isinstance(v, (list, dict))}
    body = f"<h4>{esc(path.name)}</h4><p class='note'>written {when} by a script in benchmarks/</p>"
    if scalars:
        body += table(pd.DataFrame([{k: json.dumps(v) if isinstance(v, bool) else v for k, v in scalars.items()}]))
    rows = data.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        flat = [{k: (", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()} for r in rows]
        body += table(pd.DataFrame(flat), cls="wide")
    return body


def render_benchmarks(ctx: Context) -> str | None:
    parts = []
    if ctx.inputs.readme is not None:
        for heading, body in markdown_sections(ctx.inputs.readme.read_text(), r"measured|benchmark"):
            parts.append(f"<h3>{esc(heading)}</h3>{markdown(body)}")
        if parts:
            parts.insert(0, "<p>As measured and recorded in the README:</p>")
    if ctx.inputs.benchmark_results:
        parts.append("<h3>Latest benchmark results on this machine</h3>")
        parts.extend(_json_benchmark(p) for p in ctx.inputs.benchmark_results)
    return "".join(parts) or None


# ---------------------------------------------------------------------------------------- timings


def timings(paths: list[Path]) -> pd.DataFrame:
    """One row per job from Snakemake's benchmark files (results/benchmarks/<step>/<job>.tsv);
    repeated measurements are averaged."""
    rows = []
    for path in paths:
        df = pd.read_csv(path, sep="\t")
        if df.empty:
            continue
        parts = Path(path).with_suffix("").parts
        inside = len(parts) > 3 and parts[:2] == ("results", "benchmarks")
        rows.append(
            {
                "step": parts[2] if inside else Path(path).parent.name,
                "job": "/".join(parts[3:]) if inside else Path(path).stem,
                "wall (s)": float(df["s"].mean()),
                "CPU (s)": float(df["cpu_time"].mean()) if "cpu_time" in df else np.nan,
                "max RSS (MB)": float(df["max_rss"].mean()) if "max_rss" in df else np.nan,
                "mean load (%)": float(df["mean_load"].mean()) if "mean_load" in df else np.nan,
            }
        )
    return pd.DataFrame(rows, columns=["step", "job", "wall (s)", "CPU (s)", "max RSS (MB)", "mean load (%)"])


def _bar(seconds: float, longest: float) -> str:
    width = 0 if longest <= 0 else max(1, round(200 * seconds / longest))
    return f'<span class="bar" style="width:{width}px"></span> {seconds:.1f}'


def render_timings(ctx: Context) -> str | None:
    df = timings(ctx.inputs.benchmarks)
    if df.empty:
        return None
    longest = float(df["wall (s)"].max())
    shown = df.assign(**{"wall (s)": [_bar(s, longest) for s in df["wall (s)"]]})
    shown = shown.round({"CPU (s)": 1, "max RSS (MB)": 0, "mean load (%)": 0})
    per_step = df.groupby("step", sort=False).agg(jobs=("job", "size"), wall=("wall (s)", "sum"), cpu=("CPU (s)", "sum"))
    per_step = per_step.reset_index().rename(columns={"wall": "wall, summed (s)", "cpu": "CPU, summed (s)"}).round(1)
    total = df["wall (s)"].sum()
    return (
        f"<p>From each rule's <code>benchmark:</code> file. {len(df)} jobs, {total:.0f} s of wall time summed over "
        "jobs (jobs run in parallel, so the run itself took less).</p>"
        + table(per_step)
        + "<details><summary>every job</summary>"
        + table(shown, raw_columns=("wall (s)",))
        + "</details>"
    )


# ----------------------------------------------------------------------------------------- order

SECTIONS = [
    Section("setup", "Setup", "Sec. 3", render_setup, "no dataset or models"),
    Section("training", "Training", "Sec. 3", render_training, "no training curves in this run"),
    Section("top9", "Top-9 per layer", "Fig. 2", render_top9, "the top-9 study did not run"),
    Section("unit-browser-section", "Unit browser", "Fig. 2", render_unit_browser, "no top-9 projections to browse"),
    Section(
        "evolution",
        "Feature evolution during training",
        "Fig. 4",
        render_figures(
            "evolution",
            "The strongest activation of a sample of feature maps, projected to pixels, at each "
            "checkpoint epoch: lower layers settle within a few epochs, upper layers only later (Fig. 4).",
        ),
        "the evolution study is not in this configuration",
    ),
    Section(
        "invariance",
        "Feature invariance",
        "Fig. 5",
        render_figures(
            "invariance",
            "Images translated vertically, scaled and rotated: distance between the original's and the "
            "transformed image's feature vectors at the first and last hidden layers, and P(true class) (Fig. 5).",
        ),
        "the invariance study is not in this configuration",
    ),
    Section("compare", "Architecture comparison", "Fig. 6", render_compare, "the comparison study is not in this configuration"),
    Section("occlusion", "Occlusion sensitivity", "Fig. 7", render_occlusion, "the occlusion study is not in this configuration"),
    Section(
        "correspondence", "Correspondence", "Table 1, Fig. 8", render_correspondence, "the correspondence study is not in this configuration"
    ),
    Section("transfer", "Transfer to other datasets", "Tables 4-7", render_transfer, "transfer is disabled in this configuration"),
    Section("benchmarks", "Benchmarks", "", render_benchmarks, "no benchmark figures recorded"),
    Section("timings", "How long each step took", "", render_timings, "no benchmark files"),
]
