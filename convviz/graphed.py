"""CUDA graphs of the two streaming passes: the occlusion sweep and the top-k mining pass.

On a GPU the 64-px models of this suite are bound by kernel launches, not arithmetic: a forward
pass of 169 occluded images is a few hundred launches of microsecond kernels, each costing the
host more than the GPU. `GraphedSweep` records everything one occlusion batch needs -- building
the occluded images from the occluder corners, the forward pass (with the unoccluded image as an
extra row), every top-conv channel's total activation, P(true) and the most probable class --
once per model and batch size as a CUDA graph, and replays it for every batch of every image. `GraphedMiner` does the same for
each batch of `convviz.topk`'s mining pass. Inputs live in static buffers that each batch
overwrites, so one graph serves every image. The arithmetic is the eager code's (same kernels,
whole images, full precision), so results match up to the kernels' own rounding.

While recording, cuDNN measures its convolution algorithms for these shapes and keeps the
fastest (`torch.backends.cudnn.benchmark`, for the recording only): the graph then replays those
kernels. Precision is untouched (TF32 stays as the process set it; the analysis rules turn it off).

Off CUDA, and for a model whose forward a graph cannot hold (`record`), the same steps run
eagerly: tests check them on the CPU against the eager code, and CUDA tests check the graphs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from convviz.incremental import conv_batchnorm_pairs
from convviz.topk import (
    _rank_key,
    _resolve_modules,
    _unpack_key,
    check_all_fired,
    empty_keys,
    index_bits,
    mark_fired,
    table_positions,
)


@dataclass
class SweepValues:
    """One image's graphed sweep. Per occluder position (rows, [N, ...]): the total activation of
    every channel of the watched map [N, C], P(label) [N] and the most probable class [N]; for the
    unoccluded image: each channel's spatial maximum and total [C] and the class probabilities."""

    totals: Tensor
    p_true: Tensor
    top_class: Tensor
    base_max: Tensor
    base_totals: Tensor
    base_probs: Tensor


def batchnorm_folded(model: nn.Module, keep: Iterable[nn.Module] = ()) -> nn.Module:
    """A copy of `model` in which every eval-mode BatchNorm2d that directly follows a Conv2d (its
    only reader) is folded into that convolution and replaced by an Identity, or `model` itself
    when there is none (or torch.fx cannot trace it). Exact algebra, up to rounding: on an H100,
    BatchNorm's own kernels were 32% of ResNet-50's batched forward at 64 px.

    The module tree keeps its paths, so hooks go on the copy's modules of the same names; a
    BatchNorm's Identity outputs what the BatchNorm did. Convolutions in `keep` (watched by a hook
    that needs their own output) are left as they are.
    """
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 -- any model fx cannot trace simply stays unfolded
        return model
    modules = dict(model.named_modules())
    kept = {id(module) for module in keep}
    pairs = [(conv.target, bn.target) for conv, bn in conv_batchnorm_pairs(graph, modules) if id(modules[conv.target]) not in kept]
    if not pairs:
        return model
    folded = copy.deepcopy(model)
    for conv_path, bn_path in pairs:
        fused = fuse_conv_bn_eval(folded.get_submodule(conv_path), folded.get_submodule(bn_path))
        folded.set_submodule(conv_path, fused)
        folded.set_submodule(bn_path, nn.Identity())
    return folded


