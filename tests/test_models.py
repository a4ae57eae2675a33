"""Models: the registry's layer names, the Fig. 3 geometry, filter renormalisation, safe checkpoints."""

import os
import pickle
import shlex
from functools import lru_cache

import pytest
import torch
from torch import nn

from convviz.models import (
    MODELS,
    CheckpointError,
    build_model,
    get_spec,
    layer_modules,
    load_checkpoint,
    load_model,
    resolve_layers,
    save_checkpoint,
)
from convviz.models.lenet import feature_map_size, min_input_size

# Narrow fc6/fc7 keep every test fast on a CPU; the layer structure is unchanged.
SMALL = {"fc_width": 32}

EXPECTED_CHANNELS = {
    "lenet": {"conv1": 6, "conv2": 16, "fc3": 120, "fc4": 84},
    "alexnet": {"conv1": 64, "conv2": 192, "conv3": 384, "conv4": 256, "conv5": 256, "fc6": 32, "fc7": 32},
    "zfnet": {"conv1": 96, "conv2": 256, "conv3": 384, "conv4": 384, "conv5": 256, "fc6": 32, "fc7": 32},
    "resnet50": {"conv1": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048, "pool": 2048},
}


@lru_cache(maxsize=None)
def forward_at_64(name: str) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]]]:
    """One eval forward of a 10-class `name` on a 2x3x64x64 batch: (logits shape, hooked layer shapes)."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, input_size=64, arch_cfg=SMALL).eval()
    shapes = {}
    for layer, module in layer_modules(model, name).items():
        module.register_forward_hook(lambda mod, inp, out, layer=layer: shapes.__setitem__(layer, tuple(out.shape)))
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    return tuple(logits.shape), shapes


def small_net(name: str = "zfnet", num_classes: int = 10, **cfg) -> nn.Module:
    """A 64 px model; narrow fc layers where the model has them."""
    arch_cfg = cfg if name == "lenet" else {**SMALL, **cfg}
    return build_model(name, num_classes=num_classes, input_size=64, arch_cfg=arch_cfg)


# ---------------------------------------------------------------------------------- registry


def test_registry_names_the_four_models_and_their_roles():
    assert list(MODELS) == ["lenet", "alexnet", "zfnet", "resnet50"]
    assert [(s.first_conv, s.top_conv, s.penultimate, s.plain) for s in MODELS.values()] == [
        ("conv1", "conv2", "fc4", True),
        ("conv1", "conv5", "fc7", True),
        ("conv1", "conv5", "fc7", True),
        ("conv1", "layer4", "pool", False),
    ]


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_builds_at_64px_and_returns_one_logit_per_class(name):
    logits_shape, _ = forward_at_64(name)
    assert logits_shape == (2, 10)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_analysis_layer_hook_fires_with_expected_channel_count(name):
    _, shapes = forward_at_64(name)
    assert list(shapes) == list(MODELS[name].layers)  # every layer fired, in network order
    assert {layer: shape[1] for layer, shape in shapes.items()} == EXPECTED_CHANNELS[name]


@pytest.mark.parametrize("name", ["lenet", "zfnet"])
def test_plain_models_use_relu_and_maxpool_modules_so_hooks_see_every_stage(name):
    model = small_net(name)
    kinds = {type(m) for m in model.modules()}
    assert nn.ReLU in kinds and nn.MaxPool2d in kinds
    for path in MODELS[name].layers.values():
        assert isinstance(model.get_submodule(path), nn.ReLU)


def test_unknown_model_name_error_lists_valid_models():
    with pytest.raises(ValueError, match="vgg16.*lenet.*alexnet.*zfnet.*resnet50"):
        get_spec("vgg16")
    with pytest.raises(ValueError, match="lenet"):
        build_model("vgg16", 10, 64)


def test_unknown_layer_name_error_lists_valid_layers():
    with pytest.raises(ValueError, match=r"conv9.*conv1.*conv5.*fc7"):
        resolve_layers("zfnet", ["conv1", "conv9"])


def test_resolve_layers_none_means_all_and_results_come_in_network_order():
    assert resolve_layers("resnet50", None) == ["conv1", "layer1", "layer2", "layer3", "layer4", "pool"]
    assert resolve_layers("zfnet", ["fc7", "conv2", "conv2"]) == ["conv2", "fc7"]
    assert resolve_layers("lenet", "conv2") == ["conv2"]


def test_layer_modules_returns_only_the_requested_layers():
    model = small_net("lenet")
    modules = layer_modules(model, "lenet", ["conv2"])
    assert list(modules) == ["conv2"] and modules["conv2"] is model.features[4]


def test_layer_names_of_another_architecture_are_refused_even_where_the_paths_exist():
    """alexnet's fc6/fc7 paths (classifier.2/.5) exist in lenet too: without the check they would
    silently give lenet's fc3/fc4."""
    model = small_net("lenet")
    assert model.convviz_model == "lenet"
    with pytest.raises(ValueError, match=r"the model was built as 'lenet', not 'alexnet'.*pass spec='lenet'"):
        layer_modules(model, "alexnet", ["fc6"])


