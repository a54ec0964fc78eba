"""Few-shot segmentation by masked average pooling (PANet-style), on the built-in synthetic scenes.

An episode: support images with their masks, query images to segment. Each class's prototype is
the average of the support features under its mask (``class_feature_stats`` with the mask's
coverage of each feature cell as weights); every query pixel is classified by its cosine
similarity to the prototypes (``prototype_distances``), scaled by 20 as in PANet. A small
encoder is trained on episodes of source scenes, then segments a held-out episode.

    python examples/fewshot_segmentation.py        # about 15 s on 2 CPU cores
"""

import time

import torch
import torch.nn.functional as F
from torch import nn

import lsr_fast
from lsr_fast.data import SyntheticScenes

NUM_CLASSES, VOID = 19, 255
SCALE = 20.0  # PANet's alpha: cosine similarities in [-1, 1] become usable logits


def make_encoder(width: int = 16) -> nn.Module:
    """Features at 1/4 of the image resolution (ReLU: some feature vectors are exactly 0)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(width, width, 3, 1, 1), nn.ReLU(),
    )


def scenes(domain: str, indices, size=(64, 128), seed: int = 0):
    """Images (B, 3, H, W) in [0, 1] and trainId labels (B, H, W) of some synthetic scenes."""
    indices = list(indices)
    data = SyntheticScenes(domain, max(indices) + 1, size=size, seed=seed)
    items = [data[i] for i in indices]
    return torch.stack([it["image"] for it in items]).float() / 255, torch.stack([it["label"] for it in items])


def soft_labels(labels: torch.Tensor, size) -> tuple:
    """Each feature cell's majority class (void when that is the void label) and the fraction of
    the cell it covers: the support mask pooled to feature resolution, as masked average pooling
    weights."""
    one_hot = F.one_hot(torch.where(labels == VOID, NUM_CLASSES, labels), NUM_CLASSES + 1)
    coverage = F.adaptive_avg_pool2d(one_hot.permute(0, 3, 1, 2).float(), size)  # (B, C+1, h, w)
    weight, label = coverage.max(dim=1)
    return torch.where(label == NUM_CLASSES, VOID, label), weight


def episode_loss(encoder, support_images, support_labels, query_images, query_labels):
    """PANet's segmentation loss of one episode: cross-entropy of the query pixels (of classes
    the support shows) against the scaled cosines to the support prototypes. Returns the loss,
    the query logits (B, 19, H, W) and the query labels it was scored on (others void)."""
    support = encoder(support_images)
    query = encoder(query_images)
    labels, weights = soft_labels(support_labels, support.shape[2:])
    sums, coverage = lsr_fast.class_feature_stats(support, labels, NUM_CLASSES, weights=weights)
    shown = coverage > 0
    prototypes = sums / torch.where(shown, coverage, 1).unsqueeze(1)  # masked average pooling
    logits = SCALE * lsr_fast.prototype_distances(query, prototypes, metric="cosine")
    logits = F.interpolate(logits, size=query_labels.shape[1:], mode="bilinear", align_corners=False)
    logits = logits.masked_fill(~shown.view(1, -1, 1, 1), float("-inf"))  # only the support's classes
    target = torch.where(shown[query_labels.clamp(max=NUM_CLASSES - 1)] & (query_labels != VOID), query_labels, VOID)
    return F.cross_entropy(logits, target, ignore_index=VOID), logits, target


def mean_iou(logits, labels) -> float:
    cm = lsr_fast.confusion_matrix(logits.argmax(1), labels, NUM_CLASSES)
    return float(lsr_fast.mean_iou(cm))


def main(steps: int = 30) -> None:
    start = time.time()
    torch.manual_seed(0)
    encoder = make_encoder()
    optimizer = torch.optim.Adam(encoder.parameters(), lr=3e-3)
    images, labels = scenes("source", range(36))
    episode = lambda i: ((images[i:i + 2], labels[i:i + 2]), (images[i + 2:i + 4], labels[i + 2:i + 4]))  # noqa: E731
    held_out = episode(32)  # (support, query), never trained on
    with torch.no_grad():
        before = mean_iou(*episode_loss(encoder, *held_out[0], *held_out[1])[1:])
    for step in range(steps):
        support, query = episode(4 * (step % 8))  # 2 support + 2 query scenes, from 32 scenes
        loss, _, _ = episode_loss(encoder, *support, *query)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"episode {step:2d}: query loss {loss.item():.3f}")
    with torch.no_grad():
        after = mean_iou(*episode_loss(encoder, *held_out[0], *held_out[1])[1:])
    print(f"held-out episode, query mIoU over the support's classes: {before:.1f} -> {after:.1f} "
          f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
