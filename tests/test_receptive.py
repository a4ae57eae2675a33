"""Receptive fields: symbolic geometry vs known values and an independent gradient oracle.

The oracle backpropagates from single units of a copy of the network in which every pixel that
CAN influence a unit does so with a strictly positive weight: conv/linear weights are positive
averages, biases 0, inputs positive, ReLU/BatchNorm/LRN/Dropout are identities (per-position
ops: same geometry) and max-pools are average-pools of the same geometry (a max routes gradient
to one pixel only; an average over the same window reaches every pixel the max could have
chosen). The set of input pixels with nonzero gradient must then be exactly the computed box.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from convviz.models.registry import ModelSpec, build_model, get_spec, layer_modules
from convviz.receptive import RField, receptive_fields, unit_box

SMALL_FC = {"fc_width": 32, "dropout": 0.0}


class _Stop(Exception):
    """Raised by a hook to skip the rest of the forward pass (deeper layers are not needed)."""


def _identity_like(module: nn.Module) -> nn.Module | None:
    """The oracle's replacement for `module`, or None to keep it (with positive weights)."""
    if isinstance(module, (nn.ReLU, nn.BatchNorm2d, nn.LocalResponseNorm, nn.Dropout)):
        return nn.Identity()
    if isinstance(module, nn.MaxPool2d):
        assert module.dilation in (1, (1, 1)), "avg-pool has no dilation; oracle cannot mirror it"
        return nn.AvgPool2d(module.kernel_size, module.stride, module.padding, ceil_mode=module.ceil_mode)
    return None


def oracle_model(model: nn.Module) -> nn.Module:
    """Copy of `model` whose input gradients are > 0 exactly on each unit's receptive field."""
    # Input gradients only: weight gradients would multiply the cost of every backward pass.
    oracle = copy.deepcopy(model).float().eval().requires_grad_(False)
    for parent in list(oracle.modules()):
        for name, child in parent.named_children():
            replacement = _identity_like(child)
            if replacement is not None:
                setattr(parent, name, replacement)
    with torch.no_grad():
        for module in oracle.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                # Averaging weights keep activations near 1 at every depth (no overflow).
                module.weight.fill_(1.0 / module.weight[0].numel())
                if module.bias is not None:
                    module.bias.zero_()
    return oracle


def gradient_support(oracle: nn.Module, path: str, units: list[tuple[int, int]], input_size: int) -> torch.Tensor:
    """[len(units), S, S] bool: input pixels with nonzero gradient for channel 0 at each unit.

    `oracle` is an `oracle_model`. Image i of the batch backpropagates from units[i] only
    (samples do not interact in eval mode).
    """
    captured = {}

    def hook(_module, _inputs, output):
        captured["out"] = output
        raise _Stop

    handle = oracle.get_submodule(path).register_forward_hook(hook)
    x = torch.ones(len(units), 3, input_size, input_size, requires_grad=True)
    try:
        oracle(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    out = captured["out"]
    picked = [out[i, 0, y, x_] if out.dim() == 4 else out[i, 0] for i, (y, x_) in enumerate(units)]
    torch.stack(picked).sum().backward()
    return x.grad.abs().sum(dim=1) > 0


def box_mask(box: tuple[int, int, int, int], input_size: int) -> torch.Tensor:
    y0, x0, y1, x1 = box
    mask = torch.zeros(input_size, input_size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def probe_units(rf: RField) -> list[tuple[int, int]]:
    """Corners (clipped boxes), near-corners and the centre of a feature map, without repeats."""
    h, w = rf.output_size
    units = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2), (min(1, h - 1), min(2, w - 1))]
    return list(dict.fromkeys(units))


def bounding_box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def assert_matches_oracle(
    model: nn.Module, paths: dict[str, str], fields: dict[str, RField], input_size: int, dense: bool = True
) -> None:
    """With `dense` (no dilation: no holes) each probed unit's gradient support fills its box
    exactly. Otherwise the support lies inside the box, and for units away from the border the
    box is the support's bounding box (near the border the box is the clipped hull of the
    dilated lattice, which can start on a pixel the lattice skips)."""
    oracle = oracle_model(model)
    for layer, rf in fields.items():
        units = probe_units(rf)
        support = gradient_support(oracle, paths[layer], units, input_size)
        for i, (y, x) in enumerate(units):
            box = unit_box(rf, y, x, input_size)
            if dense:
                assert torch.equal(support[i], box_mask(box, input_size)), f"{layer} unit ({y}, {x}): box {box}"
            else:
                assert not (support[i] & ~box_mask(box, input_size)).any(), f"{layer} unit ({y}, {x}) leaks"
                if box[2] - box[0] == rf.size and box[3] - box[1] == rf.size:
                    assert bounding_box(support[i]) == box, f"{layer} unit ({y}, {x}): box {box}"


# ------------------------------------------------------------------------------------- known values


def test_alexnet_known_values_at_224():
    model = build_model("alexnet", 10, 224, SMALL_FC)
    rf = receptive_fields(model, ["conv1", "conv5", "fc6"], 224, "alexnet")
    assert (rf["conv1"].size, rf["conv1"].stride, rf["conv1"].output_size) == (11, 4, (55, 55))
    assert (rf["conv5"].size, rf["conv5"].stride, rf["conv5"].output_size) == (163, 16, (13, 13))
    assert unit_box(rf["fc6"], 0, 0, 224) == (0, 0, 224, 224)


