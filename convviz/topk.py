"""Streaming top-k mining of the images that most excite each feature map (Sec. 4, Fig. 2).

For every channel of every analysis layer we keep the k distinct images whose strongest
activation anywhere in the map is highest, and where that activation occurred. In the style of
davidbau/dissect's runningstats, a small accumulator per layer is fed batch after batch
(`add`) and read at the end (`result`); one pass over a split feeds every layer at once, and
the state (a [C, k] table and a fixed [C, buffer_size] buffer) does not grow with the dataset.

Per batch and layer: the max over the flattened h*w positions per image and channel (`amax`;
read off the max-pool right after the layer where there is one, see LayerMiner) goes to a
fixed-size buffer as a sortable key, with the argmax position of the maps that can
still make the table; the buffer is merged into the running [C, k] table with one topk (see
TopKImages). Everything stays on the device, and the only host transfer is in `result` (on
the CPU, a conv layer also reads one count per batch: no real sync there). On a busy CPU the
ops run on one thread (`convviz.machine.busy_machine_threads`). Cost: see
benchmarks/mine_overhead.py.

Distinctness: each image index must be fed exactly once over the whole pass (true for one pass
over a split, whatever the batching or order). Then the candidates of a batch are distinct
images, none already in the table, so keeping the best k of the concatenation keeps k distinct
images without any bookkeeping.

Ties: images rank by value (descending), then image index (ascending); within an image's map
the first maximal position in row-major order is reported. Results therefore do not depend on
batching or data order.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Callable

import torch
from torch import Tensor, nn

from convviz.deconv_window import pair
from convviz.machine import busy_machine_threads, cpu_threads
from convviz.models.registry import MODELS, layer_modules

TopKResult = tuple[Tensor, Tensor, Tensor, Tensor]


class TopKImages:
    """Running per-channel top-k of distinct images by spatial-max activation.

    State: `_keys` and `_flat`, [k + buffer_size, C] int64 each, on the device of the first
    batch. Rows [0, k) are the table: after a merge, the best k so far, best first. The other
    rows buffer candidates not merged yet, one row per image (a batch is one contiguous
    block). A key packs value and image index into one sortable integer (`_rank_key`); `flat`
    is the position of the maximum in the flattened h*w map. Nothing grows with the data (a
    batch larger than the buffer widens it once).

    Per batch: the spatial max of every (image, channel) with `amax` and its key go to the
    buffer. An argmax costs several times more than a max, so positions are found only for
    candidates that can still make the table: keys above the table's k-th key (on the CPU,
    after the first merges that is a few percent of them; elsewhere, or while most are, every
    map's argmax is taken, which also avoids a device sync). The others keep a stale position:
    they cannot win, since k table entries already beat them. Merges (one topk over the
    [k + filled, C] keys) come after 1, 2, 4, ... batches' worth of images, so the threshold
    sharpens quickly, then whenever the buffer is full (a long topk is cheaper per element).
    """

    def __init__(self, channels: int, k: int = 9, buffer_size: int = 256, threads: int | None = None):
        """threads: intra-op threads for this accumulator's CPU ops (None: torch's setting);
        see `convviz.machine.busy_machine_threads`."""
        if channels < 1 or k < 1 or buffer_size < 1:
            raise ValueError(f"need channels, k and buffer_size >= 1, got {channels}, {k}, {buffer_size}")
        self.channels, self.k, self.buffer_size, self.threads = channels, k, buffer_size, threads
        self.width: int | None = None  # map width, fixed by the first batch (None for fc layers)
        self._keys: Tensor | None = None  # [k + buffer_size, C]
        self._flat: Tensor | None = None  # [k + buffer_size, C]
        self._filled = 0  # buffered candidate rows (Python ints: reading them needs no sync)
        self._merged = 0  # images folded into the table so far

    def add(self, feature_maps: Tensor, image_ids: Tensor, maxima: Tensor | None = None, low_bits: Tensor | None = None) -> None:
        """Take a batch: feature_maps [B, C, h, w] (conv) or [B, C] (fc), image_ids [B] int64.

        Every image index must be fed only once over the whole pass (see the module doc).
        maxima: the maps' spatial maxima [B, C] when the caller has them for less (LayerMiner
        reads them off the max-pool after the layer: the same values from a map 4x smaller).
        low_bits: `index_bits(image_ids)`, when the caller shares it among layers.
        """
        self._check(feature_maps, image_ids)
        device, batch = feature_maps.device, feature_maps.shape[0]
        with cpu_threads(device, self.threads):
            if self._keys is None or self._keys.device != device or batch > self.buffer_size:
                self._allocate(device, batch)
            elif self._filled + batch > min(self.buffer_size, max(self._merged, batch)):
                self._merge()
            rows = slice(self.k + self._filled, self.k + self._filled + batch)
            if low_bits is None or low_bits.device != device:
                low_bits = index_bits(image_ids.to(device))
            if feature_maps.dim() == 2:
                _rank_key(feature_maps, low_bits, out=self._keys[rows])
            else:
                maps = feature_maps.flatten(2)  # [B, C, h*w]
                key = _rank_key(maps.amax(dim=2) if maxima is None else maxima, low_bits, out=self._keys[rows])
                self._write_positions(maps, key, rows)
        self._filled += batch

    def result(self) -> TopKResult:
        """(values [C, k] float32, image_index [C, k] int64, y [C, k], x [C, k]) on the CPU.

        Sorted by value, descending (ties: lower image index first). Slots with no image (fewer
        than k images seen) hold value -inf and image_index, y, x = -1. For fc layers y = x = 0.
        """
        if self._keys is None:
            self._allocate(torch.device("cpu"), 1)
        with cpu_threads(self._keys.device, self.threads):
            self._merge()
        values, index = _unpack_key(self._keys[: self.k].t().cpu())
        return (values, index, *table_positions(self._flat[: self.k].t().cpu(), self.width, index < 0))

    def state_numel(self) -> int:
        """Number of elements held: table plus buffer (fixed; never grows with the data)."""
        return 0 if self._keys is None else self._keys.numel() + self._flat.numel()

    def _check(self, feature_maps: Tensor, image_ids: Tensor) -> None:
        """Validate shapes; the first batch fixes the map width."""
        if feature_maps.dim() not in (2, 4) or feature_maps.shape[1] != self.channels:
            expected = f"[B, {self.channels}] or [B, {self.channels}, h, w]"
            raise ValueError(f"expected {expected}, got {tuple(feature_maps.shape)}")
        if image_ids.dim() != 1 or image_ids.numel() != feature_maps.shape[0]:
            batch = feature_maps.shape[0]
            raise ValueError(f"image ids of shape {tuple(image_ids.shape)} for a batch of {batch} feature maps")
        width = feature_maps.shape[-1] if feature_maps.dim() == 4 else None
        if self._keys is None:
            self.width = width
        elif self.width != width:
            raise ValueError(f"feature map width changed from {self.width} to {width} between batches")

    @torch.inference_mode(False)  # normal tensors: updated both inside and outside inference mode
    def _allocate(self, device: torch.device, batch: int) -> None:
        """(Re)create the state on `device`, the buffer at least `batch` wide, keeping the table."""
        if self._keys is None:
            table = empty_keys((self.k, self.channels))
            table_flat = torch.zeros((self.k, self.channels), dtype=torch.int64)
        else:
            self._merge()
            table, table_flat = self._keys[: self.k], self._flat[: self.k]
        self.buffer_size = max(self.buffer_size, batch)
        shape = (self.k + self.buffer_size, self.channels)
        self._keys = torch.empty(shape, dtype=torch.int64, device=device)
        self._flat = torch.empty(shape, dtype=torch.int64, device=device)  # fc layers never write theirs
        self._keys[: self.k] = table.to(device)
        self._flat[: self.k] = table_flat.to(device)

    def _write_positions(self, maps: Tensor, key: Tensor, rows: slice) -> None:
        """Argmax positions of the maps [B, C, h*w] whose keys [B, C] can still make the table."""
        # max(dim) returns the FIRST maximal position: the row-major tie rule.
        if maps.device.type == "cpu" and self._merged >= self.k:  # the table is full
            image, channel = (key > self._keys[self.k - 1]).nonzero(as_tuple=True)
            if 2 * image.numel() < key.numel():
                self._flat[rows.start + image, channel] = maps[image, channel].max(dim=1).indices
                return
        self._flat[rows] = maps.max(dim=2).indices

    def _merge(self) -> None:
        """Fold the buffered candidates into the table: best k of the [k + filled, C] keys."""
        if not self._filled:
            return
        top, keep = self._keys[: self.k + self._filled].topk(self.k, dim=0)  # sorted, best first
        flat = self._flat.gather(0, keep)
        self._keys[: self.k] = top
        self._flat[: self.k] = flat
        self._merged += self._filled
        self._filled = 0


# Low 32 bits of a key hold _INDEX_BASE - image index: a lower index gives a larger key.
_INDEX_BASE = 2**32 - 2
_LOW_BITS = 2**32 - 1
_MAGNITUDE_BITS = 0x7FFFFFFF


def empty_keys(shape: tuple[int, int], device="cpu") -> Tensor:
    """Keys of empty table slots [k, C] (value -inf, image -1): below every real entry."""
    return _rank_key(torch.full(shape, float("-inf"), device=device), index_bits(torch.full((shape[0],), -1, device=device)))


def table_positions(flat: Tensor, width: int | None, empty: Tensor) -> tuple[Tensor, Tensor]:
    """(y, x) of a table's flat map positions; -1 in empty slots, 0 for fc layers (width None)."""
    if width is None:  # fc layer (or nothing seen): one position, 0
        y = x = torch.where(empty, -1, 0)
        return y, x
    return torch.where(empty, -1, flat // width), torch.where(empty, -1, flat % width)


def mark_fired(fired: set[str], name: str) -> None:
    """Note that layer `name`'s module ran in this forward pass; a second run is an error."""
    if name in fired:
        # Feeding the same images twice would break distinctness (module doc).
        raise RuntimeError(f"layer {name!r}: its module ran twice in one forward pass; hook one that runs once")
    fired.add(name)


def check_all_fired(modules: Mapping[str, nn.Module], fired: set[str]) -> None:
    if len(fired) != len(modules):
        missing = [name for name in modules if name not in fired]
        raise RuntimeError(f"layer(s) {missing} produced no output in the forward pass")


def index_bits(index: Tensor) -> Tensor:
    """The low 32 bits of the keys of images `index` [B] (int64, -1 <= index < 2^32 - 2): a
    column [B, 1], `_INDEX_BASE - index`, so a lower index gives a larger key."""
    return (_INDEX_BASE - index.to(torch.int64)).unsqueeze(1)


def _rank_key(values: Tensor, low_bits: Tensor, out: Tensor | None = None) -> Tensor:
    """int64 keys ordering entries by value (descending), then image index (ascending).

    values: float, any shape; low_bits: `index_bits(index)`, broadcastable to it. out: where to
    write the keys (e.g. the rows of the buffer they go to).
    torch.topk promises nothing about ties, and two stable sorts cost several times more, so
    ties are broken inside one integer. High 32 bits: the float32 value's bits as an int32
    that orders like the float (IEEE floats are sign-magnitude: a non-negative float's bits
    already order right; flipping the magnitude bits of a negative one reverses its order).
    Low 32 bits: _INDEX_BASE - index. Image indices are distinct within a channel, so keys are
    too, and the top k by key is unique. `_unpack_key` inverts it.
    """
    # + 0.0 turns -0.0 into +0.0: equal as floats, but not as bits.
    bits = (values.float() + 0.0).view(torch.int32)
    ordered = bits.bitwise_xor_((bits >> 31).bitwise_and_(_MAGNITUDE_BITS))  # >> 31: -1 for negatives, else 0
    if out is None:
        out = torch.empty(ordered.shape, dtype=torch.int64, device=ordered.device)
    out.copy_(ordered)
    return out.bitwise_left_shift_(32).bitwise_or_(low_bits)


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


def _following_pool(model: nn.Module, module: nn.Module) -> nn.Module | None:
    """The MaxPool2d right after `module` in the nn.Sequential holding it (a plain stack's
    conv -> ReLU -> pool), else None."""
    for parent in model.modules():
        if isinstance(parent, nn.Sequential):
            children = list(parent)
            for index, child in enumerate(children[:-1]):
                if child is module and type(children[index + 1]) is nn.MaxPool2d:
                    return children[index + 1]
    return None


def _pool_covers(pool: nn.MaxPool2d, in_hw: Sequence[int], out_hw: Sequence[int]) -> bool:
    """Whether every input position lies in some window of `pool` (then the largest pooled value
    is the largest value of the map: max-pooling only copies values, padding adds -inf)."""
    kernel, stride, padding, dilation = (pair(v) for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation))
    return all(
        d == 1 and k >= s and (n_out - 1) * s - p + k >= n_in
        for k, s, p, d, n_in, n_out in zip(kernel, stride, padding, dilation, in_hw, out_hw)
    )


