"""What the public ops build from the backends' kernels: the losses from the compiled and Triton
backends' fused pass, and weighted class statistics from any backend's unweighted ones."""

from typing import Callable, Tuple

import torch

from ..reference import _accumulate_dtype, clustering_from_sums


def weighted_class_feature_stats(
    class_feature_stats: Callable, features: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int,
    weights: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reference's ``class_feature_stats(..., weights)`` from a backend's unweighted one
    (``class_feature_stats(features, labels, num_classes, ignore_index)``): the same kernel sums
    w * f, formed in the accumulation dtype (so half-precision features are not rounded after
    weighting), and sums w itself as a one-channel feature for the weight sums. Autograd carries
    the gradient through the kernel's backward and the product (w * grad_sums[label]). Costs one
    elementwise pass over the map each way more than the unweighted op, which stays untouched."""
    acc = _accumulate_dtype(features)
    w = weights.detach().to(device=features.device, dtype=acc)
    # (B, 1, h, w) or (N, 1): broadcast over the channels, keeping the features' layout.
    sums, _ = class_feature_stats(features.to(acc) * w.unsqueeze(1), labels, num_classes, ignore_index)
    weight_sums, _ = class_feature_stats(w.reshape(-1, 1), labels.reshape(-1), num_classes, ignore_index)
    return sums, weight_sums.reshape(num_classes)


def losses_from_feature_terms(feature_terms: Callable) -> Tuple[Callable, Callable]:
    """(clustering_loss, norm_alignment_loss) with the reference's signatures, each one call of a
    backend's ``feature_terms(features, labels, prototypes, reference, mode, ignore_index,
    distance, filtered)``."""

    def clustering_loss(features, labels, prototypes, valid, ignore_index, distance="squared_l2"):
        _, counts, dist_sums, _, _ = feature_terms(features, labels, prototypes, 0.0, "source", ignore_index, distance, False)
        return clustering_from_sums(dist_sums, counts, valid, distance=distance, width=features.shape[1])

    def norm_alignment_loss(features, reference, mode, relative_to=None, filtered=False):
        rows = features.shape[0] if features.dim() == 2 else features.shape[0] * features.shape[2] * features.shape[3]
        # With zero classes (and every label equal to ignore_index) only the norm terms count.
        all_void = torch.zeros(features.shape[:1] + features.shape[2:], dtype=torch.uint8, device=features.device)
        no_prototypes = features.new_zeros((0, features.shape[1]), dtype=_accumulate_dtype(features))
        _, _, _, norm_loss_sum, _ = feature_terms(features, all_void, no_prototypes, reference, mode, 0, "squared_l2", filtered)
        loss = norm_loss_sum / rows
        return loss if relative_to is None else loss / relative_to

    return clustering_loss, norm_alignment_loss
