"""The deconvnet of Zeiler & Fergus (2014), Sec. 2.1: project one unit's activation down to pixels.

To examine a unit (layer L, channel c, position y, x) of an image, the forward pass is run while
the max-pooling "switches" are recorded; every other activation of layer L is set to zero (only
that unit's value is kept -- or the whole feature map c, to project a whole map); and the signal is
passed down to pixel space through, layer by layer (Sec. 2.1, Fig. 1):

  * unpooling: each value goes back to the location its switch recorded (Sec. 2.1 "Unpooling");
  * rectification: a ReLU applied to the downward signal (Sec. 2.1 "Rectification");
  * filtering: the transposed filters of the same layer, no bias (Sec. 2.1 "Filtering"),
    i.e. `conv_transpose2d` with the layer's weight and `x @ W` for fully connected layers.

Contrast normalisation (LocalResponseNorm) is passed through unchanged, dropout is the identity
(evaluation mode) and adaptive average pooling goes through its transpose. Two implementations:

  * `ExplicitDeconvnet` walks a plain stack (conv/ReLU/max-pool/LRN/linear modules run one after
    the other, with a flatten before the classifier: lenet, alexnet, zfnet) and applies the three
    operations above literally, reusing one forward pass of each distinct image for any number of
    projected units. Above the highest max-pool below the layer nothing depends on the image, so
    single units share that part of their projection per distinct (channel, position, sign).
  * `GeneralDeconvnet` gets the same result from autograd for any network built of modules (also
    ResNets): inside its context every `nn.ReLU` module passes `relu(signal)` downward instead of
    its gradient, LocalResponseNorm passes its signal unchanged, and everything else is ordinary
    backpropagation -- max-pool backward routes to the switches, conv backward is the transposed
    conv, linear backward is `x @ W`, biases drop out, residual additions sum, BatchNorm (eval) is a
    per-channel scaling. Only *module* ReLUs are seen: a functional `F.relu`/`torch.relu` inside a
    forward keeps its ordinary gradient (the usual caveat of hook-based deconvnets, Captum's too).

`project(model, layer, images, units)` is the batched entry point used by the studies.

Unit convention: a unit is a row (batch_index, channel, y, x) -- one activation of image
`images[batch_index]` -- or (batch_index, channel) -- the whole feature map `channel` (for fully
connected layers, the single neuron `channel`). The projected signal of a unit whose activation is
zero is exactly zero.

Unpooling detail: `F.max_unpool2d` *overwrites* when two pooling windows of an overlapping pool
(3x3 stride 2 in alexnet/zfnet) chose the same input location; the explicit deconvnet instead
*adds* the two values there (`scatter_add`), which is the exact transpose of the switch selection
and what autograd's max-pool backward does. For non-overlapping pools the two coincide.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convviz import deconv_window
from convviz.deconv_window import pair
from convviz.machine import fastest_way
from convviz.models.registry import check_built_as, get_spec

SIGNALS = ("activation", "one")
CONTRAST_NORM = ("identity", "gradient")
METHODS = ("general", "explicit", "graph")
# Rows per backward pass, as pixels per chunk: 64 rows of 64x64 images, proportionally fewer for
# larger images (memory grows with the pixel count). Larger chunks make maps of 20-90 MB, each a
# fresh mapping with a page fault per 4 KiB: resnet50's layer3 top-9 of 64 maps took 1.35 s with
# 256 rows against 1.12 s with 64 (graph deconvnet); zfnet's conv5 0.68-0.74 s against
# 0.56-0.57 s (explicit; alexnet and lenet the same within noise).
CHUNK_PIXELS = {"general": 64 * 64 * 64, "explicit": 64 * 64 * 64, "graph": 64 * 64 * 64}
# On a GPU there are no page faults to avoid, and every chunk costs the same few hundred kernel
# launches: 8x larger chunks (512 rows of 64x64 images, 0.5 GB for a 64-channel map).
CUDA_CHUNK_FACTOR = 8


# ------------------------------------------------------------------------------------- units & signals


@dataclass(frozen=True)
class Units:
    """Parsed units: batch [U] (image index), channel [U], pos [U, 2] (y, x) or None (whole maps)."""

    batch: Tensor
    channel: Tensor
    pos: Tensor | None

    def __len__(self) -> int:
        return int(self.batch.shape[0])

    def rows(self, start: int, stop: int) -> "Units":
        """Units start..stop-1 (a chunk)."""
        pos = None if self.pos is None else self.pos[start:stop]
        return Units(self.batch[start:stop], self.channel[start:stop], pos)


def parse_units(units, num_images: int) -> Units:
    """Read units given as a list of tuples or a LongTensor [U, 4] / [U, 2] (one tuple: one unit).

    Rows are (batch_index, channel, y, x) or (batch_index, channel); all rows have the same length.
    """
    if isinstance(units, Tensor):
        table = units.detach().to("cpu", torch.long)
    else:
        try:
            table = torch.as_tensor(units, dtype=torch.long)
        except (TypeError, ValueError) as err:
            raise ValueError(f"units must be equal-length integer rows: {err}") from None
    if table.numel() == 0:
        table = table.reshape(0, 2)
    if table.ndim == 1:
        table = table.unsqueeze(0)
    if table.ndim != 2 or table.shape[1] not in (2, 4):
        raise ValueError(
            "units must be rows of (batch_index, channel, y, x) or (batch_index, channel); "
            f"got shape {tuple(table.shape)}"
        )
    batch = table[:, 0]
    if len(batch) and (batch.min() < 0 or batch.max() >= num_images):
        raise ValueError(f"unit batch_index out of range for {num_images} images: {batch.tolist()}")
    pos = table[:, 2:4] if table.shape[1] == 4 else None
    return Units(batch, table[:, 1], pos)


def layer_signal(acts: Tensor, units: Units, signal: str = "activation") -> Tensor:
    """The signal at layer L that starts each projection (Sec. 2.1: all other activations set to zero).

    acts: [U, C, h, w] or [U, C] -- row u is the layer output of unit u's image.
    Returns a tensor shaped like `acts`, zero except the unit's activation (signal="activation";
    the whole channel map for whole-map units) or 1 there (signal="one", Captum's convention).
    """
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")
    index = (torch.arange(acts.shape[0], device=acts.device),) + _unit_index(acts.shape, units, acts.device)
    out = torch.zeros_like(acts)
    out[index] = acts[index] if signal == "activation" else torch.ones_like(acts[index])
    return out


def _unit_index(shape: Sequence[int], units: Units, device) -> tuple[Tensor, ...]:
    """(channel,) or (channel, y, x) of each unit on `device`, checked against a layer output
    shaped [N, C, h, w] or [N, C]."""
    # Checked where the units are (usually the CPU): on a GPU each check would wait for it.
    channels = shape[1]
    if len(units.channel) and (units.channel.min() < 0 or units.channel.max() >= channels):
        raise ValueError(f"unit channel out of range for a layer with {channels} channels")
    channel = to_device(units.channel, device)
    if units.pos is None:
        return (channel,)
    if len(shape) != 4:
        raise ValueError(
            f"(batch_index, channel, y, x) units need a conv layer; this layer's output is "
            f"{tuple(shape[1:])}: use (batch_index, channel)"
        )
    pos = units.pos
    height, width = shape[2:]
    if len(pos) and (pos.min() < 0 or pos[:, 0].max() >= height or pos[:, 1].max() >= width):
        raise ValueError(f"unit position out of range for a {height}x{width} feature map")
    pos = to_device(pos, device)
    return (channel, pos[:, 0], pos[:, 1])


def strongest_units(acts: Tensor) -> Tensor:
    """(batch_index, channel, y, x) of every map's strongest activation (the unit Fig. 2 projects).

    acts: [B, C, h, w] -> LongTensor [B * C, 4], rows ordered by image then channel.
    """
    num, channels, _, width = acts.shape
    flat = acts.flatten(2).argmax(dim=2)  # [B, C]
    batch = torch.arange(num, device=acts.device).repeat_interleave(channels)
    channel = torch.arange(channels, device=acts.device).repeat(num)
    flat = flat.flatten()
    return torch.stack([batch, channel, flat // width, flat % width], dim=1).cpu()


# --------------------------------------------------------------------------------- layer resolution


def resolve_layer(model: nn.Module, layer: str | nn.Module, spec=None) -> nn.Module:
    """The module whose output is `layer`'s feature map.

    layer: a module of `model`, an analysis-layer name of `spec` (a ModelSpec or a registry model
    name), or -- without spec -- a dotted module path such as "features.4".
    """
    if isinstance(layer, nn.Module):
        return layer
    if spec is not None:
        if isinstance(spec, str):
            spec = get_spec(spec)
        check_built_as(model, spec.name)
        if layer not in spec.layers:
            raise ValueError(f"unknown layer {layer!r} for {spec.name}; valid layers are {list(spec.layers)}")
        name, layer = layer, spec.layers[layer]
    try:
        return model.get_submodule(layer)
    except AttributeError:
        if spec is not None:
            raise ValueError(
                f"the model does not match spec {spec.name!r}: it has no module {layer!r} for layer {name!r} "
                "(pass the spec of the model's own architecture)"
            ) from None
        raise ValueError(f"{layer!r} is neither a module path of the model nor a layer name (pass spec=)") from None


def to_device(tensor: Tensor, device) -> Tensor:
    """`tensor` on `device`. Copies from the host do not wait for the GPU: torch's default blocking
    copy synchronises the stream, i.e. waits for all queued work (from pageable memory the driver
    stages the data before returning, so the source may change right after)."""
    return tensor.to(device, non_blocking=tensor.device.type == "cpu")


def _chunks(total: int, size: int | None, method: str, images: Tensor) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering range(total) in steps of `size` (None: CHUNK_PIXELS[method] worth)."""
    if size is None:
        size = max(1, CHUNK_PIXELS[method] // (images.shape[-2] * images.shape[-1]))
        if images.is_cuda:
            size *= CUDA_CHUNK_FACTOR
    for start in range(0, total, size):
        yield start, min(start + size, total)


# ------------------------------------------------------------------------ general deconvnet (autograd)


class _DeconvReLU(torch.autograd.Function):
    """relu(x) forward; backward passes relu(signal) (Sec. 2.1 "Rectification"), not the ReLU gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.clamp_min(0)


class _PassSignal(torch.autograd.Function):
    """Forward returns the precomputed `out` (e.g. LRN(x)); backward hands the signal to x unchanged."""

    @staticmethod
    def forward(ctx, x: Tensor, out: Tensor) -> Tensor:
        return out.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _deconv_relu_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return _DeconvReLU.apply(args[0])


def _pass_signal_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return _PassSignal.apply(args[0], output.detach())


class _StopForward(Exception):
    """Raised by the capture hook once layer L's output exists: the layers above are not needed."""


def forward_to(model: nn.Module, layer: nn.Module, x: Tensor) -> Tensor:
    """Run `model(x)` until `layer` first returns and give its output ([B, C, h, w] or [B, F]); the rest is skipped.

    Works under torch.no_grad() too (to collect activations cheaply); with grad enabled the output
    keeps its graph back to x.
    """
    captured: list[Tensor] = []

    def capture(module, args, output):
        captured.append(output)
        raise _StopForward

    handle = layer.register_forward_hook(capture)
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError("the layer module was not called in the model's forward pass")
    out = captured[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"the layer's output must be one tensor, got {type(out).__name__}")
    return out


@dataclass
class _SavedState:
    """Everything the general deconvnet changes on a model, to put back on exit."""

    training: dict[nn.Module, bool] = field(default_factory=dict)
    requires_grad: dict[nn.Parameter, bool] = field(default_factory=dict)
    inplace: dict[nn.Module, bool] = field(default_factory=dict)
    handles: list = field(default_factory=list)


class GeneralDeconvnet:
    """Deconvnet by autograd for any module-built network (Sec. 2.1 rules on nn.ReLU modules).

    A context manager: inside it the model is in eval mode (dropout off, BatchNorm frozen), its
    parameters do not require grad, every `nn.ReLU` module is non-inplace and passes relu(signal)
    downward, and each `nn.LocalResponseNorm` passes the signal unchanged (contrast_norm="identity",
    as the explicit deconvnet does) or by its true gradient (contrast_norm="gradient", as Captum's
    Deconvolution does). Hooks are prepended, so other forward hooks see the modified outputs.
    On exit, hooks, inplace flags, requires_grad flags and training flags are all restored; the
    modules themselves are never replaced, so module references (e.g. `layer_modules`) stay valid.

        with GeneralDeconvnet(model) as deconv:
            pixels = deconv.project(images, model.features[4], units)  # [U, 3, H, W]
    """

    def __init__(self, model: nn.Module, contrast_norm: str = "identity") -> None:
        if contrast_norm not in CONTRAST_NORM:
            raise ValueError(f"contrast_norm must be one of {CONTRAST_NORM}, got {contrast_norm!r}")
        self.model = model
        self.contrast_norm = contrast_norm
        self._saved: _SavedState | None = None

    def __enter__(self) -> "GeneralDeconvnet":
        if self._saved is not None:
            raise RuntimeError("GeneralDeconvnet context entered twice")
        saved = self._saved = _SavedState()
        try:
            for module in self.model.modules():
                saved.training[module] = module.training
                module.training = False  # eval: dropout is the identity, BatchNorm a fixed affine map
            for param in self.model.parameters():
                saved.requires_grad[param] = param.requires_grad
                param.requires_grad_(False)  # only the input needs a gradient: much faster
            for module in self.model.modules():
                if isinstance(module, nn.ReLU):
                    saved.inplace[module] = module.inplace
                    module.inplace = False  # the hook needs the ReLU's input intact
                    saved.handles.append(module.register_forward_hook(_deconv_relu_hook, prepend=True))
                elif isinstance(module, nn.LocalResponseNorm) and self.contrast_norm == "identity":
                    saved.handles.append(module.register_forward_hook(_pass_signal_hook, prepend=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        saved, self._saved = self._saved, None
        for handle in saved.handles:
            handle.remove()
        for module, inplace in saved.inplace.items():
            module.inplace = inplace
        for param, flag in saved.requires_grad.items():
            param.requires_grad_(flag)
        for module, training in saved.training.items():
            module.training = training

    def project(
        self,
        images: Tensor,
        layer: nn.Module | str,
        units,
        signal: str = "activation",
        chunk_size: int | None = None,
    ) -> Tensor:
        """Project units of `layer` (a module of the model or its dotted path) to pixel space.

        images: [B, 3, H, W]; units: see `parse_units`. Returns [U, 3, H, W].
        Each unit gets its own row in the backward pass (the deconvnet's relu(signal) makes the
        projection non-linear in the signal, so units cannot share a row); the forward is run
        on images[batch_index] for each chunk of `chunk_size` units (None: see CHUNK_PIXELS) and stops
        at `layer`.
        """
        parsed = parse_units(units, images.shape[0])
        layer = resolve_layer(self.model, layer)
        if self._saved is None:
            with self:
                return self._project(images, layer, parsed, signal, chunk_size)
        return self._project(images, layer, parsed, signal, chunk_size)

    def _project(self, images: Tensor, layer: nn.Module, parsed: Units, signal: str, chunk_size: int | None) -> Tensor:
        out = images.new_zeros(len(parsed), *images.shape[1:])
        with torch.enable_grad():
            for start, stop in _chunks(len(parsed), chunk_size, "general", images):
                chunk = parsed.rows(start, stop)
                x = images[to_device(chunk.batch, images.device)].detach().requires_grad_(True)
                acts = forward_to(self.model, layer, x)
                seed = layer_signal(acts.detach(), chunk, signal)
                (out[start:stop],) = torch.autograd.grad(acts, x, grad_outputs=seed)
        return out


# ---------------------------------------------------------------------- explicit deconvnet (Sec. 2.1)

# Leaf module kinds the explicit deconvnet knows how to run forward and project back down.
_KINDS: tuple[tuple[type, str], ...] = (
    (nn.Conv2d, "conv"),
    (nn.Linear, "linear"),
    (nn.ReLU, "relu"),
    (nn.MaxPool2d, "maxpool"),
    (nn.LocalResponseNorm, "contrast_norm"),
    (nn.Dropout, "identity"),
    (nn.Identity, "identity"),
    (nn.AdaptiveAvgPool2d, "avgpool"),
    (nn.AvgPool2d, "avgpool"),
    (nn.Flatten, "flatten"),
)


# model -> (its modules when traced, its ops); the strong references keep module ids from being reused.
_TRACES: "weakref.WeakKeyDictionary[nn.Module, tuple[list[nn.Module], list[_Op]]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class _Op:
    """One step of a plain stack: a leaf module (None for an implicit flatten) and what it does."""

    kind: str
    module: nn.Module | None


def _kind(module: nn.Module) -> str:
    for cls, kind in _KINDS:
        if type(module) is cls:
            return kind
    raise ValueError(
        f"the explicit deconvnet cannot project through {type(module).__name__}; "
        "it handles plain conv/ReLU/max-pool/LRN/linear stacks (use method='general')"
    )


def _conv_forward(conv: nn.Conv2d, x: Tensor) -> Tensor:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) and conv.padding != "valid":
        raise ValueError("the explicit deconvnet handles zero-padded convolutions with numeric padding only")
    padding = 0 if conv.padding == "valid" else conv.padding
    if x.device.type == "cpu" and conv.in_channels <= _FEW_CHANNELS and conv.groups == 1:
        # oneDNN runs a convolution of a few input channels (the colour layer) about 1.5x faster
        # on channels-last input, with bit-identical output (tested against the model's own
        # forward). The output stays channels-last: the ReLU, LRN and max-pool after it give the
        # same values in either layout, and every other step takes its input contiguous.
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = x.contiguous()
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)


_FEW_CHANNELS = 4  # input channels up to which _conv_forward runs channels-last on a CPU


def _forward_op(op: _Op, x: Tensor, inplace: bool = False) -> tuple[Tensor, Tensor | None]:
    """Run one op; returns (output, switches) where switches are the max-pool indices or None.

    inplace: x may be overwritten (an intermediate of the forward pass)."""
    m = op.module
    if op.kind == "conv":
        return _conv_forward(m, x), None
    if op.kind == "linear":
        return F.linear(x.contiguous(), m.weight, m.bias), None
    if op.kind == "relu":
        return (x.relu_() if inplace else F.relu(x)), None
    if op.kind == "maxpool":
        # Channels-last max-pooling runs several times faster on a CPU and picks the same switches
        # (the first maximum of each window, as autograd's and Captum's pooling in NCHW).
        out, switches = F.max_pool2d(
            x.contiguous(memory_format=torch.channels_last), m.kernel_size, m.stride, m.padding, m.dilation,
            m.ceil_mode, return_indices=True,
        )
        return out.contiguous(), switches.contiguous()
    if op.kind == "contrast_norm":
        return local_response_norm(x, m.size, m.alpha, m.beta, m.k), None
    if op.kind == "avgpool":
        return m(x.contiguous()), None
    if op.kind == "flatten":
        return x.contiguous().flatten(1), None
    return x, None  # dropout (eval), identity


def local_response_norm(x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    """F.local_response_norm, bit for bit, several times faster on a CPU for [N, C, H, W] maps.

    torch sums the squares of each channel window with avg_pool3d over a [N, 1, C, H, W] view,
    one slow pass; here the window is `size` shifted slices of the zero-padded squares added in
    the same order (then divided by `size`, as avg_pool3d does), so every value and hence every
    max-pool switch downstream is the same as in the model's own forward (tested). Other ranks
    go to torch's function."""
    if x.dim() != 4:
        return F.local_response_norm(x, size, alpha, beta, k)
    x = x.contiguous()  # torch's vectorised and strided pow round differently; NCHW is what it runs
    channels = x.shape[1]
    squares = F.pad(x * x, (0, 0, 0, 0, size // 2, (size - 1) // 2))
    total = squares[:, :channels]
    for shift in range(1, size):
        total = total + squares[:, shift : shift + channels]
    return x / (total / size).mul_(alpha).add_(k).pow_(beta)


def _unpool(signal: Tensor, switches: Tensor, in_hw: Sequence[int]) -> Tensor:
    """Sec. 2.1 unpooling: put each value back where its switch says the max came from.

    signal, switches: [U, C, h, w]; returns [U, C, H, W]. Values of overlapping windows that chose
    the same location are added (the transpose of the selection; see the module docstring).
    """
    num, channels = signal.shape[:2]
    out = signal.new_zeros(num, channels, in_hw[0] * in_hw[1])
    out.scatter_add_(2, switches.flatten(2), signal.flatten(2))
    return out.view(num, channels, *in_hw)


def _transposed_filter(signal: Tensor, conv: nn.Conv2d, in_hw: Sequence[int]) -> Tensor:
    """Sec. 2.1 filtering: the layer's own filters, transposed (no bias), back to an [U, C_in, H, W] map.

    output_padding restores rows/columns a strided conv dropped, so the shape is the recorded input's.
    The transposed convolution runs whichever way (`_TRANSPOSE_WAYS`) measured fastest for this
    layer and signal shape on the first call: all give the same numbers up to float rounding.
    """
    ways = _transpose_ways(conv, signal.device)
    key = (tuple(signal.shape[1:]), tuple(in_hw), signal.device, signal.dtype)
    chosen = _TRANSPOSE_CHOICE.setdefault(conv, {}).get(key)
    if chosen is None:
        chosen = _TRANSPOSE_CHOICE[conv][key] = _fastest(ways, signal, conv, in_hw)
    return _TRANSPOSE_WAYS[chosen](signal, conv, in_hw)


def _transpose_direct(signal: Tensor, conv: nn.Conv2d, in_hw: Sequence[int]) -> Tensor:
    stride, dilation = pair(conv.stride), pair(conv.dilation)
    padding = (0, 0) if conv.padding == "valid" else pair(conv.padding)
    kernel = conv.weight.shape[2:]
    out_pad = tuple(
        in_hw[i] - ((signal.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1)
        for i in range(2)
    )
    return F.conv_transpose2d(signal, conv.weight.detach(), None, stride, padding, out_pad, conv.groups, dilation)


def _transpose_channels_last(signal: Tensor, conv: nn.Conv2d, in_hw: Sequence[int]) -> Tensor:
    return _transpose_direct(signal.contiguous(memory_format=torch.channels_last), conv, in_hw).contiguous()


def _transpose_subpixel(signal: Tensor, conv: nn.Conv2d, in_hw: Sequence[int]) -> Tensor:
    """A strided transposed convolution as one stride-1 convolution with stride^2 x C_in output
    channels (one per output phase) and a pixel shuffle: much faster on a CPU where C_in is small
    (the first layer's 3 colour channels), as the plain transposed kernel vectorises over C_in.

    With stride s, kernel k (zero-padded to M*s taps, M = ceil(k/s)) and padding p, output row
    Y = s*q + r - p collects the signal at q - m with tap s*m + r (m = 0..M-1), i.e. a correlation
    of the signal padded by M-1 with the taps of phase r reversed.
    """
    (sy, sx), (ky, kx) = pair(conv.stride), conv.weight.shape[2:]
    padding = (0, 0) if conv.padding == "valid" else pair(conv.padding)
    c_out, c_in = conv.weight.shape[:2]
    my, mx = -(-ky // sy), -(-kx // sx)
    weight = F.pad(conv.weight.detach(), (0, mx * sx - kx, 0, my * sy - ky))
    # kernel[(ci, ry, rx), co, jy, jx] = weight[co, ci, sy*(my-1-jy) + ry, sx*(mx-1-jx) + rx]
    kernel = weight.view(c_out, c_in, my, sy, mx, sx).flip(2, 4).permute(1, 3, 5, 0, 2, 4)
    kernel = kernel.reshape(c_in * sy * sx, c_out, my, mx)
    phases = F.conv2d(signal, kernel, None, 1, (my - 1, mx - 1))
    if sy == sx:
        out = F.pixel_shuffle(phases, sy)
    else:
        n, _, h, w = phases.shape
        out = phases.view(n, c_in, sy, sx, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c_in, h * sy, w * sx)
    out = out[:, :, padding[0] : padding[0] + in_hw[0], padding[1] : padding[1] + in_hw[1]]
    if tuple(out.shape[2:]) != tuple(in_hw):
        # Input rows/columns the convolution never read (dropped by its stride) get no signal.
        out = F.pad(out, (0, in_hw[1] - out.shape[3], 0, in_hw[0] - out.shape[2]))
    return out


def _transpose_subpixel_channels_last(signal: Tensor, conv: nn.Conv2d, in_hw: Sequence[int]) -> Tensor:
    return _transpose_subpixel(signal.contiguous(memory_format=torch.channels_last), conv, in_hw)


def _transpose_sparse(signal: Tensor, conv: nn.Conv2d, in_hw: Sequence[int]) -> Tensor:
    """The transposed convolution of a mostly-zero signal, touching only its non-zero values.

    Below a max-pool the signal is unpooled (one value per pooling window, a quarter of the map
    or less) and rectified: measured 7-9% non-zero below zfnet's pool2 and pool1. Each non-zero
    value v of channel c at (y, x) adds v * filter c (all its output channels and taps) to the
    output around (s*y, s*x): per position, a weighted sum of filter rows -- an embedding bag
    over the position's non-zero channels -- then the taps are added into the output by their
    offsets (a col2im, phase by phase of the stride, channels-last). zfnet's conv2 on 64 rows:
    12-15 ms against 20-22 ms for the dense ways; its conv1 (3 output channels, so the col2im
    moves more than the dense convolution computes) stays dense: the tuner picks per layer.
    """
    units, channels, height, width = signal.shape
    c_out, (ky, kx) = conv.weight.shape[1], conv.weight.shape[2:]
    (sy, sx) = pair(conv.stride)
    (py, px) = (0, 0) if conv.padding == "valid" else pair(conv.padding)
    flat = signal.permute(0, 2, 3, 1).reshape(-1, channels)  # [positions, C]: row-major, so bags are in order
    rows, chans = flat.nonzero().unbind(1)
    counts = torch.bincount(rows, minlength=flat.shape[0])
    # table[c] = filter c, taps-major: [C, ky * kx * C_out]
    table = conv.weight.detach().permute(0, 2, 3, 1).reshape(channels, ky * kx * c_out)
    cols = F.embedding_bag(chans, table, counts.cumsum(0).sub_(counts), mode="sum", per_sample_weights=flat[rows, chans])
    cols = cols.view(units, height, width, ky, kx, c_out)
    # Output row s*y + t - p is row y + t // s of phase t % s: the grid [U, rows, phase, columns,
    # phase, C_out] is the channels-last output, written without a transposing copy.
    qh = max(-(-((height - 1) * sy + ky) // sy), -(-(py + in_hw[0]) // sy))
    qw = max(-(-((width - 1) * sx + kx) // sx), -(-(px + in_hw[1]) // sx))
    grid = signal.new_zeros(units, qh, sy, qw, sx, c_out)
    for ty in range(ky):
        for tx in range(kx):
            oy, ox = ty // sy, tx // sx
            grid[:, oy : oy + height, ty % sy, ox : ox + width, tx % sx] += cols[:, :, :, ty, tx]
    out = grid.view(units, qh * sy, qw * sx, c_out).permute(0, 3, 1, 2)
    return out[:, :, py : py + in_hw[0], px : px + in_hw[1]]


_TRANSPOSE_WAYS: dict[str, Callable[[Tensor, nn.Conv2d, Sequence[int]], Tensor]] = {
    "direct": _transpose_direct,
    "channels_last": _transpose_channels_last,
    "subpixel": _transpose_subpixel,
    "subpixel_channels_last": _transpose_subpixel_channels_last,
    "sparse": _transpose_sparse,
}
# conv module -> {(signal shape, input size, device, dtype): the way measured fastest}
_TRANSPOSE_CHOICE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_TUNE_ROWS = 32  # rows of the first signal the ways are timed on


def _transpose_ways(conv: nn.Conv2d, device: torch.device) -> list[str]:
    ways = ["direct", "channels_last"]
    plain = conv.groups == 1 and pair(conv.dilation) == (1, 1)
    if plain and pair(conv.stride) != (1, 1):
        ways += ["subpixel", "subpixel_channels_last"]
    if plain and device.type == "cpu":  # on a GPU the dense kernels win and nonzero() would wait for it
        ways.append("sparse")
    return ways


def _fastest(ways: list[str], signal: Tensor, conv: nn.Conv2d, in_hw: Sequence[int]) -> str:
    """The way with the shortest run on the first rows of `signal` (best of two runs each)."""
    if len(ways) == 1:
        return ways[0]
    runs = {way: functools.partial(_TRANSPOSE_WAYS[way], conv=conv, in_hw=in_hw) for way in ways}
    return fastest_way(runs, signal[:_TUNE_ROWS])[0]


def _linear_adjoint(signal: Tensor, fn: Callable[[Tensor], Tensor], in_shape: Sequence[int]) -> Tensor:
    """The transpose of a linear, parameter-free map `fn` (average pooling), by autograd."""
    with torch.enable_grad():
        probe = signal.new_zeros(signal.shape[0], *in_shape).requires_grad_(True)
        (out,) = torch.autograd.grad(fn(probe), probe, grad_outputs=signal)
    return out


# Op kinds whose backward step returns a new tensor (the others pass the signal or a view of it on).
_NEW_SIGNAL = frozenset({"relu", "maxpool", "conv", "linear", "avgpool"})


def _backward_op(op: _Op, signal: Tensor, in_shape: Sequence[int], switches: Tensor | None, inplace: bool = False) -> Tensor:
    """Project `signal` (the op's output side, [U, ...]) to the op's input side [U, *in_shape].

    inplace: the signal may be overwritten (it is an intermediate of the projection)."""
    if op.kind == "relu":
        return signal.relu_() if inplace else F.relu(signal)  # Sec. 2.1 rectification of the reconstruction
    if op.kind == "maxpool":
        return _unpool(signal, switches, in_shape[1:])
    if op.kind == "conv":
        return _transposed_filter(signal, op.module, in_shape[1:])
    if op.kind == "linear":
        return signal @ op.module.weight.detach()  # fully connected layer, transposed
    if op.kind == "avgpool":
        return _linear_adjoint(signal, op.module, in_shape)
    if op.kind == "flatten":
        return signal.reshape(signal.shape[0], *in_shape)
    return signal  # contrast norm passed unchanged; dropout/identity


@dataclass
class _ForwardRecord:
    """A forward pass to layer L: per op the input shape (no batch dim) and max-pool switches."""

    acts: Tensor
    in_shapes: list[tuple[int, ...]]
    switches: list[Tensor | None]


class ExplicitDeconvnet:
    """The literal Sec. 2.1 deconvnet for plain stacks (lenet, alexnet, zfnet).

    The module order is learnt once by tracing a forward pass (forward hooks on leaf modules, an
    implicit flatten wherever the input of a module is the flattened output of the previous one)
    and checked: replaying the ops must reproduce the model's output, else the model is not a plain
    stack and a ValueError says so. The model itself is left untouched (parameters are only read).

    layers: a ModelSpec, a registry model name, or a mapping of analysis-layer name -> module or
    module path; used to resolve layer names (module objects and dotted paths always work).
    """

    def __init__(self, model: nn.Module, layers=None) -> None:
        self.model = model
        self.spec = None
        self.layers: dict[str, nn.Module] = {}
        if isinstance(layers, Mapping):
            self.layers = {name: resolve_layer(model, m) for name, m in layers.items()}
        elif layers is not None:
            self.spec = layers
        self.ops: list[_Op] | None = None

    # ---- tracing

    def trace(self, image: Tensor) -> list[_Op]:
        """Learn and verify the op sequence from one image [1, 3, H, W].

        Cached per model for as long as it holds the very same module objects (so `project` does
        not retrace on every call); weights are read live, so training in between is fine.
        """
        if self.ops is not None:
            return self.ops
        modules = list(self.model.modules())[1:]  # not the model itself: the cache holds these strongly
        cached = _TRACES.get(self.model)
        if cached is not None and len(cached[0]) == len(modules) and all(a is b for a, b in zip(cached[0], modules)):
            self.ops = cached[1]
            return self.ops
        calls: list[tuple[nn.Module, tuple, tuple]] = []

        def record(module, args, output):
            calls.append((module, tuple(args[0].shape), tuple(output.shape)))

        leaves = [m for m in self.model.modules() if not list(m.children())]
        handles = [m.register_forward_hook(record) for m in leaves]
        training = {m: m.training for m in self.model.modules()}
        try:
            self.model.eval()
            with torch.no_grad():
                reference = self.model(image)
        finally:
            for handle in handles:
                handle.remove()
            for module, flag in training.items():
                module.training = flag
        ops: list[_Op] = []
        previous = tuple(image.shape)
        for module, in_shape, out_shape in calls:
            if in_shape != previous:
                if in_shape != (previous[0], _numel(previous[1:])):
                    raise ValueError(f"not a plain stack: {type(module).__name__} gets {in_shape} after {previous}")
                ops.append(_Op("flatten", None))
            ops.append(_Op(_kind(module), module))
            previous = out_shape
        self._check_replay(ops, image, reference)
        self.ops = ops
        if modules:  # a bare leaf model would appear in its own ops, keeping its cache entry alive
            _TRACES[self.model] = (modules, ops)
        return ops

    @staticmethod
    def _check_replay(ops: list[_Op], image: Tensor, reference: Tensor) -> None:
        with torch.no_grad():
            x = image
            for op in ops:
                x, _ = _forward_op(op, x)
        scale = reference.abs().max().clamp_min(1e-12)
        if x.shape != reference.shape or not torch.allclose(x, reference, rtol=1e-4, atol=1e-5 * float(scale)):
            raise ValueError(
                "not a plain stack: replaying its modules in call order does not reproduce its output "
                "(use method='general')"
            )

    def _layer_index(self, layer: nn.Module) -> int:
        inside = set(layer.modules())
        hits = [i for i, op in enumerate(self.ops) if op.module in inside]
        if not hits:
            raise ValueError("the layer module is not part of the traced forward pass")
        if sum(self.ops[i].module is self.ops[hits[-1]].module for i in hits) > 1:
            raise ValueError("the layer's last module is called more than once; its output is ambiguous")
        return hits[-1]

    def resolve(self, layer: str | nn.Module) -> nn.Module:
        if isinstance(layer, str) and layer in self.layers:
            return self.layers[layer]
        return resolve_layer(self.model, layer, self.spec)

    # ---- forward and projection

    def forward(self, images: Tensor, layer: str | nn.Module, upto: int | None = None) -> _ForwardRecord:
        """Forward images [B, 3, H, W] up to `layer`, recording input shapes and switches (Sec. 2.1).

        upto: stop after this op index instead (below the layer); `acts` is then that op's output.
        """
        self.trace(images[:1])
        stop = self._layer_index(self.resolve(layer)) if upto is None else upto
        in_shapes, switches = [], []
        x = images
        owned = False  # the caller's images are never overwritten; intermediates may be
        with torch.no_grad():
            for op in self.ops[: stop + 1]:
                in_shapes.append(tuple(x.shape[1:]))
                x, idx = _forward_op(op, x, inplace=owned)
                switches.append(idx)
                owned = owned or op.kind in _NEW_SIGNAL or op.kind == "contrast_norm"
        return _ForwardRecord(x.contiguous(), in_shapes, switches)

    def backward(self, record: _ForwardRecord, signal: Tensor, rows: Tensor, top: int | None = None) -> Tensor:
        """Project `signal` [U, *layer shape] down to pixels [U, 3, H, W].

        rows [U]: which forward image each signal row belongs to (selects its switches).
        top: start below this op index (the signal is then that op's input side) instead of at the
        layer.
        """
        start = len(record.in_shapes) - 1 if top is None else top - 1
        owned = False  # the caller's signal is never overwritten; intermediates may be
        with torch.no_grad():
            for index in reversed(range(start + 1)):
                switches = record.switches[index]
                if switches is not None:
                    switches = switches[rows]
                op = self.ops[index]
                signal = _backward_op(op, signal, record.in_shapes[index], switches, inplace=owned)
                owned = owned or op.kind in _NEW_SIGNAL
        return signal

    def project(
        self,
        images: Tensor,
        layer: str | nn.Module,
        units,
        signal: str = "activation",
        chunk_size: int | None = None,
    ) -> Tensor:
        """Project units of `layer` to pixel space: images [B, 3, H, W] -> [U, 3, H, W].

        Each distinct image referenced by the units is run forward once; the projections of all
        units are computed in chunks of `chunk_size` rows, each row using its image's switches.

        Single units (a position, or a neuron of an fc layer) share the top of their projection:
        above the highest max-pool below the layer, every step (transposed filters, rectification,
        pass-through normalisation) is the same for every image, and each step is positively
        homogeneous, so a unit's signal there is |activation| x that of a +-1 at the unit, computed
        once per distinct (channel, position, sign); only the steps from that max-pool down, which
        need each image's switches, run per (unit, image). Whole feature maps (a different signal
        per image) take the full way down per row.
        """
        if signal not in SIGNALS:
            raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")
        parsed = parse_units(units, images.shape[0])
        if len(parsed) == 0:
            return images.new_zeros(0, *images.shape[1:])
        used, rows = torch.unique(parsed.batch, return_inverse=True)
        rows = to_device(rows, images.device)
        self.trace(images[:1])
        stop = self._layer_index(self.resolve(layer))
        pools = [i for i, op in enumerate(self.ops[: stop + 1]) if op.kind == "maxpool"]
        split = pools[-1] if pools else -1  # steps above it are shared; at and below, per image
        out = images.new_zeros(len(parsed), *images.shape[1:])
        if signal == "one" and parsed.pos is not None:
            # No activation value is needed: the forward stops at the split (the layer's shape
            # and the ops' input shapes come from one image).
            record = self.forward(images[to_device(used, images.device)], layer, upto=split) if split >= 0 else None
            probe = self.forward(images[:1], layer)
        else:
            record = probe = self.forward(images[to_device(used, images.device)], layer)
        if parsed.pos is None and probe.acts.ndim == 4:  # whole maps: one signal per image
            for start, end in _chunks(len(parsed), chunk_size, "explicit", images):
                chunk_rows = rows[start:end]
                seed = layer_signal(record.acts[chunk_rows], parsed.rows(start, end), signal)
                out[start:end] = self.backward(record, seed, chunk_rows)
            return out
        where = _unit_index(probe.acts.shape, parsed, images.device)
        # With signal "one" the values (all 1) stay on the host, where their signs are read.
        values = record.acts[(rows,) + where] if signal == "activation" else torch.ones(len(parsed))
        windows = deconv_window.levels(self.ops, stop, images.shape[-2:]) if parsed.pos is not None else None
        if windows is not None:
            return self._project_windows(record, probe, parsed, values, rows, windows, stop, split, chunk_size, images)
        top = self._shared_top(parsed, values, probe.acts.shape, probe.in_shapes, stop, split, chunk_size, images)
        scale = to_device(values.abs(), images.device)
        for start, end in _chunks(len(parsed), chunk_size, "explicit", images):
            seed = top.signals[top.index[start:end]] * scale[start:end].view(-1, *[1] * (top.signals.ndim - 1))
            if split < 0:
                out[start:end] = seed  # no max-pool below the layer: the whole projection is shared
            else:
                out[start:end] = self.backward(record, seed, rows[start:end], top=split + 1)
        return out

    def _project_windows(self, record, probe, parsed: Units, values: Tensor, rows: Tensor, windows, stop: int, split: int, chunk_size, images) -> Tensor:
        """`project` for single conv units whose receptive field is a small part of the image: the
        same shared top and per-image steps, run on each unit's window (convviz.deconv_window)."""
        pos = to_device(parsed.pos, images.device)
        distinct, index = _distinct_keys(parsed, values, images.device)
        seed = images.new_zeros(len(distinct), probe.acts.shape[1], 1, 1)
        seed[torch.arange(len(distinct), device=seed.device), distinct[:, 0], 0, 0] = distinct[:, 1].to(seed.dtype)
        with torch.no_grad():
            tops = deconv_window.backward(self.ops, windows, seed, distinct[:, 2:], stop, split + 1, probe.in_shapes)
        scale = to_device(values.abs(), images.device)
        out = images.new_zeros(len(parsed), *images.shape[1:])
        for start, end in _chunks(len(parsed), chunk_size, "explicit", images):
            signal = tops[index[start:end]] * scale[start:end].view(-1, 1, 1, 1)
            if split >= 0:  # else no max-pool below the layer: the whole projection is shared
                with torch.no_grad():
                    signal = deconv_window.backward(
                        self.ops, windows, signal, pos[start:end], split, 0, record.in_shapes, record.switches, rows[start:end]
                    )
            deconv_window.paste(signal, windows[0].origin(pos[start:end]), out[start:end])
        return out

    def _shared_top(self, parsed: Units, values: Tensor, layer_shape, shapes, stop: int, split: int, chunk_size, images):
        """The projection of a +-1 at each distinct (channel, position, sign) from the layer down to
        the output of op `split` (to pixels when split is -1), and which of them each unit uses.

        shapes: each op's input shape (no batch dim) from a forward pass to the layer."""
        distinct, index = _distinct_keys(parsed, values, images.device)
        tops = []
        for start, end in _chunks(len(distinct), chunk_size, "explicit", images):
            key = distinct[start:end]
            seed = images.new_zeros(len(key), *layer_shape[1:])
            where = (torch.arange(len(key), device=key.device), key[:, 0]) + ((key[:, 2], key[:, 3]) if key.shape[1] == 4 else ())
            seed[where] = key[:, 1].to(seed.dtype)
            with torch.no_grad():
                for op_index in reversed(range(split + 1, stop + 1)):
                    seed = _backward_op(self.ops[op_index], seed, shapes[op_index], None, inplace=True)
            tops.append(seed)
        return _SharedTop(torch.cat(tops), index)


def _distinct_keys(parsed: Units, values: Tensor, device) -> tuple[Tensor, Tensor]:
    """The distinct (channel, sign[, y, x]) rows of single units whose projection tops are shared,
    and which of them each unit has: (distinct [K, 2|4], index [U]), on `device`. Found on the
    host, where the units are: on a GPU `unique` waits for the device several times. Values on a
    GPU are read once, for their signs; with signal "one" the caller keeps them on the host."""
    keys = [parsed.channel.cpu(), torch.sign(values).long().cpu()]
    if parsed.pos is not None:
        keys += [parsed.pos[:, 0].cpu(), parsed.pos[:, 1].cpu()]
    distinct, index = torch.unique(torch.stack(keys, 1), dim=0, return_inverse=True)
    return to_device(distinct, device), to_device(index, device)


@dataclass
class _SharedTop:
    signals: Tensor  # [K, *shape at the split]: one per distinct (channel, position, sign)
    index: Tensor  # [U]: which of them each unit uses


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


# ------------------------------------------------------------------------------------- entry point


def project(
    model: nn.Module,
    layer: str | nn.Module,
    images: Tensor,
    units,
    method: str = "general",
    spec=None,
    signal: str = "activation",
    contrast_norm: str = "identity",
    chunk_size: int | None = None,
) -> Tensor:
    """Deconvnet projections (Sec. 2.1) of many (image, unit) pairs at once.

    model: the network; layer: analysis-layer name (with spec: a ModelSpec or registry model name),
    dotted module path, or module -- its output is the layer's feature map. images: [B, 3, H, W].
    units: rows (batch_index, channel, y, x) for single activations or (batch_index, channel) for
    whole feature maps (fc layers: the neuron `channel`), as a list of tuples or LongTensor [U, 4|2].
    method: "explicit" (plain stacks; one forward per distinct image, switches reused), "graph"
    (the same on the torch.fx graph of a branching network such as ResNet-50; see
    convviz.deconv_graph) or "general" (autograd; any module-built network). signal: start from the activation value
    ("activation", the paper) or from 1 ("one", as Captum's NeuronDeconvolution).
    contrast_norm: LRN passes the signal unchanged ("identity") or by its gradient ("gradient",
    general method only). chunk_size: rows per backward pass (None: CHUNK_PIXELS worth).
    Returns [U, 3, H, W], detached; a zero activation projects to exact zeros.

    All methods give the same projections where they apply (tested to 1e-5); "explicit" and
    "graph" are the faster, as they run each distinct image forward once, where "general" reruns
    the forward for every unit (each unit needs its own autograd row).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in ("explicit", "graph") and contrast_norm != "identity":
        raise ValueError(f"the {method} deconvnet passes contrast normalisation unchanged (use 'identity')")
    if method == "explicit":
        deconv = ExplicitDeconvnet(model, spec)
        return deconv.project(images, deconv.resolve(layer), units, signal, chunk_size)
    if method == "graph":
        from convviz.deconv_graph import graph_deconvnet  # it builds on this module

        return graph_deconvnet(model).project(images, resolve_layer(model, layer, spec), units, signal, chunk_size)
    module = resolve_layer(model, layer, spec)
    with GeneralDeconvnet(model, contrast_norm) as deconv:
        return deconv.project(images, module, units, signal, chunk_size)
