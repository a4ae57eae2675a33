"""The Sec. 2.1 deconvnet run explicitly on a torch.fx graph: ResNets and other branching CNNs.

`GraphDeconvnet` does for any fx-traceable network of known layers what `ExplicitDeconvnet` does
for plain stacks, with the same rules as the autograd `GeneralDeconvnet` (and the same numbers up
to float rounding, tested): walking the traced graph from the layer down to the input, a
convolution passes the signal through its transposed filters (no bias), an `nn.ReLU` module
rectifies it, a max-pool unpools it with the image's switches, an eval-mode BatchNorm scales it
per channel, a residual sum hands it to both branches (and a node read by several others sums
what comes back from each), average pools go through their transpose, Linear through `x @ W`,
LocalResponseNorm, dropout and identities pass it on unchanged.

Why not autograd: autograd needs its own forward per projected unit (each unit is a row of the
backward pass), while the deconvnet's downward pass depends on the image only through the
max-pool switches. So each distinct image runs forward once (only up to the last max-pool when
the signal is 1), and above the max-pool that every path to the layer passes (ResNet's stem
pool) nothing depends on the image at all: single units share that part of their projection per
distinct (channel, position, sign), scaled by |activation| (every step up there is positively
homogeneous), and only the steps below it run per (unit, image).

Handles: placeholders, call_module Conv2d (zero padding), BatchNorm2d (running statistics), ReLU,
MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Linear, Flatten, Dropout, Identity, LocalResponseNorm;
`+` of two maps; torch.flatten and the flatten/view/reshape/size methods. Anything else (a
functional ReLU, whose true gradient the autograd method would use; a concatenation; ...) is a
ValueError naming it: use method "general" there.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from convviz import winograd
from convviz.deconv import (
    _TUNE_ROWS,
    SIGNALS,
    _chunks,
    _conv_forward,
    _distinct_keys,
    _linear_adjoint,
    _transpose_direct,
    _transposed_filter,
    _unit_index,
    _unpool,
    layer_signal,
    local_response_norm,
    parse_units,
    to_device,
)
from convviz.deconv_window import pair
from convviz.incremental import is_pointwise_conv, module_node
from convviz.machine import fastest_way

_ADDS = (operator.add, torch.add)
_RESHAPES = ("flatten", "view", "reshape")
_PASS_ON = (nn.Dropout, nn.Identity, nn.LocalResponseNorm)
_KNOWN_MODULES = (
    nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Linear, nn.Flatten, *_PASS_ON
)


def _contiguous(value):
    return value.contiguous() if isinstance(value, Tensor) else value


def _bias_free_copy(conv: nn.Conv2d) -> nn.Conv2d:
    """A Conv2d with `conv`'s geometry and no bias (weights to be set by the caller)."""
    copy = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
        bias=False, padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
    )
    return copy.requires_grad_(False)


def _transposed_as_conv(weight: Tensor) -> Tensor:
    """A stride-1 transposed convolution's filters [Cout, Cin, k, k] as those of the ordinary
    convolution computing it: in and out swapped, each filter flipped."""
    return weight.flip(2, 3).transpose(0, 1)


