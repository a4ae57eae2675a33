"""LeNet-5 for RGB inputs, plus the feature-map geometry helpers the plain models share.

LeNet-5 (LeCun et al. 1998) is the small baseline of the suite: two conv/ReLU/max-pool stages and
three fully connected layers. The original used tanh and subsampling; here it uses ReLU and
max-pooling so that the Zeiler & Fergus deconvnet (Sec. 2.1: unpool with switches, rectify, filter)
applies to it exactly as to the larger models.
"""

from __future__ import annotations

import torch
from torch import nn

# Largest input size the minimum-size search in `min_input_size` tries.
_MAX_SEARCH_SIZE = 1024


def _pair_first(value) -> int:
    """First element of a kernel/stride/padding value (torch stores ints or tuples; ours are square)."""
    return value[0] if isinstance(value, tuple) else value


def _window_out(size: int, kernel: int, stride: int, padding: int, dilation: int = 1, ceil_mode: bool = False) -> int:
    """Output length of a conv/pool window along one axis (the formula in the nn.Conv2d/nn.MaxPool2d docs)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    if ceil_mode:
        out = -(-span // stride) + 1
        # torch drops a last window that would start inside the right padding.
        if (out - 1) * stride >= size + padding:
            out -= 1
        return out
    return span // stride + 1


def feature_map_size(features: nn.Sequential, input_size: int) -> int:
    """Spatial side length of `features(x)` for a square `input_size` input, without running it.

    Walks the Conv2d and MaxPool2d modules (the only ones in our `features` stacks that change the
    spatial size). Returns a value < 1 as soon as some stage would have an empty output, which is
    where torch itself would raise a less helpful "output size is too small" error.
    """
    size = input_size
    for module in features:
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            dilation = _pair_first(module.dilation)
            ceil_mode = getattr(module, "ceil_mode", False)
            size = _window_out(
                size,
                _pair_first(module.kernel_size),
                _pair_first(module.stride),
                _pair_first(module.padding),
                dilation,
                ceil_mode,
            )
            if size < 1:
                return size
    return size


def min_input_size(features: nn.Sequential) -> int:
    """Smallest square input for which every stage of `features` has a non-empty output."""
    for size in range(1, _MAX_SEARCH_SIZE + 1):
        if feature_map_size(features, size) >= 1:
            return size
    raise ValueError(f"no input size up to {_MAX_SEARCH_SIZE} fits these features")


def check_input_size(model_name: str, features: nn.Sequential, input_size: int) -> int:
    """Return the final feature-map side for `input_size`, or raise a ValueError naming the minimum."""
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 1:
        raise ValueError(f"{model_name}: input_size must be a positive int, got {input_size!r}")
    size = feature_map_size(features, input_size)
    if size < 1:
        raise ValueError(
            f"{model_name} needs input_size >= {min_input_size(features)} "
            f"(got {input_size}): smaller inputs shrink to nothing before the classifier"
        )
    return size


class LeNet(nn.Module):
    """LeNet-5 with ReLU and max-pooling, for 3-channel inputs of any size from 16 up.

    Layout (module paths are what `convviz.models.registry` points at):
      features:   0 conv1 6@5x5, 1 ReLU, 2 maxpool 2, 3 conv2 16@5x5, 4 ReLU, 5 maxpool 2
      classifier: 0 Dropout, 1 fc3 120, 2 ReLU, 3 Dropout, 4 fc4 84, 5 ReLU, 6 fc5 num_classes
    The Dropout modules are always present (identity at p=0, the default) so layer paths never
    depend on the config.
    """

    def __init__(self, num_classes: int, input_size: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        # The classic 16*5*5 = 400 holds only for 32x32 inputs; compute it for the actual size.
        side = check_input_size("lenet", self.features, input_size)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def lenet(num_classes: int, input_size: int, dropout: float = 0.0) -> LeNet:
    """Build LeNet-5. LeNet-5 had no dropout, hence the default 0; `fc_width` does not apply."""
    return LeNet(num_classes=num_classes, input_size=input_size, dropout=dropout)