def test_zfnet_known_values_at_224():
    rf = receptive_fields(build_model("zfnet", 10, 224, SMALL_FC), None, 224, "zfnet")
    assert (rf["conv1"].size, rf["conv1"].stride, rf["conv1"].output_size) == (7, 2, (110, 110))
    # 7x7/2 pad 1 conv1: unit 0 starts one pixel into the padding.
    assert rf["conv1"].first_pixel == -1
    assert unit_box(rf["conv1"], 0, 0, 224) == (0, 0, 6, 6)
    assert rf["conv5"].output_size == (13, 13)
    assert list(rf) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]


def test_resnet50_main_path_at_224():
    """torchvision's ResNet-50 (stride on the 3x3): 7 -> 11 (pool) -> 35 -> 91 -> 267 -> 427."""
    rf = receptive_fields(build_model("resnet50", 10, 224), None, 224, "resnet50")
    assert {k: (v.size, v.stride) for k, v in rf.items() if k != "pool"} == {
        "conv1": (7, 2),
        "layer1": (35, 4),
        "layer2": (91, 8),
        "layer3": (267, 16),
        "layer4": (427, 32),
    }
    assert rf["layer4"].output_size == (7, 7)
    assert unit_box(rf["pool"], 0, 0, 224) == (0, 0, 224, 224)


# ------------------------------------------------------------------------------- gradient oracle


# Sizes chosen so some layers crop their last input rows (floor-rounded strides): lenet at 45
# never sees row 44, zfnet at 99 loses rows 96-98 at conv2, alexnet at 99 loses 97-98 at pool1.
@pytest.mark.parametrize(
    ("name", "input_size"),
    [("lenet", 32), ("lenet", 45), ("alexnet", 99), ("zfnet", 99)],
)
def test_plain_models_match_gradient_oracle(name, input_size):
    model = build_model(name, 5, input_size, SMALL_FC)
    fields = receptive_fields(model, None, input_size, name)
    assert_matches_oracle(model, get_spec(name).layers, fields, input_size)


def test_cropped_rows_are_outside_every_box():
    fields = receptive_fields(build_model("lenet", 5, 45), None, 45, "lenet")
    assert fields["fc3"].reach == 44
    assert unit_box(fields["fc3"], 0, 0, 45) == (0, 0, 44, 44)
    assert unit_box(fields["conv1"], 40, 40, 45) == (40, 40, 45, 45)


def test_resnet50_matches_gradient_oracle_at_64():
    """conv1, and layer2: through seven bottlenecks, one strided (RF 91 > 64: boxes clip)."""
    model = build_model("resnet50", 5, 64)
    fields = receptive_fields(model, ["conv1", "layer2"], 64, "resnet50")
    assert_matches_oracle(model, get_spec("resnet50").layers, fields, 64)


# ----------------------------------------------------------------------- models outside the registry


def test_custom_sequential_with_dilation_avgpool_and_ceil_mode():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=2, dilation=2),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),  # even kernel: half-integer centres
        nn.Conv2d(4, 4, 5, stride=3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(3, stride=2, padding=1),
    )
    paths = {"a": "1", "b": "2", "c": "4", "d": "5"}
    fields = receptive_fields(model, None, 41, paths)
    assert (fields["a"].size, fields["a"].stride, fields["a"].first_pixel) == (5, 1, -2)
    assert (fields["b"].size, fields["b"].stride, fields["b"].start) == (6, 2, 0.5)
    # A dilated kernel sees a lattice of pixels: the box is that lattice's bounding box.
    assert_matches_oracle(model, paths, fields, 41, dense=False)


class _Residual(nn.Module):
    """Two 3x3 convs with a strided 1x1 shortcut: a non-chain graph like a ResNet block."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.shortcut = nn.Conv2d(3, 4, 1, stride=2)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


def test_residual_branch_union_is_the_larger_path():
    model = _Residual()
    fields = receptive_fields(model, None, 20, {"out": "relu", "shortcut": "shortcut"})
    assert (fields["out"].size, fields["out"].stride) == (7, 2)
    assert (fields["shortcut"].size, fields["shortcut"].stride) == (1, 2)
    assert_matches_oracle(model, {"out": "relu"}, {"out": fields["out"]}, 20)


# ------------------------------------------------------------------------------------------ errors


def test_unknown_layer_and_out_of_range_unit():
    model = build_model("lenet", 5, 32)
    with pytest.raises(ValueError, match="valid layers"):
        receptive_fields(model, ["conv9"], 32, "lenet")
    rf = receptive_fields(model, "conv1", 32, "lenet")["conv1"]
    with pytest.raises(ValueError, match="outside"):
        unit_box(rf, 28, 0, 32)


def test_accepts_model_spec_and_layer_modules_agree():
    model = build_model("lenet", 5, 32)
    spec = ModelSpec("tiny", lambda *a: model, {"c1": "features.1"}, "c1", "c1", "c1", True)
    assert receptive_fields(model, None, 32, spec)["c1"].size == 5
    assert set(layer_modules(model, "lenet")) == set(receptive_fields(model, None, 32, "lenet"))
