"""Incremental inference for occlusion sweeps (Nakandala et al., SIGMOD 2019, "Krypton").

An occluded image differs from the unoccluded one only inside the occluder. In every layer, the
positions whose value can change are those whose receptive field meets that square; everything
else equals the unoccluded image's activations, which are computed once. So for a batch of
occluder positions each layer is run only on a small window around each position's changed
region, read from the cached unoccluded map with the batch's changed values laid over it:

    conv / max-pool / avg-pool (kernel ke = d*(k-1)+1, stride s, padding p): a changed input
        region [y0, y0+h) changes outputs ceil((y0+p-ke+1)/s) .. floor((y0+h-1+p)/s); the layer
        runs, without padding, on the input window those outputs read (padding comes from the
        cached map's border, filled with 0 or -inf as the layer's padding is)
    per-position ops (ReLU, BatchNorm in eval, contrast normalisation, dropout, ...): the
        changed values only
    elementwise sums/products of two maps (the ResNet shortcut): the union of both regions

Every position of one batch gets a region of the same size (the largest any position needs,
shifted inside the map), so each layer is one batched call. Once a region grows to (almost)
the whole map, or reaches an op that mixes all positions (flatten, linear, adaptive pooling, or
anything this module does not know), the maps are materialised whole ([B, C, H, W]) and the
rest of the network runs as an ordinary batched forward. The result is exact: the same
arithmetic as the full forward on every value that can differ, up to float rounding.

Where whole maps remain (at 64 px, everything from AlexNet's conv2 and ResNet-50's layer2 on),
the engine runs them faster than the model's own forward, again exactly up to rounding: eval-mode
BatchNorm is folded into the convolution before it; an AdaptiveAvgPool2d that only repeats a
smaller map (AlexNet's 6x6 pool at 64 px) is folded into the Linear after it; convolutions on
maps of at most 9 positions skip their padding taps (`SmallMapConv`); and each conv/pool layer
runs channels-last, in the usual layout, (1x1 convolutions) as one matrix product, (on maps
of at most 100 positions) as one product per kernel tap over just the outputs that tap reaches
(`TapConv`), or (stride-1 convolutions) by Winograd's F(m x m, r x r) with the two tile sides
needing the fewest products (`convviz.winograd`), whichever the first batch measured fastest on
this machine. Window reads and
materialised maps are written into buffers kept from one batch to the next (a fresh
multi-megabyte tensor costs a page fault per 4 KiB the first time it is written).

The network is traced with torch.fx (any module-built CNN: the plain stacks and ResNets);
`IncrementalInference.unsupported(model)` says why tracing fails, if it does, so callers can fall
back to a plain batched forward.
"""

from __future__ import annotations

import copy
import functools
import itertools
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from convviz import winograd
from convviz.deconv_window import pair
from convviz.machine import fastest_way

__all__ = ["Patched", "IncrementalInference", "materialise", "total_per_channel"]

# Modules that act on each spatial position separately (in eval mode): run on changed values only.
_POINTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.BatchNorm2d,
    nn.LocalResponseNorm,  # normalises across channels at one position (Sec. 3 contrast norm)
)
_POINTWISE_FUNCTIONS = {F.relu, torch.relu, torch.sigmoid, torch.tanh, F.gelu, F.silu, F.leaky_relu, F.hardtanh}
_POINTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone"}
# Elementwise binary ops; the in-place forms are run out of place (cached maps must stay intact).
_BINARY_FUNCTIONS = {
    operator.add: operator.add,
    operator.iadd: operator.add,
    operator.mul: operator.mul,
    operator.imul: operator.mul,
    operator.sub: operator.sub,
    operator.isub: operator.sub,
    torch.add: torch.add,
    torch.mul: torch.mul,
    torch.sub: torch.sub,
}
_BINARY_METHODS = {"add": torch.add, "add_": torch.add, "mul": torch.mul, "mul_": torch.mul, "sub": torch.sub}


@dataclass
class Patched:
    """A batch of feature maps that equal a cached map except in one window per batch row.

    values: [B, C, h, w] the window's values (every position of one batch has the same h, w);
    y0, x0: [B] int64, the window's top-left position in the [H, W] map (the window lies inside it),
    given as tensors or arrays and kept as numpy arrays (the geometry is host-side bookkeeping).
    """

    values: Tensor
    y0: np.ndarray
    x0: np.ndarray

    def __post_init__(self) -> None:
        self.y0, self.x0 = _host(self.y0), _host(self.x0)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.values.shape[-2]), int(self.values.shape[-1])


class _Same:
    """A node no occluder can change (it does not depend on the input): its cached value holds."""


SAME = _Same()


# ------------------------------------------------------------------------------------- window reads


def _host(positions) -> np.ndarray:
    if isinstance(positions, Tensor):
        positions = positions.detach().cpu().numpy()
    return np.asarray(positions, dtype=np.int64).reshape(-1)


def _index(array: np.ndarray, like: Tensor) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).reshape(-1)).to(like.device)


def _channels_last(x: Tensor) -> Tensor:
    """4-d maps in channels-last layout: window reads become row copies, and CPU pooling is far faster."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def _rows(x: Tensor) -> Tensor:
    """[B, C, h, w] -> [B*h*w, C] (a view for channels-last maps)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


_FEW_CHANNELS = 16


