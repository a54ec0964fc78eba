"""The toolkit's three methods (examples/*.py) as bench cases: one step of each method's loss on
given feature maps, built on the lsr_fast ops on a backend, or written in plain torch (backend
``plain``, the baseline of their speed-ups).

Only the method's own part of a step is timed: the network, the images and the segmentation
cross-entropy the examples also compute are the same in both versions and are left out. Labels
are given at feature resolution (the contrastive example's ``hist_downsample`` and the few-shot
example's upsampling of the query logits to image size are left out too). The plain versions are
what one writes without lsr_fast: per-class sums as a one-hot (weight) matrix times the features,
cosines from ``F.normalize`` and ``einsum``, distances from ``torch.cdist``, the EMA by hand. Both
versions compute the same loss, gradients and bank update (tests/test_bench_smoke.py checks it).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import lsr_fast

VOID = 255
FEWSHOT_SCALE = 20.0  # PANet's alpha, as examples/fewshot_segmentation.py
PRODA_TAU, PRODA_THRESHOLD = 1.0, 0.5  # as examples/proda_denoising.py
CONTRASTIVE_TEMPERATURE = 0.1  # as examples/prototype_contrastive.py
MOMENTUM = 0.9  # the examples' banks (init="first")
COSINE_EPS = 1e-8  # lsr_fast's: a vector of smaller norm has cosine 0 with everything

PLAIN = "plain"
TOOLKIT_OPS = ("toolkit_fewshot", "toolkit_proda", "toolkit_contrastive")
DESCRIPTIONS = {
    "toolkit_fewshot": (
        "examples/fewshot_segmentation.py (PANet): support prototypes by masked average pooling (class sums "
        "weighted by mask coverage), 20 x cosine of every query vector to them, cross-entropy over the classes "
        "the support shows. Gradients reach the support and the query features."),
    "toolkit_proda": (
        "examples/proda_denoising.py (ProDA): pseudo-labels rectified by a softmax over the L2 distances to the "
        "bank's prototypes, cross-entropy of the target logits on them, then the bank's update with "
        "confidence-weighted class means. Gradients reach the logits (the denoising is a constant)."),
    "toolkit_contrastive": (
        "examples/prototype_contrastive.py: InfoNCE (temperature 0.1) of every labelled vector against the bank's "
        "prototypes by cosine, then the bank's update with the batch's class means. Gradients reach the features."),
}

# forward() -> the loss; leaves: the inputs that require grad; state() -> the bank's (prototypes, seen)
Built = Tuple[Callable[[], torch.Tensor], List[torch.Tensor], Callable[[], Tuple[torch.Tensor, torch.Tensor]]]


# ---- the plain-torch building blocks ----------------------------------------------------------


def plain_class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     weights: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(C, K) float32 sums of w * f and (C,) sums of w (w = 1 without weights) of the (B, K, h, w)
    features per class of the (B, h, w) labels; void skipped. A one-hot (weight) matrix times the
    features, one GEMM."""
    valid = labels != VOID
    one_hot = F.one_hot(torch.where(valid, labels, num_classes), num_classes + 1)[..., :num_classes].to(torch.float32)
    if weights is not None:
        one_hot = one_hot * weights.to(torch.float32).unsqueeze(-1)
    one_hot = one_hot.flatten(1, 2)  # (B, N, C)
    sums = torch.einsum("bnc,bkn->ck", one_hot, features.to(torch.float32).flatten(2))
    return sums, one_hot.sum((0, 1))


def plain_cosine(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) x (C, K) -> (B, C, h, w) cosine similarities, float32."""
    f = F.normalize(features.to(torch.float32), dim=1, eps=COSINE_EPS)
    p = F.normalize(prototypes.to(torch.float32), dim=1, eps=COSINE_EPS)
    return torch.einsum("bkhw,ck->bchw", f, p)


def plain_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) x (C, K) -> (B, C, h, w) Euclidean distances, float32 (torch.cdist)."""
    B, _, h, w = features.shape
    rows = features.to(torch.float32).flatten(2).transpose(1, 2)  # (B, N, K)
    d = torch.cdist(rows, prototypes.to(torch.float32).unsqueeze(0).expand(B, -1, -1))  # (B, N, C)
    return d.transpose(1, 2).reshape(B, prototypes.shape[0], h, w)


class PlainBank:
    """The EMA prototypes (init="first") by hand: p <- m p + (1 - m) sums / totals where totals > 0."""

    def __init__(self, prototypes: torch.Tensor, seen: torch.Tensor):
        self.prototypes, self.seen = prototypes.clone(), seen.clone()

    @torch.no_grad()
    def update(self, sums: torch.Tensor, totals: torch.Tensor) -> None:
        present = totals > 0
        batch = sums / torch.where(present, totals, torch.ones_like(totals)).unsqueeze(1)
        blended = MOMENTUM * self.prototypes + (1 - MOMENTUM) * batch
        blended = torch.where(self.seen.unsqueeze(1), blended, batch)
        self.prototypes = torch.where(present.unsqueeze(1), blended, self.prototypes)
        self.seen = self.seen | present