def test_unknown_arch_cfg_key_is_rejected_by_name():
    with pytest.raises(ValueError, match="fc_widht"):
        build_model("zfnet", 10, 64, {"fc_widht": 16})


@pytest.mark.parametrize(
    "cfg", [{"fc_width": 0}, {"fc_width": 16.5}, {"dropout": 1.0}, {"filter_radius": -0.1}, {"weights": 3}]
)
def test_out_of_range_arch_cfg_values_are_rejected(cfg):
    with pytest.raises(ValueError, match=next(iter(cfg))):
        build_model("zfnet", 10, 64, cfg)


def test_keys_a_model_has_no_use_for_are_ignored():
    model = build_model("lenet", 10, 64, {"fc_width": 16, "filter_radius": 0.2, "dropout": 0.3})
    assert model.classifier[1].out_features == 120  # LeNet-5's widths are fixed
    assert model.classifier[0].p == 0.3


def test_fc_width_sets_both_hidden_layers_of_alexnet_and_zfnet():
    for name in ("alexnet", "zfnet"):
        model = build_model(name, 7, 64, {"fc_width": 24})
        fc6, fc7, fc8 = (model.classifier[i] for i in (1, 4, 6))
        assert (fc6.out_features, fc7.in_features, fc7.out_features, fc8.in_features, fc8.out_features) == (
            24, 24, 24, 24, 7,
        )


# ------------------------------------------------------------------------------ geometry / zfnet


def test_zfnet_feature_map_sizes_at_224_match_paper_fig3():
    model = build_model("zfnet", 1000, 224, SMALL).eval()
    # conv1, pool1, conv2, pool2, conv5, pool5 (Fig. 3: 110, 55, 26, 13, 13, 6)
    probes = {"conv1": 0, "pool1": 2, "conv2": 4, "pool2": 6, "conv5": 12, "pool5": 14}
    sizes = {}
    for label, index in probes.items():
        model.features[index].register_forward_hook(
            lambda mod, inp, out, label=label: sizes.__setitem__(label, tuple(out.shape[1:]))
        )
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    assert sizes == {
        "conv1": (96, 110, 110),
        "pool1": (96, 55, 55),
        "conv2": (256, 26, 26),
        "pool2": (256, 13, 13),
        "conv5": (256, 13, 13),
        "pool5": (256, 6, 6),
    }
    assert model.classifier[1].in_features == 256 * 6 * 6


def test_zfnet_uses_contrast_normalisation_after_the_first_two_pools():
    features = small_net("zfnet").features
    assert [type(features[i]) for i in (3, 7)] == [nn.LocalResponseNorm] * 2
    assert (features[3].size, features[3].alpha, features[3].beta, features[3].k) == (5, 1e-4, 0.75, 2.0)


def test_zfnet_below_its_minimum_input_size_raises_naming_the_minimum():
    with pytest.raises(ValueError, match=r"zfnet needs input_size >= 53 \(got 32\)"):
        build_model("zfnet", 10, 32)


@pytest.mark.parametrize("name", ["lenet", "alexnet", "zfnet"])
def test_computed_feature_map_size_agrees_with_torch_down_to_the_minimum(name):
    features = small_net(name).features.eval()
    smallest = min_input_size(features)
    for size in (smallest, smallest + 1, 64, 97):
        with torch.no_grad():
            out = features(torch.zeros(1, 3, size, size))
        assert out.shape[-1] == feature_map_size(features, size)
    with pytest.raises(RuntimeError):
        features(torch.zeros(1, 3, smallest - 1, smallest - 1))


def test_zfnet_init_is_gaussian_with_std_1e_2_and_zero_biases():
    model = build_model("zfnet", 10, 224)  # full size: enough weights for a tight std estimate
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert torch.all(module.bias == 0)
            assert module.weight.std().item() == pytest.approx(0.01, rel=0.05)


def _rms(weight: torch.Tensor) -> torch.Tensor:
    return weight.pow(2).mean(dim=(1, 2, 3)).sqrt()


