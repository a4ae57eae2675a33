"""Streaming top-k mining vs a brute-force loop over every image and channel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convviz.models.registry import build_model, layer_modules
from convviz.topk import TopKImages, mine_top9


def brute_force(maps: list[torch.Tensor], ids: list[int], k: int):
    """Reference: for each channel, sort (value desc, image id asc) over every image's spatial max.

    maps: one [C, h, w] or [C] tensor per image. The position is the first maximum in row-major
    order. Returns the TopKImages.result() layout as nested lists.
    """
    channels = maps[0].shape[0]
    out = {"values": [], "index": [], "y": [], "x": []}
    for c in range(channels):
        entries = []
        for fmap, image_id in zip(maps, ids):
            if fmap.dim() == 1:
                entries.append((-float(fmap[c]), image_id, 0, 0))
                continue
            plane = fmap[c].tolist()
            best = max(max(row) for row in plane)
            y, x = next((y, x) for y, row in enumerate(plane) for x, v in enumerate(row) if v == best)
            entries.append((-best, image_id, y, x))
        entries.sort()
        entries = entries[:k] + [(float("inf"), -1, -1, -1)] * (k - len(entries))
        out["values"].append([-e[0] for e in entries])
        out["index"].append([e[1] for e in entries])
        out["y"].append([e[2] for e in entries])
        out["x"].append([e[3] for e in entries])
    return out


def feed(acc: TopKImages, maps: torch.Tensor, ids: torch.Tensor, batch_sizes: list[int]) -> None:
    start = 0
    for size in batch_sizes:
        acc.add(maps[start : start + size], ids[start : start + size])
        start += size
    assert start == len(ids)


def assert_equal_to_brute_force(result, maps: torch.Tensor, ids: torch.Tensor, k: int) -> None:
    values, index, y, x = result
    expected = brute_force(list(maps), ids.tolist(), k)
    assert values.dtype == torch.float32 and index.dtype == torch.int64
    assert index.tolist() == expected["index"]
    assert values.tolist() == expected["values"]
    assert y.tolist() == expected["y"]
    assert x.tolist() == expected["x"]


# ------------------------------------------------------------------------------ the accumulator


# buffer_size 4 (= k) and 5: a merge after (nearly) every batch.
@pytest.mark.parametrize("batch_sizes", [[13], [5, 1, 7], [1] * 13, [4, 4, 4, 1]])
@pytest.mark.parametrize("buffer_size", [256, 4, 5])
def test_conv_maps_match_brute_force_for_any_batching(batch_sizes, buffer_size):
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(13, 6, 5, 7, generator=gen)
    ids = torch.randperm(100, generator=gen)[:13]  # distinct, not in ascending order
    acc = TopKImages(6, k=4, buffer_size=buffer_size)
    feed(acc, maps, ids, batch_sizes)
    assert_equal_to_brute_force(acc.result(), maps, ids, 4)


def test_non_contiguous_maps_match_brute_force():
    """channels_last maps (as on a GPU model) take the general gather path."""
    gen = torch.Generator().manual_seed(3)
    maps = torch.randint(0, 4, (9, 5, 6, 6), generator=gen).float()
    acc = TopKImages(5, k=3)
    feed(acc, maps.contiguous(memory_format=torch.channels_last), torch.arange(9), [4, 5])
    assert_equal_to_brute_force(acc.result(), maps, torch.arange(9), 3)


def test_ties_prefer_lower_image_index_and_first_position():
    gen = torch.Generator().manual_seed(1)
    # Values in {0, 1, 2}: many images share a channel's maximum, many positions share an image's.
    maps = torch.randint(0, 3, (20, 5, 4, 4), generator=gen).float()
    ids = torch.randperm(20, generator=gen) + 1000
    maps[:4, 0] = -maps[:4, 0]  # -0.0 ties with 0.0 too
    maps[4:8, 1] = -1.0
    for batch_sizes in ([20], [3, 9, 8], [7, 7, 6]):
        for buffer_size in (256, 9):
            acc = TopKImages(5, k=9, buffer_size=buffer_size)
            feed(acc, maps, ids, batch_sizes)
            assert_equal_to_brute_force(acc.result(), maps, ids, 9)


# fc layers buffer every image's key: buffer_size 9 < a batch of 11 makes the buffer grow.
@pytest.mark.parametrize(("batch_sizes", "buffer_size"), [([2, 6, 3], 256), ([2, 6, 3], 9), ([11], 9), ([3, 8], 9)])
def test_fc_layers_match_brute_force(batch_sizes, buffer_size):
    gen = torch.Generator().manual_seed(2)
    maps = torch.randint(-3, 4, (11, 8), generator=gen).float()  # ties too
    ids = torch.arange(11) * 3
    acc = TopKImages(8, k=9, buffer_size=buffer_size)
    feed(acc, maps, ids, batch_sizes)
    assert_equal_to_brute_force(acc.result(), maps, ids, 9)
    _, _, y, x = acc.result()
    assert (y == 0).all() and (x == 0).all()


def test_fewer_images_than_k_are_padded():
    maps = torch.randn(3, 2, 3, 3)
    acc = TopKImages(2, k=9)
    feed(acc, maps, torch.tensor([7, 2, 5]), [2, 1])
    values, index, y, x = acc.result()
    assert_equal_to_brute_force((values, index, y, x), maps, torch.tensor([7, 2, 5]), 9)
    assert (index[:, 3:] == -1).all() and (y[:, 3:] == -1).all() and (x[:, 3:] == -1).all()
    assert torch.isneginf(values[:, 3:]).all()
    assert sorted(index[0, :3].tolist()) == [2, 5, 7]


@pytest.mark.parametrize("threads", [None, 1])
def test_long_runs_match_brute_force(threads):
    """Enough batches that the table's threshold leaves few candidates per batch, so only
    their positions are computed (the sparse path), with ties at the threshold."""
    gen = torch.Generator().manual_seed(4)
    maps = torch.randint(0, 40, (240, 4, 5, 5), generator=gen).float()
    ids = torch.randperm(240, generator=gen)
    acc = TopKImages(4, k=3, buffer_size=24, threads=threads)
    feed(acc, maps, ids, [8] * 30)
    assert_equal_to_brute_force(acc.result(), maps, ids, 3)


def test_state_does_not_grow_with_the_data():
    acc = TopKImages(16, k=4, buffer_size=32)
    acc.add(torch.randn(8, 16, 6, 6), torch.arange(8))
    size = acc.state_numel()
    for step in range(1, 60):  # 480 images through a 32-image buffer: merged over and over
        acc.add(torch.randn(8, 16, 6, 6), torch.arange(8) + 8 * step)
    assert acc.state_numel() == size == 2 * 16 * (4 + 32)
    values, index, y, x = acc.result()
    assert acc.state_numel() == size
    assert [tuple(t.shape) for t in (values, index, y, x)] == [(16, 4)] * 4


def test_rejects_inconsistent_input():
    acc = TopKImages(4, k=2)
    with pytest.raises(ValueError, match="expected"):
        acc.add(torch.randn(2, 5, 3, 3), torch.arange(2))
    with pytest.raises(ValueError, match="image ids"):
        acc.add(torch.randn(2, 4, 3, 3), torch.arange(3))
    acc.add(torch.randn(2, 4, 3, 3), torch.arange(2))
    with pytest.raises(ValueError, match="width"):
        acc.add(torch.randn(2, 4, 3, 4), torch.arange(2) + 2)


# ------------------------------------------------------------------------------------------ mining


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(inplace=True),  # hooked: the hook sees the rectified map
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 6),
        nn.ReLU(),
        nn.Linear(6, 2),
    )


def batches(images: torch.Tensor, ids: torch.Tensor, sizes: list[int]):
    start = 0
    for size in sizes:
        yield images[start : start + size], ids[start : start + size]
        start += size


def test_mine_top9_matches_brute_force_on_every_layer():
    model = tiny_net()
    images = torch.rand(17, 3, 14, 14)
    ids = torch.randperm(17) + 40
    layers = {"conv1": model[1], "conv2": model[4], "fc": model[7]}
    result = mine_top9(model, layers, batches(images, ids, [6, 6, 5]), k=9, log=lambda m: None)
    assert list(result) == ["conv1", "conv2", "fc"]
    # Reference maps from plain forward slices of the same (inference-mode) network.
    with torch.no_grad():
        conv1 = model[:2](images.clone())
        conv2 = model[:5](images.clone())
        fc = model[:8](images.clone())
    for name, maps in (("conv1", conv1), ("conv2", conv2), ("fc", fc)):
        assert_equal_to_brute_force(result[name], maps, ids, 9)


@pytest.mark.parametrize(
    "pool, covers",
    [
        (nn.MaxPool2d(2), False),  # 13x13 map, floor mode: the last row and column are in no window
        (nn.MaxPool2d(2, ceil_mode=True), True),
        (nn.MaxPool2d(3, 2, padding=1), True),  # overlapping windows (AlexNet-style)
        (nn.MaxPool2d(3, 2), True),
        (nn.MaxPool2d(1, 2), False),  # windows with gaps between them
    ],
)
def test_maxima_read_off_the_following_pool_only_where_its_windows_cover_the_map(pool, covers):
    """A layer followed by a max-pool has its spatial maxima read off the pooled map; where the
    pool misses positions the map itself is reduced. Either way: the brute-force result, here on
    maps whose largest values sit in the last row or column (the positions a floor-mode pool drops)."""
    from convviz.topk import LayerMiner, _pool_covers

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(11, 3, 13, 13, generator=gen)
    images[::2, 0, 12, 3] = 5.0 + torch.arange(6.0)  # the maxima where floor-mode 2x2 pooling never looks
    images[1::2, 1, 4, 12] = 5.0 + torch.arange(5.0)
    model = nn.Sequential(nn.ReLU(), pool, nn.Flatten())
    ids = torch.arange(11) + 3
    with LayerMiner(model, {"relu": model[0]}, k=4) as miner:
        assert miner.pools == {"relu": pool}
        for chunk in (slice(0, 5), slice(5, 11)):
            miner.feed(images[chunk], ids[chunk])
        result = miner.result()
    assert _pool_covers(pool, (13, 13), pool(images[:1]).shape[-2:]) is covers
    assert_equal_to_brute_force(result["relu"], images.clamp_min(0), ids, 4)


@pytest.mark.parametrize("sizes", [[6, 6, 5], [5, 6, 6], [17], [2, 2, 2, 2, 2, 2, 2, 2, 1]])
def test_graphed_miner_steps_match_brute_force_on_every_layer(sizes):
    """GraphedMiner's per-batch steps (run eagerly here; on CUDA they are one recorded graph):
    a short batch padded into the recorded one, a longer batch recording anew, k larger than a
    batch -- all give the brute-force tables, as LayerMiner does."""
    from convviz.graphed import GraphedMiner

    model = tiny_net().train()
    images = torch.rand(17, 3, 14, 14)
    ids = torch.randperm(17) + 40
    layers = {"conv1": model[1], "conv2": model[4], "fc": model[7]}
    with GraphedMiner(model, layers, k=9, graph=False) as miner:
        for chunk, chunk_ids in batches(images, ids, sizes):
            miner.feed(chunk, chunk_ids)
    result = miner.result()
    assert model.training and miner.images == 17
    assert len(miner._recordings) == (2 if sizes == [5, 6, 6] else 1)
    with torch.no_grad():
        model.eval()
        conv1, conv2, fc = model[:2](images.clone()), model[:5](images.clone()), model[:8](images.clone())
    for name, maps in (("conv1", conv1), ("conv2", conv2), ("fc", fc)):
        assert_equal_to_brute_force(result[name], maps, ids, 9)
    # reset() empties the tables for a new pass over other images, keeping the recordings.
    miner.reset()
    with miner:
        miner.feed(images[:4], ids[:4] + 100)
    assert miner.images == 4
    assert_equal_to_brute_force(miner.result()["conv2"], conv2[:4], ids[:4] + 100, 9)


def test_graphed_miner_pads_fewer_images_than_k():
    from convviz.graphed import GraphedMiner

    model = tiny_net()
    images, ids = torch.rand(3, 3, 14, 14), torch.tensor([7, 2, 5])
    with GraphedMiner(model, {"conv2": model[4]}, k=5, graph=False) as miner:
        miner.feed(images, ids)
    with torch.no_grad():
        maps = model[:5](images.clone())
    assert_equal_to_brute_force(miner.result()["conv2"], maps, ids, 5)


def test_graphed_miner_falls_back_to_eager_steps_when_capture_fails(monkeypatch):
    from convviz import graphed

    def refuse(body, device):
        raise RuntimeError("operation failed due to a previous error during capture")

    monkeypatch.setattr(graphed, "_warm_up", lambda body, device: [body() for _ in range(2)])
    monkeypatch.setattr(graphed, "_capture", refuse)
    model, messages = tiny_net(), []
    images, ids = torch.rand(17, 3, 14, 14), torch.arange(17)
    with graphed.GraphedMiner(model, {"conv2": model[4]}, k=9, graph=True, log=messages.append) as miner:
        for chunk, chunk_ids in batches(images, ids, [6, 6, 5]):
            miner.feed(chunk, chunk_ids)
    assert messages == ["mining: the model cannot be recorded as a CUDA graph (operation failed due to a previous "
                        "error during capture); running each batch eagerly"]
    with torch.no_grad():
        maps = model[:5](images.clone())
    assert_equal_to_brute_force(miner.result()["conv2"], maps, ids, 9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("name", ["lenet", "alexnet", "resnet50"])
def test_cuda_graph_mining_equals_the_cpu_miner(name):
    """mine_top9 on CUDA (GraphedMiner, recorded graphs, a short last batch) against the CPU's
    LayerMiner on the same model and images: the same images and positions, values to float
    rounding."""
    from convviz.graphed import GraphedMiner
    from convviz.machine import full_precision_float32
    from convviz.topk import make_miner

    full_precision_float32()
    torch.manual_seed(0)
    model = build_model(name, 10, 64, {"fc_width": 64} if name != "lenet" else {}).eval()
    images, ids = torch.rand(150, 3, 64, 64), torch.arange(150)
    layers = ["conv1", "fc4"] if name == "lenet" else (["conv2", "conv5", "fc7"] if name == "alexnet" else ["layer1", "layer4", "pool"])
    cpu = mine_top9(model, layers, batches(images, ids, [64, 64, 22]), model_name=name, log=lambda m: None)
    cuda_model = model.cuda()
    assert isinstance(make_miner(cuda_model, layers, model_name=name, device="cuda"), GraphedMiner)
    gpu = mine_top9(cuda_model, layers, batches(images, ids, [64, 64, 22]), model_name=name, device="cuda", log=lambda m: None)
    for layer in layers:
        torch.testing.assert_close(gpu[layer][0], cpu[layer][0], rtol=1e-4, atol=1e-5)
        agree = (gpu[layer][1] == cpu[layer][1]).float().mean()
        assert agree > 0.98, f"{layer}: {agree:.3f} of the top images agree"  # near-ties may swap on rounding


def test_mine_top9_is_independent_of_batching_and_restores_mode():
    model = tiny_net().train()
    threads = torch.get_num_threads()
    images = torch.rand(10, 3, 14, 14)
    ids = torch.arange(10)
    layers = {"conv2": model[4]}
    one = mine_top9(model, layers, batches(images, ids, [10]), k=3, log=lambda m: None)
    many = mine_top9(model, layers, batches(images, ids, [3, 3, 3, 1]), k=3, log=lambda m: None)
    assert model.training and torch.get_num_threads() == threads
    # Conv kernels may round differently per batch size: values agree to float precision.
    torch.testing.assert_close(one["conv2"][0], many["conv2"][0])
    for a, b in zip(one["conv2"][1:], many["conv2"][1:]):
        assert torch.equal(a, b)


def test_mine_top9_resolves_registry_layer_names():
    model = build_model("lenet", 3, 32)
    images, ids = torch.rand(6, 3, 32, 32), torch.arange(6)
    by_name = mine_top9(model, ["conv2", "fc4"], batches(images, ids, [4, 2]), k=2, log=lambda m: None)
    quiet = {"k": 2, "log": lambda m: None}
    by_model = mine_top9(model, ["conv2", "fc4"], batches(images, ids, [6]), model_name="lenet", **quiet)
    by_module = mine_top9(model, layer_modules(model, "lenet", ["conv2", "fc4"]), batches(images, ids, [6]), **quiet)
    for layer in ("conv2", "fc4"):
        torch.testing.assert_close(by_name[layer][0], by_model[layer][0])
        torch.testing.assert_close(by_name[layer][0], by_module[layer][0])
        for a, b, c in zip(by_name[layer][1:], by_model[layer][1:], by_module[layer][1:]):
            assert torch.equal(a, b) and torch.equal(a, c)
    assert by_name["conv2"][0].shape == (16, 2) and by_name["fc4"][0].shape == (84, 2)
    with pytest.raises(ValueError, match="model_name"):
        mine_top9(model, ["conv3"], batches(images, ids, [6]), log=lambda m: None)


def test_mine_top9_needs_batches():
    model = tiny_net()
    with pytest.raises(ValueError, match="no batches"):
        mine_top9(model, {"c": model[1]}, [], log=lambda m: None)


def test_mine_top9_rejects_a_module_that_runs_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(self.conv(x))

    model = Twice()
    with pytest.raises(RuntimeError, match="twice"):
        mine_top9(model, {"c": model.conv}, batches(torch.rand(2, 3, 4, 4), torch.arange(2), [2]), log=lambda m: None)


def test_rank_key_orders_by_value_then_lower_index_and_round_trips():
    from convviz.topk import _rank_key, _unpack_key, index_bits

    values = torch.tensor([0.0, -0.0, 1.5, -1.5, float("inf"), float("-inf"), 1e-40, -1e-40, 3e38, -3e38, 1.5, 0.0])
    index = torch.tensor([5, 3, 7, 2, 9, -1, 4, 8, 2**32 - 3, 0, 6, 1])
    key = _rank_key(values, index_bits(index).squeeze(1))
    by_key = key.argsort(descending=True).tolist()
    expected = sorted(range(len(values)), key=lambda i: (-float(values[i]), int(index[i])))
    assert by_key == expected
    unpacked_values, unpacked_index = _unpack_key(key)
    assert unpacked_values.tolist() == values.tolist() and unpacked_index.tolist() == index.tolist()


def test_busy_machine_threads_follows_the_load(monkeypatch):
    """One thread only when the 1-minute load exceeds 1.5x the cores; the count is restored."""
    from convviz import machine

    cores = machine.os.cpu_count() or 1
    monkeypatch.setattr(machine.os, "getloadavg", lambda: (2.0 * cores, 0.0, 0.0))
    assert machine.busy_machine_threads() == 1
    monkeypatch.setattr(machine.os, "getloadavg", lambda: (0.5 * cores, 0.0, 0.0))
    assert machine.busy_machine_threads() is None
    before = torch.get_num_threads()
    with machine.cpu_threads("cpu", 1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_fastest_way_picks_the_quicker_way_and_returns_a_result():
    """The layout/transposed-filter tuners' timing helper: shortest run wins, output is kept."""
    import time

    from convviz.machine import fastest_way

    ways = {"slow": lambda t: (time.sleep(0.01), t + 1)[1], "quick": lambda t: t + 1}
    name, out = fastest_way(ways, torch.zeros(2))
    assert name == "quick" and torch.equal(out, torch.ones(2))
