"""The one registry of models and analysis-layer names that every study speaks.

Each model is a plain PyTorch module built by `build_model(name, num_classes, input_size,
arch_cfg)`. Analysis code never hard-codes module paths: it asks the registry for a layer name
("conv1", "fc7", "layer4", ...) and gets the module whose OUTPUT is that layer's feature map
(post-ReLU), ready for a forward hook.

arch_cfg keys (all optional):
  fc_width       width of the fc6/fc7 hidden layers (alexnet, zfnet; default 4096)
  dropout        dropout rate before fc6/fc7 (default 0.5; lenet 0.0)
  weights        None, a torchvision weights name such as "IMAGENET1K_V1" (alexnet, resnet50),
                 or a path to a .pt file (a convviz checkpoint or a bare state dict)
  filter_radius  RMS radius of `ZFNet.renormalize_filters` (zfnet; default 0.1, Sec. 3)
  init           weight init: zfnet "paper" (N(0, 0.01^2), Sec. 3) or "kaiming"; alexnet
                 "torchvision" or "kaiming" (He init leaves chance level within a few epochs)
A key a model has no use for (e.g. fc_width for lenet) is ignored, so one config can serve all
models; a key outside this list is an error.
"""

from __future__ import annotations

import inspect
import logging
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torchvision.models as tvm
from torch import nn

from convviz.layer_names import ANALYSIS_LAYERS
from convviz.models.checkpoint import load_weights
from convviz.models.lenet import check_input_size, lenet
from convviz.models.zfnet import zfnet

log = logging.getLogger(__name__)

ARCH_KEYS = ("fc_width", "dropout", "weights", "filter_radius", "init")
_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_IMAGENET_CLASSES = 1000
_TORCHVISION_FC_WIDTH = 4096
BUILT_AS = "convviz_model"  # attribute build_model sets on a model: its registry name


@dataclass(frozen=True)
class ModelSpec:
    """What the analysis code needs to know about one model.

    layers: ordered (bottom to top) analysis layer name -> dotted module path whose output is that
    layer's (post-ReLU) feature map. plain: the model is a plain conv/ReLU/max-pool/LRN/linear
    stack, so the explicit deconvnet of Sec. 2.1 applies to it.
    """

    name: str
    builder: Callable[..., nn.Module]
    layers: dict[str, str]
    first_conv: str
    top_conv: str
    penultimate: str
    plain: bool

    def __post_init__(self) -> None:
        for role in ("first_conv", "top_conv", "penultimate"):
            if getattr(self, role) not in self.layers:
                raise ValueError(f"{self.name}: {role} {getattr(self, role)!r} is not one of its layers")


# ------------------------------------------------------------------------- torchvision-based builders


def _torchvision_weights(enum_cls, model_name: str, weights):
    """Resolve a torchvision weights name (e.g. "IMAGENET1K_V1", "DEFAULT") without downloading."""
    if weights is None or isinstance(weights, enum_cls):
        return weights
    try:
        return enum_cls[weights]
    except KeyError:
        raise ValueError(
            f"{model_name}: unknown torchvision weights {weights!r}; valid names are "
            f"{list(enum_cls.__members__)}, or give a path to a .pt file"
        ) from None


def _replace_head(model: nn.Module, head_path: str, num_classes: int, model_name: str) -> None:
    """Swap the pretrained 1000-way head for a fresh one sized for this dataset (transfer, Sec. 5.2)."""
    parent_path, _, attr = head_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))
    log.info(
        "%s: replaced the pretrained %d-class head %r with a fresh %d-class one",
        model_name, old.out_features, head_path, num_classes,
    )


def _load_pretrained(model: nn.Module, tv_weights, num_classes: int, head_path: str, model_name: str) -> None:
    """Load torchvision weights into a 1000-class model (downloads), then resize the head if needed."""
    # The same call torchvision's own builders make; needs the network or a filled torch hub cache.
    model.load_state_dict(tv_weights.get_state_dict(progress=True, check_hash=True))
    if num_classes != _IMAGENET_CLASSES:
        _replace_head(model, head_path, num_classes, model_name)