def test_renormalize_filters_rescales_only_filters_whose_rms_exceeds_the_radius():
    model = small_net("zfnet")
    conv1, conv3 = model.features[0], model.features[8]
    with torch.no_grad():
        conv1.weight[0].fill_(0.3)  # RMS 0.3 > 0.1: must become exactly 0.1 (every weight 0.1)
        conv1.weight[1].copy_(torch.linspace(-2, 2, conv1.weight[1].numel()).view_as(conv1.weight[1]))
        conv1.weight[2].fill_(0.09)  # RMS 0.09, just inside the radius: left alone
        conv3.weight[5].fill_(-0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rms1 = _rms(before["features.0.weight"])[1].item()  # by hand: sqrt(mean(linspace^2)), about 1.16

    rescaled = model.renormalize_filters()

    assert int(rescaled) == 3
    after = dict(model.named_parameters())
    assert torch.allclose(after["features.0.weight"][0], torch.full_like(conv1.weight[0], 0.1))
    assert torch.allclose(after["features.0.weight"][1], before["features.0.weight"][1] * (0.1 / rms1))
    assert torch.allclose(after["features.8.weight"][5], torch.full_like(conv3.weight[5], -0.1))
    assert torch.allclose(_rms(after["features.0.weight"][:2]), torch.tensor([0.1, 0.1]))
    # Every other filter (within the radius) and every bias and fc weight is bit-identical.
    untouched = torch.ones(conv1.weight.shape[0], dtype=torch.bool)
    untouched[:2] = False
    assert torch.equal(after["features.0.weight"][untouched], before["features.0.weight"][untouched])
    for name, value in before.items():
        if name not in ("features.0.weight", "features.8.weight"):
            assert torch.equal(after[name], value), name


def test_renormalize_filters_accepts_a_radius_and_the_configured_default():
    model = small_net("zfnet", filter_radius=0.005)
    assert model.filter_radius == 0.005
    model.renormalize_filters()  # N(0, 0.01) filters have RMS about 0.01 > 0.005
    assert torch.all(_rms(model.features[0].weight) <= 0.005 + 1e-7)
    model.renormalize_filters(radius=0.001)
    assert torch.allclose(_rms(model.features[12].weight), torch.full((256,), 0.001))


# ----------------------------------------------------------------------------------- weights names


@pytest.mark.parametrize("name", ["lenet", "zfnet"])
def test_pretrained_weights_names_are_refused_for_models_without_them(name):
    with pytest.raises(ValueError, match="no pretrained"):
        build_model(name, 10, 64, {"weights": "IMAGENET1K_V1"})


@pytest.mark.parametrize("name, valid", [("alexnet", "IMAGENET1K_V1"), ("resnet50", "IMAGENET1K_V2")])
def test_unknown_torchvision_weights_name_lists_the_valid_ones_without_downloading(name, valid):
    with pytest.raises(ValueError, match=valid):
        build_model(name, 10, 64, {"weights": "IMAGENET1K_V9"})


def test_pretrained_alexnet_needs_the_torchvision_fc_width():
    with pytest.raises(ValueError, match="fc_width=4096"):
        build_model("alexnet", 10, 64, {"weights": "IMAGENET1K_V1", "fc_width": 64})


def test_pretrained_alexnet_loads_imagenet_weights_then_gets_a_fresh_head(monkeypatch):
    import torchvision.models._api as tv_api

    torch.manual_seed(1)
    reference = build_model("alexnet", 1000, 64).state_dict()  # stands in for the download
    urls = []

    def fake_download(url, *args, **kwargs):
        urls.append(url)
        return reference

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", fake_download)
    model = build_model("alexnet", 10, 64, {"weights": "IMAGENET1K_V1"})
    assert urls and urls[0].endswith(".pth")
    state = model.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference if not k.startswith("classifier.6"))
    assert model.classifier[6].out_features == 10


# ------------------------------------------------------------------------------------- checkpoints


def _save(path, name="lenet", num_classes=10, **cfg):
    torch.manual_seed(2)
    model = small_net(name, num_classes, **cfg)
    arch_cfg = {**SMALL, **cfg} if name != "lenet" else cfg
    save_checkpoint(path, name, model, epoch=3, num_classes=num_classes, input_size=64, arch_cfg=arch_cfg,
                    extra={"history": [0.5, 0.25]})
    return model.eval()


@pytest.mark.parametrize("name, cfg", [("lenet", {}), ("zfnet", {"dropout": 0.3, "filter_radius": 0.2})])
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, name, cfg):
    path = tmp_path / "model.pt"
    original = _save(path, name, **cfg)
    loaded, meta = load_model(path)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))
    assert not loaded.training
    assert meta["model"] == name and meta["epoch"] == 3 and meta["history"] == [0.5, 0.25]
    assert meta["format"] == "convviz-checkpoint-v1" and "state_dict" not in meta
    if name == "zfnet":
        assert loaded.filter_radius == 0.2 and loaded.classifier[0].p == 0.3


