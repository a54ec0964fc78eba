"""A pixel-to-prototype contrastive loss added to a segmentation step, on the built-in synthetic
scenes.

Every labelled feature vector is pulled towards its class prototype and pushed from the others:
InfoNCE over the cosine similarities to the prototypes of a ``PrototypeBank`` (each vector's
positive is its own class, the negatives every other class the bank has seen), with temperature
0.1. Labels reach feature resolution with ``hist_downsample``; the similarities are one
``prototype_distances`` call; the bank takes the batch's class means from
``class_feature_stats`` after each step (constants in the loss, as in LSR's clustering term).

    python examples/prototype_contrastive.py       # about 10 s on 2 CPU cores
"""

import time

import torch
import torch.nn.functional as F
from torch import nn

import lsr_fast
from lsr_fast.data import SyntheticScenes

NUM_CLASSES, VOID = 19, 255
TEMPERATURE = 0.1
LAMBDA = 0.1  # weight of the contrastive term next to the cross-entropy


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


def contrastive_loss(features, labels, bank):
    """Mean over the labelled vectors whose class the bank has seen of
    -log softmax_c(cos(f, p_c) / T)[label], the softmax over the seen classes; 0 when none."""
    logits = lsr_fast.prototype_distances(features, bank.prototypes, metric="cosine") / TEMPERATURE
    logits = logits.masked_fill(~bank.seen.view(1, -1, 1, 1), float("-inf"))
    seen_label = bank.seen[labels.clamp(max=NUM_CLASSES - 1)] & (labels != VOID)
    target = torch.where(seen_label, labels, VOID)
    if not bool(seen_label.any()):  # first step: nothing seen, no term (and no NaN from a 0/0 mean)
        return logits.new_zeros(())
    return F.cross_entropy(logits, target, ignore_index=VOID)  # -inf logits: probability 0, no NaN


def train_loss(net, bank, images, labels):
    """Cross-entropy + LAMBDA * the contrastive term against the bank as it stands; then the bank
    takes this batch's class means. Returns (total, cross-entropy, contrastive)."""
    features, logits = net(images)
    small = lsr_fast.hist_downsample(labels, features.shape[2:], NUM_CLASSES)  # labels at feature size
    logits = F.interpolate(logits, size=labels.shape[1:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(logits, labels, ignore_index=VOID)
    contrastive = contrastive_loss(features, small, bank)
    with torch.no_grad():
        sums, counts = lsr_fast.class_feature_stats(features, small, NUM_CLASSES)
    bank.update(sums, counts)
    return ce + LAMBDA * contrastive, ce, contrastive


def main(steps: int = 60) -> None:
    start = time.time()
    torch.manual_seed(0)
    net = Net()
    bank = lsr_fast.PrototypeBank(NUM_CLASSES, 16, momentum=0.9, init="first")
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    images, labels = scenes("source", range(24))
    for step in range(steps):
        batch = slice(2 * (step % 12), 2 * (step % 12) + 2)
        total, ce, contrastive = train_loss(net, bank, images[batch], labels[batch])
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"step {step:2d}: cross-entropy {ce.item():.3f}, contrastive {contrastive.item():.3f}, "
                  f"mean angle between prototypes {bank.mean_prototype_angle().item():.0f} deg")
    print(f"{steps} steps in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
