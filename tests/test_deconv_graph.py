"""The graph deconvnet (convviz.deconv_graph) gives the autograd deconvnet's projections, faster.

The oracle is `method="general"` (autograd with the deconvnet's ReLU rule), itself tested against
Captum's NeuronDeconvolution in tests/test_deconv.py.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convviz.deconv import forward_to, project
from convviz.deconv_graph import GraphDeconvnet, graph_deconvnet, graph_unsupported
from convviz.models import build_model, get_spec
from convviz.top9 import choose_method


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class Branchy(nn.Module):
    """A small ResNet-like net: BatchNorm with non-trivial statistics, an overlapping max-pool, a
    residual block with a strided 1x1 shortcut, 3x3 and 5x5 stride-1 convolutions (where Winograd applies),
    in-place ReLU modules used several times, a node read by two branches, torch.flatten."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.bn0 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.a = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(12)
        self.b = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(12)
        self.short = nn.Conv2d(8, 12, 1, stride=2, bias=False)
        self.c = nn.Conv2d(12, 12, 5, padding=2)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.pool(self.relu(self.bn0(self.stem(x))))
        y = self.relu(self.bn_a(self.a(x)))
        y = self.bn_b(self.b(y))
        y = self.relu(y + self.short(x))
        z = self.relu(self.c(y)) + y  # y read by two branches
        return self.fc(torch.flatten(self.avg(z), 1))


@pytest.fixture(scope="module")
def branchy():
    torch.manual_seed(0)
    model = Branchy().eval()
    for bn in (model.bn0, model.bn_a, model.bn_b):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return model


def assert_close(actual, expected, rtol=1e-5):
    scale = expected.abs().max()
    assert scale > 0, "a projection that is all zero proves nothing"
    assert (actual - expected).abs().max() <= rtol * scale


def units_of(acts, count, seed, whole_map=False):
    where = (acts > 0).nonzero()
    pick = where[torch.randperm(len(where), generator=torch.Generator().manual_seed(seed))[:count]]
    return pick[:, :2] if whole_map else pick


@pytest.mark.parametrize("way", [None, "deconv", "channels_last", "winograd", "matmul"])
@pytest.mark.parametrize("signal", ["activation", "one"])
@pytest.mark.parametrize("layer", ["bn_b", "c", "fc"])
def test_graph_equals_autograd_on_a_branching_net(branchy, way, signal, layer):
    """Every way of running the transposed filters (tuned, or each forced where it applies) gives
    the autograd deconvnet's projections: single positions (shared top over repeated keys), whole
    maps, fc neurons."""
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    module = branchy.get_submodule(layer)
    with torch.no_grad():
        acts = forward_to(branchy, module, images)
    deconv = GraphDeconvnet(branchy)
    deconv.force_way = way
    if acts.ndim == 2:
        unit_sets = [units_of(acts, 6, 0, whole_map=True)]
    else:
        single = units_of(acts, 6, 0)
        repeated = torch.cat([single, single[:3]])  # keys shared by several units
        repeated[-3:, 0] = (repeated[-3:, 0] + 1) % 4  # ... on other images
        unit_sets = [repeated, units_of(acts, 4, 1, whole_map=True)]
    for units in unit_sets:
        expected = project(branchy, layer, images, units, method="general", signal=signal)
        assert_close(deconv.project(images, module, units, signal=signal), expected)


def test_the_split_is_the_max_pool_every_path_passes(branchy):
    deconv = GraphDeconvnet(branchy)
    fc = deconv.node_for(branchy.fc)
    assert deconv.split_node(fc).target == "pool"
    assert deconv.split_node(deconv.node_for(branchy.stem)) is deconv.input  # no max-pool below

    class TwoPools(nn.Module):  # two max-pools side by side: neither is passed by every path
        def __init__(self):
            super().__init__()
            self.conv, self.mix = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.p1, self.p2 = nn.MaxPool2d(2), nn.MaxPool2d(2)
            self.top = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            x = self.conv(x)
            return self.top(self.p1(x) + self.p2(self.mix(x)))

    twin = TwoPools().eval()
    deconv = GraphDeconvnet(twin)
    assert deconv.split_node(deconv.node_for(twin.top)) is None
    images = torch.randn(2, 3, 16, 16)
    units = torch.tensor([[0, 1, 3, 4], [1, 2, 5, 6], [1, 1, 3, 4]])
    expected = project(twin, "top", images, units, method="general")
    assert_close(deconv.project(images, twin.top, units), expected)


