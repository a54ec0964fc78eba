"""The compiled backends ("cpp" for CPU tensors, "cuda" for CUDA tensors): torch.ops.lsr_fast.*

The C++/CUDA kernels (csrc/) register the ops' schemas and device implementations. Here the ops
get their fake (meta) implementations, so torch.compile traces them without a graph break, and
their autograd formulas, whose backward is one more kernel each. The functions at the bottom
have the reference's signatures and are what lsr_fast.ops dispatches to.
"""

from __future__ import annotations

from typing import Union

import torch

from ._checks import DISTANCES
from ._derived import losses_from_feature_terms

try:
    from lsr_fast import _C  # noqa: F401  (loading it registers torch.ops.lsr_fast.*)

    _LOAD_ERROR = ""
except ImportError as error:  # the optional build was skipped or failed
    _LOAD_ERROR = f"the compiled extension lsr_fast._C is not built ({error}); reinstall with a C++ compiler present"

OPS = (
    "hist_downsample",
    "pseudo_label_downsample",
    "class_feature_stats",
    "class_feature_stats_backward",
    "feature_terms",
    "feature_terms_backward",
    "maxsquare_loss",
    "maxsquare_loss_backward",
)
_DISPATCH_KEY = {"cpp": "CPU", "cuda": "CUDA"}
NORM_MODES = {"source": 0, "target": 1}


def unavailable_reason(backend: str) -> str:
    """Empty when ``backend`` ("cpp" or "cuda") has kernels for every op, else why not."""
    if _LOAD_ERROR:
        return _LOAD_ERROR
    if backend == "cuda" and torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    key = _DISPATCH_KEY[backend]
    missing = [
        name
        for name in OPS
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lsr_fast::{name}", key)
    ]
    if missing:
        what = "CUDA sources" if backend == "cuda" else "CPU kernels"
        return f"the extension was built without {what} for: {', '.join(missing)}"
    return ""


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _same_device(op: str, **tensors) -> None:
    """A raw call whose tensors are on different devices reaches the fake kernel when one of them
    is a meta tensor (the Meta dispatch key wins); it must raise, not return an uninitialised
    tensor on the first tensor's device. The device kernels check the other mixes themselves."""
    (first, like), *rest = [(name, t) for name, t in tensors.items() if t is not None]
    for name, t in rest:
        if t.device != like.device:
            raise RuntimeError(f"lsr_fast::{op}: {name} is on {t.device} but {first} is on {like.device}")


if not _LOAD_ERROR:

    # ---- fake implementations: shapes and dtypes only ------------------------------------

    @torch.library.register_fake("lsr_fast::hist_downsample")
    def _(labels, out_h, out_w, num_classes, threshold, ignore_index, class_weights):
        _same_device("hist_downsample", labels=labels, class_weights=class_weights)
        return labels.new_empty((labels.shape[0], out_h, out_w), dtype=torch.int64)

    @torch.library.register_fake("lsr_fast::pseudo_label_downsample")
    def _(probs, out_h, out_w, threshold, confidence, ignore_index):
        return probs.new_empty((probs.shape[0], out_h, out_w), dtype=torch.int64)

    @torch.library.register_fake("lsr_fast::class_feature_stats")
    def _(features, labels, num_classes, ignore_index):
        _same_device("class_feature_stats", features=features, labels=labels)
        acc = _accumulate_dtype(features.dtype)
        return (
            features.new_empty((num_classes, features.shape[1]), dtype=acc),
            features.new_empty((num_classes,), dtype=torch.int64),
        )

    @torch.library.register_fake("lsr_fast::class_feature_stats_backward")
    def _(grad_sums, features, labels, ignore_index):
        _same_device("class_feature_stats_backward", features=features, labels=labels, grad_sums=grad_sums)
        return torch.empty_like(features)

    @torch.library.register_fake("lsr_fast::feature_terms")
    def _(features, labels, prototypes, reference, norm_mode, ignore_index, distance=0, filtered=False):
        _same_device("feature_terms", features=features, labels=labels, prototypes=prototypes, reference=reference)
        acc = _accumulate_dtype(features.dtype)
        num_classes = prototypes.shape[0]
        return (
            features.new_empty((num_classes, features.shape[1]), dtype=acc),
            features.new_empty((num_classes,), dtype=torch.int64),
            features.new_empty((num_classes,), dtype=acc),
            features.new_empty((), dtype=acc),
            features.new_empty((), dtype=acc),
        )

    @torch.library.register_fake("lsr_fast::feature_terms_backward")
    def _(
        grad_sums, grad_sq, grad_norm_loss, grad_norm_sum, features, labels, prototypes, reference, norm_mode, ignore_index,
        distance=0, filtered=False,
    ):
        _same_device(
            "feature_terms_backward", features=features, labels=labels, prototypes=prototypes, reference=reference,
            grad_sums=grad_sums, grad_sq_dist_sums=grad_sq, grad_norm_loss_sum=grad_norm_loss, grad_norm_sum=grad_norm_sum,
        )
        return torch.empty_like(features)

    @torch.library.register_fake("lsr_fast::maxsquare_loss")
    def _(probs, alpha):
        acc = _accumulate_dtype(probs.dtype)
        return probs.new_empty((), dtype=acc), probs.new_empty(probs.shape[:2], dtype=acc)

    @torch.library.register_fake("lsr_fast::maxsquare_loss_backward")
    def _(grad_loss, probs, class_weight):
        _same_device("maxsquare_loss_backward", probs=probs, grad_loss=grad_loss, class_weight=class_weight)
        return torch.empty_like(probs)

    # ---- autograd: every backward is one kernel --------------------------------------------

    def _stats_setup(ctx, inputs, output):
        features, labels, _, ignore_index = inputs
        ctx.save_for_backward(features, labels)
        ctx.ignore_index = ignore_index

    def _stats_backward(ctx, grad_sums, grad_counts):
        features, labels = ctx.saved_tensors
        grad = torch.ops.lsr_fast.class_feature_stats_backward(grad_sums.contiguous(), features, labels, ctx.ignore_index)
        return grad, None, None, None

    torch.library.register_autograd("lsr_fast::class_feature_stats", _stats_backward, setup_context=_stats_setup)

    def _terms_setup(ctx, inputs, output):
        features, labels, prototypes, reference, norm_mode, ignore_index, distance, filtered = inputs
        ctx.save_for_backward(features, labels, prototypes, reference)
        ctx.norm_mode, ctx.ignore_index, ctx.distance, ctx.filtered = norm_mode, ignore_index, distance, filtered

    def _terms_backward(ctx, grad_sums, grad_counts, grad_sq, grad_norm_loss, grad_norm_sum):
        features, labels, prototypes, reference = ctx.saved_tensors
        acc = _accumulate_dtype(features.dtype)
        num_classes, width = prototypes.shape
        # Outputs that did not reach the loss get no gradient; the kernel wants zeros instead.
        if grad_sums is None:
            grad_sums = features.new_zeros((num_classes, width), dtype=acc)
        if grad_sq is None:
            grad_sq = features.new_zeros((num_classes,), dtype=acc)
        if grad_norm_loss is None:
            grad_norm_loss = features.new_zeros((), dtype=acc)
        if grad_norm_sum is None:
            grad_norm_sum = features.new_zeros((), dtype=acc)
        grad = torch.ops.lsr_fast.feature_terms_backward(
            grad_sums.contiguous(), grad_sq.contiguous(), grad_norm_loss, grad_norm_sum,
            features, labels, prototypes, reference, ctx.norm_mode, ctx.ignore_index, ctx.distance, ctx.filtered,
        )
        return grad, None, None, None, None, None, None, None

    torch.library.register_autograd("lsr_fast::feature_terms", _terms_backward, setup_context=_terms_setup)

    def _maxsquare_setup(ctx, inputs, output):
        probs, _ = inputs
        ctx.save_for_backward(probs, output[1])

    def _maxsquare_backward(ctx, grad_loss, grad_class_weight):
        probs, class_weight = ctx.saved_tensors
        return torch.ops.lsr_fast.maxsquare_loss_backward(grad_loss, probs, class_weight), None

    torch.library.register_autograd("lsr_fast::maxsquare_loss", _maxsquare_backward, setup_context=_maxsquare_setup)


