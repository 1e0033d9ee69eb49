"""The convolutional baseline the ViT is compared with: torchvision's ResNet-18, adapted to small images.

The paper's comparison (section 4.3, figures 3 and 4) is ViT against ResNets trained on the same data. For images of
28 or 32 pixels the ImageNet stem (a 7x7 convolution of stride 2 and a max-pool, 4x down before the first stage) would
leave a 7x7 map for stage 1 and 1x1 for stage 4, so the stem here is one 3x3 convolution and no max-pool. Its stride
is 2 by default: stage 1 sees 14x14 for Fashion-MNIST and stage 4 2x2. The CIFAR habit of stride 1 (`stem_stride=1`,
stage 1 at full resolution) costs four times the compute, 2.7 GFLOPs per 28 px training image against 0.73 at stride 2
(the ViT Ti/4 of the default recipe: 0.08), and a baseline meant to be of similar training compute to the ViT's should
not spend 33 times its FLOPs (9 times at stride 2). Everything else is torchvision's `resnet18` (BasicBlocks [2, 2, 2,
2], BatchNorm, its initialisation), with `in_chans` input channels; its `fc` is named `head`, as the ViT's classifier
is.

The model offers the surface of a classifier the trainer, the evaluation and the few-shot probe use:
`forward(x)`, `forward_features(x)` (the pooled 512-d feature), `forward_head(features, pre_logits)`,
`num_features`, `reset_classifier(n)`, `head` and `cfg`. It has no patch tokens: the ViT-only parts of vitkit
(PatchDropout, masked patch prediction, attention maps, weight conversion) refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

ARCHITECTURE = "resnet18"
"""The value of `cfg.architecture` (and of `--model.name`) that names this model."""


@dataclass
class ResNetConfig:
    """Everything needed to rebuild the baseline; stored next to saved weights like a ViTConfig."""

    img_size: tuple[int, int] = (28, 28)
    """The training image size (informative: the global average pool takes any size of at least 8x8)."""
    in_chans: int = 3
    num_classes: int = 10
    """Classes of the head; 0 means no head (forward returns the pooled 512-d feature)."""
    stem_stride: int = 2
    """Stride of the 3x3 stem convolution: 2 (the default) or 1 (stage 1 at full resolution, 4x the compute)."""
    name: str = field(default="ResNet-18", compare=False)
    architecture: str = ARCHITECTURE
    """Tells a stored config of this model from a ViT's (the weights loaders refuse it by this key)."""

    def __post_init__(self) -> None:
        if isinstance(self.img_size, int):
            self.img_size = (self.img_size, self.img_size)
        self.img_size = tuple(int(s) for s in self.img_size)
        if len(self.img_size) != 2 or min(self.img_size) < 1:
            raise ValueError(f"img_size must be a positive int or (H, W), got {self.img_size!r}")
        if not isinstance(self.in_chans, int) or self.in_chans < 1:
            raise ValueError(f"in_chans must be a positive integer, got {self.in_chans!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0 = no head), got {self.num_classes!r}")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {self.stem_stride!r}")
        if self.architecture != ARCHITECTURE:
            raise ValueError(f"a ResNetConfig describes architecture {ARCHITECTURE!r}, got {self.architecture!r}")

    def to_dict(self) -> dict:
        return {"architecture": self.architecture, "name": self.name, "img_size": list(self.img_size),
                "in_chans": self.in_chans, "num_classes": self.num_classes, "stem_stride": self.stem_stride}

    @classmethod
    def from_dict(cls, d: dict) -> ResNetConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ResNet config keys {unknown}; known keys are {sorted(known)}")
        # Configs stored before the stride became an option describe the stride-1 stem they were built with.
        return cls(**{"stem_stride": 1, **d})


class ResNetBaseline(nn.Module):
    """torchvision's ResNet-18 with a 3x3 stem (stride 2 by default) and no max-pool. Build it with
    `ResNetBaseline(ResNetConfig(img_size=28, in_chans=1, num_classes=10))`.

    Its state dict has torchvision's names (conv1, bn1, layer1..layer4) but `head` for torchvision's `fc`.
    """

    num_features = 512
    """Width of the pooled feature the head sees."""

    def __init__(self, cfg: ResNetConfig):
        # Imported here: the weights loaders read this module's ARCHITECTURE, and `import vitkit` stays without
        # torchvision.
        from torchvision.models import resnet18

        super().__init__()
        self.cfg = cfg
        net = resnet18(num_classes=1)  # torchvision's layers and initialisation; its fc is replaced below
        conv1 = nn.Conv2d(cfg.in_chans, 64, kernel_size=3, stride=cfg.stem_stride, padding=1,
                          bias=False)
        nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's conv init
        self.conv1, self.bn1, self.relu = conv1, net.bn1, net.relu
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.avgpool = net.avgpool
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, 512) globally average-pooled features of stage 4."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"the ResNet-18 baseline takes (B, {self.cfg.in_chans}, H, W) images, got a tensor of "
                             f"shape {tuple(x.shape)}; convert the images or build it with the right in_chans")
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 64, H/s, W/s) for stem stride s: no max-pool
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512, H/8s, W/8s), rounded up
        return torch.flatten(self.avgpool(x), 1)  # (B, 512)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 512) features -> (B, classes) logits, or the features themselves if pre_logits."""
        return features if pre_logits else self.head(features)

    def forward(self, x: torch.Tensor, patch_noise: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) images -> (B, classes) logits. `patch_noise` is the ViT's PatchDropout draw, which a model
        without patch tokens cannot use: it must be None."""
        if patch_noise is not None:
            raise ValueError(f"the ResNet-18 baseline has no patch tokens to drop, but got patch_noise of shape "
                             f"{tuple(patch_noise.shape)}: train it with --model.patch_dropout 0")
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a zero-initialised one for `num_classes` classes (0 = no head), as ViT's does."""
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        if num_classes:
            head = nn.Linear(self.num_features, num_classes).to(self.conv1.weight.device)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            self.head = head
        else:
            self.head = nn.Identity()
        self.cfg.num_classes = num_classes
