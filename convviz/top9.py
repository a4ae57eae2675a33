"""Per-layer top-9 visualisations (the paper's Fig. 2) and the per-image view.

For every analysis layer: one streaming pass over a split finds, per feature map, the 9 distinct
images with the strongest activation and where it occurred (convviz.topk); then a seeded subset
of feature maps (or all) has each of its 9 activations projected to pixels by the deconvnet,
many per backward pass (convviz.deconv), and cropped to the unit's receptive field, computed
from the architecture (convviz.receptive), beside the same crop of the input image.

The per-image view takes a few images and, for each analysis layer, the 9 feature maps whose
strongest activation on that image is highest, each projected alone (the whole map, every other
map of the layer set to zero).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from convviz.analysis import image_batches, seeded_sample, with_oom_retry
from convviz.data.common import ImageDataset
from convviz.deconv import forward_to, project
from convviz.deconv_graph import graph_unsupported
from convviz.display import GREY, canvas_side, contrast_normalise, crop_boxes, crop_to_canvas
from convviz.models.registry import get_spec, layer_modules, resolve_layers
from convviz.topk import mine_top9

K = 9
TOP9_COLUMNS = ["model", "layer", "channel", "rank", "image_id", "activation", "y", "x", "box_y0", "box_x0", "box_y1", "box_x1"]
PER_IMAGE_COLUMNS = ["model", "image_id", "layer", "rank", "channel", "activation", "y", "x"]


@dataclass
class LayerProjections:
    """The displayed part of one layer's top-9: for each projected channel, 9 projections and patches.

    channels [N]; projections, patches: uint8 [N, 9, 3, R, R] (R: the layer's receptive field,
    at most the image); a rank with no image (a split smaller than 9) is grey.
    """

    channels: np.ndarray
    projections: np.ndarray
    patches: np.ndarray


def choose_method(model_name: str, method: str, model: nn.Module | None = None) -> str:
    """auto: the explicit deconvnet for plain stacks, the graph deconvnet for other networks it can
    trace (both faster: one forward per image), else autograd (`general`). model: checked for
    what the graph deconvnet handles (None: assumed to be the registry's)."""
    if method == "auto":
        if get_spec(model_name).plain:
            return "explicit"
        if model is not None and graph_unsupported(model) is not None:
            return "general"
        return "graph"
    if method == "explicit" and not get_spec(model_name).plain:
        raise ValueError(f"top9.method: the explicit deconvnet needs a plain conv/ReLU/pool stack; {model_name} is not (use auto, graph or general)")
    return method


def mine_split(
    model: nn.Module,
    model_name: str,
    dataset: ImageDataset,
    layers: list[str],
    batch_size: int,
    device: torch.device,
    log: Callable[[str], None],
) -> dict:
    """{layer: (values, dataset_index, y, x)}, each [C, 9], for one pass over `dataset`."""
    if len(dataset) < K:
        log(f"note: the split has only {len(dataset)} images, fewer than {K}: each feature map shows {len(dataset)}")

    def work(size: int):
        return mine_top9(model, layers, image_batches(dataset, size), k=K, device=device, log=log, model_name=model_name)

    return with_oom_retry(work, batch_size, log, what=f"top9 mining ({model_name})")


def top9_table(model_name: str, dataset: ImageDataset, mined: dict, fields: dict) -> pd.DataFrame:
    """Long table: one row per (layer, channel, rank) that has an image, with its receptive-field box."""
    image_ids = dataset.manifest["image_id"].to_numpy()
    size = dataset.image_size
    frames = []
    for layer, (values, index, ys, xs) in mined.items():
        channels, ranks = np.meshgrid(np.arange(values.shape[0]), np.arange(values.shape[1]), indexing="ij")
        keep = (index >= 0).numpy().ravel()
        ys_, xs_ = ys.numpy().ravel()[keep], xs.numpy().ravel()[keep]
        boxes = np.array(crop_boxes(fields[layer], ys_, xs_, size), dtype=np.int64).reshape(-1, 4)
        frames.append(
            pd.DataFrame(
                {
                    "model": model_name,
                    "layer": layer,
                    "channel": channels.ravel()[keep],
                    "rank": ranks.ravel()[keep] + 1,
                    "image_id": image_ids[index.numpy().ravel()[keep]],
                    "activation": values.numpy().ravel()[keep].astype(np.float32),
                    "y": ys_,
                    "x": xs_,
                    "box_y0": boxes[:, 0],
                    "box_x0": boxes[:, 1],
                    "box_y1": boxes[:, 2],
                    "box_x1": boxes[:, 3],
                }
            )
        )
    return pd.concat(frames, ignore_index=True)[TOP9_COLUMNS]


def project_layer(
    model: nn.Module,
    model_name: str,
    dataset: ImageDataset,
    layer: str,
    mined_layer: tuple,
    field,
    channels: list[int],
    method: str,
    device: torch.device,
    batch_size: int,
    log: Callable[[str], None],
) -> LayerProjections:
    """Project the top-9 units of `channels` of one layer and crop them (and the images) to their
    receptive fields. Images shared by several units are forwarded once (explicit method)."""
    values, index, ys, xs = (t[channels] for t in mined_layer)
    valid = index >= 0
    chan = torch.as_tensor(channels).unsqueeze(1).expand_as(index)
    used, rows = torch.unique(index[valid], return_inverse=True)
    images = dataset.normalise(dataset.raw_batch(used)).to(device)
    fc = _is_fc(model, model_name, layer, images)
    units = torch.stack([rows, chan[valid]], 1) if fc else torch.stack([rows, chan[valid], ys[valid], xs[valid]], 1)

    def work(size: int) -> torch.Tensor:
        chunk = max(1, size * (4 if method == "explicit" else 1))
        return project(model, layer, images, units, method=method, spec=model_name, chunk_size=chunk)

    pixels = with_oom_retry(work, batch_size, log, what=f"top9 projection ({model_name} {layer})").cpu()
    size = dataset.image_size
    boxes = crop_boxes(field, ys[valid], xs[valid], size)
    proj = crop_to_canvas(pixels, boxes, field, ys[valid], xs[valid], fill=0.0)
    raw = dataset.raw_batch(used)[rows].float()
    patch = crop_to_canvas(raw, boxes, field, ys[valid], xs[valid], fill=float(GREY))
    side = canvas_side(field, size)
    shape = (len(channels), K, 3, side, side)
    projections = np.full(shape, GREY, dtype=np.uint8)
    patches = np.full(shape, GREY, dtype=np.uint8)
    projections[valid.numpy()] = contrast_normalise(proj)
    patches[valid.numpy()] = patch.round().clamp(0, 255).to(torch.uint8).numpy()
    return LayerProjections(np.asarray(channels, dtype=np.int64), projections, patches)


def _is_fc(model: nn.Module, model_name: str, layer: str, images: torch.Tensor) -> bool:
    """Whether the layer's output is [B, C] (a fully connected layer), judged from one image."""
    module = layer_modules(model, model_name, [layer])[layer]
    with torch.no_grad():
        return forward_to(model, module, images[:1]).ndim == 2


def projected_channels(seed: int, model_name: str, layer: str, num_channels: int, count) -> list[int]:
    """The seeded subset of feature maps whose top-9 are projected ("all": every map)."""
    return seeded_sample(seed, num_channels, count, salt=f"top9:{model_name}:{layer}")


def figure_channels(seed: int, model_name: str, layer: str, projected: list[int], count) -> list[int]:
    """The seeded subset of the projected maps shown in the layer's figure."""
    picks = seeded_sample(seed, len(projected), count, salt=f"figure:{model_name}:{layer}")
    return [projected[i] for i in picks]


def per_image_view(
    model: nn.Module,
    model_name: str,
    images: torch.Tensor,
    image_ids: list[str],
    layers: list[str],
    method: str,
    device: torch.device,
    batch_size: int,
    log: Callable[[str], None],
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """For each image and layer, the 9 feature maps with the highest spatial-max activation, each
    projected alone (whole map). Returns the table and {layer: uint8 [n_images, 9, 3, S, S]}."""
    modules = layer_modules(model, model_name, layers)
    images = images.to(device)
    rows, shown = [], {}
    for layer, module in modules.items():
        with torch.no_grad():
            acts = forward_to(model, module, images)
        spatial = acts.flatten(2) if acts.ndim == 4 else acts.unsqueeze(2)
        peak, where = spatial.max(dim=2)  # [N, C]
        k = min(K, peak.shape[1])
        top_vals, top_ch = peak.topk(k, dim=1)
        units = torch.stack([torch.arange(len(images), device=device).repeat_interleave(k), top_ch.flatten()], 1)

        def work(size: int, units=units, layer=layer) -> torch.Tensor:
            return project(model, layer, images, units, method=method, spec=model_name, chunk_size=size)

        pixels = with_oom_retry(work, batch_size, log, what=f"per-image projection ({model_name} {layer})").cpu()
        tiles = np.full((len(images), K, 3, *images.shape[-2:]), GREY, dtype=np.uint8)
        tiles[:, :k] = contrast_normalise(pixels).reshape(len(images), k, 3, *images.shape[-2:])
        shown[layer] = tiles
        width = acts.shape[-1] if acts.ndim == 4 else 1
        flat = where.gather(1, top_ch).cpu()
        for i, image_id in enumerate(image_ids):
            for r in range(k):
                rows.append(
                    {
                        "model": model_name,
                        "image_id": image_id,
                        "layer": layer,
                        "rank": r + 1,
                        "channel": int(top_ch[i, r]),
                        "activation": float(top_vals[i, r]),
                        "y": int(flat[i, r] // width) if acts.ndim == 4 else 0,
                        "x": int(flat[i, r] % width) if acts.ndim == 4 else 0,
                    }
                )
    return pd.DataFrame(rows, columns=PER_IMAGE_COLUMNS), shown


def analysis_layers(model_name: str, layers, key: str = "top9.layers") -> list[str]:
    """Config `layers` ("all", a list of names, or per model a mapping to either) -> validated
    names; unknown names list the valid ones."""
    from convviz.layer_names import layers_for

    key, layers = layers_for(key, model_name, layers)
    try:
        return resolve_layers(model_name, None if layers == "all" else layers)
    except ValueError as err:
        raise ValueError(f"config key '{key}': {err}") from None


@dataclass
class Top9Outputs:
    table: str
    arrays: str
    figures: str
    per_image_table: str
    per_image_figures: str


def run_top9(model_name: str, checkpoint, data_dir, outputs: Top9Outputs, settings: dict, log: Callable[[str], None]) -> None:
    """Rule top9: mine, project, and write the table, the arrays and the figures of one model."""
    from pathlib import Path

    from convviz.analysis import load_for_analysis, open_split, resolve_device, write_npz
    from convviz.data.common import load_image
    from convviz.io import write_parquet
    from convviz.plots import plot_per_image, plot_top9_layer
    from convviz.receptive import receptive_fields

    device = resolve_device(settings["device"])
    batch_size = settings["analysis"]["batch_size"]
    layers = analysis_layers(model_name, settings["layers"])
    model, meta = load_for_analysis(checkpoint, device)
    method = choose_method(model_name, settings["method"], model)
    split = None if settings["split"] == "all" else settings["split"]
    dataset = open_split(data_dir, split, meta["input_size"])
    log(f"{model_name}: top-9 of {len(layers)} layer(s) {layers} over {len(dataset)} {settings['split']} images, {method} deconvnet on {device}")
    # The per-image view's own files are read first: a wrong path fails before minutes of mining.
    view = settings["per_image"]
    files = []
    for n, path in enumerate(view["paths"]):
        if not Path(path).is_file():
            raise ValueError(f"config key 'top9.per_image.paths[{n}]': {path!r} is not an image file (relative paths start at the workflow directory)")
        try:
            files.append(torch.from_numpy(load_image(path, dataset.image_size)).permute(2, 0, 1))
        except Exception as err:
            raise ValueError(f"config key 'top9.per_image.paths[{n}]': cannot read {path!r} as an image ({err})") from err

    mined = mine_split(model, model_name, dataset, layers, batch_size, device, log)
    fields = receptive_fields(model, layers, dataset.image_size, model_name)
    table = top9_table(model_name, dataset, mined, fields)

    arrays, figure_dir = {}, Path(outputs.figures)
    figure_dir.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        num_channels = mined[layer][0].shape[0]
        channels = projected_channels(settings["seed"], model_name, layer, num_channels, settings["project_maps"])
        done = project_layer(model, model_name, dataset, layer, mined[layer], fields[layer], channels, method, device, batch_size, log)
        arrays[f"{layer}__channels"] = done.channels
        arrays[f"{layer}__projections"] = done.projections
        arrays[f"{layer}__patches"] = done.patches
        shown_channels = figure_channels(settings["seed"], model_name, layer, channels, settings["figure_maps"])
        pick = np.searchsorted(done.channels, shown_channels)
        shown = LayerProjections(done.channels[pick], done.projections[pick], done.patches[pick])
        # A map whose strongest activation on the split is 0 never fires there: its "top 9" are
        # ties at 0 (the first images), its projections blank. Said in the figure and the log.
        inactive = {int(c) for c in torch.nonzero(mined[layer][0].amax(1) <= 0).flatten()}
        plot_top9_layer(model_name, layer, shown, fields[layer].size, figure_dir / f"{layer}.png", inactive=inactive)
        log(f"{layer}: projected {len(channels)} of {num_channels} feature maps x {K}; figure shows {len(pick)}")
        if inactive:
            log(f"{layer}: {len(inactive)} of {num_channels} feature maps never activate on this split "
                f"(strongest activation 0; projections blank, images are ties): {sorted(inactive)[:20]}"
                + (" ..." if len(inactive) > 20 else ""))
    write_npz(arrays, outputs.arrays)
    write_parquet(table, outputs.table)

    # Per-image view: a few seeded images of the split, plus any configured files.
    picks = seeded_sample(settings["seed"], len(dataset), view["count"], salt=f"per_image:{model_name}")
    raws = [dataset.raw(i) for i in picks] + files
    ids = [str(dataset.manifest.at[i, "image_id"]) for i in picks] + [f"file:{Path(path).name}" for path in view["paths"]]
    per_dir = Path(outputs.per_image_figures)
    per_dir.mkdir(parents=True, exist_ok=True)
    frames = []
    if raws:
        raw = torch.stack(raws)
        per_table, per_layer = per_image_view(model, model_name, dataset.normalise(raw), ids, layers, method, device, batch_size, log)
        frames.append(per_table)
        for i, image_id in enumerate(ids):
            shown = {layer: tiles[i] for layer, tiles in per_layer.items()}
            name = image_id.replace("/", "_").replace(":", "_")
            plot_per_image(model_name, image_id, raw[i].numpy(), shown, per_table[per_table["image_id"] == image_id], per_dir / f"{name}.png")
        log(f"per-image view of {len(ids)} image(s): {ids}")
    write_parquet(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PER_IMAGE_COLUMNS), outputs.per_image_table)
