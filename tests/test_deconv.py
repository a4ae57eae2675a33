"""The Sec. 2.1 deconvnet: explicit and autograd versions agree, match Captum, and batch correctly."""

import copy
import weakref
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convviz import deconv_window
from convviz.deconv import (
    _TRANSPOSE_WAYS,
    ExplicitDeconvnet,
    GeneralDeconvnet,
    _unpool,
    forward_to,
    layer_signal,
    parse_units,
    project,
    strongest_units,
)
from convviz.models import build_model, get_spec

SIZE = 64
ARCH = {"lenet": None, "alexnet": {"fc_width": 64}, "zfnet": {"fc_width": 64}, "resnet50": None}
PLAIN = ["lenet", "alexnet", "zfnet"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def models():
    """Randomly initialised models in eval mode, built once (64 px inputs, narrow fc layers)."""
    torch.manual_seed(0)
    built = {}
    for name, arch in ARCH.items():
        built[name] = build_model(name, 10, SIZE, arch).eval()
    return built


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def layer_acts(model, name, layer, images):
    with torch.no_grad():
        return forward_to(model, model.get_submodule(get_spec(name).layers[layer]), images).clone()


def random_units(acts, count, seed, active=True, whole_map=False):
    """`count` units (batch_index, channel[, y, x]) drawn among the (in)active activations of `acts`."""
    mask = acts > 0 if active else acts == 0
    where = mask.nonzero()
    pick = where[torch.randperm(len(where), generator=torch.Generator().manual_seed(seed))[:count]]
    return pick[:, :2] if whole_map else pick


def assert_close(actual, expected, rtol=1e-5):
    """Equal up to rtol times the largest magnitude (the projections' scale varies by orders)."""
    scale = expected.abs().max()
    assert scale > 0, "a projection that is all zero proves nothing"
    assert (actual - expected).abs().max() <= rtol * scale


@pytest.mark.parametrize("name", PLAIN)
def test_explicit_deconvnet_equals_general_deconvnet_on_plain_models(models, images, name):
    model, spec = models[name], get_spec(name)
    for seed, layer in enumerate(spec.layers):
        acts = layer_acts(model, name, layer, images)
        units = random_units(acts, 3, seed)
        explicit = project(model, layer, images, units, method="explicit", spec=spec)
        general = project(model, layer, images, units, method="general", spec=spec)
        assert explicit.shape == (len(units), 3, SIZE, SIZE)
        assert_close(explicit, general)
        if acts.ndim == 4:  # whole feature maps too
            maps = random_units(acts, 2, seed, whole_map=True)
            assert_close(project(model, layer, images, maps, method="explicit", spec=spec),
                         project(model, layer, images, maps, spec=spec))


@pytest.mark.parametrize("way", ["sparse", "subpixel", "direct"])
def test_explicit_deconvnet_equals_general_with_every_layer_forced_to_one_way(models, images, way, monkeypatch):
    """The tuner picks a way per layer by speed; forced to one way wherever it is offered, the
    explicit deconvnet still gives the general one's projections (zfnet: strided, padded and
    stride-1 layers, units and whole maps)."""
    from convviz import deconv

    monkeypatch.setattr(deconv, "_TRANSPOSE_CHOICE", weakref.WeakKeyDictionary())
    monkeypatch.setattr(deconv, "_fastest", lambda ways, *args: way if way in ways else ways[0])
    model, spec = models["zfnet"], get_spec("zfnet")
    for seed, layer in enumerate(["conv2", "conv5", "fc6"]):
        acts = layer_acts(model, "zfnet", layer, images)
        units = random_units(acts, 3, seed)
        assert_close(project(model, layer, images, units, method="explicit", spec=spec),
                     project(model, layer, images, units, method="general", spec=spec))
        if acts.ndim == 4:
            maps = random_units(acts, 2, seed, whole_map=True)
            assert_close(project(model, layer, images, maps, method="explicit", spec=spec),
                         project(model, layer, images, maps, method="general", spec=spec))
    chosen = {choice for choices in deconv._TRANSPOSE_CHOICE.values() for choice in choices.values()}
    assert way in chosen


@pytest.mark.parametrize("name", list(ARCH))
def test_general_deconvnet_matches_captum_neuron_deconvolution(models, images, name):
    from captum.attr import NeuronDeconvolution

    model, spec = models[name], get_spec(name)
    for seed, (layer, path) in enumerate(spec.layers.items()):
        acts = layer_acts(model, name, layer, images)
        units = random_units(acts, 2, seed)
        # Captum starts from 1 at the neuron and back-propagates LRN by its true gradient.
        ours = project(model, layer, images, units, spec=spec, signal="one", contrast_norm="gradient")
        captum = NeuronDeconvolution(model, model.get_submodule(path))
        for row, (b, *neuron) in enumerate(units.tolist()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Captum announces its ReLU hooks
                expected = captum.attribute(images[b : b + 1], neuron_selector=tuple(neuron))
            assert_close(ours[row], expected[0])


def test_signal_one_is_the_activation_signal_rescaled(models, images):
    model, spec = models["zfnet"], get_spec("zfnet")
    acts = layer_acts(model, "zfnet", "conv3", images)
    units = random_units(acts, 2, 0)
    value = acts[tuple(units.T)]
    one = project(model, "conv3", images, units, spec=spec, signal="one")
    assert_close(project(model, "conv3", images, units, spec=spec), one * value.view(-1, 1, 1, 1))


def test_contrast_norm_identity_differs_from_its_gradient(models, images):
    model, spec = models["zfnet"], get_spec("zfnet")
    units = random_units(layer_acts(model, "zfnet", "conv2", images), 1, 0)
    identity = project(model, "conv2", images, units, spec=spec)
    gradient = project(model, "conv2", images, units, spec=spec, contrast_norm="gradient")
    assert (identity - gradient).abs().max() > 1e-3 * identity.abs().max()


@pytest.mark.parametrize("name", ["alexnet", "resnet50"])
def test_inplace_relus_project_like_out_of_place_ones(models, images, name):
    model, spec = models[name], get_spec(name)
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    layer = spec.top_conv
    units = random_units(layer_acts(model, name, layer, images), 3, 0)
    ours, reference = (project(net, layer, images, units, spec=spec) for net in (model, twin))
    assert_close(ours, reference, rtol=1e-6)


@pytest.mark.parametrize("method", ["explicit", "general"])
@pytest.mark.parametrize("layer", ["conv2", "fc6"])
def test_unit_with_zero_activation_projects_to_exact_zeros(models, images, method, layer):
    model, spec = models["zfnet"], get_spec("zfnet")
    units = random_units(layer_acts(model, "zfnet", layer, images), 2, 0, active=False)
    out = project(model, layer, images, units, method=method, spec=spec)
    assert len(units) == 2 and torch.equal(out, torch.zeros_like(out))


def model_state(model):
    return {
        "modules": list(model.modules()),
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "inplace": [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)],
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()],
    }