def _as_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """The ordinary k x k stride-1 convolution equal to `conv`'s transposed filters (no bias):
    padding k - 1 - p keeps the map size."""
    (ph, pw), (k, _) = pair(conv.padding), pair(conv.kernel_size)
    twin = nn.Conv2d(conv.out_channels, conv.in_channels, k, padding=(k - 1 - ph, k - 1 - pw), bias=False,
                     device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        twin.weight.copy_(_transposed_as_conv(conv.weight.detach()))
    return twin.requires_grad_(False)


def _pointwise_transposed(signal: Tensor, conv: nn.Conv2d, in_hw) -> Tensor:
    """A 1x1 convolution's transposed filters as one matrix product [U*h*w, Cout] x [Cout, Cin];
    with stride s the products land on every s-th input position, the others get no signal."""
    num, cout, height, width = signal.shape
    rows = signal.permute(0, 2, 3, 1).reshape(-1, cout)
    product = (rows @ conv.weight.detach().view(cout, -1)).view(num, height, width, -1).permute(0, 3, 1, 2)
    (sy, sx) = pair(conv.stride)
    if (sy, sx) == (1, 1) and (height, width) == tuple(in_hw):
        return product
    out = signal.new_zeros(num, product.shape[1], *in_hw).contiguous(memory_format=torch.channels_last)
    out[:, :, : height * sy : sy, : width * sx : sx] = product
    return out


@dataclass
class _Record:
    """A forward pass to some node: each node's output shape (no batch dim), the max-pool switches,
    and the value at the node the pass stopped at."""

    shapes: dict[fx.Node, tuple[int, ...]]
    switches: dict[fx.Node, Tensor]
    value: Tensor


class GraphDeconvnet:
    """Explicit deconvnet on the model's torch.fx graph (see the module docstring).

        deconv = GraphDeconvnet(model)
        pixels = deconv.project(images, "layer3", units)  # [U, 3, H, W]

    The model is traced once and left untouched (weights are read live; no hooks, no flags).
    """

    def __init__(self, model: nn.Module) -> None:
        # Its submodules by object, not the model itself (the cache below is keyed by the model).
        self._paths = _submodules(model)
        try:
            self.gm = fx.symbolic_trace(model)
        except Exception as err:  # noqa: BLE001 - tracing fails in many ways
            raise ValueError(
                f"the graph deconvnet needs a torch.fx-traceable model: {type(err).__name__}: {err} (use method='general')"
            ) from None
        self.nodes = list(self.gm.graph.nodes)
        self.order = {node: index for index, node in enumerate(self.nodes)}
        self.modules = dict(self.gm.named_modules())
        for node in self.nodes:
            self._check(node)
        inputs = [node for node in self.nodes if node.op == "placeholder"]
        if len(inputs) != 1:
            raise ValueError(f"the graph deconvnet needs a model with one input, this one has {len(inputs)}")
        self.input = inputs[0]
        # BatchNorm node -> the convolution node that alone feeds it (folded going down).
        self._folds = {
            node: node.args[0]
            for node in self.nodes
            if node.op == "call_module"
            and isinstance(self.modules[node.target], nn.BatchNorm2d)
            and isinstance(node.args[0], fx.Node)
            and node.args[0].op == "call_module"
            and type(self.modules[node.args[0].target]) is nn.Conv2d
            and len(node.args[0].users) == 1
        }
        self._folded: dict[fx.Node, nn.Conv2d] = {}
        self._winograd: dict[fx.Node, winograd.WinogradConv] = {}
        self._ways: dict[tuple, str] = {}  # (node, signal shape, device, dtype) -> the way measured fastest
        self.force_way: str | None = None
        self._splits: dict[fx.Node, fx.Node | None] = {}

    def _check(self, node: fx.Node) -> None:
        if node.op in ("placeholder", "output", "get_attr"):
            return
        if node.op == "call_module":
            module = self.modules[node.target]
            if type(module) not in _KNOWN_MODULES:
                raise ValueError(
                    f"the graph deconvnet cannot project through {node.target} ({type(module).__name__}) (use method='general')"
                )
            if isinstance(module, nn.BatchNorm2d) and module.running_var is None:
                raise ValueError(f"{node.target}: BatchNorm without running statistics is not a fixed map in eval mode (use method='general')")
            return
        if node.op == "call_function" and node.target in _ADDS and len(node.args) == 2 and not node.kwargs:
            return
        if node.op == "call_function" and node.target is torch.flatten:
            return
        if node.op == "call_method" and node.target in (*_RESHAPES, "size"):
            return
        raise ValueError(f"the graph deconvnet cannot project through {node.op} {node.target} ({node.name}) (use method='general')")

    def node_for(self, layer: nn.Module) -> fx.Node:
        """The graph node whose output is `layer`'s (a module of the model)."""
        for module, path in self._paths:
            if module is layer:
                return module_node(self.gm, path)
        raise ValueError("the layer module is not part of the model")

    # ---- forward

    def forward(self, images: Tensor, stop: fx.Node) -> _Record:
        """Run the graph on images [B, 3, H, W] until node `stop`, recording shapes and switches."""
        values: dict[fx.Node, object] = {self.input: images}
        shapes = {self.input: tuple(images.shape[1:])}
        switches: dict[fx.Node, Tensor] = {}
        last_use = {}
        for node in self.nodes[: self.order[stop] + 1]:
            for arg in node.all_input_nodes:
                last_use[arg] = node
        with torch.no_grad():
            for node in self.nodes[1 : self.order[stop] + 1]:
                if node.op == "placeholder":
                    continue
                out = self._forward_node(node, values, switches)
                values[node] = out
                if isinstance(out, Tensor):
                    shapes[node] = tuple(out.shape[1:])
                for arg in node.all_input_nodes:
                    if last_use.get(arg) is node and arg is not stop:
                        values.pop(arg, None)
        return _Record(shapes, switches, _contiguous(values[stop]))

    def _forward_node(self, node: fx.Node, values: dict, switches: dict) -> object:
        args = fx.node.map_arg(node.args, lambda n: values[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
        if node.op == "call_module":
            m, x = self.modules[node.target], args[0]
            if isinstance(m, nn.Conv2d):
                return _conv_forward(m, x)
            if isinstance(m, nn.BatchNorm2d):  # eval mode: running statistics, whatever m.training says
                return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
            if isinstance(m, nn.ReLU):
                return F.relu(x)
            if isinstance(m, nn.MaxPool2d):
                # Channels-last pooling: several times faster on a CPU, the same switches.
                out, index = F.max_pool2d(
                    x.contiguous(memory_format=torch.channels_last), m.kernel_size, m.stride, m.padding, m.dilation,
                    m.ceil_mode, return_indices=True,
                )
                switches[node] = index.contiguous()
                return out.contiguous()
            if isinstance(m, nn.LocalResponseNorm):
                return local_response_norm(x, m.size, m.alpha, m.beta, m.k)
            if isinstance(m, (nn.Dropout, nn.Identity)):
                return x
            return m(_contiguous(x))  # pools, Linear, Flatten
        # A channels-last map (from _conv_forward) is made contiguous for any other step, whose
        # rounding could depend on the layout; the steps above give the same values in either.
        args, kwargs = fx.node.map_aggregate((args, kwargs), _contiguous)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)  # call_method

    # ---- backward

    def refresh(self) -> None:
        """Fold each BatchNorm into the transposed filters of the convolution before it, from the
        live weights (called at each projection, so training in between is fine): going down, a
        BatchNorm scales the signal per channel right before that convolution's transposed
        filters, one pass over the maps less."""
        for bn_node, conv_node in self._folds.items():
            bn, conv = self.modules[bn_node.target], self.modules[conv_node.target]
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.detach()
            folded = self._folded.get(bn_node)
            if folded is None or (folded.weight.device, folded.weight.dtype) != (conv.weight.device, conv.weight.dtype):
                folded = self._folded[bn_node] = _bias_free_copy(conv)
            with torch.no_grad():
                folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        for key, fast in list(self._winograd.items()):
            weight = self._conv_of(key).weight.detach()
            if (fast.u.device, fast.u.dtype) != (weight.device, weight.dtype):  # the model moved
                self._winograd[key] = winograd.WinogradConv(_as_conv(self._conv_of(key)))
            else:
                fast.set_weight(_transposed_as_conv(weight))

    def _conv_of(self, node: fx.Node) -> nn.Conv2d:
        """The convolution whose transposed filters node's adjoint applies (folded for a BatchNorm)."""
        return self._folded[node] if node in self._folds else self.modules[node.target]

    def _transpose(self, node: fx.Node, grad: Tensor, in_hw) -> Tensor:
        """The transposed filters of node's convolution on `grad`, the fastest of the deconvnet's
        ways and, for stride-1 convolutions, Winograd's minimal filtering (measured per shape)."""
        conv = self._conv_of(node)
        ways = {
            "deconv": lambda g: _transposed_filter(g, conv, in_hw),
            # channels-last in and out: the other ways' layout, no conversion back and forth
            "channels_last": lambda g: _transpose_direct(g.contiguous(memory_format=torch.channels_last), conv, in_hw),
        }
        if winograd.applies(conv) and max(pair(conv.padding)) <= pair(conv.kernel_size)[0] - 1:
            fast = self._winograd.get(node)
            if fast is None:
                fast = self._winograd[node] = winograd.WinogradConv(_as_conv(conv))
            ways["winograd"] = fast
        if is_pointwise_conv(conv):
            ways["matmul"] = lambda g: _pointwise_transposed(g, conv, in_hw)
        if self.force_way in ways:  # tests: one way everywhere it applies
            return ways[self.force_way](grad)
        key = (node, tuple(grad.shape[1:]), grad.device, grad.dtype)
        chosen = self._ways.get(key)
        if chosen is None:
            chosen = self._ways[key] = fastest_way(ways, grad[:_TUNE_ROWS])[0]
        return ways[chosen](grad)

    def backward(self, top: fx.Node, signal: Tensor, record: _Record, rows: Tensor | None, until: fx.Node | None = None) -> Tensor:
        """Project `signal` [U, *shape of top's output] down to the input (or to the output of node
        `until`, which every path from `top` to the input must pass). rows [U]: which recorded
        image each row belongs to (selects its switches; needed below a max-pool only)."""
        until = until or self.input
        # node -> (the signal at its output, whether that tensor is ours to overwrite: not the
        # caller's, not handed to two branches)
        pending: dict[fx.Node, tuple[Tensor, bool]] = {top: (signal, False)}
        skip = set()
        with torch.no_grad():
            for node in reversed(self.nodes[self.order[until] : self.order[top] + 1]):
                if node not in pending or node in skip:
                    continue
                if node is until:
                    return pending[node][0]
                grad, owned = pending.pop(node)
                if node in self._folds:  # BatchNorm and its convolution in one step
                    conv_node = self._folds[node]
                    skip.add(conv_node)
                    source = conv_node.args[0]
                    parts = [(source, self._transpose(node, grad, record.shapes[source][1:]), True)]
                else:
                    parts = self._adjoint(node, grad, owned, record, rows)
                for arg, part, fresh in parts:
                    if arg not in pending:
                        pending[arg] = (part, fresh)
                    elif pending[arg][1]:
                        pending[arg][0].add_(part)
                    else:
                        pending[arg] = (pending[arg][0] + part, True)
        raise ValueError(f"node {until.name} is not below {top.name}: nothing reached it")

    def _adjoint(self, node: fx.Node, grad: Tensor, owned: bool, record: _Record, rows: Tensor | None):
        """[(input node, the signal it gets from `node`, whether that tensor is new)] for one node
        of the downward pass; owned: `grad` may be overwritten."""
        source = node.args[0] if node.args else None
        if node.op == "call_function" and node.target in _ADDS:
            return [(arg, grad, False) for arg in node.args if isinstance(arg, fx.Node) and arg in record.shapes]
        in_shape = record.shapes[source]
        if node.op in ("call_function", "call_method"):  # flatten / view / reshape
            return [(source, grad.reshape(grad.shape[0], *in_shape), owned)]
        m = self.modules[node.target]
        if isinstance(m, nn.Conv2d):
            return [(source, self._transpose(node, grad, in_shape[1:]), True)]
        if isinstance(m, nn.BatchNorm2d):  # one not folded (its input is not a convolution's alone)
            scale = torch.rsqrt(m.running_var + m.eps)
            if m.weight is not None:
                scale = scale * m.weight.detach()
            scale = scale.view(1, -1, 1, 1)
            return [(source, grad.mul_(scale) if owned else grad * scale, True)]
        if isinstance(m, nn.ReLU):  # Sec. 2.1 rectification of the reconstruction
            return [(source, grad.relu_() if owned else F.relu(grad), True)]
        if isinstance(m, nn.MaxPool2d):
            return [(source, _unpool(grad, record.switches[node][rows], in_shape[1:]), True)]
        if isinstance(m, nn.Linear):
            return [(source, grad @ m.weight.detach(), True)]
        if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            return [(source, _linear_adjoint(grad, m, in_shape), True)]
        if isinstance(m, nn.Flatten):
            return [(source, grad.reshape(grad.shape[0], *in_shape), owned)]
        return [(source, grad, owned)]  # dropout, identity, LocalResponseNorm (passed through)

    # ---- where the image stops mattering

    def _ancestors(self, node: fx.Node) -> set[fx.Node]:
        seen, stack = set(), [node]
        while stack:
            current = stack.pop()
            for arg in current.all_input_nodes:
                if arg not in seen:
                    seen.add(arg)
                    stack.append(arg)
        return seen

    def split_node(self, top: fx.Node) -> fx.Node | None:
        """The max-pool below `top` above which nothing depends on the image: one that every path
        from the input to `top` passes, with no other max-pool between it and `top`. The input
        itself when there is no max-pool below `top`; None when no such pool exists (then every
        unit runs the whole way down). Found once per node."""
        if top not in self._splits:
            self._splits[top] = self._find_split(top)
        return self._splits[top]

    def _find_split(self, top: fx.Node) -> fx.Node | None:
        ancestors = self._ancestors(top)
        # The layer itself counts when it is a max-pool: its unpooling needs each image's switches.
        pools = [n for n in ancestors | {top} if n.op == "call_module" and isinstance(self.modules[n.target], nn.MaxPool2d)]
        if not pools:
            return self.input
        for pool in sorted(pools, key=self.order.get, reverse=True):
            between = [n for n in ancestors if self.order[n] > self.order[pool] and pool in self._ancestors(n)]
            if any(n in pools for n in between):
                continue
            # Every path passes `pool` when the input cannot reach `top` around it.
            reach, stack = {self.input}, [self.input]
            while stack:
                current = stack.pop()
                for user in current.users:
                    if user is not pool and user not in reach and (user in ancestors or user is top):
                        reach.add(user)
                        stack.append(user)
            if top not in reach:
                return pool
        return None

    # ---- projection

    def traced_from(self, model: nn.Module) -> bool:
        """Whether `model` still holds the submodules it was traced with (the same objects at the
        same paths); the graph calls those objects, so a replaced one needs a new trace."""
        current = _submodules(model)
        return len(current) == len(self._paths) and all(
            old is new and old_path == new_path for (old, old_path), (new, new_path) in zip(self._paths, current)
        )

    def project(self, images: Tensor, layer: nn.Module, units, signal: str = "activation", chunk_size: int | None = None) -> Tensor:
        """Project units of `layer` (a module of the model) to pixels: images [B, 3, H, W] ->
        [U, 3, H, W]; units and signal as in `convviz.deconv.project`."""
        if signal not in SIGNALS:
            raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")
        parsed = parse_units(units, images.shape[0])
        out = images.new_zeros(len(parsed), *images.shape[1:])
        if len(parsed) == 0:
            return out
        top = self.node_for(layer)
        self.refresh()
        try:
            return self._project(images, top, parsed, signal, chunk_size, out)
        finally:
            for fast in self._winograd.values():  # its buffers are sized for this call's chunks
                fast.release()

    def _project(self, images: Tensor, top: fx.Node, parsed, signal: str, chunk_size: int | None, out: Tensor) -> Tensor:
        used, rows = torch.unique(parsed.batch, return_inverse=True)
        rows = to_device(rows, images.device)
        distinct_images = images[to_device(used, images.device)]
        split = self.split_node(top)
        if signal == "one" and parsed.pos is not None and split is not None:
            # No activation value is needed: the images go forward only to the split (not at all
            # without a max-pool below); one image gives the shapes above it and the layer's.
            probe = self.forward(images[:1], top)
            record = self.forward(distinct_images, split) if split is not self.input else None
        else:
            record = probe = self.forward(distinct_images, top)
        if probe.value.ndim == 4 and parsed.pos is None:  # whole maps: a different signal per image
            for start, end in _chunks(len(parsed), chunk_size, "graph", images):
                seed = layer_signal(record.value[rows[start:end]], parsed.rows(start, end), signal)
                out[start:end] = self.backward(top, seed, record, rows[start:end])
            return out
        where = _unit_index(probe.value.shape, parsed, images.device)
        if signal == "one":
            values = torch.ones(len(parsed))  # on the host, where their signs are read
        else:
            values = record.value[(rows,) + where]
        if split is None:  # no image-free part: every unit the whole way down
            for start, end in _chunks(len(parsed), chunk_size, "graph", images):
                seed = layer_signal(record.value[rows[start:end]], parsed.rows(start, end), signal)
                out[start:end] = self.backward(top, seed, record, rows[start:end])
            return out
        # The top, once per distinct (channel, sign[, position]), from a +-1 at the unit.
        distinct, index = _distinct_keys(parsed, values, images.device)
        tops = []
        for start, end in _chunks(len(distinct), chunk_size, "graph", images):
            key = distinct[start:end]
            seed = images.new_zeros(len(key), *probe.value.shape[1:])
            at = (torch.arange(len(key), device=key.device), key[:, 0]) + ((key[:, 2], key[:, 3]) if key.shape[1] == 4 else ())
            seed[at] = key[:, 1].to(seed.dtype)
            tops.append(self.backward(top, seed, probe, None, until=split))
        tops = torch.cat(tops)
        scale = to_device(values.abs(), images.device)
        for start, end in _chunks(len(parsed), chunk_size, "graph", images):
            seed = tops[index[start:end]] * scale[start:end].view(-1, *[1] * (tops.ndim - 1))
            if split is self.input:
                out[start:end] = seed  # no max-pool below the layer: the whole projection is shared
            else:
                out[start:end] = self.backward(split, seed, record, rows[start:end])
        return out


# model -> its GraphDeconvnet (traced once; weights are read live, so training in between is fine).
def _submodules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(module, path) for path, module in model.named_modules() if path]


_CACHE: "weakref.WeakKeyDictionary[nn.Module, GraphDeconvnet]" = weakref.WeakKeyDictionary()


def graph_deconvnet(model: nn.Module) -> GraphDeconvnet:
    """The GraphDeconvnet of `model`, traced on first use and kept while the model lives and keeps
    the same submodules (replacing one, e.g. `model.fc = nn.Linear(...)`, traces it again)."""
    deconv = _CACHE.get(model)
    if deconv is None or not deconv.traced_from(model):
        deconv = _CACHE[model] = GraphDeconvnet(model)
    return deconv


def graph_unsupported(model: nn.Module) -> str | None:
    """Why the graph deconvnet cannot run on `model` (a sentence naming the layer), or None."""
    try:
        graph_deconvnet(model)
    except ValueError as err:
        return str(err)
    return None