# ---- the backend functions (reference signatures, checked arguments) -------------------------


def hist_downsample(labels, size, num_classes, threshold, ignore_index, class_weights):
    if class_weights is not None:
        class_weights = class_weights.to(device=labels.device, dtype=torch.float32).contiguous()
    return torch.ops.lsr_fast.hist_downsample(labels, size[0], size[1], num_classes, threshold, ignore_index, class_weights)


def pseudo_label_downsample(probs, size, threshold, confidence, ignore_index):
    return torch.ops.lsr_fast.pseudo_label_downsample(probs, size[0], size[1], threshold, confidence, ignore_index)


def class_feature_stats(features, labels, num_classes, ignore_index):
    return torch.ops.lsr_fast.class_feature_stats(features, labels, num_classes, ignore_index)


def feature_terms(
    features: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    reference: Union[float, torch.Tensor],
    mode: str,
    ignore_index: int,
    distance: str = "squared_l2",
    filtered: bool = False,
):
    """One pass: (sums (C,K), counts (C,), distance sums (C,), norm-loss sum, norm sum).

    ``distance``: "squared_l2" (||f - p_c||^2) or "l1_mean" (sum_k |f_k - p_ck|; the mean over
    channels is clustering_from_sums' division); ``filtered``: the norm-loss sum of the filtered
    norms (see lsr_fast.reference.feature_terms)."""
    acc = _accumulate_dtype(features.dtype)
    if isinstance(reference, torch.Tensor):
        reference = reference.detach().to(device=features.device, dtype=acc)
    else:
        # Filled on the device: a tensor made on the host and moved would be a blocking
        # host-to-device copy on every call (clustering_loss passes 0.0 each time).
        reference = torch.full((), float(reference), dtype=acc, device=features.device)
    # A copy: the op saves it for backward, and callers (LSRRegularizer) update their prototype
    # bank in place before backward runs; (C, K) costs nothing next to the pass over features.
    prototypes = prototypes.detach().to(device=features.device, dtype=acc, memory_format=torch.contiguous_format, copy=True)
    return torch.ops.lsr_fast.feature_terms(
        features, labels, prototypes, reference, NORM_MODES[mode], ignore_index, DISTANCES.index(distance), bool(filtered)
    )


clustering_loss, norm_alignment_loss = losses_from_feature_terms(feature_terms)


def maxsquare_loss(probs, alpha):
    return torch.ops.lsr_fast.maxsquare_loss(probs, alpha)[0]
