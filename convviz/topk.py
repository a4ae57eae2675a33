"""Streaming top-k mining of the images that most excite each feature map (Sec. 4, Fig. 2).

For every channel of every analysis layer we keep the k distinct images whose strongest
activation anywhere in the map is highest, and where that activation occurred. In the style of
davidbau/dissect's runningstats, a small accumulator per layer is fed batch after batch
(`add`) and read at the end (`result`); one pass over a split feeds every layer at once, and
the state (a [C, k] table and a fixed [C, buffer_size] buffer) does not grow with the dataset.

Per batch and conv layer: the max over the flattened h*w positions per image and channel
(`amax`), the batch's own best k images per channel (the only ones that can reach the top k),
and the argmax position of just those maps, appended to a fixed-size buffer (fc layers append
every image). A full buffer is merged into the running [C, k] table with one topk. Everything
stays on the device; the only host transfer is in `result`. On the CPU these ops run on one
thread (`_one_cpu_thread`). Cost: see benchmarks/mine_overhead.py.

Distinctness: each image index must be fed exactly once over the whole pass (true for one pass
over a split, whatever the batching or order). Then the candidates of a batch are distinct
images, none already in the table, so keeping the best k of the concatenation keeps k distinct
images without any bookkeeping.

Ties: images rank by value (descending), then image index (ascending); within an image's map
the first maximal position in row-major order is reported. Results therefore do not depend on
batching or data order.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Callable

import torch
from torch import Tensor, nn

from convviz.models.registry import MODELS, layer_modules

TopKResult = tuple[Tensor, Tensor, Tensor, Tensor]


class TopKImages:
    """Running per-channel top-k of distinct images by spatial-max activation.

    State, all [C, ...] int64 on the device of the first batch, of fixed size:
      table   `key` [C, k], `flat` [C, k]: the best k so far, best first. `key` packs value and
              image index into one sortable integer (see `_rank_key`); `flat` is the position
              of the maximum in the flattened h*w map.
      buffer  [C, buffer_size] keys and positions of candidates not yet merged into the table
              (grown once to the batch size if a batch has more candidates than that).
    Per batch, conv maps: spatial max values with `amax`, then the batch's own best k per
    channel by key (only those can reach the global top k), and the argmax position of just
    those k maps (an argmax over every map costs several times more than the max). fc layers
    have no position to find, so all B keys go to the buffer as they are. A full buffer is
    merged into the table with one topk (per element, a long topk is cheaper than many short).
    """

    def __init__(self, channels: int, k: int = 9, buffer_size: int = 256):
        if channels < 1 or k < 1 or buffer_size < k:
            raise ValueError(f"need channels >= 1, k >= 1 and buffer_size >= k, got {channels}, {k}, {buffer_size}")
        self.channels, self.k, self.buffer_size = channels, k, buffer_size
        self.width: int | None = None  # map width, fixed by the first batch (1 for fc layers)
        empty = _rank_key(torch.full((channels, k), float("-inf")), torch.full((channels, k), -1))
        self.key, self.flat = empty, torch.zeros((channels, k), dtype=torch.int64)
        self._buffer: tuple[Tensor, Tensor] | None = None  # key, flat: [C, buffer_size] each
        self._channel_rows: Tensor | None = None  # [C, 1]: c, on the buffer's device
        self._filled = 0  # buffer columns in use (a Python int: reading it needs no device sync)

    def add(self, feature_maps: Tensor, image_ids: Tensor) -> None:
        """Take a batch: feature_maps [B, C, h, w] (conv) or [B, C] (fc), image_ids [B] int64.

        Every image index must be fed only once over the whole pass (see the module doc).
        """
        self._check(feature_maps, image_ids)
        device = feature_maps.device
        batch = feature_maps.shape[0]
        n = batch if feature_maps.dim() == 2 else min(self.k, batch)  # candidates per channel
        with _one_cpu_thread(device):
            if self._buffer is None or self._buffer[0].device != device or n > self.buffer_size:
                self._allocate(device, n)
            elif self._filled + n > self.buffer_size:
                self._merge()
            key, flat = self._candidates(feature_maps, image_ids.to(device))  # [C, n] each
            columns = slice(self._filled, self._filled + n)
            self._buffer[0][:, columns] = key
            if flat is not None:
                self._buffer[1][:, columns] = flat
        self._filled += n

    def result(self) -> TopKResult:
        """(values [C, k] float32, image_index [C, k] int64, y [C, k], x [C, k]) on the CPU.

        Sorted by value, descending (ties: lower image index first). Slots with no image (fewer
        than k images seen) hold value -inf and image_index, y, x = -1. For fc layers y = x = 0.
        """
        with _one_cpu_thread(self.key.device):
            self._merge()
        values, index = _unpack_key(self.key.cpu())
        flat = self.flat.cpu()
        width = self.width or 1
        empty = index < 0
        y = torch.where(empty, -1, flat // width)
        x = torch.where(empty, -1, flat % width)
        return values, index, y, x

    def state_numel(self) -> int:
        """Number of elements held: table plus buffer (fixed; never grows with the data)."""
        buffers = self._buffer or ()
        return sum(t.numel() for t in (self.key, self.flat, *buffers))

    def _check(self, feature_maps: Tensor, image_ids: Tensor) -> None:
        """Validate shapes; the first batch fixes the map width."""
        if feature_maps.dim() not in (2, 4) or feature_maps.shape[1] != self.channels:
            expected = f"[B, {self.channels}] or [B, {self.channels}, h, w]"
            raise ValueError(f"expected {expected}, got {tuple(feature_maps.shape)}")
        if image_ids.dim() != 1 or image_ids.numel() != feature_maps.shape[0]:
            batch = feature_maps.shape[0]
            raise ValueError(f"image ids of shape {tuple(image_ids.shape)} for a batch of {batch} feature maps")
        width = feature_maps.shape[-1] if feature_maps.dim() == 4 else 1
        if self.width is None:
            self.width = width
        elif self.width != width:
            raise ValueError(f"feature map width changed from {self.width} to {width} between batches")

    def _allocate(self, device: torch.device, columns: int) -> None:
        """(Re)create the buffer on `device`, at least `columns` wide, after merging what it held."""
        self._merge()
        self.key, self.flat = self.key.to(device), self.flat.to(device)
        self.buffer_size = max(self.buffer_size, columns)
        shape = (self.channels, self.buffer_size)
        # Positions start at 0 and fc layers never write theirs.
        self._buffer = (
            torch.empty(shape, dtype=torch.int64, device=device),
            torch.zeros(shape, dtype=torch.int64, device=device),
        )
        self._channel_rows = torch.arange(self.channels, device=device).unsqueeze(1)

    def _candidates(self, feature_maps: Tensor, image_ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """Keys [C, n] and flat positions [C, n] (None for fc: all 0) of a batch's candidates.

        fc: all B images. conv: each channel's best min(k, B) images of the batch.
        """
        ids = image_ids.to(torch.int64).unsqueeze(1)  # [B, 1]
        if feature_maps.dim() == 2:
            return _rank_key(feature_maps, ids).t(), None
        maps = feature_maps.flatten(2)  # [B, C, h*w]
        key = _rank_key(maps.amax(dim=2), ids).t()  # [C, B]
        key, pick = key.topk(min(self.k, key.shape[1]), dim=1)  # [C, k'], best first
        # max(dim) returns the FIRST maximal position: the row-major tie rule.
        return key, self._picked_maps(maps, pick).max(dim=2).indices

    def _picked_maps(self, maps: Tensor, pick: Tensor) -> Tensor:
        """maps [B, C, n], pick [C, k'] batch positions -> maps[pick[c, j], c, :] as [C, k', n]."""
        batch, channels, n = maps.shape
        if maps.is_contiguous():
            # Row b*C + c of the [B*C, n] view: index_select copies whole rows, several times
            # faster than the general advanced indexing below.
            rows = (pick * channels + self._channel_rows).reshape(-1)
            return maps.reshape(batch * channels, n).index_select(0, rows).view(channels, -1, n)
        return maps[pick, self._channel_rows]

    def _merge(self) -> None:
        """Fold the buffered candidates into the table: best k of the [C, k + filled] keys."""
        if not self._filled:
            return
        key = torch.cat([self.key, self._buffer[0][:, : self._filled]], dim=1)
        flat = torch.cat([self.flat, self._buffer[1][:, : self._filled]], dim=1)
        self.key, keep = key.topk(self.k, dim=1)  # sorted, best first
        self.flat = flat.gather(1, keep)
        self._filled = 0


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the mining ops on CPU tensors with one intra-op thread, restoring the count after.

    Each op is small (one pass over a map, or [C, B]-sized bookkeeping) and gains little from
    more threads, while every parallel region can wait a scheduler time slice for its threads
    on a busy machine. Measured on 2 shared cores: 1.45-1.50x a plain pass with the default
    threads, 1.02-1.05x with this; the model's own ops keep every thread. (The thread count
    is process-wide: don't run other torch work in parallel Python threads while mining.)
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# Low 32 bits of a key hold _INDEX_BASE - image index: a lower index gives a larger key.
_INDEX_BASE = 2**32 - 2
_LOW_BITS = 2**32 - 1
_MAGNITUDE_BITS = 0x7FFFFFFF


def _rank_key(values: Tensor, index: Tensor) -> Tensor:
    """int64 keys ordering entries by value (descending), then image index (ascending).

    values: float, any shape; index: int64 broadcastable to it, -1 <= index < 2^32 - 2.
    torch.topk promises nothing about ties, and two stable sorts cost several times more, so
    ties are broken inside one integer. High 32 bits: the float32 value's bits as an int32
    that orders like the float (IEEE floats are sign-magnitude: a non-negative float's bits
    already order right; flipping the magnitude bits of a negative one reverses its order).
    Low 32 bits: _INDEX_BASE - index. Image indices are distinct within a channel, so keys are
    too, and the top k by key is unique. `_unpack_key` inverts it.
    """
    # + 0.0 turns -0.0 into +0.0: equal as floats, but not as bits.
    bits = (values.float() + 0.0).view(torch.int32)
    ordered = bits ^ ((bits >> 31) & _MAGNITUDE_BITS)  # bits >> 31 is -1 for negatives, else 0
    return (ordered.to(torch.int64) << 32) | (_INDEX_BASE - index)


def _unpack_key(key: Tensor) -> tuple[Tensor, Tensor]:
    """(values float32, image index int64) of keys made by `_rank_key` (-0.0 comes back as 0.0)."""
    ordered = (key >> 32).to(torch.int32)  # arithmetic shift: keeps the sign
    bits = ordered ^ ((ordered >> 31) & _MAGNITUDE_BITS)  # the flip is its own inverse
    return bits.view(torch.float32), _INDEX_BASE - (key & _LOW_BITS)


# ------------------------------------------------------------------------------------------ mining


def _resolve_modules(
    model: nn.Module, layers: Sequence[str] | Mapping[str, nn.Module], model_name: str | None
) -> dict[str, nn.Module]:
    """Layer name -> module whose output is mined.

    `layers` may be a {name: module} mapping, analysis layer names of `model_name`, analysis
    names that every registry model containing them maps to the same module paths of `model`
    (so the model name need not be passed), or dotted module paths of `model`.
    """
    if isinstance(layers, Mapping):
        return dict(layers)
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ValueError("no layers to mine")
    if model_name is not None:
        return layer_modules(model, model_name, names)
    candidates = {
        tuple(spec.layers[name] for name in names)
        for spec in MODELS.values()
        if all(name in spec.layers and _has_submodule(model, spec.layers[name]) for name in names)
    }
    if len(candidates) == 1:
        paths = candidates.pop()
    elif all(_has_submodule(model, name) for name in names):
        paths = tuple(names)
    else:
        raise ValueError(f"cannot tell which modules layers {names} are; pass model_name or a {{name: module}} mapping")
    return {name: model.get_submodule(path) for name, path in zip(names, paths)}


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


class LayerMiner:
    """Forward hooks feeding one TopKImages per layer; `feed` batches, then read `result`.

    Use as a context manager: entering registers the hooks and puts the model in eval mode,
    leaving removes them and restores the mode. Each hook reduces its layer's output at once,
    so the map can be freed and later in-place ops cannot touch it first.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | Mapping[str, nn.Module],
        k: int = 9,
        model_name: str | None = None,
    ):
        self.model, self.k = model, k
        self.modules = _resolve_modules(model, layers, model_name)
        self.accumulators: dict[str, TopKImages] = {}
        self.images = 0
        self._ids: Tensor | None = None
        self._fired: set[str] = set()
        self._handles: list = []
        self._was_training = model.training

    def __enter__(self) -> LayerMiner:
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()]
        self._was_training = self.model.training
        self.model.eval()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.model.train(self._was_training)

    def feed(self, images: Tensor, image_ids: Tensor) -> None:
        """One forward pass: images [B, 3, H, W] and image_ids [B] on the model's device."""
        self._ids, self._fired = image_ids, set()
        with torch.inference_mode():
            self.model(images)
        if len(self._fired) != len(self.modules):
            missing = [name for name in self.modules if name not in self._fired]
            raise RuntimeError(f"layer(s) {missing} produced no output in the forward pass")
        self.images += len(image_ids)

    def result(self) -> dict[str, TopKResult]:
        """{layer: TopKImages.result()} in layer order."""
        if not self.accumulators:
            raise ValueError("no batches were mined")
        return {name: self.accumulators[name].result() for name in self.modules}

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if name in self._fired:
                # Feeding the same images twice would break distinctness (module doc).
                raise RuntimeError(f"layer {name!r}: its module ran twice in one forward pass; hook one that runs once")
            if name not in self.accumulators:
                self.accumulators[name] = TopKImages(output.shape[1], self.k)
            self.accumulators[name].add(output, self._ids)
            self._fired.add(name)

        return hook


def mine_top9(
    model: nn.Module,
    layers: Sequence[str] | Mapping[str, nn.Module],
    batches: Iterable[tuple[Tensor, Tensor]],
    k: int = 9,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
    model_name: str | None = None,
) -> dict[str, TopKResult]:
    """One pass over `batches` mining the top-k images of every channel of every layer.

    batches: (images [B, 3, H, W], image_index [B] int64 global indices), each index once.
    layers: analysis layer names (see `_resolve_modules`; pass model_name if ambiguous) or a
    {name: module} mapping. The model should already be on `device`; it runs in eval mode
    under inference_mode (its train/eval mode is restored afterwards).
    Returns {layer: (values, image_index, y, x)}, each [C, k] (see TopKImages.result), in the
    order of `layers`.
    """
    device = torch.device(device)
    started = time.perf_counter()
    with LayerMiner(model, layers, k, model_name) as miner:
        for images, ids in batches:
            miner.feed(images.to(device, non_blocking=True), ids.to(device, non_blocking=True))
    result = miner.result()
    seconds = time.perf_counter() - started
    log(f"mined top-{k} of {len(miner.modules)} layer(s) over {miner.images} images in {seconds:.1f}s")
    return result
