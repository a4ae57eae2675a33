"""Data for the report's unit browser (DeepVis / OpenAI Microscope in spirit).

Per model, per analysis layer, per feature map ("unit"): its 9 projections and 9 input patches as
two small 3x3-grid PNGs, its top-9 table, and its evolution over the training epochs where the
evolution study recorded it. The page keeps each model's units as a JSON blob and only creates
<img> elements for the unit on screen, so thousands of units cost no decoding up front.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from convviz.report.html import data_uri, png_bytes

GAP_PX = 1  # white line between the tiles of a 3x3 grid


def _resize_tile(tile: np.ndarray, tile_px: int) -> np.ndarray:
    """(3, R, R) uint8 -> (S, S, 3) uint8 with S = min(R, tile_px) (never upscaled: the page
    scales tiles up with crisp pixels, which keeps the file small)."""
    from PIL import Image

    hwc = np.ascontiguousarray(np.transpose(tile, (1, 2, 0)))
    if max(hwc.shape[:2]) <= tile_px:
        return hwc
    return np.asarray(Image.fromarray(hwc).resize((tile_px, tile_px), Image.Resampling.BILINEAR))


def tile_grid(tiles: np.ndarray, tile_px: int, columns: int = 3) -> np.ndarray:
    """[K, 3, R, R] uint8 tiles -> one (H, W, 3) image, `columns` per row, white gaps."""
    resized = [_resize_tile(t, tile_px) for t in tiles]
    size = resized[0].shape[0]
    rows = -(-len(resized) // columns)
    cols = min(columns, len(resized))
    grid = np.full((rows * size + (rows - 1) * GAP_PX, cols * size + (cols - 1) * GAP_PX, 3), 255, np.uint8)
    for k, tile in enumerate(resized):
        r, c = divmod(k, columns)
        y, x = r * (size + GAP_PX), c * (size + GAP_PX)
        grid[y : y + size, x : x + size] = tile
    return grid


def grid_uri(tiles: np.ndarray, tile_px: int, colours: int, columns: int = 3) -> str:
    return data_uri(png_bytes(tile_grid(tiles, tile_px, columns), colours=colours or None))


def layers_in(arrays) -> list[str]:
    """Layer names of a top9_arrays.npz, in the file's order (keys `{layer}__channels`)."""
    return [k[: -len("__channels")] for k in arrays.files if k.endswith("__channels")]


def choose_channels(channels: list[int], first: list[int], k: int | str, seed: int, salt: str) -> list[int]:
    """The feature maps the browser shows: every one for k="all"; else those in `first` (the
    evolution study's, so their evolution is browsable) plus a seeded sample of the rest, up to k."""
    from convviz.analysis import seeded_sample

    if k == "all" or int(k) >= len(channels):
        return list(channels)
    keep = [c for c in channels if c in set(first)][: int(k)]
    rest = [c for c in channels if c not in set(keep)]
    picked = [rest[i] for i in seeded_sample(seed, len(rest), int(k) - len(keep), salt=salt)]
    return sorted(keep + picked)


def _evolution_arrays(path: Path | None) -> dict:
    """{layer: (channels [N], epochs [E], projections [N, E, 3, R, R])} from the evolution study's
    npz (keys `epochs`, `{layer}__channels`, `{layer}__projections`), or {} when it is absent or
    in a layout this reader does not know."""
    if path is None or not Path(path).exists():
        return {}
    found = {}
    with np.load(path) as arrays:
        for layer in layers_in(arrays):
            epochs_key = f"{layer}__epochs" if f"{layer}__epochs" in arrays.files else "epochs"
            keys = (f"{layer}__channels", epochs_key, f"{layer}__projections")
            if all(k in arrays.files for k in keys):
                channels, epochs, projections = (arrays[k] for k in keys)
                if projections.ndim == 5 and projections.shape[:2] == (len(channels), len(epochs)):
                    found[layer] = (channels, epochs, projections)
    return found


def model_units(
    model: str,
    top9_npz: Path,
    top9_table: pd.DataFrame | None = None,
    evolution_table: pd.DataFrame | None = None,
    evolution_npz: Path | None = None,
    *,
    units_per_layer: int | str = "all",
    tile_px: int = 32,
    colours: int = 128,
    seed: int = 0,
) -> dict:
    """The browser's data for one model (plain JSON types; images as PNG data URIs).

    {"model": str, "layers": [{"name", "total", "channels": [int],
      "units": {str(channel): {"projections": uri, "patches": uri,
                               "top9": [[rank, image_id, activation, y, x], ...],
                               "evolution": {"epochs": [int], "activation": [float],
                                             "image_epochs": [int], "image": uri}}}}]}
    (evolution keys present where the study recorded them).
    """
    evolution_images = _evolution_arrays(evolution_npz)
    out = {"model": model, "layers": []}
    with np.load(top9_npz) as arrays:
        for layer in layers_in(arrays):
            channels = [int(c) for c in arrays[f"{layer}__channels"]]
            evo_rows = evolution_table[evolution_table["layer"] == layer] if evolution_table is not None else None
            evo_channels = sorted(set(evo_rows["channel"].astype(int))) if evo_rows is not None else []
            shown = choose_channels(channels, evo_channels, units_per_layer, seed, salt=f"report:{model}:{layer}")
            index = {c: i for i, c in enumerate(channels)}
            projections, patches = arrays[f"{layer}__projections"], arrays[f"{layer}__patches"]
            rows = top9_table[top9_table["layer"] == layer] if top9_table is not None else None
            units = {}
            for channel in shown:
                i = index[channel]
                unit = {
                    "projections": grid_uri(projections[i], tile_px, colours),
                    "patches": grid_uri(patches[i], tile_px, colours),
                }
                if rows is not None:
                    mine = rows[rows["channel"] == channel].sort_values("rank")
                    unit["top9"] = [
                        [int(r.rank), str(r.image_id), round(float(r.activation), 4), int(r.y), int(r.x)]
                        for r in mine.itertuples()
                    ]
                evolution = _unit_evolution(layer, channel, evo_rows, evolution_images, tile_px, colours)
                if evolution:
                    unit["evolution"] = evolution
                units[str(channel)] = unit
            # The layer's width: every feature map was mined, a subset projected.
            total = int(rows["channel"].nunique()) if rows is not None and len(rows) else len(channels)
            out["layers"].append({"name": layer, "total": max(total, len(channels)), "channels": shown, "units": units})
    return out


def _unit_evolution(layer, channel, evo_rows, evolution_images, tile_px, colours) -> dict | None:
    """Strongest activation per checkpoint epoch (from evolution.parquet) and, where the study
    saved them, the projections per epoch as one strip image."""
    evolution = {}
    if evo_rows is not None:
        mine = evo_rows[evo_rows["channel"] == channel]
        if len(mine):
            per_epoch = mine.groupby("epoch")["activation"].max().sort_index()
            evolution["epochs"] = [int(e) for e in per_epoch.index]
            evolution["activation"] = [round(float(a), 4) for a in per_epoch.values]
    if layer in evolution_images:
        channels, epochs, projections = evolution_images[layer]
        where = np.flatnonzero(channels == channel)
        if where.size:
            evolution["image_epochs"] = [int(e) for e in epochs]
            evolution["image"] = grid_uri(projections[where[0]], tile_px, colours, columns=len(epochs))
    return evolution or None