def alexnet(
    num_classes: int,
    input_size: int,
    fc_width: int = _TORCHVISION_FC_WIDTH,
    dropout: float = 0.5,
    weights=None,
    init: str = "torchvision",
) -> nn.Module:
    """torchvision's AlexNet with the fc6/fc7 width configurable (narrow heads train on a CPU).

    `features` and `avgpool` (AdaptiveAvgPool2d((6, 6))) are exactly torchvision's, so ImageNet
    weights load unchanged; the smallest input is 63 px.
    """
    tv_weights = _torchvision_weights(tvm.AlexNet_Weights, "alexnet", weights)
    if tv_weights is not None and fc_width != _TORCHVISION_FC_WIDTH:
        raise ValueError(
            f"alexnet: pretrained weights {weights!r} need fc_width={_TORCHVISION_FC_WIDTH}, got {fc_width}"
        )
    head_classes = _IMAGENET_CLASSES if tv_weights is not None else num_classes
    model = tvm.alexnet(weights=None, num_classes=head_classes, dropout=dropout)
    check_input_size("alexnet", model.features, input_size)
    if fc_width != _TORCHVISION_FC_WIDTH:
        # Same positions as torchvision's classifier: 1 fc6, 4 fc7, 6 fc8.
        in_features = model.classifier[1].in_features
        model.classifier[1] = nn.Linear(in_features, fc_width)
        model.classifier[4] = nn.Linear(fc_width, fc_width)
        model.classifier[6] = nn.Linear(fc_width, num_classes)
    if init == "kaiming":
        # He init of the conv layers: without BatchNorm, torchvision's default start stalls at
        # chance for many epochs on small datasets. The fc layers keep torchvision's init: at
        # small inputs AdaptiveAvgPool2d((6, 6)) repeats each conv5 value up to 36 times, so a
        # fan-in init of fc6 would blow up its output.
        for module in model.features.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        # A zero classifier starts at exactly ln(classes) loss: no early spike that kills ReLUs.
        nn.init.zeros_(model.classifier[6].weight)
        nn.init.zeros_(model.classifier[6].bias)
    elif init != "torchvision":
        raise ValueError(f"alexnet init must be 'torchvision' or 'kaiming', got {init!r}")
    if tv_weights is not None:
        _load_pretrained(model, tv_weights, num_classes, "classifier.6", "alexnet")
    return model


def resnet50(num_classes: int, input_size: int, weights=None) -> nn.Module:
    """torchvision's ResNet-50 (not a plain stack: the deconvnet falls back to gradients there)."""
    tv_weights = _torchvision_weights(tvm.ResNet50_Weights, "resnet50", weights)
    if not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"resnet50: input_size must be a positive int, got {input_size!r}")
    head_classes = _IMAGENET_CLASSES if tv_weights is not None else num_classes
    # zero_init_residual: each block starts as the identity (Goyal et al. 2017), which keeps a
    # from-scratch run on a small dataset stable; pretrained weights overwrite it anyway.
    model = tvm.resnet50(weights=None, num_classes=head_classes, zero_init_residual=True)
    if tv_weights is not None:
        _load_pretrained(model, tv_weights, num_classes, "fc", "resnet50")
    return model