@functools.lru_cache(maxsize=512)
def _read_plan(height: int, width: int, ty: bytes, tx: bytes, th: int, tw: int, step: tuple[int, int], patch_key):
    """Index bookkeeping of one window read, which depends on positions only, so each sweep of
    the same occluder grid (every image of a run) reuses it: (padding, map index, patch target
    and source indices or None)."""
    ty, tx = np.frombuffer(ty, dtype=np.int64), np.frombuffer(tx, dtype=np.int64)
    pad_t, pad_l = max(0, -int(ty.min())), max(0, -int(tx.min()))
    pad_b = max(0, int(ty.max()) + (th - 1) * step[0] + 1 - height)
    pad_r = max(0, int(tx.max()) + (tw - 1) * step[1] + 1 - width)
    padded_w = width + pad_l + pad_r
    rows = (ty + pad_t)[:, None] + step[0] * np.arange(th)  # [B, th] in the padded map
    cols = (tx + pad_l)[:, None] + step[1] * np.arange(tw)
    index = torch.from_numpy((rows[:, :, None] * padded_w + cols[:, None, :]).reshape(-1))  # [B*th*tw]
    if patch_key is None:
        return (pad_t, pad_b, pad_l, pad_r), index, None, None
    y0, x0, ph, pw = np.frombuffer(patch_key[0], dtype=np.int64), np.frombuffer(patch_key[1], dtype=np.int64), *patch_key[2:]
    prow = rows - pad_t - y0[:, None]  # row inside the patch, [B, th]
    pcol = cols - pad_l - x0[:, None]
    inside = (((prow >= 0) & (prow < ph))[:, :, None] & ((pcol >= 0) & (pcol < pw))[:, None, :]).reshape(-1)
    target = np.flatnonzero(inside)
    source = None
    if len(target) != len(ty) * ph * pw:  # the window cuts the patch: take the part inside
        batch = np.arange(len(ty))[:, None, None]
        source = torch.from_numpy(((batch * ph + prow[:, :, None]) * pw + pcol[:, None, :]).reshape(-1)[target])
    return (pad_t, pad_b, pad_l, pad_r), index, torch.from_numpy(target), source


def _read(
    base: Tensor, patch: Patched | None, ty: np.ndarray, tx: np.ndarray, th: int, tw: int, fill: float, step=(1, 1),
    scratch=None,
) -> Tensor:
    """Windows [B, C, th, tw] at (ty, tx) of the map `base` [1, C, H, W] with `patch` laid over it;
    with step (sy, sx), every sy-th row and sx-th column from (ty, tx) on.

    Rows/columns outside the map (a layer's padding) read `fill`. The windows are one
    `index_select` of whole channel vectors of the map (a row copy per position), then the
    patch's vectors are copied over them (with few channels, as in the input image, both go per
    channel instead: copies of a few floats at a time are slow). scratch(shape): where to
    write the windows (a buffer reused from the previous batch; fresh when None).
    """
    _, channels, height, width = base.shape
    patch_key = None if patch is None else (patch.y0.tobytes(), patch.x0.tobytes(), *patch.size)
    (pad_t, pad_b, pad_l, pad_r), index, target, source = _read_plan(
        height, width, _host(ty).tobytes(), _host(tx).tobytes(), th, tw, tuple(step), patch_key
    )
    grid = base[0].permute(1, 2, 0)  # [H, W, C]
    if pad_t or pad_l or pad_b or pad_r:
        grid = F.pad(grid, (0, 0, pad_l, pad_r, pad_t, pad_b), value=fill)
    few = channels < _FEW_CHANNELS
    dim = 1 if few else 0
    if few:
        out = grid.permute(2, 0, 1).reshape(channels, -1).index_select(1, index.to(base.device))  # [C, B*th*tw]
    else:
        rows = (len(index), channels)
        out = torch.index_select(  # [B*th*tw, C]
            grid.reshape(-1, channels), 0, index.to(base.device), out=None if scratch is None else scratch(rows)
        )
    if patch is not None:
        changed = patch.values.permute(1, 0, 2, 3).reshape(channels, -1) if few else _rows(patch.values)
        if source is not None:
            changed = changed.index_select(dim, source.to(base.device))
        out.index_copy_(dim, target.to(base.device), changed)
    if few:
        return out.view(channels, len(ty), th, tw).transpose(0, 1)
    return out.view(len(ty), th, tw, channels).permute(0, 3, 1, 2)


def materialise(value, base: Tensor, batch: int, scratch=None) -> Tensor:
    """The whole maps [B, ...] of a Patched value (or SAME, or a tensor, returned as is);
    scratch(shape): where to write them (a buffer reused from the previous batch)."""
    if isinstance(value, Tensor):
        return value
    if value is SAME:
        return base.expand(batch, *base.shape[1:])
    _, channels, height, width = base.shape
    num = len(value.y0)
    spread = base.permute(0, 2, 3, 1).expand(num, height, width, channels)
    full = spread.contiguous() if scratch is None else scratch(spread.shape).copy_(spread)  # [B, H, W, C]
    ph, pw = value.size
    rows = value.y0[:, None] + np.arange(ph)
    cols = value.x0[:, None] + np.arange(pw)
    batch = np.arange(num)[:, None, None]
    index = (batch * height + rows[:, :, None]) * width + cols[:, None, :]
    full.view(-1, channels).index_copy_(0, _index(index, base), _rows(value.values))
    return full.permute(0, 3, 1, 2)  # channels-last


def total_per_channel(value, base: Tensor, channels: Tensor | None = None) -> Tensor:
    """Sum over positions of each map, [B, C] (or [B, len(channels)]), without materialising.

    For a Patched value: the cached map's total, minus what the window covered there, plus the
    window's new values.
    """
    if channels is not None:
        base = base[:, channels]
    if isinstance(value, Tensor):
        maps = value if channels is None else value[:, channels]
        return maps.flatten(2).sum(2)
    if value is SAME:
        return base.flatten(2).sum(2)
    values = value.values if channels is None else value.values[:, channels]
    covered = _read(base, None, value.y0, value.x0, *value.size, fill=0.0)
    return base.flatten(2).sum(2) - covered.flatten(2).sum(2) + values.flatten(2).sum(2)


# ---------------------------------------------------------------------------------------- geometry


