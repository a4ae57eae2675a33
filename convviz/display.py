"""Turning deconvnet projections and image patches into pictures (Figs. 2 and 4).

Projections are signed pixel-space signals. For display the paper contrast-normalises each one;
we map zero to mid-grey and scale each projection by its own largest absolute value, so the
background of a projection is grey as in the paper's figures and faint and strong units are
equally visible. Patches are the receptive-field crops of the input image; a receptive field
that reaches past the image edge is drawn grey there.
"""

from __future__ import annotations

import numpy as np
import torch

from convviz.receptive import RField, unit_box

GREY = 128


def contrast_normalise(projections: torch.Tensor | np.ndarray) -> np.ndarray:
    """Signed projections [..., 3, h, w] -> uint8 display images, zero at grey, each scaled by
    its own max |value| (an all-zero projection stays flat grey)."""
    p = torch.as_tensor(projections, dtype=torch.float32)
    scale = p.abs().flatten(-3).amax(-1).clamp_min(1e-12)[..., None, None, None]
    shown = 0.5 + 0.5 * p / scale
    return (shown * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def canvas_side(rf: RField, image_size: int) -> int:
    """Side of the square a layer's crops are drawn on: its receptive field, at most the image."""
    return image_size if rf.stride == 0 else min(rf.size, image_size)


def crop_boxes(rf: RField, ys, xs, image_size: int) -> list[tuple[int, int, int, int]]:
    """Input-pixel boxes (y0, x0, y1, x1), clipped to the image, of units (y, x) of a layer."""
    return [unit_box(rf, int(y), int(x), image_size) for y, x in zip(ys, xs)]


def crop_to_canvas(images: torch.Tensor, boxes, rf: RField, ys, xs, fill: float) -> torch.Tensor:
    """Crop each image [N, 3, S, S] to its box and place it on a [N, 3, R, R] canvas where it sits
    in the unit's unclipped receptive field (fill elsewhere: outside the image)."""
    size = images.shape[-1]
    side = canvas_side(rf, size)
    out = images.new_full((images.shape[0], images.shape[1], side, side), fill)
    for i, ((y0, x0, y1, x1), y, x) in enumerate(zip(boxes, ys, xs)):
        uy0 = rf.first_pixel + int(y) * rf.stride
        ux0 = rf.first_pixel + int(x) * rf.stride
        oy = min(max(y0 - uy0, 0), side - (y1 - y0))
        ox = min(max(x0 - ux0, 0), side - (x1 - x0))
        out[i, :, oy : oy + (y1 - y0), ox : ox + (x1 - x0)] = images[i, :, y0:y1, x0:x1]
    return out


def mosaic(tiles: np.ndarray, rows: int, cols: int, pad: int = 1, fill: int = 255) -> np.ndarray:
    """uint8 tiles [n, 3, h, w] (n <= rows*cols) -> one HWC image, row-major, `pad` pixels apart;
    missing tiles are left as `fill`."""
    n, _, h, w = tiles.shape
    out = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, 3), fill, dtype=np.uint8)
    for i in range(min(n, rows * cols)):
        r, c = divmod(i, cols)
        out[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = tiles[i].transpose(1, 2, 0)
    return out