# ----------------------------------------------------------------------------------------- registry

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="lenet",
            builder=lenet,
            layers=ANALYSIS_LAYERS["lenet"],
            first_conv="conv1",
            top_conv="conv2",
            penultimate="fc4",
            plain=True,
        ),
        ModelSpec(
            name="alexnet",
            builder=alexnet,
            layers=ANALYSIS_LAYERS["alexnet"],
            first_conv="conv1",
            top_conv="conv5",
            penultimate="fc7",
            plain=True,
        ),
        ModelSpec(
            name="zfnet",
            builder=zfnet,
            layers=ANALYSIS_LAYERS["zfnet"],
            first_conv="conv1",
            top_conv="conv5",
            penultimate="fc7",
            plain=True,
        ),
        ModelSpec(
            name="resnet50",
            builder=resnet50,
            layers=ANALYSIS_LAYERS["resnet50"],
            first_conv="conv1",
            top_conv="layer4",
            penultimate="pool",
            plain=False,
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`; ValueError listing the valid names otherwise."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; valid models are {list(MODELS)}") from None


def _check_arch_cfg(arch_cfg: dict) -> None:
    """Reject unknown keys and out-of-range values before anything is built or downloaded."""
    unknown = [key for key in arch_cfg if key not in ARCH_KEYS]
    if unknown:
        raise ValueError(f"unknown arch_cfg key(s) {unknown}; valid keys are {list(ARCH_KEYS)}")
    fc_width = arch_cfg.get("fc_width")
    if fc_width is not None and (not isinstance(fc_width, int) or isinstance(fc_width, bool) or fc_width < 1):
        raise ValueError(f"arch_cfg fc_width must be a positive int, got {fc_width!r}")
    dropout = arch_cfg.get("dropout")
    if dropout is not None and (not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1):
        raise ValueError(f"arch_cfg dropout must be a number in [0, 1), got {dropout!r}")
    radius = arch_cfg.get("filter_radius")
    if radius is not None and (not isinstance(radius, numbers.Real) or not radius > 0):
        raise ValueError(f"arch_cfg filter_radius must be a number > 0, got {radius!r}")
    weights = arch_cfg.get("weights")
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise ValueError(f"arch_cfg weights must be None, a torchvision weights name or a path, got {weights!r}")


def _is_weights_path(weights: str | os.PathLike) -> bool:
    """Tell a file path from a torchvision weights name such as "IMAGENET1K_V1"."""
    if isinstance(weights, os.PathLike):
        return True
    return weights.endswith(_WEIGHT_FILE_SUFFIXES) or "/" in weights or os.sep in weights or Path(weights).is_file()


def _builder_keys(builder: Callable[..., nn.Module]) -> set[str]:
    """The arch_cfg keys a builder accepts (its parameters after num_classes and input_size)."""
    return set(inspect.signature(builder).parameters) - {"num_classes", "input_size"}


def build_model(name: str, num_classes: int, input_size: int, arch_cfg: dict | None = None) -> nn.Module:
    """Build registry model `name` for `num_classes` classes and square `input_size` inputs.

    `arch_cfg["weights"]` may name torchvision weights (alexnet, resnet50: built with the 1000-class
    head, loaded, then the head is replaced if num_classes differs) or a path to a .pt file (a
    convviz checkpoint or bare state dict; a head of another class count is left fresh).
    """
    spec = get_spec(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    cfg = {key: value for key, value in dict(arch_cfg or {}).items() if value is not None}
    _check_arch_cfg(cfg)
    weights = cfg.pop("weights", None)
    accepted = _builder_keys(spec.builder)
    ignored = sorted(key for key in cfg if key not in accepted)
    if ignored:
        log.debug("%s ignores arch_cfg key(s) %s", name, ignored)
    kwargs = {key: value for key, value in cfg.items() if key in accepted}

    if weights is None:
        model = spec.builder(num_classes, input_size, **kwargs)
    elif _is_weights_path(weights):
        model = load_weights(spec.builder(num_classes, input_size, **kwargs), weights, name)
    elif "weights" not in accepted:
        raise ValueError(
            f"{name} has no pretrained torchvision weights (got weights={weights!r}); "
            "train it first and pass the checkpoint path instead"
        )
    else:
        model = spec.builder(num_classes, input_size, weights=weights, **kwargs)
    setattr(model, BUILT_AS, name)
    return model


def check_built_as(model: nn.Module, name: str) -> None:
    """ValueError if `model` was built by `build_model` as another registry model than `name`.

    Layer names map to module paths, and models share paths (lenet's fc3 and alexnet's fc6 are
    both classifier.2), so another spec's names could silently pick the wrong layer. A model
    built elsewhere carries no name and is taken at its word.
    """
    built = getattr(model, BUILT_AS, None)
    if built is not None and built != name:
        raise ValueError(
            f"the model was built as {built!r}, not {name!r}: its layers are {list(get_spec(built).layers)} "
            f"(pass spec={built!r}, the model's own architecture)"
        )


def resolve_layers(name: str, layers: list[str] | str | None) -> list[str]:
    """Validate analysis layer names for model `name`; None means all of them.

    Returned in network order (bottom to top) without duplicates; a single string is one layer.
    """
    known = get_spec(name).layers
    if layers is None:
        return list(known)
    requested = [layers] if isinstance(layers, str) else list(layers)
    unknown = [layer for layer in requested if layer not in known]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown} for {name}; valid layers are {list(known)}")
    return [layer for layer in known if layer in requested]


def layer_modules(model: nn.Module, name: str, layers: list[str] | str | None = None) -> dict[str, nn.Module]:
    """Analysis layer name -> the module of `model` (a `name` model) whose output is that feature map."""
    paths = get_spec(name).layers
    check_built_as(model, name)
    return {layer: model.get_submodule(paths[layer]) for layer in resolve_layers(name, layers)}