@pytest.mark.parametrize("name", ["alexnet", "resnet50"])
def test_model_is_restored_after_projection_even_on_error(models, images, name):
    model, spec = models[name], get_spec(name)
    model.train()
    next(model.parameters()).requires_grad_(False)  # a mixed state must come back as it was
    before = model_state(model)
    try:
        with GeneralDeconvnet(model):
            assert not any(p.requires_grad for p in model.parameters())
            assert not any(m.training for m in model.modules())
            assert not any(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
        project(model, spec.top_conv, images, [(0, 1, 0, 0), (1, 2, 0, 0)], spec=spec)
        project(model, spec.top_conv, images, [(1, 2)], spec=spec)
        with pytest.raises(ValueError, match="channel out of range"):
            project(model, spec.top_conv, images, [(0, 10**6)], spec=spec)
        after = model_state(model)
    finally:
        model.eval()
        next(model.parameters()).requires_grad_(True)
    assert after["modules"] == before["modules"]  # same module objects, none swapped
    assert after == before


@pytest.mark.parametrize("method", ["explicit", "general"])
def test_batched_projection_equals_projecting_each_unit_alone(models, images, method):
    model, spec = models["zfnet"], get_spec("zfnet")
    acts = layer_acts(model, "zfnet", "conv2", images)
    for units in (random_units(acts, 7, 0), random_units(acts, 5, 1, whole_map=True)):
        assert len(set(units[:, 0].tolist())) < len(units)  # images shared between units
        batched = project(model, "conv2", images, units, method=method, spec=spec, chunk_size=3)
        for row, unit in enumerate(units):
            image = images[unit[0] : unit[0] + 1]
            alone = project(model, "conv2", image, [(0, *unit[1:].tolist())], method=method, spec=spec)
            assert_close(batched[row], alone[0], rtol=1e-6)


def test_unpooling_adds_values_whose_overlapping_windows_share_a_switch():
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out, switches = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    signal = torch.rand(out.shape, generator=torch.Generator().manual_seed(1))
    (expected,) = torch.autograd.grad(out, x, signal)  # max-pool backward: the exact transpose
    assert torch.allclose(_unpool(signal, switches, (9, 9)), expected)
    # Non-overlapping pools: same as F.max_unpool2d.
    out, switches = F.max_pool2d(x.detach(), 2, 2, return_indices=True)
    assert torch.equal(_unpool(out, switches, (9, 9)), F.max_unpool2d(out, switches, 2, 2, output_size=(9, 9)))


def test_layer_signal_keeps_only_the_unit_or_its_whole_map():
    rows = torch.rand(2, 3, 4, 4) + 0.5  # row u: the layer output of unit u's image
    single = layer_signal(rows, parse_units([(1, 2, 3, 0), (0, 1, 0, 2)], 2))
    assert single.count_nonzero() == 2
    assert single[0, 2, 3, 0] == rows[0, 2, 3, 0] and single[1, 1, 0, 2] == rows[1, 1, 0, 2]
    maps = layer_signal(rows, parse_units([(1, 2), (0, 0)], 2), signal="one")
    assert torch.equal(maps[0, 2], torch.ones(4, 4)) and torch.equal(maps[1, 0], torch.ones(4, 4))
    assert maps.sum() == 32
    fc = layer_signal(rows[:, :, 0, 0], parse_units([(0, 1), (1, 2)], 2))
    assert fc.count_nonzero() == 2 and fc[0, 1] == rows[0, 1, 0, 0]
    with pytest.raises(ValueError, match="need a conv layer"):
        layer_signal(rows[:, :, 0, 0], parse_units([(0, 1, 0, 0)], 2))


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x) + x)


