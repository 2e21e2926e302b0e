"""Built-in models for 32x32 images (CIFAR), used by the command line and the experiments.

Every model has the paper's four γ categories: where a block changes shape its shortcut is a
1x1 convolution followed by BatchNorm ("option B" of He et al. 2016).

- ``resnet20/32/44/56/110``: CIFAR ResNets of He et al. (2016), 6n+2 layers, widths 16-32-64.
- ``resnet18/34/50``: ImageNet ResNets adapted to 32x32 (3x3 stem, stride 1, no max-pool).
- ``preact_resnet18``: pre-activation ResNet-18 (He et al. 2016b), with its final BN.
- ``wrn16_4``: Wide-ResNet-16-4 (Zagoruyko & Komodakis 2016), pre-activation blocks.

The text transformers (``textcls_preln``, ``textcls_postln``, ``seq2seq_preln``,
``seq2seq_postln``) live in ``gammaguide.text_models``; ``create_model`` builds them too.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .errors import GammaGuideError
from .text_models import TEXT_MODELS, list_text_models


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def _projection(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _projection(cin, planes, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + (x if self.shortcut is None else self.shortcut(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _projection(cin, cout, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + (x if self.shortcut is None else self.shortcut(x))
        return self.relu(out)


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; the shortcut (when it projects) reads the pre-activated input."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3(cin, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3(planes, planes)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut = _projection(cin, planes, stride)

    def forward(self, x):
        out = self.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + skip


class ResNet(nn.Module):
    """A residual network for 32x32 inputs: stem, stages of blocks, pooled linear head."""

    def __init__(self, block: type, blocks: list[int], widths: list[int], num_classes: int = 10,
                 stem_width: int = 16, preact: bool = False):
        super().__init__()
        self.conv1 = _conv3(3, stem_width)
        # Pre-activation nets normalize inside each block; a stem BN would be redundant.
        self.bn1 = None if preact else nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], stem_width
        for i, (n, width) in enumerate(zip(blocks, widths, strict=True)):
            layers = []
            for j in range(n):
                layers.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.bn_final = nn.BatchNorm2d(cin) if preact else None
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.pretrained_cfg = {"input_size": (3, 32, 32), "num_classes": num_classes}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.conv1(x)
        if self.bn1 is not None:
            x = self.relu(self.bn1(x))
        x = self.layers(x)
        if self.bn_final is not None:
            x = self.relu(self.bn_final(x))
        return self.fc(self.pool(x).flatten(1))


def cifar_resnet(depth: int, num_classes: int = 10) -> ResNet:
    """He et al.'s CIFAR ResNet with ``depth = 6n + 2`` layers."""
    if depth < 8 or (depth - 2) % 6:
        raise GammaGuideError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    return ResNet(BasicBlock, [n, n, n], [16, 32, 64], num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": lambda num_classes=10: cifar_resnet(20, num_classes),
    "resnet32": lambda num_classes=10: cifar_resnet(32, num_classes),
    "resnet44": lambda num_classes=10: cifar_resnet(44, num_classes),
    "resnet56": lambda num_classes=10: cifar_resnet(56, num_classes),
    "resnet110": lambda num_classes=10: cifar_resnet(110, num_classes),
    "resnet18": lambda num_classes=10: ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], num_classes, 64),
    "resnet34": lambda num_classes=10: ResNet(BasicBlock, [3, 4, 6, 3], [64, 128, 256, 512], num_classes, 64),
    "resnet50": lambda num_classes=10: ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], num_classes, 64),
    "preact_resnet18": lambda num_classes=10: ResNet(PreActBlock, [2, 2, 2, 2], [64, 128, 256, 512], num_classes,
                                                      64, preact=True),
    "wrn16_4": lambda num_classes=10: ResNet(PreActBlock, [2, 2, 2], [64, 128, 256], num_classes, 16, preact=True),
}


def list_models() -> list[str]:
    """The image models (``list_text_models()``: the text transformers)."""
    return sorted(MODELS)


def create_model(name: str, num_classes: int = 10, **options) -> nn.Module:
    """A built-in model by name (see ``list_models()`` and ``list_text_models()``). ``options`` go
    to a text model's constructor (``vocab_size``, ``max_len``, ``width``, ``layers``, ``heads``...)."""
    build = MODELS.get(name) or TEXT_MODELS.get(name)
    if build is None:
        raise GammaGuideError(f"unknown built-in model {name!r}; choose one of "
                              f"{', '.join(list_models() + list_text_models())}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise GammaGuideError(f"num_classes must be a positive integer, got {num_classes!r}")
    try:
        return build(num_classes=num_classes, **options)
    except (TypeError, ValueError) as exc:
        if not options:
            raise
        raise GammaGuideError(f"cannot build {name} with {options}: {exc}") from exc