def test_checkpoint_path_as_weights_keeps_a_fresh_head_for_another_class_count(tmp_path):
    path = tmp_path / "lenet10.pt"
    source = _save(path, "lenet", num_classes=10).state_dict()
    model = build_model("lenet", 5, 64, {"weights": str(path)})
    state = model.state_dict()
    assert model.classifier[6].out_features == 5
    assert all(torch.equal(state[k], source[k]) for k in source if not k.startswith("classifier.6"))


def test_bare_state_dict_is_accepted_as_weights_but_not_by_load_model(tmp_path):
    source = small_net("lenet")
    torch.save(source.state_dict(), tmp_path / "raw.pt")
    model = build_model("lenet", 10, 64, {"weights": tmp_path / "raw.pt"})
    assert torch.equal(model.features[0].weight, source.features[0].weight)
    with pytest.raises(CheckpointError, match="bare state dict"):
        load_model(tmp_path / "raw.pt")


def test_missing_checkpoint_error_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_checkpoint_is_reported_as_corrupt(tmp_path, keep):
    path = tmp_path / "model.pt"
    _save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"model.pt is truncated or corrupt.*delete it and rerun"):
        load_model(path)


def test_checkpoint_with_damaged_weights_is_reported_before_use(tmp_path):
    """Bytes flipped inside a tensor's data leave a readable archive that torch loads as wrong
    weights; the archive's CRC-32 check catches them and names the entry."""
    import struct
    import zipfile

    path = tmp_path / "model.pt"
    _save(path)
    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[entry.header_offset + 26 : entry.header_offset + 30])
    middle = entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"model.pt is corrupt: its entry '{entry.filename}' fails its CRC-32"):
        load_model(path)


def test_random_bytes_are_not_called_a_checkpoint(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).tolist()))
    with pytest.raises(CheckpointError, match=r"noise.pt(: it is not a torch.save archive| is truncated or corrupt)"):
        load_checkpoint(path)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "lenet.pt"
    lenet = _save(path, "lenet")
    with pytest.raises(CheckpointError, match="holds a lenet model, not zfnet"):
        build_model("zfnet", 10, 64, {**SMALL, "weights": path})
    # Without metadata, the mismatching keys are listed instead.
    torch.save(lenet.state_dict(), tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match=r"do not fit the zfnet.*features\.0\.weight"):
        build_model("zfnet", 10, 64, {**SMALL, "weights": tmp_path / "raw.pt"})
    # Metadata that lies about the model is caught by the strict load.
    checkpoint = load_checkpoint(path)
    checkpoint.update(model="zfnet", arch_cfg=SMALL)
    torch.save(checkpoint, tmp_path / "liar.pt")
    with pytest.raises(CheckpointError, match="liar.pt.*do not fit the zfnet"):
        load_model(tmp_path / "liar.pt")


def test_checkpoint_with_another_fc_width_lists_the_mismatching_shapes(tmp_path):
    path = tmp_path / "zf.pt"
    _save(path, "zfnet")  # fc_width 32
    with pytest.raises(CheckpointError, match=r"classifier\.1\.weight: \(32, 256\) in file vs \(64, 256\)"):
        build_model("zfnet", 10, 64, {"fc_width": 64, "weights": path})


class _Payload:
    """Unpickling this runs a shell command: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.command = f"echo hacked > {shlex.quote(str(marker))}"

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the plain-pickle file
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path, writer):
    marker = tmp_path / "hacked"
    path = tmp_path / "evil.pt"
    obj = {"format": "convviz-checkpoint-v1", "state_dict": {}, "x": _Payload(marker)}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    for load in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError, match="refused to load .*evil.pt.*only load checkpoints you trust"):
            load(path)
    with pytest.raises(CheckpointError, match="refused"):
        build_model("lenet", 10, 64, {"weights": path})
    assert not marker.exists()
    # Control: the payload is live, so the assertion above is not vacuous.
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def test_save_checkpoint_rejects_extras_that_could_not_be_loaded_back(tmp_path):
    model = small_net("lenet")
    common = dict(epoch=1, num_classes=10, input_size=64, arch_cfg={})
    with pytest.raises(TypeError, match="_Payload"):
        save_checkpoint(tmp_path / "a.pt", "lenet", model, **common, extra={"x": _Payload(tmp_path / "m")})
    with pytest.raises(ValueError, match="clash"):
        save_checkpoint(tmp_path / "a.pt", "lenet", model, **common, extra={"epoch": 2})
    assert not (tmp_path / "a.pt").exists()
    save_checkpoint(tmp_path / "b.pt", "lenet", model, epoch=1, num_classes=10, input_size=64,
                    arch_cfg={"weights": tmp_path / "init.pt"})
    assert load_checkpoint(tmp_path / "b.pt")["arch_cfg"]["weights"] == str(tmp_path / "init.pt")