class LayerMiner:
    """Forward hooks feeding one TopKImages per layer; `feed` batches, then read `result`.

    Use as a context manager: entering registers the hooks and puts the model in eval mode,
    leaving removes them and restores the mode. Each hook reduces its layer's output at once,
    so the map can be freed and later in-place ops cannot touch it first -- except where a
    max-pool follows the layer in a plain stack (conv -> ReLU -> pool): there the spatial maxima
    are read off the pooled map, 4x smaller (the same values: max-pooling copies them), when
    that pool runs on the very tensor the layer returned and its windows cover the map; the map
    is held until then (only the pool runs in between, which does not change its input).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | Mapping[str, nn.Module],
        k: int = 9,
        model_name: str | None = None,
        mining_threads: int | None | str = "auto",
    ):
        """mining_threads: intra-op threads for the mining ops on the CPU: "auto"
        (`convviz.machine.busy_machine_threads`, decided here once), None (torch's setting) or a count."""
        self.model, self.k = model, k
        self.threads = busy_machine_threads() if mining_threads == "auto" else mining_threads
        self.modules = _resolve_modules(model, layers, model_name)
        self.pools = {name: pool for name, module in self.modules.items() if (pool := _following_pool(model, module)) is not None}
        self._held: dict[str, Tensor] = {}  # layer -> its map, waiting for the pool after it
        self._low: Tensor | None = None
        self.accumulators: dict[str, TopKImages] = {}
        self.images = 0
        self._ids: Tensor | None = None
        self._fired: set[str] = set()
        self._handles: list = []
        self._was_training = model.training

    def __enter__(self) -> LayerMiner:
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()]
        self._handles += [pool.register_forward_hook(self._pool_hook(name)) for name, pool in self.pools.items()]
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
        self._ids, self._fired, self._held = image_ids, set(), {}
        self._low = index_bits(image_ids)  # shared by every layer's keys
        with torch.inference_mode():
            self.model(images)
            for name, held in self._held.items():  # the pool did not run on it: reduce it here
                self._add(name, held)
        self._held = {}
        check_all_fired(self.modules, self._fired)
        self.images += len(image_ids)

    def result(self) -> dict[str, TopKResult]:
        """{layer: TopKImages.result()} in layer order."""
        if not self.accumulators:
            raise ValueError("no batches were mined")
        return {name: self.accumulators[name].result() for name in self.modules}

    def _add(self, name: str, output: Tensor, maxima: Tensor | None = None) -> None:
        if name not in self.accumulators:
            self.accumulators[name] = TopKImages(output.shape[1], self.k, threads=self.threads)
        self.accumulators[name].add(output, self._ids, maxima=maxima, low_bits=self._low)

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            mark_fired(self._fired, name)
            if name in self.pools and output.dim() == 4:
                self._held[name] = output  # reduced when the pool after it has run
            else:
                self._add(name, output)

        return hook

    def _pool_hook(self, name: str):
        def hook(pool, inputs, output):
            held = self._held.pop(name, None)
            if held is None:
                return
            if inputs[0] is held and _pool_covers(pool, held.shape[-2:], output.shape[-2:]):
                with cpu_threads(held.device, self.threads):
                    maxima = output.flatten(2).amax(dim=2)
                self._add(name, held, maxima)
            else:
                self._add(name, held)

        return hook


