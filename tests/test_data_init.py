"""Data-dependent bias init (`train.center_init`): hidden layers' outputs centred, nothing else touched."""

import pytest
import torch
from torch import nn

from convviz.models.data_init import center_biases
from convviz.models.registry import build_model


def layer_outputs(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every conv/linear layer's output on `images`, copied by plain hooks before any in-place ReLU (eval mode)."""
    outputs, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out.clone())))
    model.eval()
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return outputs


@pytest.mark.parametrize(("name", "arch"), [("lenet", {}), ("alexnet", {"fc_width": 64, "init": "kaiming"}),
                                            ("zfnet", {"fc_width": 64, "init": "kaiming"})])
def test_every_hidden_layer_output_has_zero_mean_per_channel_and_only_biases_change(name, arch):
    torch.manual_seed(0)
    model = build_model(name, 5, 64, arch)
    images = torch.randn(24, 3, 64, 64) * 0.5 + 0.3  # a common offset, as real images have
    before = {key: value.clone() for key, value in model.state_dict().items()}
    raw = layer_outputs(model, images)
    model.train()

    changed = center_biases(model, images)

    assert model.training  # mode restored
    layers = list(raw)
    assert changed == layers[:-1]  # every hidden layer, in network order; not the head
    after = layer_outputs(model, images)
    for layer in layers[:-1]:
        out = after[layer]
        dims = [0] + list(range(2, out.dim()))
        scale = raw[layer].abs().max()
        assert out.mean(dim=dims).abs().max() <= 1e-5 * scale, layer
        # Before, some channels were far from centred (else the test proves nothing).
        assert raw[layer].mean(dim=dims).abs().max() > 1e-2 * scale, layer
    state = model.state_dict()
    moved = {key for key in state if not torch.equal(state[key], before[key])}
    assert moved == {f"{layer}.bias" for layer in layers[:-1]}


def test_layers_without_bias_and_the_head_are_left_alone():
    # resnet50's pattern: bias-free convs followed by BatchNorm, then the fc head.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    assert center_biases(model, torch.randn(6, 3, 16, 16) + 1.0) == []
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_a_module_run_twice_in_one_pass_is_centred_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.fc(self.fc(x)))

    torch.manual_seed(0)
    model = Twice()
    x = torch.randn(32, 4) + 2.0
    with torch.no_grad():
        first = model.fc(x)
    assert center_biases(model, x) == ["fc"]
    with torch.no_grad():
        assert model.fc(x).mean(0).abs().max() <= 1e-5 * first.abs().max()
