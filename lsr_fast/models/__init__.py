"""DeepLabV2 with a ResNet backbone (output stride 8) and its pretrained-weight loading.

    from lsr_fast.models import build_model, load_pretrained, parameter_groups
    model = build_model(19, "resnet101")
    print(load_pretrained(model, "resnet101-imagenet.pth"))
    optimizer = torch.optim.SGD(parameter_groups(model, lr=2.5e-4), momentum=0.9)
    logits, features = model(images)  # both at 1/8 resolution, logits not upsampled
"""

from .deeplabv2 import (
    ASPP_DILATIONS,
    BACKBONES,
    ASPPClassifier,
    DeepLabV2,
    LoadReport,
    build_model,
    load_pretrained,
    parameter_groups,
)
from .resnet import FrozenBatchNorm2d, ResNetBackbone

__all__ = [
    "ASPP_DILATIONS",
    "BACKBONES",
    "ASPPClassifier",
    "DeepLabV2",
    "FrozenBatchNorm2d",
    "LoadReport",
    "ResNetBackbone",
    "build_model",
    "load_pretrained",
    "parameter_groups",
]
