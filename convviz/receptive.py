"""Receptive-field geometry of analysis layers, derived from the architecture itself.

For a unit at output position (y, x) of an analysis layer, which input pixels can influence it?
Zeiler & Fergus crop each top-9 patch to that box (Fig. 2). Nothing here is hard-coded per
model: the network is traced with torch.fx and the classic recurrences are composed along the
graph, node by node, for every Conv2d / MaxPool2d / AvgPool2d (kernel k, stride s, padding p,
dilation d, effective kernel ke = d*(k-1) + 1):

    size'  = size + (ke - 1) * jump       side of the box one unit sees
    jump'  = jump * s                     input pixels between neighbouring units
    left'  = left - p * jump              first input pixel (may be negative) unit 0 sees

Pixel i of the input has its centre at coordinate i, so unit (y, x) sees rows
left + y*jump ... left + y*jump + size - 1 (inclusive), clipped to the image.

Clipping at the far (bottom/right) edge needs one more quantity. Floor-rounded output sizes drop
the last few input rows of some layers (LeNet at 45 px never looks at row 44; ZFNet at 99 px
loses rows 96-98 at conv2), and a window that reaches past such a cropped map sees nothing
there, even though those pixels are inside the image. So each layer also carries its `reach`:
the exclusive end of the input pixels that any of its units sees at all,

    reach' = min(reach, left + (n - 1) * jump + size)     n: side of the window's input map

and boxes are clipped to [0, reach). (The near edge needs nothing: maps start at the image's
first pixel, and padding there really is outside the image.)

Where branches meet (the residual `+` of a ResNet bottleneck) the result is the union of the
branches' boxes; with a shortcut that is an identity or a strided 1x1 conv, that union is the box
of the largest path (through each bottleneck's 3x3 conv and its downsampling stride). Linear
layers, flattening and adaptive pooling to 1x1 see everything their input map sees (the whole
image, minus any rows cropped as above): the stride of such layers is 0, every unit the same box. Only square geometry
(equal kernel/stride/padding along both axes) is supported, which covers every model here.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from convviz.models.registry import ModelSpec, get_spec


@dataclass(frozen=True)
class RField:
    """Receptive-field geometry of one analysis layer for a square input of a given side.

    size: side of the box one unit sees, in input pixels, before clipping to the image (it can
        exceed the image). stride: input pixels between neighbouring units (the "jump"); 0 when
        every unit sees the same box (fc layers, anything after flattening: the whole image).
    start: centre of unit (0, 0)'s box in input-pixel coordinates (pixel i is centred at i); a
        half-integer for even sizes and possibly negative. output_size: (h, w) of the layer's
        feature map; (1, 1) for fc layers, whose units all see the whole image.
    reach: exclusive end of the input rows/columns that any unit of this layer sees at all
        (< the input size where floor-rounded strides crop the last rows); None: the image edge.
    """

    size: int
    stride: int
    start: float
    output_size: tuple[int, int]
    reach: int | None = None

    @property
    def first_pixel(self) -> int:
        """First input row/column (possibly negative, i.e. in the padding) that unit 0 sees."""
        return round(self.start - (self.size - 1) / 2)


def unit_box(rf: RField, y: int, x: int, input_size: int) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) input-pixel box that unit (y, x) sees, clipped to the image, ends exclusive."""
    h, w = rf.output_size
    if not (0 <= y < h and 0 <= x < w):
        raise ValueError(f"unit ({y}, {x}) is outside the {h}x{w} feature map")
    end = input_size if rf.reach is None else min(rf.reach, input_size)
    y0, x0 = rf.first_pixel + y * rf.stride, rf.first_pixel + x * rf.stride
    return (max(y0, 0), max(x0, 0), min(y0 + rf.size, end), min(x0 + rf.size, end))


# ------------------------------------------------------------------------------- geometry algebra


@dataclass(frozen=True)
class _Geo:
    """Geometry of one traced tensor along either axis (see the module doc); jump 0: one shared box."""

    size: int
    jump: int
    left: int
    reach: int

    def extent(self, n: int) -> tuple[int, int]:
        """[lo, hi) of the input pixels that the first n units together see (clipped below at 0)."""
        return max(self.left, 0), min(self.reach, self.left + (n - 1) * self.jump + self.size)


def _input_geo(input_size: int) -> _Geo:
    return _Geo(size=1, jump=1, left=0, reach=input_size)


def _collapse(geo: _Geo, n: int) -> _Geo:
    """Every output unit sees what all n input units together see (flatten, fc, global pooling)."""
    lo, hi = geo.extent(n)
    return _Geo(size=hi - lo, jump=0, left=lo, reach=hi)


