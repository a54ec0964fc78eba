"""Evaluation under both protocols of the UDA literature, from one forward per image.

- ``full_resolution``: logits upsampled (bilinear) to each label map's full size (2048x1024 for
  Cityscapes), the protocol of most tables.
- ``input_resolution``: labels downsampled with nearest (pixel centres, as PIL's NEAREST) to the
  network's input size (1024x512 in the paper's configs) and logits upsampled to it, as the
  authors' released code scores.

``evaluate`` returns the (C, C) confusion matrix over a dataset (sharded over the ranks of a
distributed job and summed), or one per protocol; ``report`` turns a matrix into per-class IoU,
mIoU (19, or 16 and 13 for SYNTHIA) and mASR against the paper's target-only table or a user's
own, and ``write_report`` / ``write_protocol_report`` save JSON and Markdown.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from .metrics import (
    SUBSET_13,
    SUBSET_16,
    as_iou,
    class_names,
    confusion_matrix,
    masr,
    mean_iou,
    paper_target_only_iou,
    per_class_iou,
)


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


PROTOCOLS = ("full_resolution", "input_resolution")
PROTOCOL_TITLES = {"full_resolution": "labels at full resolution",
                   "input_resolution": "labels at network input size (nearest)"}


def _logits(model: torch.nn.Module, images: torch.Tensor, flip: bool, amp: str):
    with autocast(images.device, amp):
        logits = model(images)[0].float()
        flipped = model(images.flip(-1))[0].float() if flip else None
    return logits, flipped


def _probabilities(logits: torch.Tensor, flipped: Optional[torch.Tensor], size, align_corners: bool) -> torch.Tensor:
    def up(x):
        return torch.softmax(F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners), 1)

    probs = up(logits)
    if flipped is not None:
        probs = 0.5 * (probs + up(flipped).flip(-1))
    return probs


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, size, *, flip: bool = False, amp: str = "none",
            align_corners: bool = False) -> torch.Tensor:
    """Class probabilities (B, C, *size) from the network's logits, bilinearly upsampled (with
    ``align_corners`` as the run was trained); with ``flip`` the mean with the mirrored image's
    prediction."""
    return _probabilities(*_logits(model, images, flip, amp), size, align_corners)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, num_classes: int, *, device: torch.device, flip: bool = False,
             amp: str = "none", channels_last: bool = False, align_corners: bool = False, rank: int = 0,
             world_size: int = 1, max_images: Optional[int] = None, progress: bool = False,
             protocols: Optional[Sequence[str]] = None):
    """Confusion matrix (C, C) int64 on the CPU over ``dataset`` (items: normalised image at the
    network's input size, label at full resolution) under the full-resolution protocol; with
    ``protocols`` (a subset of PROTOCOLS) a dict protocol -> matrix, from the same forwards.
    Rank r takes images r, r + R, ...; the caller sums the ranks' matrices."""
    wanted = ("full_resolution",) if protocols is None else tuple(protocols)
    unknown = [p for p in wanted if p not in PROTOCOLS]
    if unknown or not wanted:
        raise ValueError(f"protocols must name some of {', '.join(PROTOCOLS)}, got {protocols!r}")
    from ..data.transforms import resize_label

    was_training = model.training
    model.eval()
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    confusions = {p: torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device) for p in wanted}
    indices = range(rank, count, world_size)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="eval", leave=False, dynamic_ncols=True)
    for index in indices:
        item = dataset[index]
        image = item["image"].unsqueeze(0).to(device)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        logits, flipped = _logits(model, image, flip, amp)
        for protocol in wanted:
            label = item["label"]
            if protocol == "input_resolution":
                label = resize_label(label, tuple(image.shape[-2:]))
            label = label.to(device)
            probs = _probabilities(logits, flipped, tuple(label.shape[-2:]), align_corners)
            confusions[protocol] += confusion_matrix(probs.argmax(1)[0], label, num_classes)
    model.train(was_training)
    if protocols is None:
        return confusions["full_resolution"].cpu()
    return {p: c.cpu() for p, c in confusions.items()}


