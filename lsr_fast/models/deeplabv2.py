"""DeepLabV2 (ResNet backbone + ASPP classifier) as the UDA literature uses it, and its weights.

State-dict layout of :class:`DeepLabV2`:
- ``backbone.*``: torchvision names inside (``backbone.conv1.weight``, ``backbone.bn1.running_mean``,
  ``backbone.layer1.0.conv1.weight``, ``backbone.layer2.0.downsample.0.weight`` /
  ``downsample.1.*`` for the shortcut conv and BN, ...).
- ``classifier.convs.{0,1,2,3}.{weight,bias}``: the ASPP branches with dilation 6, 12, 18, 24.

:func:`load_pretrained` reads that layout, torchvision ResNet checkpoints, and the DeepLab init
layout (keys behind a prefix such as ``Scale.`` or ``module.``, ASPP under
``layer5.conv2d_list.{i}``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .resnet import RESNET_LAYOUTS, ResNetBackbone, conv_output_length

BACKBONES = tuple(RESNET_LAYOUTS)
ASPP_DILATIONS = (6, 12, 18, 24)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


class ASPPClassifier(nn.Module):
    """Four parallel dilated 3x3 convs from the features to the classes; their outputs summed.

    ``two_branch=True`` reproduces earlier public code whose loop returned after adding only the
    first two branches. All four convs exist either way, so checkpoints load into both variants.
    """

    def __init__(self, in_channels: int, num_classes: int, dilations=ASPP_DILATIONS, *, two_branch: bool = False):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations)
        self.two_branch = two_branch
        for conv in self.convs:
            # DeepLab's init for the classifier (the backbone uses Kaiming).
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        used = self.convs[:2] if self.two_branch else self.convs
        out = used[0](x)
        for conv in used[1:]:
            out = out + conv(x)
        return out


class DeepLabV2(nn.Module):
    """DeepLabV2: ResNet (output stride 8) + ASPP.

    ``forward(x)`` maps images (B, 3, H, W) to ``(logits, features)``: logits (B, num_classes, h, w)
    at feature resolution (not upsampled) and features (B, feature_dim, h, w), the layer4 map that
    LSR regularises. ``(h, w) == model.output_size(H, W)``.

    batchnorm="frozen" keeps every BN in eval behaviour (running statistics used and never
    updated, affine parameters not trained), as DeepLab UDA code does at batch size 1;
    batchnorm="train" uses ordinary trainable BatchNorm2d.
    """

    def __init__(self, num_classes: int, backbone: str = "resnet101", *, width: int = 64, two_branch_aspp: bool = False, batchnorm: str = "frozen"):
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        if not isinstance(two_branch_aspp, bool):
            raise TypeError(f"two_branch_aspp must be a bool, got {type(two_branch_aspp).__name__}")
        # ResNetBackbone checks backbone, width and batchnorm by the same names.
        self.backbone = ResNetBackbone(backbone, width=width, batchnorm=batchnorm)
        self.classifier = ASPPClassifier(self.backbone.feature_dim, num_classes, two_branch=two_branch_aspp)
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.width = width
        self.batchnorm = batchnorm

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    @property
    def two_branch_aspp(self) -> bool:
        return self.classifier.two_branch

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the logits and features for an input of ``height`` x ``width`` pixels."""
        _check_positive_int("height", height)
        _check_positive_int("width", width)
        h, w = self.backbone.output_size(height, width)
        for conv in self.classifier.convs:
            h, w = conv_output_length(h, conv, 0), conv_output_length(w, conv, 1)
        return h, w

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be images of shape (B, 3, H, W), got shape {tuple(x.shape)}")
        features = self.backbone(x)
        return self.classifier(features), features

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, backbone={self.backbone_name!r}, width={self.width}, two_branch_aspp={self.two_branch_aspp}, batchnorm={self.batchnorm!r}"


def build_model(num_classes: int, backbone: str = "resnet101", **kwargs) -> DeepLabV2:
    """``DeepLabV2(num_classes, backbone, **kwargs)``; kwargs: width, two_branch_aspp, batchnorm."""
    return DeepLabV2(num_classes, backbone, **kwargs)