def _square(value, what: str, module: nn.Module) -> int:
    """The single value of a square kernel/stride/padding/dilation (torch stores ints or tuples)."""
    if isinstance(value, str):  # Conv2d(padding="same"/"valid")
        raise NotImplementedError(f"string padding {value!r} of {module} is not supported")
    values = set(value) if isinstance(value, tuple) else {value}
    if len(values) != 1:
        raise NotImplementedError(f"non-square {what} {value} of {module} is not supported")
    return int(values.pop())


def _window(geo: _Geo, n: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> _Geo:
    """Compose a sliding window (conv or pool) over an n-unit map of geometry `geo`.

    The recurrences of the module doc; a jump-0 input (one shared box) stays as it is.
    """
    effective = dilation * (kernel - 1) + 1
    return _Geo(
        size=geo.size + (effective - 1) * geo.jump,
        jump=geo.jump * stride,
        left=geo.left - padding * geo.jump,
        reach=geo.extent(n)[1],
    )


def _union(geos: list[_Geo]) -> _Geo:
    """Box covering every branch's box (branches of a sum/concat have the same unit grid)."""
    jumps = {g.jump for g in geos}
    if len(jumps) != 1:
        raise NotImplementedError(f"branches with different strides {sorted(jumps)} meet; cannot merge their grids")
    left = min(g.left for g in geos)
    right = max(g.left + g.size for g in geos)  # exclusive
    return _Geo(size=right - left, jump=jumps.pop(), left=left, reach=max(g.reach for g in geos))


def _side(shape, module) -> int:
    """Spatial side of a square [B, C, h, w] tensor shape."""
    if shape is None or len(shape) != 4 or shape[-1] != shape[-2]:
        raise NotImplementedError(f"{module} needs a square [B, C, h, w] input, got shape {shape}")
    return int(shape[-1])


def _module_geo(module: nn.Module, geo: _Geo, in_shape, out_shape) -> _Geo:
    """Geometry after one leaf module, given its input geometry and tensor shapes."""
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
        return _window(
            geo,
            _side(in_shape, module),
            _square(module.kernel_size, "kernel", module),
            _square(module.stride, "stride", module),
            _square(module.padding, "padding", module),
            _square(module.dilation, "dilation", module),
        )
    if isinstance(module, nn.AvgPool2d):
        stride = module.stride if module.stride is not None else module.kernel_size
        return _window(
            geo,
            _side(in_shape, module),
            _square(module.kernel_size, "kernel", module),
            _square(stride, "stride", module),
            _square(module.padding, "padding", module),
        )
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return _adaptive_geo(geo, in_shape, out_shape)
    if isinstance(module, (nn.Linear, nn.Flatten)):
        return _collapse_any(geo, in_shape)
    if hasattr(module, "kernel_size") or isinstance(module, (nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle)):
        # A spatial op we do not model: refuse rather than report a wrong box.
        raise NotImplementedError(f"receptive field through {type(module).__name__} is not supported")
    # Everything else (ReLU, BatchNorm, LRN, Dropout, Identity, ...) acts per position.
    return geo


def _collapse_any(geo: _Geo, in_shape) -> _Geo:
    """_collapse of an input that may already be collapsed (fc after fc: nothing left to gather)."""
    if geo.jump == 0:
        return geo
    return _collapse(geo, _side(in_shape, "flattening"))


def _adaptive_geo(geo: _Geo, in_shape, out_shape) -> _Geo:
    """Adaptive pooling: a regular window when the sizes divide evenly, else one shared box.

    Uneven adaptive windows have no single stride, so each unit is given the box of the whole
    input map (a superset). In our models they only feed fc layers (AlexNet's 6x6 pool at
    small inputs), which see that whole map anyway, so fc boxes stay exact.
    """
    n_in, n_out = _side(in_shape, "adaptive pooling"), _side(out_shape, "adaptive pooling")
    if n_out == 1 or n_in % n_out:
        return _collapse(geo, n_in)
    return _window(geo, n_in, n_in // n_out, n_in // n_out, 0)


# Functions/methods that mix positions in ways no window describes: their output sees everything.
_GLOBAL_FUNCTIONS = {torch.flatten, torch.reshape, torch.mean, torch.sum}
_GLOBAL_METHODS = {"flatten", "view", "reshape", "mean", "sum"}
# Elementwise / concatenation ops: their output sees the union of what their inputs see.
_UNION_FUNCTIONS = {operator.add, operator.iadd, operator.mul, torch.add, torch.cat, torch.relu, nn.functional.relu}


def _function_geo(node: fx.Node, inputs: list[_Geo]) -> _Geo:
    """Geometry after a call_function / call_method node (inputs: its tensor arguments' geometry)."""
    if not inputs:
        raise NotImplementedError(f"{node.target} creates a tensor from nothing traced")
    source = node.all_input_nodes[0]
    if (node.op == "call_function" and node.target in _GLOBAL_FUNCTIONS) or (
        node.op == "call_method" and node.target in _GLOBAL_METHODS
    ):
        return _collapse_any(_union(inputs), _shape(source))
    if node.op == "call_method" or node.target in _UNION_FUNCTIONS:
        # Remaining tensor methods in traced models (add_, relu_, contiguous, ...) act per position.
        return _union(inputs)
    raise NotImplementedError(f"receptive field through function {node.target} is not supported")


# ------------------------------------------------------------------------------------ the tracer


def _shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _trace(model: nn.Module, input_size: int) -> tuple[fx.GraphModule, dict[fx.Node, _Geo]]:
    """fx-trace `model`, run it once on zeros for the shapes, and give every node its geometry."""
    gm = fx.symbolic_trace(model)
    param = next(model.parameters(), None)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first_conv.in_channels if first_conv is not None else 3
    x = torch.zeros(
        1,
        channels,
        input_size,
        input_size,
        dtype=param.dtype if param is not None else torch.float32,
        device=param.device if param is not None else "cpu",
    )
    was_training = model.training
    model.eval()  # BatchNorm on a single image in train mode would refuse 1x1 maps
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
    finally:
        model.train(was_training)

    geos: dict[fx.Node, _Geo] = {}
    for node in gm.graph.nodes:
        inputs = [geos[arg] for arg in node.all_input_nodes if arg in geos]
        if node.op == "placeholder":
            geos[node] = _input_geo(input_size)
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if source not in geos:
                raise NotImplementedError(f"cannot tell which input of {node.target} carries the image")
            geos[node] = _module_geo(module, geos[source], _shape(source), _shape(node))
        elif node.op in ("call_function", "call_method"):
            geos[node] = _function_geo(node, inputs)
        # get_attr (constants) and output carry no geometry of their own.
    return gm, geos


def _layer_node(gm: fx.GraphModule, path: str) -> fx.Node:
    """The graph node holding the output of module `path` (the last node traced inside it)."""
    found = None
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack", {})
        # fx names repeated calls of one module "path@1", "path@2", ...
        if any(key == path or key.startswith(path + "@") for key in stack):
            found = node
    if found is None:
        raise ValueError(f"module {path!r} is not called in the traced forward pass")
    return found


def _layer_paths(layers: list[str] | str | None, spec: ModelSpec | str | Mapping[str, str]) -> dict[str, str]:
    """Analysis layer name -> module path, in network order; unknown names raise ValueError."""
    if isinstance(spec, str):
        spec = get_spec(spec)
    known = dict(spec.layers if isinstance(spec, ModelSpec) else spec)
    if layers is None:
        return known
    requested = [layers] if isinstance(layers, str) else list(layers)
    unknown = [layer for layer in requested if layer not in known]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; valid layers are {list(known)}")
    return {layer: path for layer, path in known.items() if layer in requested}


def receptive_fields(
    model: nn.Module,
    layers: list[str] | str | None,
    input_size: int,
    spec: ModelSpec | str | Mapping[str, str],
) -> dict[str, RField]:
    """Receptive field of every requested analysis layer of `model` for square `input_size` inputs.

    spec: a registry model name, its ModelSpec, or a plain {layer name: module path} mapping
    (for models outside the registry). layers: names to compute, None for all. The model is traced
    with torch.fx and run once on a 1x3xSxS zero image (in eval mode, then restored) for shapes.
    Returns {layer: RField} in network order.
    """
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 1:
        raise ValueError(f"input_size must be a positive int, got {input_size!r}")
    paths = _layer_paths(layers, spec)
    gm, geos = _trace(model, input_size)
    fields = {}
    for layer, path in paths.items():
        node = _layer_node(gm, path)
        shape = _shape(node)
        if shape is None or len(shape) not in (2, 4):
            raise ValueError(f"layer {layer!r} ({path}) output has shape {shape}; expected [B,C] or [B,C,h,w]")
        fields[layer] = _to_rfield(geos[node], shape, input_size)
    return fields


def _to_rfield(geo: _Geo, shape: tuple[int, ...], input_size: int) -> RField:
    """Public form of a node's geometry; an fc output [B, C] is a 1x1 map."""
    output_size = (int(shape[2]), int(shape[3])) if len(shape) == 4 else (1, 1)
    return RField(
        size=geo.size,
        stride=geo.jump,
        start=geo.left + (geo.size - 1) / 2,
        output_size=output_size,
        reach=min(geo.reach, input_size),
    )