def report(confusion: torch.Tensor, *, supervised_iou: Optional[Sequence[float]] = None,
           supervised_source: str = "paper") -> Dict[str, Any]:
    """Per-class IoU (percent), mIoU, and mASR against ``supervised_iou`` (fractions in [0, 1], so
    a percent table must be divided by 100; default the paper's target-only table). For 16
    classes also the 13-class mIoU/mASR. Classes absent from both prediction and ground truth
    have IoU null and are left out of the means; so are, for mASR, classes whose supervised IoU
    is 0 or NaN (no defined ratio)."""
    iou = per_class_iou(confusion)
    num_classes = iou.numel()
    names = class_names(num_classes)
    result: Dict[str, Any] = {
        "num_classes": num_classes,
        "per_class_iou": {n: (None if math.isnan(v) else 100.0 * v) for n, v in zip(names, iou.tolist())},
        "miou": mean_iou(iou),
        "pixels": int(torch.as_tensor(confusion).sum()),
        "masr_reference": supervised_source,
    }
    supervised = None
    if supervised_iou is not None:
        supervised = as_iou("supervised_iou", supervised_iou)
    elif num_classes in (19, 16):
        supervised = paper_target_only_iou(num_classes)
    if supervised is not None:
        if supervised.numel() != num_classes:
            raise ValueError(f"supervised_iou has {supervised.numel()} classes, the evaluation {num_classes}")
        # Classes the reference never got right (IoU 0 or absent) have no defined ratio: skip them.
        usable = ~torch.isnan(supervised) & (supervised > 0)
        result["masr"] = _masr_over(iou, supervised, usable)
        result["masr_classes"] = [n for n, u in zip(names, usable.tolist()) if u]
    if num_classes == 16:
        subset = [SUBSET_16.index(c) for c in SUBSET_13]
        result["miou13"] = mean_iou(iou[subset])
        if supervised is not None:
            result["masr13"] = _masr_over(iou[subset], supervised[subset], usable[subset])
    return result


def _masr_over(iou: torch.Tensor, supervised: torch.Tensor, usable: torch.Tensor) -> float:
    """mASR over the ``usable`` classes; NaN when there is none."""
    return masr(iou[usable], supervised[usable]) if bool(usable.any()) else float("nan")


def markdown_table(results: Dict[str, Dict[str, Any]]) -> str:
    """One column per run: mIoU, mASR, then per-class IoU (classes with any defined value)."""
    runs = list(results)
    names = [n for n in next(iter(results.values()))["per_class_iou"]
             if any(results[r]["per_class_iou"].get(n) is not None for r in runs)]

    def fmt(value):
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"

    lines = ["| | " + " | ".join(runs) + " |", "|---|" + "---:|" * len(runs)]
    lines.append("| **mIoU** | " + " | ".join(fmt(results[r]["miou"]) for r in runs) + " |")
    if all("masr" in results[r] for r in runs):
        lines.append("| **mASR** | " + " | ".join(fmt(results[r]["masr"]) for r in runs) + " |")
    if all("miou13" in results[r] for r in runs):
        lines.append("| mIoU (13) | " + " | ".join(fmt(results[r]["miou13"]) for r in runs) + " |")
    for name in names:
        lines.append(f"| {name} | " + " | ".join(fmt(results[r]["per_class_iou"].get(name)) for r in runs) + " |")
    return "\n".join(lines) + "\n"


def write_report(result: Dict[str, Any], out_prefix: str, title: str = "Evaluation") -> None:
    """``out_prefix``.json and ``out_prefix``.md, written atomically."""
    from .._atomic import atomic_write_text

    atomic_write_text(out_prefix + ".json", json.dumps(result, indent=2) + "\n")
    body = f"# {title}\n\n" + markdown_table({result.get("name", "result"): result})
    atomic_write_text(out_prefix + ".md", body)


def write_protocol_report(results: Dict[str, Dict[str, Any]], out_prefix: str, title: str = "Evaluation",
                          info: Optional[Dict[str, Any]] = None) -> None:
    """Both protocols side by side: ``out_prefix``.json as ``{"protocols": {name: report}, **info}``
    and ``out_prefix``.md with one column per protocol."""
    from .._atomic import atomic_write_text

    atomic_write_text(out_prefix + ".json", json.dumps({**(info or {}), "protocols": results}, indent=2) + "\n")
    body = f"# {title}\n\n" + markdown_table({PROTOCOL_TITLES.get(p, p): r for p, r in results.items()})
    atomic_write_text(out_prefix + ".md", body)


def load_iou_table(path: str, num_classes: int) -> torch.Tensor:
    """A user's target-supervised IoUs: a JSON list of C percentages, or an eval result JSON."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IoU table {path} does not exist")
    try:
        with open(path, "r", encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read IoU table {path}: {error}") from None
    if isinstance(data, dict) and "per_class_iou" in data:
        data = list(data["per_class_iou"].values())
    if not isinstance(data, list) or len(data) != num_classes:
        raise ValueError(f"IoU table {path} must be a list of {num_classes} percentages (or an eval result JSON)")
    if any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in data):
        raise ValueError(f"IoU table {path} must hold numbers (percentages) or null, got {data!r:.200}")
    values = [float("nan") if v is None else float(v) for v in data]
    if any(not (0 <= v <= 100) for v in values if not math.isnan(v)):
        raise ValueError(f"IoU table {path} must hold percentages in [0, 100]")
    return torch.tensor(values, dtype=torch.float64) / 100.0
