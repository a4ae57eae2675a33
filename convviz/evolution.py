"""Feature evolution during training (the paper's Fig. 4).

For every kept checkpoint epoch and every analysis layer, a seeded subset of feature maps (the
same maps at every epoch, chosen among those rule top9 projects so the report's unit browser can
show both): the strongest activation of each map over the training split, at that epoch's
weights, projected to pixels by the deconvnet and cropped to its receptive field.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from convviz.analysis import image_batches, load_for_analysis, open_split, resolve_device, seeded_sample, with_oom_retry, write_npz
from convviz.deconv import forward_to, project
from convviz.display import contrast_normalise, crop_boxes, crop_to_canvas
from convviz.io import write_parquet
from convviz.models.checkpoint import CheckpointError
from convviz.models.registry import layer_modules
from convviz.receptive import receptive_fields
from convviz.top9 import analysis_layers, choose_method, projected_channels
from convviz.topk import mine_top9

COLUMNS = ["model", "layer", "channel", "epoch", "image_id", "activation", "y", "x"]
_EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt$")


@dataclass
class EvolutionOutputs:
    table: str
    arrays: str
    figure: str


def checkpoint_epochs(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every `epoch_NNN.pt` in the train rule's checkpoint folder, by epoch."""
    found = sorted((int(m.group(1)), p) for p in Path(checkpoint_dir).iterdir() if (m := _EPOCH_FILE.search(p.name)))
    if not found:
        raise CheckpointError(
            f"no epoch_NNN.pt checkpoints in {checkpoint_dir}; rerun rule train for this model "
            "(train.checkpoint_epochs decides which epochs are kept)"
        )
    return found


def evolution_channels(settings: dict, model_name: str, layer: str, num_channels: int) -> list[int]:
    """A seeded subset of the maps that rule top9 projects (the same at every epoch)."""
    pool = projected_channels(settings["seed"], model_name, layer, num_channels, settings["top9_project_maps"])
    picks = seeded_sample(settings["seed"], len(pool), settings["maps_per_layer"], salt=f"evolution:{model_name}:{layer}")
    return [pool[i] for i in picks]


def evolve_one_epoch(model, model_name, dataset, layers, channels, fields, method, device, batch_size, log):
    """Rows of the table and {layer: uint8 [maps, 3, R, R]} for one checkpoint's weights."""

    def mine(size: int):
        return mine_top9(model, layers, image_batches(dataset, size), k=1, device=device, log=log, model_name=model_name)

    mined = with_oom_retry(mine, batch_size, log, what=f"evolution mining ({model_name})")
    image_ids = dataset.manifest["image_id"].to_numpy()
    rows, shown = [], {}
    for layer in layers:
        values, index, ys, xs = (t[channels[layer], 0] for t in mined[layer])
        used, which = torch.unique(index, return_inverse=True)
        images = dataset.normalise(dataset.raw_batch(used)).to(device)
        conv = len(_output_shape(model, model_name, layer, images[0])) == 3
        chan = torch.as_tensor(channels[layer])
        units = torch.stack([which, chan, ys, xs], 1) if conv else torch.stack([which, chan], 1)
        pixels = project(model, layer, images, units, method=method, spec=model_name).cpu()
        boxes = crop_boxes(fields[layer], ys, xs, dataset.image_size)
        shown[layer] = contrast_normalise(crop_to_canvas(pixels, boxes, fields[layer], ys, xs, 0.0))
        for c, v, i, y, x in zip(channels[layer], values.tolist(), index.tolist(), ys.tolist(), xs.tolist()):
            rows.append({"model": model_name, "layer": layer, "channel": c, "image_id": image_ids[i], "activation": v, "y": y, "x": x})
    return rows, shown


def run_evolution(model_name: str, checkpoint_dir, data_dir, outputs: EvolutionOutputs, settings: dict, log: Callable[[str], None]) -> None:
    """Rule evolution: the same feature maps' strongest projections at every kept epoch."""
    from convviz.plots import plot_evolution

    device = resolve_device(settings["device"])
    batch_size = settings["analysis"]["batch_size"]
    layers = analysis_layers(model_name, settings["layers"], key="evolution.layers")
    method = None  # chosen on the first checkpoint's model (auto: what its graph allows)
    epochs = checkpoint_epochs(checkpoint_dir)
    dataset = None
    rows, arrays = [], {}
    per_epoch: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    for epoch, path in epochs:
        model, meta = load_for_analysis(path, device)
        if method is None:
            method = choose_method(model_name, settings["method"], model)
        if dataset is None:
            split = None if settings["split"] == "all" else settings["split"]
            dataset = open_split(data_dir, split, meta["input_size"])
            if settings["images"] != "all" and settings["images"] < len(dataset):
                keep = seeded_sample(settings["seed"], len(dataset), settings["images"], salt="evolution:images")
                dataset.__init__(data_dir, split, meta["input_size"], manifest=dataset.manifest.iloc[keep])
            fields = receptive_fields(model, layers, dataset.image_size, model_name)
            first = dataset.normalise(dataset.raw(0)).to(device)
            sizes = {layer: _output_shape(model, model_name, layer, first)[0] for layer in layers}
            channels = {layer: evolution_channels(settings, model_name, layer, sizes[layer]) for layer in layers}
            log(
                f"{model_name}: evolution of {sum(map(len, channels.values()))} feature maps over epochs "
                f"{[e for e, _ in epochs]}, strongest activation over {len(dataset)} {settings['split']} images"
            )
        epoch_rows, shown = evolve_one_epoch(model, model_name, dataset, layers, channels, fields, method, device, batch_size, log)
        rows.extend(dict(r, epoch=epoch) for r in epoch_rows)
        for layer in layers:
            per_epoch[layer].append(shown[layer])
        log(f"epoch {epoch}: done")
    table = pd.DataFrame(rows)[COLUMNS]
    epoch_list = [e for e, _ in epochs]
    arrays["epochs"] = np.asarray(epoch_list, dtype=np.int64)
    for layer in layers:
        arrays[f"{layer}__channels"] = np.asarray(channels[layer], dtype=np.int64)
        arrays[f"{layer}__projections"] = np.stack(per_epoch[layer], axis=1)  # [maps, epochs, 3, R, R]
    write_npz(arrays, outputs.arrays)
    write_parquet(table, outputs.table)
    plot_evolution(model_name, epoch_list, {layer: (arrays[f"{layer}__channels"], arrays[f"{layer}__projections"]) for layer in layers}, outputs.figure)


def _output_shape(model, model_name: str, layer: str, image: torch.Tensor) -> tuple[int, ...]:
    """Shape of one image's `layer` output: (C, h, w) for conv layers, (C,) for fc layers."""
    with torch.no_grad():
        return tuple(forward_to(model, layer_modules(model, model_name, [layer])[layer], image[None]).shape[1:])