def _bank(x: dict, backend: str, num_classes: int):
    """The bank both versions start from: the class means of the source features, every class seen."""
    seen = torch.ones(num_classes, dtype=torch.bool, device=x["prototypes"].device)
    if backend == PLAIN:
        return PlainBank(x["prototypes"], seen)
    bank = lsr_fast.PrototypeBank(num_classes, x["prototypes"].shape[1], momentum=MOMENTUM, init="first",
                                  distributed="off").to(x["prototypes"].device)
    bank.prototypes.copy_(x["prototypes"])
    bank.seen.copy_(seen)
    return bank


# ---- the three steps --------------------------------------------------------------------------


def build(op: str, x: dict, num_classes: int, backend: str, backward: bool) -> Built:
    """One step of the method ``op`` on the inputs ``x`` of lsr_fast.bench.make_inputs, with the
    lsr_fast ops on ``backend`` or in plain torch (``backend="plain"``). Leaves require grad only
    with ``backward``; every call of forward() updates the step's own bank, as a training step does."""
    C, plain = num_classes, backend == PLAIN

    def leaf(name):
        return x[name].detach().requires_grad_(backward)  # shares storage: no copy

    def class_sums(features, labels, weights=None):
        if plain:
            return plain_class_sums(features, labels, C, weights)
        return lsr_fast.class_feature_stats(features, labels, C, weights=weights, backend=backend)

    def cosine(features, prototypes):
        return plain_cosine(features, prototypes) if plain else lsr_fast.prototype_distances(features, prototypes, metric="cosine")

    if op == "toolkit_fewshot":
        support, query = leaf("features"), leaf("target_features")
        labels, coverage = x["small"], x["coverage"]

        def forward():
            sums, covered = class_sums(support, labels, coverage)
            shown = covered > 0
            prototypes = sums / torch.where(shown, covered, torch.ones_like(covered)).unsqueeze(1)  # masked average pooling
            logits = FEWSHOT_SCALE * cosine(query, prototypes)
            logits = logits.masked_fill(~shown.view(1, -1, 1, 1), float("-inf"))  # only the support's classes
            target = torch.where(shown[labels.clamp(max=C - 1)] & (labels != VOID), labels, VOID)
            return F.cross_entropy(logits, target, ignore_index=VOID)

        return forward, [support, query], lambda: (None, None)

    bank = _bank(x, backend, C)
    state = lambda: (bank.prototypes, bank.seen)  # noqa: E731
    if op == "toolkit_proda":
        features, logits = x["target_features"], leaf("target_logits")

        def forward():
            with torch.no_grad():
                probs = logits.softmax(dim=1)
                confidence, labels = probs.max(dim=1)
                prototypes = bank.prototypes
                if plain:
                    distances = plain_distances(features, prototypes)
                else:
                    distances = lsr_fast.prototype_distances(features, prototypes, metric="l2")
                unseen = ~bank.seen.view(1, -1, 1, 1)
                weights = torch.softmax((-distances / PRODA_TAU).masked_fill(unseen, torch.finfo(distances.dtype).min), dim=1)
                rectified = weights * probs
                rectified = rectified / rectified.sum(dim=1, keepdim=True)
                score, denoised = rectified.max(dim=1)
                pseudo = torch.where(score > PRODA_THRESHOLD, denoised, VOID)
            loss = F.cross_entropy(logits, pseudo, ignore_index=VOID)
            with torch.no_grad():
                bank.update(*class_sums(features, labels, confidence))
            return loss

        return forward, [logits], state
    if op == "toolkit_contrastive":
        features, labels = leaf("features"), x["small"]

        def forward():
            logits = cosine(features, bank.prototypes) / CONTRASTIVE_TEMPERATURE
            logits = logits.masked_fill(~bank.seen.view(1, -1, 1, 1), float("-inf"))
            target = torch.where(bank.seen[labels.clamp(max=C - 1)] & (labels != VOID), labels, VOID)
            loss = F.cross_entropy(logits, target, ignore_index=VOID)
            with torch.no_grad():
                bank.update(*class_sums(features.detach(), labels))
            return loss

        return forward, [features], state
    raise ValueError(f"op must be one of {TOOLKIT_OPS}, got {op!r}")


def bytes_moved(op: str, backward: bool, x: Dict[str, torch.Tensor]) -> int:
    """Hand model of the fewest bytes a step must read and write (see workload.bytes_moved): the
    feature maps, labels, weights and logits read once, the (C, K) sums and (B, C, h, w) logits or
    distances written once; backward re-reads the maps it differentiates and writes their gradients."""

    def nb(name):
        t = x[name]
        return t.numel() * t.element_size()

    C, K = x["prototypes"].shape
    table = C * K * 4
    scores = x["target_logits"].numel() * 4  # (B, C, h, w) float32 logits, distances or cosines
    if op == "toolkit_fewshot":
        forward = nb("features") + nb("small") + nb("coverage") + table + nb("target_features") + scores
        return forward + (2 * (nb("features") + nb("target_features")) + nb("small") + scores if backward else 0)
    if op == "toolkit_proda":
        forward = nb("target_features") + nb("target_logits") + 2 * table + scores
        return forward + (2 * nb("target_logits") if backward else 0)
    if op == "toolkit_contrastive":
        forward = nb("features") + nb("small") + 2 * table + scores
        return forward + (2 * nb("features") + scores if backward else 0)
    raise ValueError(f"op must be one of {TOOLKIT_OPS}, got {op!r}")
