"""Data-dependent bias init: centre every hidden layer's outputs on a batch of training images.

Nets without BatchNorm (alexnet, zfnet) start with nearly the same features for every image:
after a few conv/ReLU/max-pool layers at He init, two images' top features have cosine
similarity ~0.96 (measured on the synthetic set), so the gradient that tells classes apart is
tiny and training sits at chance for its first ~8 epochs. Krähenbühl et al. (ICLR 2016,
"Data-dependent initializations of convolutional neural networks") set each layer's
parameters from the statistics of its outputs on real images; `center_biases` does the mean
part: layer by layer, in one forward pass, each conv/linear layer's bias is shifted so that
its output has zero mean per channel over the batch (and positions), so each ReLU after it
splits the images instead of passing (or blocking) them all. Weights are unchanged (scaling
them to unit variance as well trained worse here). Layers without a bias (resnet50's convs,
which BatchNorm centres anyway) and the last layer (the classifier head) are left alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def centred_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the conv/linear layers `center_biases` shifts: all but the last, with a bias."""
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    return [(name, module) for name, module in layers[:-1] if module.bias is not None]


@torch.no_grad()
def center_biases(model: nn.Module, images: Tensor) -> list[str]:
    """Shift the biases of `model`'s hidden conv/linear layers so their outputs on `images`
    [N, 3, H, W] have zero mean per channel; returns the names of the layers changed.

    One forward pass in eval mode (no dropout): a hook on each layer subtracts the mean from
    its output as well as from its bias, so the layers after it see the centred values, as
    they will after the init. The model's train/eval mode is restored.
    """
    hidden = centred_layers(model)
    changed: list[str] = []
    if not hidden:
        return changed

    def hook(name: str):
        def centre(module: nn.Module, _inputs, output: Tensor) -> Tensor | None:
            if name in changed:  # a module run twice in one pass is centred on its first output
                return None
            dims = [0] + list(range(2, output.dim()))  # all but the channel dim
            mean = output.mean(dim=dims)
            module.bias.sub_(mean.to(module.bias.dtype))
            changed.append(name)
            return output - mean.view(1, -1, *([1] * (output.dim() - 2)))

        return centre

    was_training = model.training
    handles = [module.register_forward_hook(hook(name)) for name, module in hidden]
    try:
        model.eval()
        model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return changed
