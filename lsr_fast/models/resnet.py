"""ResNet backbones as DeepLabV2 uses them in UDA work (AdaptSegNet / LSR): output stride 8.

Differences from an ImageNet ResNet, all deliberate:
- Caffe-style bottleneck: the stride sits on the first 1x1 conv of a block, not on the 3x3.
- The stem's max-pool uses ceil_mode=True (so 720x1280 gives 91x161 features, not 90x160).
- layer3 and layer4 keep stride 1 and use dilation 2 and 4 in every one of their blocks.

Module names follow torchvision (conv1, bn1, layer1.0.conv1, layer1.0.downsample.0, ...) so that
ImageNet checkpoints map onto them key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# name -> (block kind, blocks per stage)
RESNET_LAYOUTS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}

# (stride, dilation) of layer1..layer4: output stride 8.
STAGE_STRIDES = (1, 2, 1, 1)
STAGE_DILATIONS = (1, 1, 2, 4)


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its running statistics, as in eval mode.

    DeepLab UDA training runs with batch size 1, where batch statistics are useless, so the
    ImageNet statistics and affine parameters are kept fixed. Subclassing BatchNorm2d keeps the
    state-dict keys identical to a trainable BN (checkpoints load either way).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps=eps, momentum=0.0)  # never used: stats are not updated
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # training=False regardless of self.training: running stats are used and never updated.
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False, momentum=0.0, eps=self.eps)


def conv_output_length(length: int, conv: nn.Conv2d | nn.MaxPool2d, dim: int) -> int:
    """Length along ``dim`` (0 = height, 1 = width) after ``conv``, by PyTorch's size formula."""

    def pick(value):
        return value if isinstance(value, int) else value[dim]

    kernel, stride, padding, dilation = (pick(conv.kernel_size), pick(conv.stride), pick(conv.padding), pick(conv.dilation))
    span = length + 2 * padding - dilation * (kernel - 1) - 1
    if getattr(conv, "ceil_mode", False):
        out = -(-span // stride) + 1
        # PyTorch drops a last window that would start inside the right padding.
        if (out - 1) * stride >= length + padding:
            out -= 1
    else:
        out = span // stride + 1
    return out


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). The stride is on the first conv."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, dilation: int, norm_layer):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, out_channels, 3, stride=1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride, norm_layer)

    def main_path_convs(self):
        return (self.conv1, self.conv2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (dilated) -> 1x1, Caffe style: the stride is on the first 1x1 conv."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, dilation: int, norm_layer):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, stride=stride, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride, norm_layer)

    def main_path_convs(self):
        return (self.conv1, self.conv2, self.conv3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int, norm_layer):
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm_layer(out_channels))


class ResNetBackbone(nn.Module):
    """ResNet trunk up to layer4 (no pooling, no fc); forward returns the layer4 map.

    ``width`` is the stem width and the base stage width (stages use width, 2w, 4w, 8w), so
    width=64 is the standard network and width=8 a tiny one for CPU runs.
    """

    def __init__(self, name: str = "resnet101", *, width: int = 64, batchnorm: str = "frozen"):
        super().__init__()
        if not isinstance(name, str) or name not in RESNET_LAYOUTS:
            raise ValueError(f"backbone must be one of {tuple(RESNET_LAYOUTS)}, got {name!r}")
        if isinstance(width, bool) or not isinstance(width, int):
            raise TypeError(f"width must be an int, got {type(width).__name__}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if batchnorm == "frozen":
            norm_layer = FrozenBatchNorm2d
        elif batchnorm == "train":
            norm_layer = nn.BatchNorm2d
        else:
            raise ValueError(f"batchnorm must be 'frozen' or 'train', got {batchnorm!r}")
        kind, counts = RESNET_LAYOUTS[name]
        block = Bottleneck if kind == "bottleneck" else BasicBlock
        self.name = name
        self.width = width

        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)

        in_channels = width
        for index, (count, stride, dilation) in enumerate(zip(counts, STAGE_STRIDES, STAGE_DILATIONS)):
            planes = width * 2**index
            blocks = []
            for b in range(count):
                blocks.append(block(in_channels, planes, stride if b == 0 else 1, dilation, norm_layer))
                in_channels = planes * block.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.feature_dim = in_channels
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the layer4 map for an input of ``height`` x ``width``."""
        sizes = [height, width]
        path = [self.conv1, self.maxpool]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                path.extend(block.main_path_convs())
        for module in path:
            sizes = [conv_output_length(sizes[d], module, d) for d in (0, 1)]
        return sizes[0], sizes[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)
