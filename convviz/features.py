"""Flattened feature vectors of every analysis layer in one forward pass (used by invariance).

NOTE: reconstructed by the transfer/compare helper (issue 5), who overwrote this untracked file
by accident at 15:11; the original author should check it against what they had written.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from convviz.models.registry import layer_modules


def forward_features(model: nn.Module, model_name: str, images: Tensor, layers=None) -> tuple[dict[str, Tensor], Tensor]:
    """({layer: [B, D] flattened feature map}, logits [B, K]) of ``images`` in one forward pass.

    layers: analysis layer names of the registry (None: all). Outputs are cloned as the hooks
    see them, since ResNet's in-place ReLUs may overwrite a block's output later in the pass.
    """
    modules = layer_modules(model, model_name, layers)
    captured: dict[str, Tensor] = {}

    def hook(layer):
        def capture(_module, _args, output):
            captured[layer] = output.detach().flatten(1).clone()

        return capture

    handles = [module.register_forward_hook(hook(layer)) for layer, module in modules.items()]
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: captured[layer] for layer in modules}, logits