def test_explicit_deconvnet_rejects_a_network_that_is_not_a_plain_stack():
    with pytest.raises(ValueError, match="not a plain stack"):
        ExplicitDeconvnet(_Residual()).project(torch.randn(1, 3, 8, 8), "relu", [(0, 0, 1, 1)])
    with pytest.raises(ValueError, match="cannot project through BatchNorm2d"):
        ExplicitDeconvnet(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()).project(
            torch.randn(1, 3, 8, 8), "2", [(0, 0, 1, 1)])


def test_strongest_units_point_at_each_maps_maximum():
    acts = torch.rand(2, 3, 5, 4)
    units = strongest_units(acts)
    assert units.shape == (6, 4)
    for b, c, y, x in units.tolist():
        assert acts[b, c, y, x] == acts[b, c].max()


def test_explicit_trace_is_reused_until_a_module_is_replaced():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 5), nn.ReLU())
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    first = ExplicitDeconvnet(model).trace(x[:1])
    assert ExplicitDeconvnet(model).trace(x[:1]) is first
    model[4] = nn.Linear(36, 5)  # a new module object: the old trace must not be used
    assert ExplicitDeconvnet(model).trace(x[:1]) is not first
    units = [(0, 3), (1, 0), (1, 4)]
    assert_close(project(model, "5", x, units, method="explicit"), project(model, "5", x, units))


