"""Single-unit deconvnet projections computed on the unit's support only (explicit deconvnet).

A single unit at (y, x) of a conv layer projects to nothing outside its receptive field: on the
input side of every op below it the signal is zero outside a window whose size follows from the
architecture alone (kernel, stride, padding, dilation) and whose origin moves with (y, x)
(origin = position x scale + offset, per axis). Where that window is much smaller than the map --
lenet's conv2 reaches 14 x 14 of a 64 x 64 image, zfnet's conv2 27 x 27 -- running the Sec. 2.1
steps (unpooling with the image's switches, rectification, transposed filters) on windows
instead of whole maps gives the same numbers for a fraction of the work. Two details keep them
equal: a window position outside its map (the map's padding) is zeroed after each transposed
filter, as the whole-map transposed convolution drops it; and unpooling reads each window
position's switch and adds its value at that switch's place inside the input-side window.

`levels` decides whether a layer is worth it (its pixel window at most `WINDOW_SHARE` of the
image); `ExplicitDeconvnet.project` then runs `backward` on windows and `paste`s the results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Project on windows when a unit's pixel window covers at most this share of the image; above it
# (alexnet's conv2 reaches 51 x 51 of 64 x 64, the layers above cover everything) whole maps are
# as fast and take the tuned transposed-filter ways.
WINDOW_SHARE = 0.5

_SLIDING = ("conv", "maxpool")
_POINTWISE = ("relu", "contrast_norm", "identity")  # spatially pointwise in the deconvnet


@dataclass(frozen=True)
class Level:
    """A unit's window on one op's input side: size (h, w); origin = position * scale + offset."""

    size: tuple[int, int]
    scale: tuple[int, int]
    offset: tuple[int, int]

    def origin(self, pos: Tensor) -> Tensor:
        """[N, 2] window origins (y, x) for unit positions pos [N, 2] at the layer."""
        return pos * pos.new_tensor(self.scale) + pos.new_tensor(self.offset)


UNIT = Level((1, 1), (1, 1), (0, 0))  # the unit itself, on the layer's output side


def pair(value) -> tuple[int, int]:
    """A module's kernel/stride/padding/dilation as (height, width)."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def levels(ops: Sequence, stop: int, image_hw: Sequence[int]) -> list[Level] | None:
    """The unit's window on the input side of ops 0..stop (index i: op i's input side), or None
    when an op below the layer is not a sliding window or pointwise (fc layers, average pooling,
    string padding) or the pixel window covers more than WINDOW_SHARE of the image."""
    out: list[Level | None] = [None] * (stop + 1)
    level = UNIT
    for index in reversed(range(stop + 1)):
        op = ops[index]
        if op.kind in _SLIDING:
            m = op.module
            padding = 0 if m.padding == "valid" else m.padding
            if isinstance(padding, str):
                return None
            k, s, p, d = (pair(v) for v in (m.kernel_size, m.stride, padding, m.dilation))
            level = Level(
                tuple((level.size[a] - 1) * s[a] + d[a] * (k[a] - 1) + 1 for a in range(2)),
                tuple(level.scale[a] * s[a] for a in range(2)),
                tuple(level.offset[a] * s[a] - p[a] for a in range(2)),
            )
        elif op.kind not in _POINTWISE:
            return None
        out[index] = level
    if out[0].size[0] * out[0].size[1] > WINDOW_SHARE * image_hw[0] * image_hw[1]:
        return None
    return out


