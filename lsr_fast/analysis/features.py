"""One pass of a segmentation model over images: what every analysis figure needs, in bounded
memory (class sums, a per-class reservoir of vectors, a confusion matrix, label histograms)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F

from .. import ops
from ..eval.metrics import confusion_matrix
from ..ops import _checks as check
from .sampler import ClassReservoir
from .stats import class_histogram, nearest_downsample


@dataclass
class DownsampleStats:
    """Label histograms (C + 1 bins, the last is void) over the analysed images, at full
    resolution and at feature resolution under nearest and histogram-aware downsampling, and
    the first image's three maps as an example."""

    full: torch.Tensor
    nearest: torch.Tensor
    hist: torch.Tensor
    threshold: float
    example: Dict[str, object] = field(default_factory=dict)


@dataclass
class FeatureStats:
    """What ``collect`` gathers for one model."""

    num_classes: int
    images: int
    feature_size: tuple  # (h, w) of the last image
    sums: torch.Tensor  # (C, K) float64, all features of each class (labels hist-downsampled)
    counts: torch.Tensor  # (C,) int64
    confusion: torch.Tensor  # (C, C) int64, full-resolution predictions vs labels
    reservoir: Optional[ClassReservoir]
    downsampling: Optional[DownsampleStats]
    seconds: float

    @property
    def present(self) -> torch.Tensor:
        return self.counts > 0

    @property
    def class_means(self) -> torch.Tensor:
        """(C, K) float64 mean feature of each class; NaN rows for absent classes."""
        means = self.sums / self.counts.clamp(min=1).unsqueeze(1).to(self.sums.dtype)
        return torch.where(self.present.unsqueeze(1), means, torch.full_like(means, float("nan")))


def _as_batch(item, index: int):
    if not isinstance(item, dict) or "image" not in item or "label" not in item:
        raise TypeError(f"batch {index} must be a dict with 'image' and 'label' tensors, got {type(item).__name__}")
    image, label = item["image"], item["label"]
    check.float_tensor(f"batch {index} image", image)
    check.integer_labels(f"batch {index} label", label)
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if label.dim() == 2:
        label = label.unsqueeze(0)
    if image.dim() != 4 or label.dim() != 3 or image.shape[0] != label.shape[0]:
        raise ValueError(f"batch {index}: image must be (3, H, W) or (B, 3, H, W) and label (H, W) or (B, H, W) "
                         f"with the same B, got {tuple(image.shape)} and {tuple(label.shape)}")
    name = item.get("name", str(index))
    if isinstance(name, (list, tuple)):
        name = name[0] if name else str(index)
    return image, label, str(name)


@torch.no_grad()
def collect(
    model: torch.nn.Module,
    batches: Iterable[dict],
    num_classes: int,
    *,
    samples_per_class: Optional[int] = 350,
    seed: int = 0,
    device="cpu",
    backend: str = "auto",
    threshold: float = 0.5,
    ignore_index: int = 255,
    downsampling: bool = True,
    align_corners: bool = False,
    progress: Optional[Callable[[int], None]] = None,
) -> FeatureStats:
    """Run ``model`` (``model(images) -> (logits (B, C, h, w), features (B, K, h, w))``) over
    ``batches`` (dicts with a float ``image`` (3, H', W') or (B, 3, H', W') network input and an
    integer ``label`` (H, W) or (B, H, W), 255 = void) and gather:

    - labels at feature resolution with hist_downsample(threshold), and per-class sums and counts
      of every feature vector with class_feature_stats (the class means = prototypes);
    - a ClassReservoir of at most ``samples_per_class`` vectors per class (None: no reservoir);
    - the confusion matrix of the logits upsampled (bilinear, ``align_corners`` as the run was
      trained) to the label size, argmax;
    - with ``downsampling``, class histograms of the labels at full resolution and nearest- and
      hist-downsampled to feature resolution, and the first image's maps as an example.
    """
    check.positive_int("num_classes", num_classes)
    start = time.perf_counter()
    model.eval()
    reservoir = None if samples_per_class is None else ClassReservoir(
        num_classes, samples_per_class, seed=seed, ignore_index=ignore_index)
    sums = counts = None
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    hist_bins = {key: torch.zeros(num_classes + 1, dtype=torch.int64) for key in ("full", "nearest", "hist")}
    example: Dict[str, object] = {}
    images, feature_size = 0, None
    for index, item in enumerate(batches):
        image, label, name = _as_batch(item, index)
        image, label = image.to(device), label.to(device)
        output = model(image)
        if not isinstance(output, (tuple, list)) or len(output) != 2:
            raise TypeError("model must return (logits, features)")
        logits, features = output
        if logits.dim() != 4 or logits.shape[1] != num_classes or logits.shape[0] != image.shape[0]:
            raise ValueError(f"model logits must be (B, {num_classes}, h, w), got {tuple(logits.shape)}")
        if features.dim() != 4 or features.shape[0] != image.shape[0]:
            raise ValueError(f"model features must be (B, K, h, w), got {tuple(features.shape)}")
        feature_size = tuple(features.shape[2:])
        small = ops.hist_downsample(label, feature_size, num_classes, threshold=threshold,
                                    ignore_index=ignore_index, backend=backend)
        batch_sums, batch_counts = ops.class_feature_stats(features, small, num_classes,
                                                           ignore_index=ignore_index, backend=backend)
        batch_sums, batch_counts = batch_sums.double().cpu(), batch_counts.cpu()
        if sums is None:
            sums, counts = batch_sums, batch_counts
        else:
            if batch_sums.shape != sums.shape:
                raise ValueError(f"model features changed width from K={sums.shape[1]} to {batch_sums.shape[1]}")
            sums, counts = sums + batch_sums, counts + batch_counts
        if reservoir is not None:
            reservoir.add(features, small)

        logits = F.interpolate(logits.float(), size=tuple(label.shape[1:]), mode="bilinear", align_corners=align_corners)
        confusion += confusion_matrix(logits.argmax(1), label, num_classes, ignore_index=ignore_index).cpu()

        if downsampling:
            nearest = nearest_downsample(label, feature_size)
            hist_bins["full"] += class_histogram(label, num_classes, ignore_index)
            hist_bins["nearest"] += class_histogram(nearest, num_classes, ignore_index)
            hist_bins["hist"] += class_histogram(small, num_classes, ignore_index)
            if not example:
                example = dict(name=name, label=label[0].cpu(), nearest=nearest[0].cpu(), hist=small[0].cpu())
        images += image.shape[0]
        if progress is not None:
            progress(images)
    if sums is None:
        raise ValueError("batches yielded no images")
    down = DownsampleStats(threshold=threshold, example=example, **hist_bins) if downsampling else None
    return FeatureStats(num_classes=num_classes, images=images, feature_size=feature_size, sums=sums, counts=counts,
                        confusion=confusion, reservoir=reservoir, downsampling=down,
                        seconds=time.perf_counter() - start)