def shared_units(acts, images_per_key=3, keys=4, seed=0):
    """Units that repeat each of `keys` (channel, y, x) on several images (as top-9 units of a map
    often do), so the explicit deconvnet's shared top is reused with different switches."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(keys):
        c = int(torch.randint(acts.shape[1], (1,), generator=gen))
        y, x = (int(torch.randint(n, (1,), generator=gen)) for n in acts.shape[2:])
        rows += [(b, c, y, x) for b in range(images_per_key)]
    return torch.tensor(rows)


@pytest.mark.parametrize("name,layer", [("alexnet", "conv5"), ("zfnet", "conv4"), ("lenet", "conv2"), ("alexnet", "conv1")])
@pytest.mark.parametrize("signal", ["activation", "one"])
def test_explicit_shared_top_equals_general_for_units_repeated_over_images(models, images, name, layer, signal):
    """Units with the same (channel, position) on different images share the projection's top
    half (above the highest max-pool) and still match the autograd deconvnet row by row."""
    model, spec = models[name], get_spec(name)
    acts = layer_acts(model, name, layer, images)
    units = shared_units(acts)
    explicit = project(model, layer, images, units, method="explicit", spec=spec, signal=signal, chunk_size=5)
    general = project(model, layer, images, units, method="general", spec=spec, signal=signal)
    assert (explicit.flatten(1).abs().amax(1) > 0).sum() >= 2  # not all zero
    assert_close(explicit, general)
    # The same key on different images really gives different projections (switches differ).
    if layer != "conv1":
        first = [r for r in range(len(units)) if explicit[r].abs().max() > 0]
        same_key = [r for r in first if tuple(units[r, 1:]) == tuple(units[first[0], 1:])]
        if len(same_key) > 1:
            assert not torch.allclose(explicit[same_key[0]], explicit[same_key[1]])


def test_explicit_projects_negative_activations_through_the_shared_top():
    """A layer with negative outputs (a conv without ReLU) projects -|a| units by homogeneity
    exactly as the autograd deconvnet does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 5, 3), nn.ReLU(), nn.Conv2d(5, 4, 3)).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        acts = model(x)
    negative = (acts < 0).nonzero()[:4]
    positive = (acts > 0).nonzero()[:4]
    units = torch.cat([negative, positive, negative[:1] * torch.tensor([0, 1, 1, 1]) + torch.tensor([2, 0, 0, 0])])
    explicit = project(model, "5", x, units, method="explicit")
    assert_close(explicit, project(model, "5", x, units))


@pytest.mark.parametrize("way", sorted(_TRANSPOSE_WAYS))
@pytest.mark.parametrize(
    "c_in,c_out,kernel,stride,padding,size",
    [(3, 96, 7, 2, 1, 64), (3, 64, 11, 4, 2, 64), (96, 16, 5, 2, 0, 15), (4, 8, 3, (2, 3), (1, 0), 17),
     (5, 7, (4, 3), 3, 2, 23), (2, 3, 1, 2, 0, 9), (3, 6, 5, 1, 0, 20)],
)
def test_every_transposed_filter_way_equals_conv_transpose(way, c_in, c_out, kernel, stride, padding, size):
    """The ways the deconvnet may pick for a layer's transposed filters (plain, channels-last,
    sub-pixel, sparse) give conv_transpose2d's result, including rows a stride dropped, for a
    dense signal, an unpooled-like one (90% zeros, whole positions and units without any
    non-zero) and an all-zero one."""
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding)
    dense = torch.randn_like(conv(torch.randn(3, c_in, size, size)))
    sparse = dense * (torch.rand_like(dense) < 0.1)
    sparse[1] = 0
    for signal in (dense, sparse, torch.zeros_like(dense)):
        (expected,) = torch.autograd.grad(conv(x := torch.randn(3, c_in, size, size, requires_grad=True)), x, signal)
        actual = _TRANSPOSE_WAYS[way](signal, conv, (size, size))
        assert actual.shape == expected.shape
        if signal.any():
            assert_close(actual, expected)
        else:
            assert not actual.any()