def parameter_groups(model: DeepLabV2, lr: float, classifier_lr_mult: float = 10.0) -> list[dict]:
    """Optimizer groups: backbone at ``lr``, classifier at ``lr * classifier_lr_mult`` (DeepLab's 10x).

    Only parameters that require grad are included; each trainable parameter appears once.
    """
    if not isinstance(model, DeepLabV2):
        raise TypeError(f"model must be a DeepLabV2, got {type(model).__name__}")
    for name, value in (("lr", lr), ("classifier_lr_mult", classifier_lr_mult)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    classifier = [p for p in model.classifier.parameters() if p.requires_grad]
    # Parameters attached outside backbone/classifier would otherwise never be optimised.
    grouped = {id(p) for p in backbone + classifier}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
    if outside:
        raise ValueError(f"model has trainable parameters outside backbone and classifier: {outside}")
    return [
        {"name": "backbone", "params": backbone, "lr": float(lr)},
        {"name": "classifier", "params": classifier, "lr": float(lr) * float(classifier_lr_mult)},
    ]


# ---------------------------------------------------------------------------------------------
# Pretrained weights


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    ``loaded``, ``missing`` and ``shape_mismatch`` hold the model's key names; ``unexpected`` and
    ``skipped`` hold the file's key names. ``missing`` leaves out BN ``num_batches_tracked``
    counters (unused by the model, absent from older checkpoints) and, with skip_classifier, the
    classifier (kept at its initialisation on purpose).
    """

    path: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    # model key -> (shape in the file, shape in the model), for the message.
    mismatch_shapes: dict = field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        lines = [f"weights from {self.path}: {len(self.loaded)} tensors loaded"]
        sections = (
            ("missing from the file (kept at initialisation)", self.missing),
            ("unexpected in the file (ignored)", self.unexpected),
            ("skipped on purpose", self.skipped),
        )
        for title, names in sections:
            if names:
                lines.append(f"  {len(names)} {title}: {_abbreviate(names)}")
        if self.shape_mismatch:
            details = [f"{k} file {tuple(self.mismatch_shapes[k][0])} vs model {tuple(self.mismatch_shapes[k][1])}" if k in self.mismatch_shapes else k for k in self.shape_mismatch]
            lines.append(f"  {len(details)} shape mismatches (not loaded): {_abbreviate(details)}")
        return "\n".join(lines)


def _abbreviate(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"


_BACKBONE_ROOTS = {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}


def _map_key(key: str) -> tuple[str, str | None]:
    """Classify a checkpoint key: ("backbone" | "classifier" | "fc", our key) or ("unknown", None).

    Leading components are dropped until the rest starts with a known name, which strips
    wrappers such as ``module.``, ``Scale.``, ``model.`` and our own ``backbone.``.
    """
    parts = key.split(".")
    for start in range(len(parts)):
        rest = parts[start:]
        head = rest[0]
        if head in _BACKBONE_ROOTS and len(rest) > 1:
            return "backbone", "backbone." + ".".join(rest)
        if head == "fc" and len(rest) == 2:
            return "fc", None
        if head == "classifier" and len(rest) == 4 and rest[1] == "convs":
            return "classifier", ".".join(rest)
        # DeepLab init layout: ASPP is layer5.conv2d_list.{i}.{weight,bias}. AdaptSegNet/ADVENT
        # multi-level checkpoints add layer6, their main head; layer5 is then an auxiliary head
        # on layer3 (see _main_head).
        if head in ("layer5", "layer6") and len(rest) == 4 and rest[1] == "conv2d_list":
            return head, f"classifier.convs.{rest[2]}.{rest[3]}"
    return "unknown", None


def _main_head(keys) -> str:
    """Which DeepLab-layout head is the classifier: layer6 when the file has one (multi-level
    AdaptSegNet/ADVENT checkpoints, whose layer5 sits on layer3), else layer5."""
    return "layer6" if any(_map_key(str(k))[0] == "layer6" for k in keys) else "layer5"


def deeplab_layout(keys) -> bool:
    """Whether weights are in the DeepLab (Caffe-converted) layout: a ``Scale.`` wrapper or an
    ASPP under ``layer5/layer6.conv2d_list``. Such files expect Caffe input normalisation."""
    return any(str(k).startswith("Scale.") or _map_key(str(k))[0] in ("layer5", "layer6") for k in keys)


def _read_state_dict(path: str) -> Mapping:
    if not os.path.exists(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for bad files; all mean "unreadable"
        raise ValueError(f"could not read pretrained weights from {path}: {type(err).__name__}: {err}") from err
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state dict (a mapping of names to tensors)")  # noqa: TRY004 (bad file content, not a bad argument)
    return obj


def load_pretrained(model: DeepLabV2, path: str | os.PathLike, *, skip_classifier: bool = True,
                    normalize: str | None = None) -> LoadReport:
    """Copy matching tensors from a weights file into ``model`` and say what happened.

    Accepted layouts: our ``model.state_dict()``; a torchvision ResNet checkpoint (``fc.*``
    skipped); the DeepLab init layout with a leading component such as ``Scale.`` or ``module.``
    (its ASPP ``layer5.conv2d_list.*`` maps onto ours); any of these under a "model" or
    "state_dict" key. With ``skip_classifier`` (default) classifier weights in the file are
    skipped, as when starting from ImageNet or another dataset's labels. In a multi-level
    AdaptSegNet/ADVENT checkpoint the main head ``layer6`` is the classifier and the auxiliary
    ``layer5`` is skipped.

    ``normalize``: the input normalisation the model will be fed ("imagenet", "caffe", "none");
    when given, a DeepLab-layout file (Caffe-converted, see :func:`deeplab_layout`) with anything
    but "caffe" raises ValueError before anything is copied.

    Tensors whose shape differs from the model's are reported and not loaded. Nothing is copied
    unless at least one tensor (other than a BN counter) matches; a file that matches nothing
    raises ValueError.
    """
    if not isinstance(model, DeepLabV2):
        raise TypeError(f"model must be a DeepLabV2, got {type(model).__name__}")
    if not isinstance(skip_classifier, bool):
        raise TypeError(f"skip_classifier must be a bool, got {type(skip_classifier).__name__}")
    path = os.fspath(path)
    source = _read_state_dict(path)
    if normalize is not None and normalize != "caffe" and deeplab_layout(source.keys()):
        raise ValueError(f"{path} is in the DeepLab init layout (Caffe-converted weights, which expect BGR input "
                         f"minus the Caffe mean), but the input normalisation is {normalize!r}: set data.normalize: "
                         f"caffe for model.pretrained {path}, or use torchvision-layout weights")
    main_head = _main_head(source.keys())
    targets = model.state_dict()
    report = LoadReport(path=path)
    assignments: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}

    for key, value in source.items():
        kind, ours = _map_key(str(key))
        if kind in ("layer5", "layer6"):
            kind = "classifier" if kind == main_head else "auxiliary"
        if kind in ("fc", "auxiliary") or (kind == "classifier" and skip_classifier):
            report.skipped.append(key)
            continue
        if ours is None or ours not in targets or not isinstance(value, torch.Tensor):
            report.unexpected.append(key)
            continue
        if ours in origin:
            raise ValueError(f"keys {origin[ours]!r} and {key!r} of {path} both map to the model's {ours!r}")
        origin[ours] = key
        if value.shape != targets[ours].shape:
            report.shape_mismatch.append(ours)
            report.mismatch_shapes[ours] = (tuple(value.shape), tuple(targets[ours].shape))
            continue
        assignments[ours] = value

    # BN counters are scalars that match any model; they alone do not make the file a match.
    if all(k.endswith("num_batches_tracked") for k in assignments):
        raise ValueError(f"no tensor in {path} matches the model ({type(model).__name__} {model.backbone_name}, width {model.width}); nothing was loaded.\n{report}")

    with torch.no_grad():
        for ours, value in assignments.items():
            targets[ours].copy_(value)  # state_dict tensors share storage with the model
    report.loaded = list(assignments)
    for ours in targets:
        if ours in assignments or ours in origin:
            continue
        if ours.endswith("num_batches_tracked"):
            continue
        if skip_classifier and ours.startswith("classifier."):
            continue
        report.missing.append(ours)
    return report