def _valid(origin: Tensor, size: Sequence[int], hw: Sequence[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per unit the window's map rows/columns [N, h], [N, w] and which of them lie inside the map."""
    ys = origin[:, :1] + torch.arange(size[0], device=origin.device)
    xs = origin[:, 1:] + torch.arange(size[1], device=origin.device)
    return ys, xs, (ys >= 0) & (ys < hw[0]), (xs >= 0) & (xs < hw[1])


def _outside_zeroed(signal: Tensor, origin: Tensor, hw: Sequence[int]) -> Tensor:
    """Zero the window positions that lie outside the map (its padding), in place."""
    size = signal.shape[-2:]
    if origin.device.type == "cpu":  # skip the multiply when no window reaches the padding (on a GPU
        # the check would wait for the device, which costs more than the multiply)
        lo, hi = origin.min(0).values, (origin + origin.new_tensor(tuple(size))).max(0).values
        if lo.min() >= 0 and hi[0] <= hw[0] and hi[1] <= hw[1]:
            return signal
    _, _, vy, vx = _valid(origin, size, hw)
    return signal.mul_((vy[:, None, :, None] & vx[:, None, None, :]).to(signal.dtype))


def _unpool(signal: Tensor, switches: Tensor, rows: Tensor, out_origin: Tensor, level_in: Level, pos: Tensor, in_hw) -> Tensor:
    """Windowed Sec. 2.1 unpooling: signal [N, C, h, w] (window on the pool's output side) ->
    [N, C, *level_in.size], each value added where its image's switch (a flat index into the
    pool's input map) points, relative to the input-side window."""
    num, channels, height, width = signal.shape
    ys, xs, vy, vx = _valid(out_origin, (height, width), switches.shape[-2:])
    ys, xs = ys.clamp(0, switches.shape[-2] - 1), xs.clamp(0, switches.shape[-1] - 1)
    taken = switches[rows[:, None, None], :, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)  # [N, C, h, w]
    in_origin = level_in.origin(pos)
    local = (taken // in_hw[1] - in_origin[:, 0].view(-1, 1, 1, 1)) * level_in.size[1]
    local += taken % in_hw[1] - in_origin[:, 1].view(-1, 1, 1, 1)
    inside = (vy[:, None, :, None] & vx[:, None, None, :]).expand_as(local)
    local = torch.where(inside, local, 0)
    values = torch.where(inside, signal, 0)
    out = signal.new_zeros(num, channels, level_in.size[0] * level_in.size[1])
    out.scatter_add_(2, local.flatten(2), values.flatten(2))
    return out.view(num, channels, *level_in.size)


def backward(ops, windows: list[Level], signal: Tensor, pos: Tensor, top: int, bottom: int, in_shapes,
             switches=None, rows: Tensor | None = None) -> Tensor:
    """Project window signals [N, C, h, w] on the output side of op `top` down to the input side
    of op `bottom` (top >= bottom; top < bottom returns the signal). pos [N, 2]: each row's unit
    position at the layer; switches/rows: the forward record's max-pool indices and each row's
    image (needed when a max-pool lies in the range). The signal may be overwritten."""
    for index in reversed(range(bottom, top + 1)):
        op, level_in = ops[index], windows[index]
        out_level = windows[index + 1] if index + 1 < len(windows) else UNIT
        if op.kind == "relu":
            signal = signal.relu_()
        elif op.kind == "conv":
            m = op.module
            signal = F.conv_transpose2d(signal, m.weight.detach(), None, m.stride, 0, 0, m.groups, m.dilation)
            signal = _outside_zeroed(signal, level_in.origin(pos), in_shapes[index][1:])
        elif op.kind == "maxpool":
            signal = _unpool(signal, switches[index], rows, out_level.origin(pos), level_in, pos, in_shapes[index][1:])
        # contrast norm, dropout, identity: passed unchanged
    return signal


def paste(windows: Tensor, origin: Tensor, out: Tensor) -> Tensor:
    """Add each window [N, C, h, w] at its origin [N, 2] into the maps `out` [N, C, H, W]
    (contiguous; positions outside the map are dropped) and return `out`."""
    num, channels, height, width = windows.shape
    hw = out.shape[-2:]
    ys, xs, vy, vx = _valid(origin, (height, width), hw)
    flat = ys.clamp(0, hw[0] - 1)[:, :, None] * hw[1] + xs.clamp(0, hw[1] - 1)[:, None, :]
    inside = vy[:, :, None] & vx[:, None, :]
    values = torch.where(inside[:, None], windows, 0).flatten(2)
    index = torch.where(inside, flat, 0).flatten(1)[:, None].expand(-1, channels, -1)
    out.view(num, channels, -1).scatter_add_(2, index, values)
    return out