def make_miner(model, layers, k: int = 9, model_name: str | None = None, mining_threads="auto", device="cpu",
               log: Callable[[str], None] = print):
    """The miner for `device`: on CUDA a `convviz.graphed.GraphedMiner` (each batch's forward and
    mining recorded as one CUDA graph), elsewhere a LayerMiner. Both give the same tables."""
    if torch.device(device).type == "cuda":
        from convviz.graphed import GraphedMiner

        return GraphedMiner(model, layers, k, model_name, log=log)
    return LayerMiner(model, layers, k, model_name, mining_threads)


def mine_top9(
    model: nn.Module,
    layers: Sequence[str] | Mapping[str, nn.Module],
    batches: Iterable[tuple[Tensor, Tensor]],
    k: int = 9,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
    model_name: str | None = None,
    mining_threads: int | None | str = "auto",
) -> dict[str, TopKResult]:
    """One pass over `batches` mining the top-k images of every channel of every layer.

    batches: (images [B, 3, H, W], image_index [B] int64 global indices), each index once.
    layers: analysis layer names (see `_resolve_modules`; pass model_name if ambiguous) or a
    {name: module} mapping. The model should already be on `device`; it runs in eval mode
    under inference_mode (its train/eval mode is restored afterwards). mining_threads: see
    LayerMiner.
    Returns {layer: (values, image_index, y, x)}, each [C, k] (see TopKImages.result), in the
    order of `layers`.
    """
    device = torch.device(device)
    started = time.perf_counter()
    with make_miner(model, layers, k, model_name, mining_threads, device, log) as miner:
        for images, ids in batches:
            miner.feed(images.to(device, non_blocking=True), ids.to(device, non_blocking=True))
    result = miner.result()
    seconds = time.perf_counter() - started
    threads = "" if getattr(miner, "threads", None) is None else f", mining on {miner.threads} thread(s)"
    log(f"mined top-{k} of {len(miner.modules)} layer(s) over {miner.images} images in {seconds:.1f}s{threads}")
    return result