def _affected(start: np.ndarray, length: int, size_out: int, kernel: int, stride: int, pad: int):
    """Along one axis: outputs a changed input run [start, start+length) reaches, one size for all.

    Returns (first output [B], output count, first input row read [B], input rows read).
    """
    first = np.maximum(-((kernel - 1 - pad - start) // stride), 0)  # ceil((start + pad - kernel + 1) / stride)
    last = np.minimum((start + length - 1 + pad) // stride, size_out - 1)
    count = min(int((last - first).max()) + 1, size_out)
    first = np.minimum(first, size_out - count)
    return first, count, first * stride - pad, (count - 1) * stride + kernel


# ------------------------------------------------------------------------------------------ engine


def module_node(gm: fx.GraphModule, path: str) -> fx.Node:
    """The graph node holding the output of module `path` (the last node traced inside it)."""
    found = None
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == path:
            found = node
            continue
        stack = node.meta.get("nn_module_stack", {})
        if any(key == path or key.startswith(path + "@") for key in stack):
            found = node
    if found is None:
        raise ValueError(f"module {path!r} is not called in the traced forward pass")
    return found


def conv_batchnorm_pairs(graph: fx.Graph, modules: Mapping[str, nn.Module]) -> list[tuple[fx.Node, fx.Node]]:
    """(conv node, BatchNorm node) of every eval-mode BatchNorm2d whose input is a Conv2d's output
    that nothing else reads, each module called once: the pairs whose BatchNorm can be folded
    into the convolution (exact algebra, up to rounding). modules: the traced model's, by path."""
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d) or len(node.args) != 1:
            continue
        source, bn = node.args[0], modules[node.target]
        if not (isinstance(source, fx.Node) and source.op == "call_module"):
            continue
        if (
            type(modules[source.target]) is nn.Conv2d
            and len(source.users) == 1
            and calls[source.target] == 1
            and calls[node.target] == 1
            and not bn.training
            and bn.track_running_stats
        ):
            pairs.append((source, node))
    return pairs


def _fold_batchnorm(gm: fx.GraphModule, keep: set[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Fold each eval-mode BatchNorm2d into the Conv2d feeding it (`conv_batchnorm_pairs`; one op less).

    Conv nodes in `keep` are left; returns {removed bn node: the conv node now holding its value}.
    """
    modules = dict(gm.named_modules())
    moved = {}
    for source, node in conv_batchnorm_pairs(gm.graph, modules):
        if source in keep:
            continue
        fused = fuse_conv_bn_eval(modules[source.target], modules[node.target])
        gm.set_submodule(source.target, fused)
        modules[source.target] = fused
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        moved[node] = source
    gm.recompile()
    return moved


# Modules whose speed depends on the memory layout (the elementwise ones do not).
_LAYOUT_SENSITIVE = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.LocalResponseNorm, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class _Windowed:
    """A conv/pool run on windows without padding (a callable, so layouts can be tuned for it)."""

    def __init__(self, module: nn.Module, kernel, stride, dilation) -> None:
        self.module, self.kernel, self.stride, self.dilation = module, kernel, stride, dilation

    def __call__(self, x: Tensor) -> Tensor:
        m = self.module
        if isinstance(m, nn.Conv2d):
            return F.conv2d(x, m.weight, m.bias, self.stride, 0, self.dilation, m.groups)
        if isinstance(m, nn.MaxPool2d):
            return F.max_pool2d(x, self.kernel, self.stride, 0, self.dilation)
        return F.avg_pool2d(x, self.kernel, self.stride, 0)


def _elementwise_op(target, a, b, private: list[bool]):
    """a (op) b for an add/mul/sub node, in place into a fresh operand of the result's shape."""
    op = _BINARY_FUNCTIONS.get(target) or _BINARY_METHODS[target]
    in_place = _IN_PLACE.get(op)
    if in_place is not None and isinstance(a, Tensor) and isinstance(b, Tensor):
        shape = torch.broadcast_shapes(a.shape, b.shape)
        if private[0] and a.shape == shape:
            return getattr(a, in_place)(b)
        if in_place in _COMMUTATIVE and private[1] and b.shape == shape:
            return getattr(b, in_place)(a)
    return op(a, b)


def is_pointwise_conv(module: nn.Module) -> bool:
    """A 1x1 convolution without padding, dilation or groups: a matrix product at each position."""
    return (
        type(module) is nn.Conv2d
        and pair(module.kernel_size) == (1, 1)
        and module.groups == 1
        and not isinstance(module.padding, str)
        and pair(module.padding) == (0, 0)
    )


def _pointwise_matmul(conv: nn.Conv2d, x: Tensor, stride=None, scratch=None) -> Tensor:
    """conv(x) for a 1x1 convolution as one [B*h*w, Cin] x [Cin, Cout] product (channels-last out);
    stride: the convolution's own unless given (windows already subsampled run with (1, 1));
    scratch(shape): where to write the product (a buffer reused from the previous batch)."""
    stride = pair(conv.stride if stride is None else stride)
    if stride != (1, 1):
        x = x[:, :, :: stride[0], :: stride[1]]
    batch, channels, height, width = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(-1, channels)
    weight = conv.weight.view(conv.out_channels, channels).t()
    out = None if scratch is None else scratch((rows.shape[0], conv.out_channels))
    if conv.bias is not None:
        out = torch.addmm(conv.bias, rows, weight, out=out)
    else:
        out = torch.mm(rows, weight, out=out)
    return out.view(batch, height, width, conv.out_channels).permute(0, 3, 1, 2)


_FLATTENS = {torch.flatten}
# Modules that may return their input itself: their result is never overwritten in place.
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.Unflatten)
# Elementwise ops with an in-place form, used when the first operand (or, for the commutative
# ones, the second) is a fresh tensor nobody else reads: one pass over memory less.
_IN_PLACE = {operator.add: "add_", torch.add: "add_", operator.mul: "mul_", torch.mul: "mul_",
             operator.sub: "sub_", torch.sub: "sub_"}
_COMMUTATIVE = {"add_", "mul_"}
_IDENTITY_IN_EVAL = (nn.Dropout, nn.Identity)


def _fold_upsampling_pool(gm: fx.GraphModule, keep: set[fx.Node]) -> int:
    """Fold an upsampling AdaptiveAvgPool2d -> flatten -> (dropout) -> Linear into one Linear.

    At small inputs AlexNet's AdaptiveAvgPool2d((6, 6)) repeats each value of a smaller map up to
    36 times before fc6; fc6 of the repeated map equals a Linear on the small map whose weights
    are fc6's, summed back through the pool (its adjoint). Exact algebra (up to rounding), far
    fewer multiply-adds. Returns how many were folded. Pools whose output is not larger than their
    input are left alone (folding would not save anything).
    """
    modules = dict(gm.named_modules())
    folded = 0
    for pool_node in list(gm.graph.nodes):
        if pool_node.op != "call_module" or not isinstance(modules[pool_node.target], nn.AdaptiveAvgPool2d):
            continue
        in_shape, out_shape = pool_node.args[0].meta.get("shape"), pool_node.meta.get("shape")
        if in_shape is None or out_shape is None or in_shape[-2] * in_shape[-1] >= out_shape[-2] * out_shape[-1]:
            continue
        chain = [pool_node]
        while len(chain[-1].users) == 1 and chain[-1] not in keep:
            user = next(iter(chain[-1].users))
            chain.append(user)
            if user.op == "call_module" and isinstance(modules[user.target], nn.Linear):
                break
        flatten = chain[1] if len(chain) > 1 else None
        linear = chain[-1]
        if (
            flatten is None
            or not (flatten.op == "call_function" and flatten.target in _FLATTENS and flatten.args[1:] == (1,))
            or not (linear.op == "call_module" and isinstance(modules[linear.target], nn.Linear))
            or any(not (n.op == "call_module" and isinstance(modules[n.target], _IDENTITY_IN_EVAL)) for n in chain[2:-1])
        ):
            continue
        pool, fc = modules[pool_node.target], modules[linear.target]
        with torch.enable_grad():
            probe = fc.weight.new_zeros(fc.out_features, *in_shape[1:]).requires_grad_(True)
            (weight,) = torch.autograd.grad(pool(probe).flatten(1), probe, grad_outputs=fc.weight.detach())
        merged = nn.Linear(weight[0].numel(), fc.out_features, bias=fc.bias is not None, device=fc.weight.device, dtype=fc.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(weight.flatten(1))
            if fc.bias is not None:
                merged.bias.copy_(fc.bias)
        merged.requires_grad_(False)
        gm.set_submodule(linear.target, merged)
        modules[linear.target] = merged
        pool_node.replace_all_uses_with(pool_node.args[0])
        gm.graph.erase_node(pool_node)
        folded += 1
    gm.recompile()
    return folded


class SmallMapConv(nn.Module):
    """A zero-padded Conv2d on a map of a few positions, as one matrix product per output row
    (exact algebra, up to rounding).

    On a 3x3 map a 3x3 convolution with padding 1 spends 32 of its 81 taps per channel pair on
    padding (on a 2x2 map, 20 of 36). Output row `oy` reads only input rows r0..r1; over those
    rows the convolution is a dense [rows*W*Cin, Wout*Cout] matrix, so each output row is one
    large matrix product that skips the padding rows (e.g. AlexNet's conv3-conv5 at 64 px,
    ResNet-50's layer4). The input is read in place, channels-last: no im2col copy.
    """

    def __init__(self, conv: nn.Conv2d, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
        super().__init__()
        (kh, kw), (sh, sw) = pair(conv.kernel_size), pair(conv.stride)
        (ph, pw), (dh, dw) = pair(conv.padding), pair(conv.dilation)
        weight = conv.weight.detach()  # [Cout, Cin, kh, kw]
        cout, cin = weight.shape[:2]
        (height, width), (out_h, out_w) = in_hw, out_hw
        self.out_hw, self.out_channels = out_hw, cout
        # Tap blocks [kh*kw + 1, Cin, Cout]; the last one is zero (positions no tap reaches).
        blocks = torch.cat([weight.permute(2, 3, 1, 0).reshape(kh * kw, cin, cout), weight.new_zeros(1, cin, cout)])
        ox = torch.arange(out_w)
        ix = torch.arange(width)
        kx = ix[:, None] - (ox[None, :] * sw - pw)  # [W, Wout]: tap column, when a multiple of dw
        kx_ok = (kx >= 0) & (kx % dw == 0) & (kx // dw < kw)
        self.rows: list[tuple[int, int]] = []
        for oy in range(out_h):
            top = oy * sh - ph
            r0, r1 = max(top, 0), min(top + (kh - 1) * dh, height - 1) + 1
            ky = torch.arange(r0, r1) - top  # [rows]
            ky_ok = (ky % dh == 0) & (ky // dh < kh)
            tap = (ky // dh)[:, None, None] * kw + (kx // dw)[None]  # [rows, W, Wout]
            tap = torch.where(ky_ok[:, None, None] & kx_ok[None], tap, kh * kw)
            matrix = blocks[tap].permute(0, 1, 3, 2, 4)  # [rows, W, Cin, Wout, Cout]
            self.register_buffer(f"row{oy}", matrix.reshape((r1 - r0) * width * cin, out_w * cout).contiguous())
            self.rows.append((r0, r1))
        bias = conv.bias.detach() if conv.bias is not None else weight.new_zeros(cout)
        self.register_buffer("bias", bias.repeat(out_w))  # [Wout*Cout], ordered (ox, cout)
        self.taps = TapConv(conv, in_hw, out_hw)  # the same convolution tap by tap: faster on some maps
        self.conv = conv  # and as it was (the Winograd forms are built from it)

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        grid = x.permute(0, 2, 3, 1)  # [B, H, W, Cin]: a view when x is channels-last
        if not grid.is_contiguous():
            grid = grid.contiguous()
        out = torch.stack(
            [torch.addmm(self.bias, grid[:, r0:r1].reshape(batch, -1), getattr(self, f"row{oy}"))
             for oy, (r0, r1) in enumerate(self.rows)],
            1,
        )  # [B, Hout, Wout*Cout]
        return out.view(batch, *self.out_hw, self.out_channels).permute(0, 3, 1, 2)


class TapConv(nn.Module):
    """A zero-padded Conv2d on a small map as one matrix product per kernel tap, each over only
    the outputs whose input for that tap lies inside the map (exact algebra, up to rounding).

    A 3x3 convolution with padding 1 on a 4x4 map spends 44 of its 144 taps per channel pair on
    padding; strided, on ResNet-50's layer4 entry (4x4 -> 2x2), 11 of 36. Tap (ky, kx) reads a
    strided block of the channels-last input and adds its product with W[:, :, ky, kx] into the
    block of outputs it reaches; the tap that reaches every output starts the sum, with the bias.
    """

    def __init__(self, conv: nn.Conv2d, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
        super().__init__()
        (kh, kw), stride = pair(conv.kernel_size), pair(conv.stride)
        padding, dilation = pair(conv.padding), pair(conv.dilation)
        weight = conv.weight.detach()  # [Cout, Cin, kh, kw]
        self.out_hw, self.stride = tuple(out_hw), stride
        taps = []
        for ky in range(kh):
            for kx in range(kw):
                spans = [
                    _tap_span(k, s, p, d, n_in, n_out)
                    for k, s, p, d, n_in, n_out in zip((ky, kx), stride, padding, dilation, in_hw, out_hw)
                ]
                if None not in spans:
                    taps.append((spans[0], spans[1], weight[:, :, ky, kx].t().contiguous()))
        taps.sort(key=lambda t: -(t[0][1] - t[0][0]) * (t[1][1] - t[1][0]))  # the widest first
        self.plan = [(rows, cols) for rows, cols, _ in taps]
        for index, (_, _, matrix) in enumerate(taps):
            self.register_buffer(f"tap{index}", matrix)  # [Cin, Cout]
        self.register_buffer("bias", conv.bias.detach() if conv.bias is not None else weight.new_zeros(weight.shape[0]))
        (oy0, oy1, _), (ox0, ox1, _) = self.plan[0]
        self.first_covers_all = (oy0, oy1, ox0, ox1) == (0, out_hw[0], 0, out_hw[1])

    def forward(self, x: Tensor) -> Tensor:
        batch, channels = x.shape[:2]
        grid = x.permute(0, 2, 3, 1)  # [B, H, W, Cin]: a view when x is channels-last
        (sy, sx), (out_h, out_w) = self.stride, self.out_hw
        out = None
        for index, ((oy0, oy1, iy0), (ox0, ox1, ix0)) in enumerate(self.plan):
            ny, nx = oy1 - oy0, ox1 - ox0
            block = grid[:, iy0 : iy0 + (ny - 1) * sy + 1 : sy, ix0 : ix0 + (nx - 1) * sx + 1 : sx].reshape(-1, channels)
            matrix = getattr(self, f"tap{index}")
            if out is None and self.first_covers_all:
                out = torch.addmm(self.bias, block, matrix).view(batch, out_h, out_w, -1)
                continue
            if out is None:
                out = self.bias.expand(batch, out_h, out_w, -1).contiguous()
            out[:, oy0:oy1, ox0:ox1] += (block @ matrix).view(batch, ny, nx, -1)
        return out.permute(0, 3, 1, 2)


def _tap_span(k: int, stride: int, pad: int, dilation: int, size_in: int, size_out: int):
    """Along one axis: (first output, end output, first input row) of the outputs whose input for
    kernel tap k lies inside the map, or None when there are none."""
    inside = [o for o in range(size_out) if 0 <= o * stride - pad + k * dilation < size_in]
    if not inside:
        return None
    return inside[0], inside[-1] + 1, inside[0] * stride - pad + k * dilation


def _small_map_convs(gm: fx.GraphModule, max_positions: int = 9) -> int:
    """Replace convolutions whose output map has at most `max_positions` positions, and whose
    kernel falls partly on padding there, by SmallMapConv. Returns how many were replaced."""
    modules = dict(gm.named_modules())
    replaced = 0
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) is not nn.Conv2d:
            continue
        conv = modules[node.target]
        in_shape, out_shape = node.args[0].meta.get("shape"), node.meta.get("shape")
        if in_shape is None or out_shape is None or conv.groups != 1 or conv.padding_mode != "zeros":
            continue
        if isinstance(conv.padding, str) or out_shape[-2] * out_shape[-1] > max_positions or not any(pair(conv.padding)):
            continue
        small = SmallMapConv(conv, tuple(in_shape[-2:]), tuple(out_shape[-2:]))
        gm.set_submodule(node.target, small)
        replaced += 1
    gm.recompile()
    return replaced


def _record_shapes(gm: fx.GraphModule, example: Tensor) -> None:
    """node.meta["shape"] for every tensor-valued node, from one forward of `example`."""
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(example)
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        node.meta["shape"] = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class IncrementalInference:
    """Run many occluded copies of one image through a model, recomputing only what changes.

        engine = IncrementalInference(model, watch={"conv5": "features.11"})
        engine.prepare(image)                       # [1, 3, H, W]: caches every layer's maps
        logits, watched = engine.run(Patched(zeros[B, 3, s, s], y0, x0))

    model: any torch.fx-traceable network (it is copied; the original is untouched). watch:
    name -> module path whose output the caller wants per occluder position; `run` returns it as
    a Patched value or a whole [B, ...] tensor (see `materialise`, `total_per_channel`), and
    `prepare` returns the unoccluded values. full_fraction: a window covering at least this share
    of its map is computed as whole maps instead (the gathers would cost more than they save).
    tune_layout: run each conv/pool layer in the memory layout (channels-last or not; 1x1
    convolutions also as a matrix product) that the first batch measures fastest for it; the
    numbers are the same either way, up to rounding.
    fold: apply exact graph rewrites first (BatchNorm folded into the convolution before it, an
    upsampling adaptive pool folded into the Linear after it, convolutions on maps of at most 9
    positions as SmallMapConv); equal up to float rounding.
    """

    def __init__(
        self,
        model: nn.Module,
        watch: Mapping[str, str] | None = None,
        full_fraction: float = 0.8,
        fold: bool = True,
        tune_layout: bool = True,
    ) -> None:
        if not 0 < full_fraction <= 1:
            raise ValueError(f"full_fraction must be in (0, 1], got {full_fraction!r}")
        self.model = copy.deepcopy(model).eval()
        for module in self.model.modules():
            if getattr(module, "inplace", False):
                module.inplace = False  # cached maps must never be overwritten
        self.model.requires_grad_(False)
        self.watch_paths = dict(watch or {})
        self.full_fraction = full_fraction
        self.fold = fold
        self.tune_layout = tune_layout
        self._layouts: dict[fx.Node, str] = {}
        # Window reads and whole maps are written into buffers kept from one batch to the next:
        # fresh multi-megabyte tensors cost a page fault per 4 KiB on first touch.
        self._scratch: dict[tuple, Tensor] = {}
        self._taps: dict[fx.Node, TapConv | None] = {}
        self._winograd: dict[tuple[fx.Node, int], winograd.WinogradConv] = {}  # (node, tile side)
        self.input_shape: tuple[int, ...] | None = None
        self.base: dict[fx.Node, object] | None = None

    def _build(self, image: Tensor) -> None:
        """Trace the model for inputs shaped like `image` and apply the exact graph rewrites."""
        gm = fx.symbolic_trace(copy.deepcopy(self.model))
        watch = {name: module_node(gm, path) for name, path in self.watch_paths.items()}
        if self.fold:
            moved = _fold_batchnorm(gm, set(watch.values()))
            watch = {name: moved.get(node, node) for name, node in watch.items()}
            _record_shapes(gm, image)
            _fold_upsampling_pool(gm, set(watch.values()))
            _small_map_convs(gm)
        self.gm, self.watch = gm, watch
        self._layouts = {}
        self._scratch = {}
        self._taps = {}
        self._winograd = {}
        self.nodes = list(gm.graph.nodes)
        self.modules = dict(gm.named_modules())
        last_use: dict[fx.Node, int] = {}
        for index, node in enumerate(self.nodes):
            for arg in node.all_input_nodes:
                last_use[arg] = index
        keep = set(watch.values())
        # A node's result may be overwritten in place by its consumer when that consumer is its
        # only user and the node made a new tensor (not a view or its input passed through).
        self._overwritable = {
            node
            for node in self.nodes
            if len(node.users) == 1
            and node not in keep
            and next(iter(node.users)).op != "output"
            and (
                (node.op == "call_module" and not isinstance(self.modules[node.target], _PASS_THROUGH))
                or (node.op == "call_function" and node.target in _BINARY_FUNCTIONS)
                or (node.op == "call_method" and node.target in _BINARY_METHODS)
            )
        }
        self._free_after = [[] for _ in self.nodes]
        for node, index in last_use.items():
            if node not in keep:
                self._free_after[index].append(node)
        self.input_shape = tuple(image.shape)

    @staticmethod
    def unsupported(model: nn.Module) -> str | None:
        """Why torch.fx cannot trace the model (then use a plain batched forward), or None."""
        try:
            fx.symbolic_trace(model)
        except Exception as err:  # noqa: BLE001 - tracing fails in many ways (control flow on values, ...)
            return f"torch.fx cannot trace it: {type(err).__name__}: {err}"
        return None

    # ---- the unoccluded forward

    @torch.no_grad()
    def prepare(self, image: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Run the unoccluded image [1, C, H, W] once, caching every node's output.

        Returns (logits [1, K], {watch name: its unoccluded output [1, ...]}).
        """
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"prepare takes one image [1, C, H, W], got shape {tuple(image.shape)}")
        if tuple(image.shape) != self.input_shape:
            self._build(image)
        # The cached maps are kept channels-last, the layout the batches read them in. Small-map
        # convolutions run for this one image as the plain convolutions they replace (their
        # matrices are built for batches: megabytes to read for a single image).
        values: dict[fx.Node, object] = {}
        output = None
        for node in self.nodes:
            if node.op == "placeholder":
                values[node] = _channels_last(image)
            elif node.op == "output":
                output = fx.node.map_arg(node.args[0], lambda n: values[n])
            else:
                args = fx.node.map_arg(node.args, lambda n: values[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
                module = self.modules.get(node.target) if node.op == "call_module" else None
                if isinstance(module, SmallMapConv):
                    value = module.conv(*args, **kwargs)
                else:
                    value = self._call(node, args, kwargs)
                values[node] = _channels_last(value) if isinstance(value, Tensor) else value
        self.base = values
        return output, {name: values[node] for name, node in self.watch.items()}

    # ---- the occluded batch

    @torch.no_grad()
    def run(self, occluded: Patched) -> tuple[Tensor, dict[str, object]]:
        """Forward the batch of occluded inputs, given as the input's changed windows.

        Returns (logits [B, K], {watch name: Patched | [B, ...] tensor}).
        """
        if self.base is None:
            raise RuntimeError("call prepare(image) before run()")
        batch = len(occluded.y0)
        values: dict[fx.Node, object] = {}
        output = None
        for index, node in enumerate(self.nodes):
            if node.op == "placeholder":
                values[node] = Patched(_channels_last(occluded.values), occluded.y0, occluded.x0)
            elif node.op == "get_attr":
                values[node] = SAME
            elif node.op == "output":
                output = fx.node.map_arg(node.args[0], lambda n: materialise(values[n], self.base[n], batch))
            else:
                values[node] = self._step(node, values, batch)
            for done in self._free_after[index]:
                values.pop(done, None)
        watched = {name: self._own(values[node]) for name, node in self.watch.items()}
        return fx.node.map_aggregate(output, self._own), watched

    def _scratch_for(self, key: tuple, like: Tensor):
        """shape -> a tensor of that shape in the buffer kept for `key` (a read or materialise
        site), grown when a batch needs more; the next batch overwrites it."""

        def get(shape) -> Tensor:
            numel = int(np.prod(shape))
            buffer = self._scratch.get(key)
            if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device:
                buffer = self._scratch[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
            return buffer[:numel].view(tuple(shape))

        return get

    def _own(self, value):
        """A value handed to the caller, copied out of the scratch buffers the next batch reuses."""
        tensor = value.values if isinstance(value, Patched) else value
        if not isinstance(tensor, Tensor) or not self._scratch:
            return value
        storage = tensor.untyped_storage().data_ptr()
        if not any(buffer.untyped_storage().data_ptr() == storage for buffer in self._scratch.values()):
            return value
        return Patched(tensor.clone(), value.y0, value.x0) if isinstance(value, Patched) else tensor.clone()

    def _step(self, node: fx.Node, values: dict, batch: int):
        """One node of the occluded forward: Patched where the op allows, whole maps otherwise."""
        inputs = node.all_input_nodes
        if all(values[n] is SAME for n in inputs):
            return SAME
        if node.op == "call_module":
            module = self.modules[node.target]
            source = node.args[0]
            value = values[source] if isinstance(source, fx.Node) else None
            if isinstance(value, Patched) and len(node.args) == 1 and not node.kwargs:
                if type(module) is nn.ReLU and source in self._overwritable:
                    return Patched(torch.relu_(value.values), value.y0, value.x0)
                if isinstance(module, _POINTWISE_MODULES):
                    return Patched(self._in_best_layout(node, module, value.values), value.y0, value.x0)
                windowed = self._windowed(node, module, value, self.base[source], self.base[node])
                if windowed is not None:
                    return windowed
        elif node.op == "call_function" and node.target in _POINTWISE_FUNCTIONS:
            value = values[node.args[0]] if isinstance(node.args[0], fx.Node) else None
            if isinstance(value, Patched) and len(inputs) == 1:
                kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
                return Patched(node.target(value.values, *node.args[1:], **kwargs), value.y0, value.x0)
        elif node.op == "call_method" and node.target in _POINTWISE_METHODS:
            value = values[node.args[0]]
            if isinstance(value, Patched) and len(inputs) == 1:
                return Patched(getattr(value.values, node.target)(*node.args[1:], **node.kwargs), value.y0, value.x0)
        binary = None
        if node.op == "call_function":
            binary = _BINARY_FUNCTIONS.get(node.target)
        elif node.op == "call_method":
            binary = _BINARY_METHODS.get(node.target)
        if binary is not None and len(node.args) == 2 and not node.kwargs:
            combined = self._elementwise(binary, node, values)
            if combined is not None:
                return combined
        # Anything else sees whole maps: materialise every changed input and run the op as usual.
        sites = itertools.count()
        args = fx.node.map_arg(
            node.args,
            lambda n: materialise(values[n], self.base[n], batch, self._scratch_for((node, next(sites)), self.base[n])),
        )
        kwargs = fx.node.map_arg(node.kwargs, lambda n: materialise(values[n], self.base[n], batch))
        # Which arguments are ours to overwrite: just materialised, or fresh with no other reader.
        private = [
            isinstance(a, fx.Node)
            and (isinstance(values[a], Patched) or (isinstance(values[a], Tensor) and a in self._overwritable))
            for a in node.args
        ]
        if node.op == "call_module" and len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
            if type(self.modules[node.target]) is nn.ReLU and private[0]:
                return torch.relu_(args[0])
            return self._in_best_layout(node, self.modules[node.target], args[0])
        if binary is not None and len(args) == 2 and all(isinstance(a, Tensor) and a.ndim == 4 for a in args):
            # Elementwise ops on maps of two layouts run several times slower: align them first.
            layout = torch.channels_last if args[0].is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            aligned = args[1].contiguous(memory_format=layout)
            private[1] = private[1] or aligned is not args[1]
            return _elementwise_op(node.target, args[0], aligned, private)
        return self._call(node, args, kwargs)

    def _in_best_layout(self, node: fx.Node, fn, x: Tensor) -> Tensor:
        """fn(x), run the way that is fastest on this machine, measured on the first batch that
        reaches the node: with x channels-last or not (CPU pooling is many times faster
        channels-last, while convolutions on 2x2 to 4x4 maps run several times faster in the
        usual layout), and for 1x1 convolutions also as a plain matrix product. Every way
        computes the same numbers, up to rounding."""
        module = self.modules[node.target]
        if not self.tune_layout or x.ndim != 4 or not isinstance(module, (*_LAYOUT_SENSITIVE, SmallMapConv)):
            return fn(x)  # elementwise ops are as fast in either layout: never convert for them
        ways = {
            "channels_last": lambda t: fn(t.contiguous(memory_format=torch.channels_last)),
            "contiguous": lambda t: fn(t.contiguous()),
        }
        if is_pointwise_conv(module):
            stride = fn.stride if isinstance(fn, _Windowed) else None
            # The product is written into a buffer kept from batch to batch: the largest maps
            # (ResNet-50's 256-channel layer1 outputs, 20-30 MB) otherwise cost a page fault per
            # 4 KiB each time (the oneDNN ways cannot write into a given tensor).
            scratch = self._scratch_for((node, "out"), x)
            ways["matmul"] = lambda t: _pointwise_matmul(module, t, stride, scratch)
        taps = self._tap_conv(node, module, x) if fn is module else None
        if taps is not None:
            ways["taps"] = lambda t: taps(t.contiguous(memory_format=torch.channels_last))
        conv = module.conv if isinstance(module, SmallMapConv) else module
        if fn is module and winograd.applies(conv):
            kernel = pair(conv.kernel_size)[0]
            out_hw = winograd.output_size(kernel, pair(conv.padding), x.shape[-2:])
            for tile in winograd.tiles_worth_trying(kernel, out_hw):
                fast = self._winograd.get((node, tile))
                if fast is None:
                    fast = self._winograd[node, tile] = winograd.WinogradConv(conv, tile).to(x.device)
                # Into a kept buffer: a fresh output costs page faults, how many varying from run
                # to run (they made this way measure 2x slower on some first batches).
                scratch = self._scratch_for((node, "out", tile), x)
                ways[f"winograd{tile}"] = lambda t, fast=fast, scratch=scratch: fast(t, out=scratch(fast.tiled_shape(t)))
        chosen = self._layouts.get(node)
        if chosen in ways:
            return ways[chosen](x)
        current = "channels_last" if x.is_contiguous(memory_format=torch.channels_last) else "contiguous"
        ordered = {name: ways[name] for name in sorted(ways, key=lambda n: n != current)}  # the current layout first
        self._layouts[node], out = fastest_way(ordered, x)
        return out

    def _tap_conv(self, node: fx.Node, module: nn.Module, x: Tensor) -> TapConv | None:
        """The TapConv form of a whole-map convolution on a small map (at most 100 positions),
        built once per node; None where it does not apply."""
        if isinstance(module, SmallMapConv):
            return module.taps
        if node in self._taps:
            return self._taps[node]
        taps = None
        height, width = x.shape[-2:]
        if (
            type(module) is nn.Conv2d
            and module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
            and pair(module.kernel_size) != (1, 1)
            and height * width <= 100
        ):
            out_hw = tuple(
                (n + 2 * p - d * (k - 1) - 1) // s + 1
                for n, p, d, k, s in zip(
                    (height, width), pair(module.padding), pair(module.dilation), pair(module.kernel_size), pair(module.stride)
                )
            )
            taps = TapConv(module, (height, width), out_hw).to(x.device)
        self._taps[node] = taps
        return taps

    def _call(self, node: fx.Node, args, kwargs):
        """The node's own operation on concrete arguments (in-place forms run out of place)."""
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            target = _BINARY_FUNCTIONS.get(node.target, node.target)
            if "inplace" in kwargs:
                kwargs = dict(kwargs, inplace=False)
            return target(*args, **kwargs)
        if node.op == "call_method":
            name = node.target
            if name.endswith("_") and hasattr(args[0], name[:-1]):
                name = name[:-1]
            return getattr(args[0], name)(*args[1:], **kwargs)
        if node.op == "get_attr":
            target = self.gm
            for part in node.target.split("."):
                target = getattr(target, part)
            return target
        raise ValueError(f"unexpected fx node {node.op}")

    def _too_big(self, count_y: int, count_x: int, out_h: int, out_w: int) -> bool:
        return count_y * count_x >= self.full_fraction * out_h * out_w

    def _windowed(self, node: fx.Node, module: nn.Module, value: Patched, base_in: Tensor, base_out: Tensor) -> Patched | None:
        """Conv/pool on the windows the changed region reaches; None when this op needs whole maps."""
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str) and module.padding != "valid":
                return None
            padding = (0, 0) if module.padding == "valid" else pair(module.padding)
            fill = 0.0
        elif isinstance(module, nn.MaxPool2d):
            padding, fill = pair(module.padding), float("-inf")
        elif isinstance(module, nn.AvgPool2d):
            padding = pair(module.padding)
            if module.ceil_mode or module.divisor_override or (any(padding) and not module.count_include_pad):
                return None
            fill = 0.0
        else:
            return None
        kernel, stride = pair(module.kernel_size), pair(module.stride or module.kernel_size)
        dilation = pair(getattr(module, "dilation", 1))
        eff = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
        out_h, out_w = base_out.shape[-2:]
        ph, pw = value.size
        oy, count_y, ty, th = _affected(value.y0, ph, out_h, eff[0], stride[0], padding[0])
        ox, count_x, tx, tw = _affected(value.x0, pw, out_w, eff[1], stride[1], padding[1])
        if self._too_big(count_y, count_x, out_h, out_w):
            return None
        if (th, tw) == value.size and np.array_equal(ty, value.y0) and np.array_equal(tx, value.x0):
            windows = value.values  # the window is the changed region itself (1x1 convolutions)
        elif is_pointwise_conv(module) and stride != (1, 1):
            # A strided 1x1 convolution (a ResNet shortcut) needs every s-th position only.
            sampled = _read(base_in, value, ty, tx, count_y, count_x, fill, step=stride,
                            scratch=self._scratch_for((node, "window"), base_in))
            return Patched(self._in_best_layout(node, _Windowed(module, kernel, (1, 1), dilation), sampled), oy, ox)
        else:
            windows = _read(base_in, value, ty, tx, th, tw, fill, scratch=self._scratch_for((node, "window"), base_in))
        return Patched(self._in_best_layout(node, _Windowed(module, kernel, stride, dilation), windows), oy, ox)

    def _elementwise(self, op, node: fx.Node, values: dict) -> Patched | None:
        """op(a, b) where at least one is Patched and none is whole: on the union of the windows."""
        operands = [values[a] if isinstance(a, fx.Node) else a for a in node.args]
        patched = [v for v in operands if isinstance(v, Patched)]
        if not patched or any(isinstance(v, Tensor) for v in operands):
            return None
        bases = [self.base[a] if isinstance(a, fx.Node) else a for a in node.args]
        shape = self.base[node].shape
        if any(isinstance(b, Tensor) and b.shape != shape for b in bases) or len(shape) != 4:
            return None  # broadcasting: leave it to the whole-map path
        out_h, out_w = shape[-2:]
        y0 = np.min([p.y0 for p in patched], axis=0)
        x0 = np.min([p.x0 for p in patched], axis=0)
        h = int((np.max([p.y0 + p.size[0] for p in patched], axis=0) - y0).max())
        w = int((np.max([p.x0 + p.size[1] for p in patched], axis=0) - x0).max())
        h, w = min(h, out_h), min(w, out_w)
        if self._too_big(h, w, out_h, out_w):
            return None
        y0, x0 = np.minimum(y0, out_h - h), np.minimum(x0, out_w - w)
        args, private = [], []
        for site, (arg, value, base) in enumerate(zip(node.args, operands, bases)):
            if isinstance(value, Patched) and value.size == (h, w) and (value.y0 == y0).all() and (value.x0 == x0).all():
                args.append(value.values)  # already the union's window (the ResNet branch that grew most)
                private.append(arg in self._overwritable)
            elif isinstance(value, Patched) or value is SAME:
                scratch = self._scratch_for((node, site), base)
                args.append(_read(base, value if isinstance(value, Patched) else None, y0, x0, h, w, 0.0, scratch=scratch))
                private.append(True)
            else:
                args.append(value)  # a scalar
                private.append(False)
        return Patched(_elementwise_op(node.target, args[0], args[1], private), y0, x0)
