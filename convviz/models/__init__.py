"""Models of the suite and the registry of analysis-layer names (see `registry`)."""

from convviz.models.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from convviz.models.registry import (
    ARCH_KEYS,
    MODELS,
    ModelSpec,
    build_model,
    get_spec,
    layer_modules,
    resolve_layers,
)
from convviz.models.zfnet import ZFNet

__all__ = [
    "ARCH_KEYS",
    "MODELS",
    "CheckpointError",
    "ModelSpec",
    "ZFNet",
    "build_model",
    "get_spec",
    "layer_modules",
    "load_checkpoint",
    "load_model",
    "resolve_layers",
    "save_checkpoint",
]