class GraphedSweep:
    """Occlusion sweeps of `model` watching module `top` (the top conv layer), batch by batch.

        sweep = GraphedSweep(model, top)
        values = sweep.run(image, fill, label, y0, x0, size, batch_size)     # a SweepValues

    Each batch carries the unoccluded image as an extra first row, so the values the sweep needs
    from it (which feature map is strongest, P(true)) come from the same graph: an eager forward
    pass of one ResNet-50 image costs the host 4-5 ms of kernel launches, as much as the graph's
    whole batch of 169 occluded images on an H100.

    The sweep runs a copy of the model with its BatchNorms folded into the convolutions before
    them (`batchnorm_folded`); `top` is watched in the copy under its path in `model`.

    graph: record a CUDA graph (default: when the model is on a CUDA device; a model the graph
    cannot hold runs each batch eagerly instead, said through `log`). autotune: let cuDNN pick the
    fastest convolution algorithms while recording.
    """

    def __init__(
        self, model: nn.Module, top: nn.Module, graph: bool | None = None, autotune: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        path = next((name for name, module in model.named_modules() if module is top), None)
        if path is None:
            raise ValueError("the watched module `top` is not a module of the model")
        self.model = batchnorm_folded(model, keep=[top])
        self.top, self.log = self.model.get_submodule(path), log
        self.graph, self.autotune = graph, autotune
        self._recorded: dict[tuple, _Recording] = {}

    def run(self, image: Tensor, fill: Tensor, label: int, y0: Tensor, x0: Tensor, size: int, batch_size: int) -> SweepValues:
        """Occluders of side `size` at top-left corners (y0[i], x0[i]) over `image` [1, 3, H, W],
        `batch_size` positions per pass (plus the unoccluded image); results on the image's device."""
        count = len(y0)
        batch = max(1, min(batch_size, count))
        graph = image.is_cuda if self.graph is None else self.graph
        key = (batch, tuple(image.shape), size, image.dtype, image.device, graph)
        recording = self._recorded.get(key)
        if recording is None:
            recording = self._recorded[key] = _Recording(self.model, self.top, image, batch, size, graph, self.autotune, self.log)
        recording.set_image(image, fill, label)
        totals, p_true, top_class, base = [], [], [], None
        for start in range(0, count, batch):
            by, bx = y0[start : start + batch], x0[start : start + batch]
            out = recording.replay(by, bx)
            rows = slice(1, 1 + len(by))  # row 0: the unoccluded image
            totals.append(out[0][rows].clone())
            p_true.append(out[1][rows].clone())
            top_class.append(out[2][rows].clone())
            if base is None:
                base = (out[3].clone(), out[0][0].clone(), out[4].clone())
        return SweepValues(torch.cat(totals), torch.cat(p_true), torch.cat(top_class), *base)


class _Recording:
    """The static buffers and (on CUDA) the recorded graph of one batch size and image shape."""

    def __init__(
        self, model: nn.Module, top: nn.Module, image: Tensor, batch: int, size: int, graph: bool, autotune: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        device = image.device
        self.model, self.top, self.size, self.batch = model, top, size, batch
        self.image = torch.zeros_like(image)
        self.fill = torch.zeros(image.shape[1], dtype=image.dtype, device=device)
        self.label = torch.zeros(1, dtype=torch.long, device=device)
        # Row 0 is the unoccluded image: its occluder sits wholly above and left of the image.
        self.y0 = torch.full((batch + 1,), -size, dtype=torch.long, device=device)
        self.x0 = torch.full((batch + 1,), -size, dtype=torch.long, device=device)
        self.rows = torch.arange(image.shape[-2], device=device)
        self.cols = torch.arange(image.shape[-1], device=device)
        self.graph = None
        if graph:
            with torch.backends.cudnn.flags(enabled=True, benchmark=autotune, deterministic=False,
                                            allow_tf32=torch.backends.cudnn.allow_tf32):
                self.graph, self.outputs = record(self._no_grad_body, device, "occlusion", log)

    def set_image(self, image: Tensor, fill: Tensor, label: int) -> None:
        self.image.copy_(image)
        self.fill.copy_(fill)
        self.label.fill_(label)

    def replay(self, y0: Tensor, x0: Tensor) -> tuple[Tensor, ...]:
        taken = len(y0)
        self.y0[1 : taken + 1].copy_(y0)
        self.x0[1 : taken + 1].copy_(x0)
        if taken < self.batch:  # a short last batch: the spare rows repeat its last corner
            self.y0[taken + 1 :].copy_(y0[-1:].expand(self.batch - taken))
            self.x0[taken + 1 :].copy_(x0[-1:].expand(self.batch - taken))
        if self.graph is None:
            return self._body()
        self.graph.replay()
        return self.outputs

    def _body(self) -> tuple[Tensor, ...]:
        """One batch: the occluded images, the forward pass, the values per row."""
        inside_y = (self.rows >= self.y0[:, None]) & (self.rows < self.y0[:, None] + self.size)  # [B + 1, H]
        inside_x = (self.cols >= self.x0[:, None]) & (self.cols < self.x0[:, None] + self.size)  # [B + 1, W]
        mask = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]  # [B + 1, 1, H, W]
        occluded = torch.where(mask, self.fill.view(1, -1, 1, 1), self.image)
        maps: list[Tensor] = []
        handle = self.top.register_forward_hook(lambda module, args, out: maps.append(out))
        try:
            logits = self.model(occluded)
        finally:
            handle.remove()
        flat = maps[0].flatten(2)  # [B + 1, C, h*w]
        probs = logits.float().softmax(1)
        p_true = probs.gather(1, self.label.expand(len(probs), 1))[:, 0]
        return flat.sum(2).float(), p_true, probs.argmax(1), flat[0].amax(1).float(), probs[0]

    def _no_grad_body(self) -> tuple[Tensor, ...]:
        with torch.no_grad():
            return self._body()


class GraphedMiner:
    """`convviz.topk.LayerMiner`'s pass with each batch's work recorded as one CUDA graph.

        with GraphedMiner(model, layers, k=9, model_name="alexnet") as miner:
            for images, ids in batches:
                miner.feed(images, ids)
        result = miner.result()                 # as LayerMiner.result()

    On a GPU the eager miner launches about six small kernels per layer and batch, several times
    the plain forward's launches (measured on an H100: 1.6-3.6x a plain pass). Here one graph per
    batch size holds the forward pass and the mining, with every layer's channels side by side
    in one channel-major table (rows: all layers' channels; columns: the k best so far, then the
    batch): per layer one `max` writes its maps' spatial maxima and first positions into the
    batch columns (fc layers copy their outputs); then for all layers at once the packed keys
    (`topk._rank_key`), one top-k along the rows and one gather of the positions. Keys are
    distinct per channel, so the top k is unique and merging every batch gives LayerMiner's
    tables. A short batch fills the recorded batch's first columns; the rest get the empty key
    (value -inf, image -1), which no real entry ranks below. Off CUDA, or for a model the graph
    cannot hold (said through `log`), the same steps run eagerly.
    """

    def __init__(
        self, model: nn.Module, layers, k: int = 9, model_name: str | None = None, graph: bool | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.model, self.k, self.graph, self.log = model, k, graph, log
        self.modules = _resolve_modules(model, layers, model_name)
        self.rows: dict[str, tuple[int, int]] = {}  # layer -> its channels' rows in the tables
        self.widths: dict[str, int | None] = {}  # layer -> map width (None: fc layer)
        self.keys: Tensor | None = None  # [all channels, k], best first
        self.flat: Tensor | None = None  # [all channels, k]: positions in the flattened maps
        self.images = 0
        self._recordings: dict[tuple, _MinerRecording] = {}
        self._was_training = model.training

    def __enter__(self) -> GraphedMiner:
        self._was_training = self.model.training
        self.model.eval()
        return self

    def __exit__(self, *exc) -> None:
        self.model.train(self._was_training)

    def feed(self, images: Tensor, image_ids: Tensor) -> None:
        """One batch: images [B, 3, H, W] and image_ids [B] (each index once over the pass)."""
        if self.keys is None:
            self._lay_out(images[:1])
        count = len(images)
        graph = images.is_cuda if self.graph is None else self.graph
        same = (tuple(images.shape[1:]), images.dtype, images.device, graph)
        fits = [r for key, r in self._recordings.items() if key[1:] == same and key[0] >= count]
        recording = min(fits, key=lambda r: r.batch) if fits else None
        if recording is None:
            recording = self._recordings[(count, *same)] = _MinerRecording(self, images, graph)
        recording.run(images, image_ids)
        self.images += count

    def reset(self) -> None:
        """Empty the tables for a new pass, keeping the recorded graphs (they update the tables in place)."""
        if self.keys is not None:
            self.keys.copy_(empty_keys(self.keys.shape, self.keys.device))
            self.flat.zero_()
        self.images = 0

    def result(self) -> dict:
        """{layer: (values [C, k] float32, image_index [C, k], y [C, k], x [C, k])} on the CPU."""
        if self.keys is None:
            raise ValueError("no batches were mined")
        keys, flat = self.keys.cpu(), self.flat.cpu()
        out = {}
        for name in self.modules:
            start, stop = self.rows[name]
            values, index = _unpack_key(keys[start:stop])
            out[name] = (values, index, *table_positions(flat[start:stop], self.widths[name], index < 0))
        return out

    def _lay_out(self, image: Tensor) -> None:
        """Each layer's rows in the tables, from one image's forward pass; the empty tables."""
        shapes: dict[str, tuple[int, ...]] = {}

        def record(name):
            def on_output(module, args, output):
                shapes.setdefault(name, tuple(output.shape))

            return on_output

        handles = [module.register_forward_hook(record(name)) for name, module in self.modules.items()]
        try:
            with torch.inference_mode():
                self.model(image)
        finally:
            for handle in handles:
                handle.remove()
        check_all_fired(self.modules, set(shapes))
        start = 0
        for name in self.modules:
            shape = shapes[name]
            self.rows[name] = (start, start + shape[1])
            self.widths[name] = shape[-1] if len(shape) == 4 else None
            start += shape[1]
        self.keys = empty_keys((start, self.k), image.device)
        self.flat = torch.zeros((start, self.k), dtype=torch.int64, device=image.device)


class _MinerRecording:
    """Static buffers of one batch size and, on CUDA, the recorded graph merging a batch into the tables."""

    def __init__(self, miner: GraphedMiner, images: Tensor, graph: bool) -> None:
        self.miner, self.batch = miner, len(images)
        device = images.device
        self.images = torch.zeros_like(images)
        self.ids = torch.full((self.batch,), -1, dtype=torch.int64, device=device)
        self.invalid = torch.ones(1, self.batch, dtype=torch.bool, device=device)
        channels = miner.keys.shape[0]
        self.values = torch.empty(channels, self.batch, device=device)  # this batch's maxima, layer rows
        self.positions = torch.zeros(channels, self.batch, dtype=torch.int64, device=device)  # fc rows stay 0
        self.graph = None
        if graph:  # warm-up and recording see only invalid columns: they leave the tables as they are
            self.graph = record(self._body, device, "mining", miner.log)[0]

    def run(self, images: Tensor, ids: Tensor) -> None:
        count = len(images)
        self.images[:count].copy_(images)
        self.ids[:count].copy_(ids)
        self.invalid[:, :count] = False
        if count < self.batch:
            self.ids[count:] = -1
            self.invalid[:, count:] = True
        if self.graph is None:
            self._body()
        else:
            self.graph.replay()

    def _body(self) -> None:
        miner, fired = self.miner, set()

        def hook(name):
            start, stop = miner.rows[name]
            values, positions = self.values[start:stop].t(), self.positions[start:stop].t()  # [B, C] views

            def on_output(module, args, output):
                mark_fired(fired, name)
                if output.dim() == 2:
                    values.copy_(output)
                elif output.dtype == values.dtype:  # the first maximal position, as LayerMiner's
                    torch.max(output.flatten(2), dim=2, out=(values, positions))
                else:
                    best = output.flatten(2).max(dim=2)
                    values.copy_(best.values)
                    positions.copy_(best.indices)

            return on_output

        handles = [module.register_forward_hook(hook(name)) for name, module in miner.modules.items()]
        try:
            with torch.inference_mode():
                miner.model(self.images)
        finally:
            for handle in handles:
                handle.remove()
        check_all_fired(miner.modules, fired)
        self.values.masked_fill_(self.invalid, float("-inf"))
        keys = torch.cat([miner.keys, _rank_key(self.values, index_bits(self.ids).t())], dim=1)
        top, keep = keys.topk(miner.k, dim=1)  # sorted, best first
        miner.flat.copy_(torch.cat([miner.flat, self.positions], dim=1).gather(1, keep))
        miner.keys.copy_(top)


# ------------------------------------------------------------------------------- recording a graph


def record(body: Callable[[], object], device, what: str, log: Callable[[str], None]):
    """(graph, outputs): `body` recorded as a CUDA graph after two warm-up runs on a side stream
    (cuDNN picks and loads its kernels there, as capture requires). A model whose forward the
    graph cannot hold -- one that reads values back to the host, or whose shapes depend on the
    data -- fails the capture: then (None, None) and a log line, and the caller runs `body`
    eagerly. Errors of the warm-up runs (real errors of the model) are raised."""
    _warm_up(body, device)
    try:
        return _capture(body, device)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log(f"{what}: the model cannot be recorded as a CUDA graph ({reason}); running each batch eagerly")
        return None, None


def _warm_up(body: Callable[[], object], device) -> None:
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            body()
    torch.cuda.current_stream(device).wait_stream(stream)


def _capture(body: Callable[[], object], device):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = body()
    return graph, outputs
