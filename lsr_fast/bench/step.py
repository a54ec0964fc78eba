"""The training step: one SGD step of DeepLabV2, source-only, both domains, or with LSR on a
backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F

import lsr_fast

from .workload import FAST_BACKENDS, backend_skip_reason


@dataclass(frozen=True)
class StepSize:
    backbone: str
    width: int
    source: Tuple[int, int]  # H, W
    target: Tuple[int, int]


STEP_SIZES = {
    "paper": StepSize("resnet101", 64, (720, 1280), (512, 1024)),  # GTA5 1280x720 + Cityscapes 1024x512
    "small": StepSize("resnet18", 16, (256, 512), (256, 512)),
    "tiny": StepSize("resnet18", 8, (64, 128), (64, 128)),  # smoke tests only
}
STEP_CLASSES = 19


def step_variants(device: torch.device, backends: Sequence[str]) -> List[str]:
    """source_only, two_domain, and one LSR step per selected backend usable here (not compile)."""
    names = ["source_only", "two_domain"]
    for backend in ("reference",) + FAST_BACKENDS:
        if backend in backends and not backend_skip_reason(backend, device):
            names.append(f"lsr-{backend}")
    return names


def prepare_step(variant: str, size: str, device: torch.device) -> Callable[[], None]:
    """One SGD training step of DeepLabV2 at batch 1 (frozen BN, fp32), as a callable.

    source_only: source forward, CE on the upsampled source logits, backward, SGD step.
    two_domain: also the target forward, with a zero-weight sum of the target logits and both
      feature maps in the loss, so backward runs through the same network as the LSR step;
      this is the network cost of an LSR step without the regulariser.
    lsr-<backend>: the UDA step: CE + LSRRegularizer (GTA5 preset, L+) on the source features
      with the source labels and the target features with the softmax of the upsampled target
      logits.
    """
    from lsr_fast.models import DeepLabV2, parameter_groups

    s = STEP_SIZES[size]
    torch.manual_seed(0)
    model = DeepLabV2(STEP_CLASSES, s.backbone, width=s.width, batchnorm="frozen").to(device).train()
    optimizer = torch.optim.SGD(parameter_groups(model, lr=2.5e-4), lr=2.5e-4, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    source = torch.randn(1, 3, *s.source, generator=g).to(device)
    target = torch.randn(1, 3, *s.target, generator=g).to(device)
    coarse = torch.randint(0, STEP_CLASSES, (1, s.source[0] // 16 + 1, s.source[1] // 16 + 1), generator=g)
    labels = coarse.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, : s.source[0], : s.source[1]]
    labels = labels.contiguous().to(device)
    regularizer = None
    if variant.startswith("lsr-"):
        backend = variant[len("lsr-"):]
        regularizer = lsr_fast.LSRRegularizer.from_preset("gta5", feature_dim=model.feature_dim, backend=backend).to(device)
    elif variant not in ("source_only", "two_domain"):
        raise ValueError(f"variant must be source_only, two_domain or lsr-<backend>, got {variant!r}")

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits_s, features_s = model(source)
        up_s = F.interpolate(logits_s, size=s.source, mode="bilinear", align_corners=False)
        loss = F.cross_entropy(up_s, labels, ignore_index=255)
        if variant != "source_only":
            logits_t, features_t = model(target)
            if regularizer is None:
                loss = loss + 0.0 * (logits_t.sum() + features_t.sum() + features_s.sum())
            else:
                up_t = F.interpolate(logits_t, size=s.target, mode="bilinear", align_corners=False)
                loss = loss + regularizer(features_s, labels, features_t, up_t.softmax(1))["total"]
        loss.backward()
        optimizer.step()

    return step
