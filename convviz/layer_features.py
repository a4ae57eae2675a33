"""Frozen features of analysis layers: hooks that see every layer in one forward pass, the
flattened feature vectors of a batch (invariance, correspondence), and the fixed-size pooled
vectors the transfer probes train on (Sec. 5.2, Table 7).

Pooling: a convolutional feature map [B, C, h, w] is average-pooled (adaptive, PyTorch's
`adaptive_avg_pool2d`) to min(pool_size, h) x min(pool_size, w) and flattened channel-major,
giving C * p * p numbers per image; fc outputs [B, F] are used as they are. So every layer
gives a vector whose length does not depend on the input size, and conv1 of a 96-channel net at
pool_size 2 gives 384 numbers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convviz.analysis import image_batches, with_oom_retry
from convviz.models.registry import layer_modules, resolve_layers


@contextlib.contextmanager
def observe_layers(
    model: nn.Module, model_name: str, layers, observe: Callable[[str, torch.Tensor], None]
) -> Iterator[list[str]]:
    """Call ``observe(layer, output)`` for every analysis layer as the forward pass reaches it.

    The callback must reduce or copy the output at once: ResNet's in-place ReLUs may overwrite
    it later in the same pass. Yields the resolved layer names (network order).
    """
    modules = layer_modules(model, model_name, layers)
    handles = [
        module.register_forward_hook(lambda _m, _args, output, layer=layer: observe(layer, output))
        for layer, module in modules.items()
    ]
    try:
        yield list(modules)
    finally:
        for handle in handles:
            handle.remove()


def forward_features(
    model: nn.Module, model_name: str, images: torch.Tensor, layers=None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({layer: [B, D] flattened feature map}, logits [B, K]) of ``images`` in one forward pass.

    layers: analysis layer names of the registry (None: all), returned in network order. Each
    output is copied as the hook sees it (ResNet's in-place ReLUs overwrite a block's output
    later in the same pass).
    """
    captured: dict[str, torch.Tensor] = {}

    def keep(layer, output):
        captured[layer] = output.detach().flatten(1).clone()

    with torch.no_grad(), observe_layers(model, model_name, layers, keep) as names:
        logits = model(images)
    return {layer: captured[layer] for layer in names}, logits


def pool_feature_map(output: torch.Tensor, pool_size: int) -> torch.Tensor:
    """[B, C, h, w] -> [B, C * p_h * p_w] with p = min(pool_size, side); [B, F] unchanged."""
    if output.ndim == 2:
        return output
    if output.ndim != 4:
        raise ValueError(f"expected a [B, C, h, w] or [B, F] layer output, got shape {tuple(output.shape)}")
    h, w = output.shape[-2:]
    return F.adaptive_avg_pool2d(output, (min(pool_size, h), min(pool_size, w))).flatten(1)


def extract_features(
    model: nn.Module,
    model_name: str,
    dataset,
    *,
    layers=None,
    pool_size: int = 2,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    log=print,
) -> dict[str, np.ndarray]:
    """Pooled features of every image of ``dataset`` (an ImageDataset) at each analysis layer.

    Returns {layer: float32 [N, D_layer]} in dataset order. ``model`` must be in eval mode on
    ``device``; one forward pass per batch feeds every layer.
    """
    names = resolve_layers(model_name, layers)
    t0 = time.time()

    def work(size: int) -> dict[str, np.ndarray]:
        chunks: dict[str, list[torch.Tensor]] = {name: [] for name in names}

        def keep(layer, output):
            chunks[layer].append(pool_feature_map(output.detach().float(), pool_size).cpu())

        with torch.inference_mode(), observe_layers(model, model_name, names, keep):
            for images, _ in image_batches(dataset, size):
                model(images.to(device))
        return {name: torch.cat(parts).numpy() for name, parts in chunks.items()}

    features = with_oom_retry(work, batch_size, log, what="feature extraction")
    dims = ", ".join(f"{k} {v.shape[1]}" for k, v in features.items())
    log(f"features of {len(dataset)} images at {len(names)} layers ({dims}) in {time.time() - t0:.1f}s")
    return features