def test_the_sparse_way_is_offered_on_the_cpu_only():
    """nonzero() would make the host wait for a GPU, whose dense kernels are faster anyway."""
    from convviz.deconv import _transpose_ways

    conv = nn.Conv2d(96, 256, 5, 2)
    assert "sparse" in _transpose_ways(conv, torch.device("cpu"))
    assert "sparse" not in _transpose_ways(conv, torch.device("cuda"))
    assert "sparse" not in _transpose_ways(nn.Conv2d(96, 256, 5, 2, groups=2), torch.device("cpu"))


def test_explicit_backward_leaves_the_callers_signal_untouched(models, images):
    """Rectification runs in place on the projection's own intermediates, never on the input."""
    model = models["alexnet"]
    deconv = ExplicitDeconvnet(model, "alexnet")
    record = deconv.forward(images, "conv5")
    assert deconv.ops[len(record.in_shapes) - 1].kind == "relu"  # the first step rectifies
    signal = torch.randn_like(record.acts)
    before = signal.clone()
    out = deconv.backward(record, signal, torch.arange(len(images)))
    assert torch.equal(signal, before) and out.abs().max() > 0


def test_explicit_forward_leaves_the_callers_images_untouched():
    """The forward rectifies its own intermediates in place, never the images, even where a ReLU
    (behind a dropout that passes them on) is the stack's first step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2)).eval()
    images = torch.randn(2, 3, 8, 8)
    before = images.clone()
    record = ExplicitDeconvnet(model, {"top": model[4]}).forward(images, "top")
    assert torch.equal(images, before) and (images < 0).any() and record.acts.abs().max() > 0


def corner_and_shared_units(acts):
    """Units at the four corners of the map (windows reaching into the padding) on every image,
    plus the same (channel, position) repeated over images and a few active units."""
    h, w = acts.shape[-2:]
    corners = [(b, (3 * b + i) % acts.shape[1], y, x) for b in range(acts.shape[0])
               for i, (y, x) in enumerate([(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)])]
    return torch.cat([torch.tensor(corners), shared_units(acts), random_units(acts, 4, 0)])


@pytest.mark.parametrize("name,layer", [("lenet", "conv2"), ("alexnet", "conv1"), ("alexnet", "conv2"),
                                        ("zfnet", "conv2"), ("zfnet", "conv3"), ("alexnet", "conv5")])
@pytest.mark.parametrize("signal", ["activation", "one"])
def test_windowed_projection_equals_whole_map_projection(models, images, monkeypatch, name, layer, signal):
    """Projecting single units on their receptive-field windows (unpooling, rectification and
    transposed filters on the window only) gives the whole-map projection, also for windows that
    reach past the map's edges and are larger than the image (zfnet conv3, alexnet conv5, whose
    transposed filters follow one another with no unpooling between)."""
    model, spec = models[name], get_spec(name)
    units = corner_and_shared_units(layer_acts(model, name, layer, images))
    monkeypatch.setattr(deconv_window, "WINDOW_SHARE", 0.0)
    whole = project(model, layer, images, units, method="explicit", spec=spec, signal=signal, chunk_size=5)
    monkeypatch.setattr(deconv_window, "WINDOW_SHARE", float("inf"))
    deconv = ExplicitDeconvnet(model, spec)
    deconv.trace(images[:1])
    assert deconv_window.levels(deconv.ops, deconv._layer_index(deconv.resolve(layer)), (SIZE, SIZE)) is not None
    windowed = project(model, layer, images, units, method="explicit", spec=spec, signal=signal, chunk_size=5)
    assert (whole.flatten(1).abs().amax(1) > 0).sum() >= 4
    assert_close(windowed, whole)


def test_windowed_projection_of_negative_activations(monkeypatch):
    """Windows carry the sign of a negative activation (a conv without ReLU) like whole maps do."""
    monkeypatch.setattr(deconv_window, "WINDOW_SHARE", 4.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Conv2d(6, 5, 3), nn.ReLU(),
                          nn.Conv2d(5, 4, 3, padding=2, dilation=2)).eval()
    x = torch.randn(3, 3, 20, 20)
    with torch.no_grad():
        acts = model(x)
    units = torch.cat([(acts < 0).nonzero()[:5], (acts > 0).nonzero()[:5]])
    assert_close(project(model, "5", x, units, method="explicit"), project(model, "5", x, units))


@pytest.mark.parametrize("name", PLAIN)
def test_window_geometry_is_the_receptive_field(models, monkeypatch, name):
    """The pixel window of a unit is its receptive field as convviz.receptive derives it by
    another route (torch.fx over the whole graph): same side, stride and first pixel."""
    from convviz.receptive import receptive_fields

    monkeypatch.setattr(deconv_window, "WINDOW_SHARE", float("inf"))
    model, spec = models[name], get_spec(name)
    deconv = ExplicitDeconvnet(model, spec)
    deconv.trace(torch.zeros(1, 3, SIZE, SIZE))
    conv_layers = [layer for layer in spec.layers if layer.startswith("conv")]
    fields = receptive_fields(model, conv_layers, SIZE, spec)
    for layer in conv_layers:
        pixels = deconv_window.levels(deconv.ops, deconv._layer_index(deconv.resolve(layer)), (SIZE, SIZE))[0]
        rf = fields[layer]
        assert pixels.size == (rf.size, rf.size) and pixels.scale == (rf.stride, rf.stride), layer
        assert pixels.offset == (rf.first_pixel, rf.first_pixel), layer


def test_windows_are_used_only_where_the_receptive_field_is_small(models):
    """Small receptive fields (lenet conv2: 14 px, zfnet conv2: 27 px of 64) go by windows; layers
    that see most of the image (alexnet conv2: 51 px, conv5; fc layers) by whole maps."""
    chosen = {}
    for name, layer in [("lenet", "conv2"), ("zfnet", "conv2"), ("alexnet", "conv1"), ("alexnet", "conv2"),
                        ("alexnet", "conv5"), ("zfnet", "fc6")]:
        deconv = ExplicitDeconvnet(models[name], name)
        deconv.trace(torch.zeros(1, 3, SIZE, SIZE))
        levels = deconv_window.levels(deconv.ops, deconv._layer_index(deconv.resolve(layer)), (SIZE, SIZE))
        chosen[name, layer] = levels is not None
    assert chosen == {("lenet", "conv2"): True, ("zfnet", "conv2"): True, ("alexnet", "conv1"): True,
                      ("alexnet", "conv2"): False, ("alexnet", "conv5"): False, ("zfnet", "fc6"): False}


@pytest.mark.parametrize("shape,size", [((4, 96, 15, 15), 5), ((3, 7, 5, 6), 4), ((2, 3, 4, 4), 5), ((2, 10, 3, 3), 1),
                                        ((2, 16, 8), 3), ((1, 6, 3, 4, 5), 3)])
def test_local_response_norm_is_torchs_bit_for_bit(shape, size):
    """The explicit deconvnet's LRN gives exactly torch's values (a rounding difference could move
    a max-pool switch downstream), for odd and even windows, windows wider than the channels,
    channels-last input, and the ranks it hands to torch."""
    from convviz.deconv import local_response_norm

    torch.manual_seed(0)
    for scale in (0.01, 1.0, 30.0):
        x = torch.randn(shape) * scale
        for alpha, beta, k in [(1e-4, 0.75, 2.0), (0.5, 1.5, 1.0)]:
            expected = F.local_response_norm(x, size, alpha, beta, k)
            assert torch.equal(local_response_norm(x, size, alpha, beta, k), expected)
            if x.dim() == 4:  # the explicit forward may hand it a channels-last map
                assert torch.equal(local_response_norm(x.contiguous(memory_format=torch.channels_last), size, alpha, beta, k), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("name", list(ARCH))
def test_cuda_projections_equal_the_cpus(models, images, name):
    """Every deconvnet on CUDA (in full float32, as the analysis rules run it) against the same
    projections on the CPU: explicit (plain stacks), graph (resnet50) and general, every layer."""
    from convviz.machine import full_precision_float32

    full_precision_float32()
    model, spec = models[name], get_spec(name)
    cuda_model = copy.deepcopy(model).cuda()
    methods = ["general", "explicit" if spec.plain else "graph"]
    for seed, layer in enumerate(spec.layers):
        units = random_units(layer_acts(model, name, layer, images), 4, seed)
        for method in methods:
            cpu = project(model, layer, images, units, method=method, spec=spec)
            gpu = project(cuda_model, layer, images.cuda(), units, method=method, spec=spec)
            assert gpu.is_cuda
            assert_close(gpu.cpu(), cpu, rtol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", list(ARCH))
def test_deconvnet_forward_is_the_models_own_bit_for_bit(models, threads, name):
    """The explicit and graph deconvnets run their own forward pass (the colour convolution
    channels-last on a CPU, max-pooling channels-last). Every max-pool switch and the top layer's
    activations must be exactly those of the model's own forward with NCHW pooling, as Captum
    sees them: one rounding difference could move a switch and with it a projection."""
    from convviz.deconv_graph import graph_deconvnet

    model, spec = models[name], get_spec(name)
    images = torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2
    top = list(spec.layers)[-1] if name != "resnet50" else "layer4"
    module = model.get_submodule(spec.layers[top])
    pool_inputs, top_out = [], []
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    handles = [m.register_forward_hook(lambda m, a, o: pool_inputs.append((m, a[0].clone()))) for m in pools]
    handles.append(module.register_forward_hook(lambda m, a, o: top_out.append(o.clone())))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            model(images)
        for handle in handles:
            handle.remove()
        if name == "resnet50":
            deconvnet = graph_deconvnet(model)
            record = deconvnet.forward(images, deconvnet.node_for(module))
            switches, acts = list(record.switches.values()), record.value
        else:
            record = ExplicitDeconvnet(model, spec).forward(images, top)
            switches, acts = [s for s in record.switches if s is not None], record.acts
    finally:
        torch.set_num_threads(before)
        for handle in handles:
            handle.remove()  # again, where the model failed
    expected = [F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)[1]
                for m, x in pool_inputs]
    assert len(switches) == len(expected) > 0
    for got, want in zip(switches, expected):
        assert torch.equal(got, want)
    assert acts.is_contiguous() and torch.equal(acts, top_out[0])


def test_layer_names_are_resolved_with_errors_that_say_what_is_wrong(models, images):
    """A misspelt layer lists the valid ones; a spec of another architecture is refused, even for
    a layer whose module path both have (lenet's fc3 and alexnet's fc6 are both classifier.2),
    and for a model built outside the registry where the path is missing; a path without spec
    asks for one."""
    lenet = models["lenet"]
    with pytest.raises(ValueError, match=r"unknown layer 'conv9' for lenet; valid layers are \['conv1'"):
        project(lenet, "conv9", images, [(0, 0)], spec="lenet")
    for layer in ("conv5", "fc6"):
        with pytest.raises(ValueError, match=r"the model was built as 'lenet', not 'alexnet': its layers are \['conv1', 'conv2', 'fc3', 'fc4'\] \(pass spec='lenet'"):
            project(lenet, layer, images, [(0, 0)], spec="alexnet")
    unnamed = copy.deepcopy(lenet)
    del unnamed.convviz_model  # as a model built without build_model
    with pytest.raises(ValueError, match=r"does not match spec 'alexnet': it has no module 'features.11' for layer 'conv5'"):
        project(unnamed, "conv5", images, [(0, 0)], spec="alexnet")
    assert project(unnamed, "conv2", images, [(0, 0, 0, 0)], spec="lenet").shape == (1, *images.shape[1:])
    with pytest.raises(ValueError, match=r"'conv2' is neither a module path of the model nor a layer name \(pass spec=\)"):
        project(lenet, "conv2", images, [(0, 0)])