@pytest.mark.parametrize("signal", ["activation", "one"])
def test_a_layer_that_is_a_max_pool_unpools_with_each_images_switches(signal):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 4, 3), nn.ReLU(),
                          nn.MaxPool2d(2)).eval()
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    for layer in ("2", "5"):
        with torch.no_grad():
            acts = forward_to(model, model.get_submodule(layer), images)
        units = units_of(acts, 5, 0)
        units = torch.cat([units, units[:2] * torch.tensor([0, 1, 1, 1]) + torch.tensor([2, 0, 0, 0])])  # same keys, image 2
        expected = project(model, layer, images, units, method="general", signal=signal)
        assert_close(GraphDeconvnet(model).project(images, model.get_submodule(layer), units, signal=signal), expected)


@pytest.mark.parametrize("layer", ["layer1", "layer3", "pool"])
def test_graph_equals_autograd_on_resnet50(layer):
    torch.manual_seed(0)
    model = build_model("resnet50", 10, 64, None).eval()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    module = model.get_submodule(get_spec("resnet50").layers[layer])
    with torch.no_grad():
        acts = forward_to(model, module, images)
    units = units_of(acts, 5, 0, whole_map=acts.shape[-1] == 1)
    expected = project(model, layer, images, units, method="general", spec="resnet50")
    assert_close(project(model, layer, images, units, method="graph", spec="resnet50"), expected)
    if layer == "layer1":  # a unit whose activation is zero projects to exact zeros
        dead = (acts == 0).nonzero()[:3]
        assert len(dead) and not project(model, layer, images, dead, method="graph", spec="resnet50").any()


def test_weights_are_read_at_each_projection(branchy):
    """The traced graph is cached per model; BatchNorm folding and Winograd's filters are redone
    from the live weights, so a changed model projects as autograd says."""
    import copy

    model = copy.deepcopy(branchy)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    units = torch.tensor([[0, 3, 1, 1], [1, 5, 2, 0]])
    graph_deconvnet(model).force_way = "winograd"
    project(model, "c", images, units, method="graph")
    with torch.no_grad():
        model.b.weight.mul_(-1.5)
        model.bn_b.running_var.mul_(3.0)
        model.c.weight.add_(0.1)
    expected = project(model, "c", images, units, method="general")
    assert_close(project(model, "c", images, units, method="graph"), expected)


def test_a_replaced_submodule_is_traced_again(branchy):
    """The cached trace calls the submodules it was traced with: after `model.c = new conv` the
    projection must go through the new one, as autograd's does."""
    import copy

    model = copy.deepcopy(branchy)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    units = torch.tensor([[0, 3, 1, 1], [1, 5, 2, 0]])
    project(model, "c", images, units, method="graph")
    torch.manual_seed(5)
    model.c = nn.Conv2d(12, 12, 3, padding=1)
    expected = project(model, "c", images, units, method="general")
    assert_close(project(model, "c", images, units, method="graph"), expected)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.cat([F.relu(self.conv(x)), x[:, :1, 1:-1, 1:-1]], 1)


def test_unsupported_ops_are_named_and_auto_falls_back_to_autograd():
    model = Functional().eval()
    why = graph_unsupported(model)
    assert why is not None and "relu" in why and "method='general'" in why
    with pytest.raises(ValueError, match="relu"):
        GraphDeconvnet(model)
    assert choose_method("resnet50", "auto", model) == "general"
    assert choose_method("resnet50", "auto", build_model("resnet50", 10, 64, None)) == "graph"
    assert choose_method("alexnet", "auto") == "explicit"
