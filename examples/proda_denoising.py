"""Prototype-based pseudo-label denoising for domain adaptation (ProDA-style), on the built-in
synthetic scenes.

Each step trains on a labelled source batch and a target batch labelled by the network itself.
The target pseudo-labels are denoised with class prototypes: the network's probabilities are
reweighted by a softmax over the (negative) distances of each feature to the target prototypes
(``prototype_distances``), as in ProDA (Zhang et al., CVPR 2021), and kept where the rectified
probability is confident. The prototypes live in a ``PrototypeBank``, updated every step with
confidence-weighted target prototypes (``class_feature_stats`` with the network's confidence as
weights). The first steps train on the source only (the warm-up a real run does first).

    python examples/proda_denoising.py             # about 20 s on 2 CPU cores
"""

import time

import torch
import torch.nn.functional as F
from torch import nn

import lsr_fast
from lsr_fast.data import SyntheticScenes

NUM_CLASSES, VOID = 19, 255
TAU = 1.0  # temperature of the softmax over distances
THRESHOLD = 0.5  # rectified probability a pseudo-label must exceed


class Net(nn.Module):
    """A small segmentation network: features at 1/4 resolution and a 1x1 classifier on them."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(width, width, 3, 1, 1), nn.ReLU(),
        )
        self.classifier = nn.Conv2d(width, NUM_CLASSES, 1)

    def forward(self, images):
        features = self.features(images)
        return features, self.classifier(features)


def scenes(domain: str, indices, size=(64, 128), seed: int = 0):
    """Images (B, 3, H, W) in [0, 1] and trainId labels (B, H, W) of some synthetic scenes."""
    indices = list(indices)
    data = SyntheticScenes(domain, max(indices) + 1, size=size, seed=seed)
    items = [data[i] for i in indices]
    return torch.stack([it["image"] for it in items]).float() / 255, torch.stack([it["label"] for it in items])


@torch.no_grad()
def denoised_pseudo_labels(features, logits, bank):
    """ProDA's rectification: p'_c = w_c * p_c / sum_k w_k p_k with w = softmax_c(-||f - eta_c|| /
    tau) over the classes the bank has seen (all weights equal before any), then argmax, void
    where p' <= THRESHOLD. Also the network's own labels and confidence, for the bank."""
    probs = logits.softmax(dim=1)
    confidence, labels = probs.max(dim=1)
    distances = lsr_fast.prototype_distances(features, bank.prototypes.to(features.dtype), metric="l2")
    unseen = ~bank.seen.view(1, -1, 1, 1)
    # The lowest finite value, not -inf: with no class seen yet every weight is then equal.
    weights = torch.softmax((-distances / TAU).masked_fill(unseen, torch.finfo(distances.dtype).min), dim=1)
    rectified = weights * probs
    rectified = rectified / rectified.sum(dim=1, keepdim=True)
    score, denoised = rectified.max(dim=1)
    return torch.where(score > THRESHOLD, denoised, VOID), labels, confidence


def train_loss(net, bank, source, target, lambda_target: float = 0.5):
    """Source cross-entropy + lambda * cross-entropy on the denoised target pseudo-labels (at
    feature resolution); then the bank takes this batch's confidence-weighted target prototypes
    (so the next step denoises with them)."""
    (source_images, source_labels), (target_images, _) = source, target
    _, source_logits = net(source_images)
    source_logits = F.interpolate(source_logits, size=source_labels.shape[1:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(source_logits, source_labels, ignore_index=VOID)
    target_features, target_logits = net(target_images)
    pseudo, labels, confidence = denoised_pseudo_labels(target_features.detach(), target_logits.detach(), bank)
    if lambda_target > 0 and bool((pseudo != VOID).any()):
        loss = loss + lambda_target * F.cross_entropy(target_logits, pseudo, ignore_index=VOID)
    with torch.no_grad():
        sums, weight_sums = lsr_fast.class_feature_stats(target_features, labels, NUM_CLASSES, weights=confidence)
    bank.update(sums, weight_sums)
    return loss


def target_miou(net, images, labels) -> float:
    with torch.no_grad():
        logits = F.interpolate(net(images)[1], size=labels.shape[1:], mode="bilinear", align_corners=False)
    return float(lsr_fast.mean_iou(lsr_fast.confusion_matrix(logits.argmax(1), labels, NUM_CLASSES)))


def main(warmup: int = 60, steps: int = 40) -> None:
    start = time.time()
    torch.manual_seed(0)
    net = Net()
    bank = lsr_fast.PrototypeBank(NUM_CLASSES, 16, momentum=0.9, init="first")
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    source, target = scenes("source", range(24)), scenes("target", range(24))
    held_out = scenes("target", range(24, 28))
    for step in range(warmup + steps):
        batch = slice(2 * (step % 12), 2 * (step % 12) + 2)  # the 24 scenes of each domain, cycled
        loss = train_loss(net, bank, [t[batch] for t in source], [t[batch] for t in target],
                          lambda_target=0.0 if step < warmup else 0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step + 1 == warmup:
            print(f"after {warmup} source-only steps: target mIoU {target_miou(net, *held_out):.1f}")
        if step % 20 == 0:
            print(f"step {step:2d}: loss {loss.item():.3f}, target classes in the bank {int(bank.seen.sum())}")
    print(f"after {steps} steps with denoised pseudo-labels: target mIoU {target_miou(net, *held_out):.1f} "
          f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
