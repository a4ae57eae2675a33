"""The Zeiler & Fergus (2014) ImageNet model of Fig. 3, with the paper's init and filter renormalisation.

Fig. 3: 224x224 input -> conv1 96@7x7 stride 2 -> ReLU -> 3x3 max-pool stride 2 -> contrast norm
-> conv2 256@5x5 stride 2 -> ReLU -> 3x3 max-pool stride 2 -> contrast norm -> conv3 384@3x3
-> conv4 384@3x3 -> conv5 256@3x3 -> 3x3 max-pool stride 2 -> fc6 4096 -> fc7 4096 -> softmax.
Feature maps are 110, 55, 26, 13, 13 and 6 pixels wide; the paddings below reproduce those.
"""

from __future__ import annotations

import torch
from torch import nn

from convviz.models.lenet import check_input_size

DEFAULT_FILTER_RADIUS = 0.1  # Sec. 3: "a fixed radius of 10^-1"
INIT_STD = 0.01  # Sec. 3: weights initialised to 10^-2, biases to 0


def _contrast_norm() -> nn.LocalResponseNorm:
    """Local contrast normalisation across feature maps (Sec. 3; AlexNet's LRN constants, k=2)."""
    return nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)


class ZFNet(nn.Module):
    """The 8-layer network of Fig. 3.

    Layout (module paths are what `convviz.models.registry` points at):
      features:   0 conv1, 1 ReLU, 2 pool1, 3 norm1, 4 conv2, 5 ReLU, 6 pool2, 7 norm2,
                  8 conv3, 9 ReLU, 10 conv4, 11 ReLU, 12 conv5, 13 ReLU, 14 pool5
      classifier: 0 Dropout, 1 fc6, 2 ReLU, 3 Dropout, 4 fc7, 5 ReLU, 6 fc8
    ReLUs are not in-place, so a hook on a conv module keeps its pre-rectification output intact.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        input_size: int = 224,
        fc_width: int = 4096,
        dropout: float = 0.5,
        filter_radius: float = DEFAULT_FILTER_RADIUS,
        init: str = "paper",
    ) -> None:
        super().__init__()
        self.filter_radius = filter_radius
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=7, stride=2, padding=1),  # 224 -> 110
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),  # 110 -> 55
            _contrast_norm(),
            nn.Conv2d(96, 256, kernel_size=5, stride=2),  # 55 -> 26
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),  # 26 -> 13
            _contrast_norm(),
            nn.Conv2d(256, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),  # 13 -> 6
        )
        # 256*6*6 at 224 px as in Fig. 3; computed so smaller (CPU-sized) inputs work too.
        side = check_input_size("zfnet", self.features, input_size)
        # Sec. 3: dropout (rate 0.5) in the fully connected layers 6 and 7.
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * side * side, fc_width),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(fc_width, fc_width),
            nn.ReLU(),
            nn.Linear(fc_width, num_classes),
        )
        self._init_weights(init)

    def _init_weights(self, init: str) -> None:
        """Sec. 3 ("paper"): weights N(0, 0.01^2), biases 0. That start needs the paper's ~70 epochs
        to leave chance level; "kaiming" (He et al. 2015, fan-in, ReLU gain) trains in a few epochs,
        which is what a CPU-sized run needs. Filter renormalisation applies either way."""
        if init not in ("paper", "kaiming"):
            raise ValueError(f"zfnet init must be 'paper' or 'kaiming', got {init!r}")
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                if init == "paper":
                    nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
                else:
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        if init == "kaiming":
            # A zero classifier starts at exactly ln(classes) loss: no early spike that kills ReLUs.
            nn.init.zeros_(self.classifier[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)

    @torch.no_grad()
    def renormalize_filters(self, radius: float | None = None) -> torch.Tensor:
        """Rescale every conv filter whose RMS exceeds `radius` to RMS exactly `radius`.

        Sec. 3: "we renormalize each filter in the convolutional layers whose RMS value exceeds a
        fixed radius of 10^-1 to this fixed radius" -- this keeps the first-layer filters from
        being dominated by a few (Fig. 6). A filter is one output channel's weights (all input
        channels and taps); biases are left alone. Meant to run after every optimiser step.
        Returns how many filters were rescaled as a 0-d tensor on the weights' device (an int
        would force a GPU->CPU sync on every training step).
        """
        radius = self.filter_radius if radius is None else radius
        if not radius > 0:
            raise ValueError(f"filter radius must be > 0, got {radius!r}")
        rescaled = torch.zeros((), dtype=torch.long, device=self.features[0].weight.device)
        for module in self.features:
            if isinstance(module, nn.Conv2d):
                weight = module.weight
                rms = weight.pow(2).mean(dim=(1, 2, 3)).sqrt()
                too_big = rms > radius
                # Filters within the radius keep a scale of exactly 1 (bit-identical weights).
                scale = torch.where(too_big, radius / rms.clamp_min(torch.finfo(rms.dtype).tiny), torch.ones_like(rms))
                weight.mul_(scale.view(-1, 1, 1, 1))
                rescaled += too_big.sum()
        return rescaled


def zfnet(
    num_classes: int,
    input_size: int,
    fc_width: int = 4096,
    dropout: float = 0.5,
    filter_radius: float = DEFAULT_FILTER_RADIUS,
    init: str = "paper",
) -> ZFNet:
    """Build the Fig. 3 model; the smallest usable input is 53 px (raises ValueError below that)."""
    return ZFNet(
        num_classes=num_classes,
        input_size=input_size,
        fc_width=fc_width,
        dropout=dropout,
        filter_radius=filter_radius,
        init=init,
    )
