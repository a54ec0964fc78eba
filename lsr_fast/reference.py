"""Pure-torch reference of every LSR op: the oracle every kernel is tested against and the
baseline every kernel is benchmarked against.

Everything here is vectorised (no Python loop over classes, windows or pixels), runs on the
tensors' device, never synchronises with the host, and gets its gradients from plain autograd.
The functions take already-validated arguments; the public, checked entry points live in
:mod:`lsr_fast.ops`. Semantics are those of ``DESIGN.md`` ("Semantics"); where the design left
a choice, it is written down next to the code that makes it.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "window_bounds",
    "window_counts",
    "hist_downsample",
    "pseudo_label_downsample",
    "class_feature_stats",
    "clustering_loss",
    "clustering_from_sums",
    "feature_terms",
    "perpendicularity_loss",
    "norm_alignment_loss",
    "maxsquare_loss",
    "update_prototypes",
    "prototype_distances",
    "COSINE_EPS",
    "PROTOTYPE_METRICS",
]

# cos(a, b) = a.b / (max(|a|, eps) * max(|b|, eps)): a zero prototype (possible after a ReLU)
# has cosine 0 with everything instead of NaN.
COSINE_EPS = 1e-8
# prototype_distances' metrics.
PROTOTYPE_METRICS = ("l2", "cosine")
# A squared distance |f|^2 - 2 f.p + |p|^2 below this fraction of |f|^2 + |p|^2 is the GEMM's
# rounding noise (about u * (|f|^2 + |p|^2)): it is reported as distance 0 with gradient 0.
_L2_NOISE = {torch.float32: 16 * 2.0**-24, torch.float64: 16 * 2.0**-53}


def window_bounds(in_size: int, out_size: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Start and end (exclusive) of the ``out_size`` adaptive-pooling windows over ``in_size``.

    Cell i covers [floor(i * in / out), ceil((i + 1) * in / out)), as adaptive_avg_pool2d does.
    Integer arithmetic only, so every backend gets the same windows.
    """
    i = torch.arange(out_size, device=device, dtype=torch.int64)
    start = (i * in_size) // out_size
    end = ((i + 1) * in_size + out_size - 1) // out_size
    return start, end


def window_counts(one_hot: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Exact per-window sums of an integer (B, C, H, W) map, windows as in :func:`window_bounds`.

    Separable prefix sums: a cumulative sum down the rows gives every row-window's column
    counts by one subtraction, then a cumulative sum along those gives every window's count.
    Each window costs O(1) whatever its size, and overlapping (non-dividing) windows need no
    special case.
    """
    B, C, H, W = one_hot.shape
    h, w = size
    y0, y1 = window_bounds(H, h, one_hot.device)
    x0, x1 = window_bounds(W, w, one_hot.device)
    down = F.pad(one_hot.cumsum(2, dtype=torch.int32), (0, 0, 1, 0))  # (B, C, H + 1, W)
    bands = down.index_select(2, y1) - down.index_select(2, y0)  # (B, C, h, W)
    across = F.pad(bands.cumsum(3, dtype=torch.int32), (1, 0))  # (B, C, h, W + 1)
    return across.index_select(3, x1) - across.index_select(3, x0)


def _peak_ratio_decision(
    counts: torch.Tensor, threshold: float, ignore_index: int, class_weights: Optional[torch.Tensor]
) -> torch.Tensor:
    """DESIGN.md's decision on (B, C, h, w) window histograms -> int64 (B, h, w).

    Counts (times the optional weights) are compared in float32 so every backend rounds alike:
    keep the top class c1 (lowest index on ties) if n1 > 0 and n2 < threshold * n1.
    """
    scores = counts.to(torch.float32)
    if class_weights is not None:
        scores = scores * class_weights.to(device=scores.device, dtype=torch.float32).view(1, -1, 1, 1)
    n1, c1 = scores.max(dim=1)  # first maximum on ties
    if scores.shape[1] > 1:
        runner_up = scores.scatter(1, c1.unsqueeze(1), float("-inf"))
        n2 = runner_up.max(dim=1).values
    else:
        n2 = torch.zeros_like(n1)
    keep = (n1 > 0) & (n2 < torch.tensor(threshold, dtype=torch.float32) * n1)
    return torch.where(keep, c1, torch.full_like(c1, ignore_index))


def hist_downsample(
    labels: torch.Tensor,
    size: Tuple[int, int],
    num_classes: int,
    threshold: float = 0.5,
    ignore_index: int = 255,
    class_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Histogram-aware downsampling of integer (B, H, W) labels to int64 (B, h, w) (Sec. 3).

    Each window's class histogram comes from a one-hot map and an integral image; void pixels
    (``ignore_index``, and values outside [0, C): see :func:`_class_index`) get no one-hot
    entry, so they do not vote.
    """
    # Void pixels point at an extra class C that is dropped before counting. The one-hot map is
    # scattered straight into (B, C, H, W) int32, the layout the prefix sums want.
    index = _class_index(labels, num_classes, ignore_index)
    B, H, W = labels.shape
    window_pixels = _max_window(H, size[0]) * _max_window(W, size[1])
    if (num_classes + 1) * H * W * 4 > size[0] * size[1] * window_pixels**2:
        # Many classes: a one-hot map would outgrow the pairwise comparison within each window.
        return _hist_downsample_pairwise(index, size, num_classes, threshold, ignore_index, class_weights)
    one_hot = torch.zeros(B, num_classes + 1, H, W, dtype=torch.int32, device=labels.device)
    one_hot = one_hot.scatter_(1, index.unsqueeze(1), 1)[:, :num_classes]
    counts = window_counts(one_hot, size)
    return _peak_ratio_decision(counts, threshold, ignore_index, class_weights)


def _max_window(in_size: int, out_size: int) -> int:
    """The largest window extent of :func:`window_bounds`, from integers (no tensor read)."""
    return max(((i + 1) * in_size + out_size - 1) // out_size - (i * in_size) // out_size for i in range(out_size))


def _window_taps(in_size: int, out_size: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, extent) input positions of every window padded to the widest (clamped in range), and
    which of them lie in the window."""
    start, end = window_bounds(in_size, out_size, device)
    pos = start.unsqueeze(1) + torch.arange(_max_window(in_size, out_size), device=device)
    return pos.clamp(max=in_size - 1), pos < end.unsqueeze(1)


def _window_sums(values: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Per-window sums of a (B, H, W) map -> (B, h, w), rows then columns.

    Each window's values are gathered (padding adds 0) and summed: every partial sum holds only
    values of its own window, so where a window's sum is exact (see
    :func:`pseudo_label_downsample`) so is every step. An integral image would add the whole
    image first and lose that for large maps.
    """
    H, W = values.shape[1:]
    rows, row_ok = _window_taps(H, size[0], values.device)
    cols, col_ok = _window_taps(W, size[1], values.device)
    zero = values.new_zeros(())
    bands = torch.where(row_ok.unsqueeze(-1), values[:, rows], zero).sum(2)  # (B, h, kh, W) -> (B, h, W)
    return torch.where(col_ok, bands[:, :, cols], zero).sum(-1)  # (B, h, w, kw) -> (B, h, w)


def _hist_downsample_pairwise(
    index: torch.Tensor, size: Tuple[int, int], num_classes: int, threshold: float, ignore_index: int,
    class_weights: Optional[torch.Tensor],
) -> torch.Tensor:
    """hist_downsample for a large class count, in memory independent of it: each window's
    pixels (padded to the largest window with void) count how many of them share their class,
    and the same float32 decision as :func:`_peak_ratio_decision` is taken over those."""
    B, H, W = index.shape
    (h, w), void = size, num_classes

    rows, row_ok = _window_taps(H, h, index.device)
    cols, col_ok = _window_taps(W, w, index.device)
    window = index[:, rows.unsqueeze(2).unsqueeze(3), cols.unsqueeze(0).unsqueeze(1)]  # (B, h, kh, w, kw)
    exists = row_ok.unsqueeze(2).unsqueeze(3) & col_ok.unsqueeze(0).unsqueeze(1)
    pixels = rows.shape[1] * cols.shape[1]  # explicit: reshape(..., -1) fails for B = 0
    window = torch.where(exists, window, torch.full_like(window, void)).permute(0, 1, 3, 2, 4).reshape(B, h, w, pixels)
    is_class = window != void
    counts = (window.unsqueeze(-1) == window.unsqueeze(-2)).sum(-1)  # pixels sharing each pixel's class
    scores = counts.to(torch.float32)
    if class_weights is not None:
        weights = class_weights.to(device=index.device, dtype=torch.float32)
        scores = scores * weights[window.clamp(max=num_classes - 1)]
    scores = torch.where(is_class, scores, torch.zeros((), device=index.device))
    n1 = scores.max(dim=-1).values
    c1 = torch.where(is_class & (scores == n1.unsqueeze(-1)), window, torch.full_like(window, void)).min(dim=-1).values
    # Every class outside the window scores 0, so the runner-up is at least 0.
    n2 = torch.where(window != c1.unsqueeze(-1), scores, torch.zeros((), device=index.device)).max(dim=-1).values
    keep = (c1 != void) & (n1 > 0) & (n2 < torch.tensor(threshold, dtype=torch.float32) * n1)
    return torch.where(keep, c1, torch.full_like(c1, ignore_index))


def pseudo_label_downsample(
    probs: torch.Tensor,
    size: Tuple[int, int],
    threshold: float = 0.5,
    confidence: float = 0.5,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Pseudo-labels at feature resolution from (B, C, H, W) probabilities -> int64 (B, h, w).

    hist_downsample of the per-pixel argmax, then cells whose window-mean of the per-pixel max
    probability is <= ``confidence`` become ``ignore_index``.

    Every backend takes that test as ``S > confidence * n`` in float64, with the same
    expression: S the float64 sum of the window's maxima rounded to float32 (exact for float16
    and bfloat16), n its pixel count, ``confidence`` the Python float (a double, not rounded to
    float32). This is "mean > confidence" up to one rounding of ``confidence * n`` (2^-53
    relative), and a cell whose mean equals ``confidence`` exactly is void.

    Why the backends agree bit for bit although they add in different orders: a softmax's
    maximum is at least 1/C >= 2^-k for C <= 2^k, and every float32 value >= 2^-(k+1) (room for
    rounding below 1/C) is a multiple of 2^-(24+k). A sum of up to 2^(29-k) values in
    [2^-(k+1), 1] is a multiple of 2^-(24+k) of at most 2^(29-k), held exactly by float64, so
    no order of addition changes it (C = 19: windows up to 2^24 pixels; C = 1100: up to 2^18).
    Exactness, and so agreement, can fail only for larger windows, for maxima far below 1/C,
    or for inputs that are not probabilities; backends may then decide differently, and only
    cells whose S is within ~1e-16 relative of ``confidence * n``.
    """
    num_classes = probs.shape[1]
    max_prob, prediction = probs.max(dim=1)
    labels = hist_downsample(prediction, size, num_classes, threshold, ignore_index)
    sums = _window_sums(max_prob.to(torch.float32).to(torch.float64), size)
    y0, y1 = window_bounds(probs.shape[2], size[0], probs.device)
    x0, x1 = window_bounds(probs.shape[3], size[1], probs.device)
    count = ((y1 - y0).unsqueeze(1) * (x1 - x0)).to(torch.float64)  # (h, w), exact integers
    return torch.where(sums > confidence * count, labels, torch.full_like(labels, ignore_index))


def _accumulate_dtype(features: torch.Tensor) -> torch.dtype:
    # Half-precision features accumulate (and report) in float32; float64 stays float64.
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def _as_rows(features: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, K, h, w) + (B, h, w) -> features (B, K, N) and labels (B, N); (N, K) rows -> (1, K, N)."""
    if features.dim() == 2:
        return features.t().unsqueeze(0), labels.reshape(1, -1)
    B, K = features.shape[:2]
    n = features.shape[2] * features.shape[3]  # explicit: reshape(B, K, -1) fails for B = 0
    return features.reshape(B, K, n), labels.reshape(B, n)


def _class_index(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Labels as int64 with void mapped to the extra class ``num_classes``.

    Void is ``ignore_index`` and, in every backend, any value outside [0, C): the public ops
    reject such values first unless the value checks are off, and then no backend indexes out
    of bounds or disagrees with another (README, "The raw ops' input contract").
    """
    labels = labels.long()
    void = (labels == ignore_index) | (labels < 0) | (labels >= num_classes)
    return torch.where(void, torch.full_like(labels, num_classes), labels)


def class_feature_stats(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums (C, K) and counts (C,) int64 of the feature vectors; void is skipped.

    With ``weights`` (the shape of ``labels``, constants) the sums are of w * f and the counts
    are the per-class sums of w, in the sums' dtype. A one-hot (weight) matrix product
    ((C+1) x N times N x K per image) does the scatter-reduction with a GEMM and reads the NCHW
    features in place; its backward (a gather, times w) comes from autograd.
    """
    rows, flat_labels = _as_rows(features, labels)
    index = _class_index(flat_labels, num_classes, ignore_index)
    acc = _accumulate_dtype(features)
    # (B, N, C+1) by scatter: F.one_hot reads the indices' range back to the host on the CPU,
    # and _class_index has already put every index in [0, C].
    one_hot = torch.zeros(*index.shape, num_classes + 1, dtype=acc, device=index.device).scatter_(-1, index.unsqueeze(-1), 1)
    if weights is not None:
        one_hot = one_hot * weights.detach().to(acc).reshape(index.shape).unsqueeze(-1)
    sums = torch.einsum("bnc,bkn->ck", one_hot, rows.to(acc))[:num_classes]
    if weights is not None:
        return sums, one_hot.sum(dim=(0, 1))[:num_classes]
    counts = torch.bincount(index.reshape(-1), minlength=num_classes + 1)[:num_classes]
    return sums, counts


def clustering_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
    distance: str = "squared_l2",
) -> torch.Tensor:
    """Clustering over the classes that qualify: present in ``labels`` and ``valid[c]`` (their
    prototype has been estimated). The prototypes are constants. 0 when no class qualifies.

    ``distance="squared_l2"`` (Eq. 5): mean over qualifying classes of the mean ||p_c - f||^2
    over their vectors. ``"l1_mean"`` (the authors' released code, ``nn.L1Loss`` per class):
    (1/C) * sum over qualifying classes of the mean |f - p_c| over their vectors and channels,
    C = every class; its gradient is sign(f - p_c) (0 at equality).
    """
    num_classes = prototypes.shape[0]
    rows, labels = _as_rows(features, labels)
    index = _class_index(labels, num_classes, ignore_index)  # (B, N)
    acc = _accumulate_dtype(features)
    per_class = _class_distance_sums(rows, index, prototypes, acc, distance)
    counts = torch.bincount(index.reshape(-1), minlength=num_classes + 1)[:num_classes]
    return clustering_from_sums(per_class, counts, valid, distance=distance, width=features.shape[1])


def _class_distance_sums(
    rows: torch.Tensor, index: torch.Tensor, prototypes: torch.Tensor, acc: torch.dtype, distance: str
) -> torch.Tensor:
    """Per-class sums (C,) over the vectors of each class of ||f - p_c||^2 or sum_k |f_k - p_ck|.

    The difference is taken explicitly (not |f|^2 - 2 f.p + |p|^2) so the oracle has no
    cancellation error when features sit close to their prototype. Void vectors are compared
    with an extra zero prototype and dropped with class C.
    """
    num_classes = prototypes.shape[0]
    padded = F.pad(prototypes.detach().to(acc), (0, 0, 0, 1))
    diff = rows.to(acc) - padded[index].permute(0, 2, 1)  # (B, K, N)
    per_vector = diff.pow(2).sum(dim=1) if distance == "squared_l2" else diff.abs().sum(dim=1)
    sums = torch.zeros(num_classes + 1, dtype=acc, device=rows.device)
    return sums.index_add(0, index.reshape(-1), per_vector.reshape(-1))[:num_classes]


def clustering_from_sums(
    dist_sums: torch.Tensor,
    counts: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    *,
    distance: str = "squared_l2",
    width: int = 1,
) -> torch.Tensor:
    """Clustering from per-class distance sums (C,) and counts (C,), as the fused passes return
    them; ``width`` is K, which the ``"l1_mean"`` form averages over too (see clustering_loss)."""
    qualifies = counts > 0
    if valid is not None:
        qualifies = qualifies & valid.to(device=qualifies.device, dtype=torch.bool)
    class_means = dist_sums / counts.clamp(min=1).to(dist_sums.dtype)
    if distance == "l1_mean":
        return (class_means * qualifies).sum() / (width * dist_sums.shape[0])
    return (class_means * qualifies).sum() / qualifies.sum().clamp(min=1).to(dist_sums.dtype)


def perpendicularity_loss(prototypes: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 6: mean cosine over ordered pairs i != j of the present prototypes; 0 if fewer than 2.

    One Gram matrix of the normalised prototypes replaces the O(C^2) loop of tiny kernels.
    A prototype with norm below COSINE_EPS (e.g. a class whose features are all zero after a
    ReLU) has unit vector 0: cosine 0 and no gradient, instead of a gradient of order 1/eps.
    """
    num_classes = prototypes.shape[0]
    acc = _accumulate_dtype(prototypes)
    if present is None:
        present = torch.ones(num_classes, dtype=torch.bool, device=prototypes.device)
    present = present.to(device=prototypes.device, dtype=acc)
    protos = prototypes.to(acc)
    norms = torch.linalg.vector_norm(protos, dim=1, keepdim=True)
    unit = torch.where(norms >= COSINE_EPS, protos / norms.clamp(min=COSINE_EPS), torch.zeros_like(protos))
    cosines = unit @ unit.t()
    pair_mask = (present.unsqueeze(0) * present.unsqueeze(1)) * (1 - torch.eye(num_classes, dtype=acc, device=prototypes.device))
    n = present.sum()
    return (cosines * pair_mask).sum() / (n * (n - 1)).clamp(min=1)


def _norm_terms(
    rows: torch.Tensor, reference: Union[float, torch.Tensor], mode: str, filtered: bool, acc: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(norm-alignment term per vector, unfiltered norm per vector) of (B, K, N) rows.

    With ``filtered`` the term uses ||f~||, f~_k = f_k where f_k >= the vector's own mean channel
    value, else 0 (the released code's filter): the mean is a constant (no gradient) and the
    dropped channels get none. A channel equal to the mean is kept, and so is every channel of a
    vector whose channels are all equal (the mean is capped at the largest channel). At a zero norm the gradient is taken as 0 (as autograd does).
    """
    rows = rows.to(acc)
    norms = torch.linalg.vector_norm(rows, dim=1)
    if filtered and rows.shape[1] > 0:  # (K = 0: every norm is 0 either way)
        # Capped at the largest channel: a rounded mean of equal channels may exceed them all.
        detached = rows.detach()
        mean = torch.minimum(detached.mean(dim=1, keepdim=True), detached.amax(dim=1, keepdim=True))
        term_norms = torch.linalg.vector_norm(torch.where(rows >= mean, rows, torch.zeros((), dtype=acc, device=rows.device)), dim=1)
    else:
        term_norms = norms
    if isinstance(reference, torch.Tensor):
        reference = reference.detach().to(device=rows.device, dtype=acc)
    gap = reference - term_norms
    return (gap.abs() if mode == "source" else gap.clamp(min=0)), norms


def norm_alignment_loss(
    features: torch.Tensor,
    reference: Union[float, torch.Tensor],
    mode: str = "source",
    relative_to: Optional[Union[float, torch.Tensor]] = None,
    filtered: bool = False,
) -> torch.Tensor:
    """Eqs. 7-8 over every feature vector (void too): source mean |r - |f||, target mean relu(r - |f|).

    ``reference`` r is a constant. ``relative_to`` n (a constant) divides the mean: the released
    code's relative form |r - |f|| / n. ``filtered``: |f~| instead of |f| (see _norm_terms).
    """
    acc = _accumulate_dtype(features)
    rows = features.t().unsqueeze(0) if features.dim() == 2 else features.flatten(2)
    per_vector, _ = _norm_terms(rows, reference, mode, filtered, acc)
    loss = per_vector.mean()
    if relative_to is not None:
        loss = loss / (relative_to.detach().to(loss) if isinstance(relative_to, torch.Tensor) else relative_to)
    return loss


def maxsquare_loss(probs: torch.Tensor, alpha: float = 0.2) -> torch.Tensor:
    """Image-wise weighted MaxSquare (Chen et al., ICCV 2019), as LSR's L+ uses it.

    L = -1/(B*C) * sum_b sum_x w_b(y_x) * sum_c p_{b,c,x}^2 with y_x = argmax_c p (first on ties)
    and w_b(c) = 1 / max(N_{b,c}^alpha * N^(1-alpha), 1), N_{b,c} the pixels of image b predicted
    as c and N the pixels per image. The weights are constants; the histogram stays on device.
    """
    B, C = probs.shape[:2]
    acc = _accumulate_dtype(probs)
    p = probs.to(acc).reshape(B, C, -1)
    num_pixels = p.shape[2]
    prediction = p.argmax(dim=1)  # (B, N)
    offsets = torch.arange(B, device=probs.device).unsqueeze(1) * C
    hist = torch.bincount((prediction + offsets).reshape(-1), minlength=B * C).reshape(B, C).to(acc)
    class_weight = 1.0 / (hist.pow(alpha) * float(num_pixels) ** (1.0 - alpha)).clamp(min=1.0)
    pixel_weight = class_weight.gather(1, prediction)  # (B, N)
    return -(p.pow(2).sum(dim=1) * pixel_weight).sum() / (B * C)


def update_prototypes(
    prototypes: torch.Tensor,
    seen: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    momentum: float = 0.8,
    init: str = "zero",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 2-3: EMA of the batch prototypes for the classes present in the batch.

    p_c = sums_c / counts_c; p^_c <- momentum * p^_c + (1 - momentum) * p_c where counts_c > 0,
    absent classes keep p^_c. With ``init="first"`` a class seen for the first time takes p_c.
    ``counts`` may be float weight sums (weighted class_feature_stats), below 1 too.
    Returns new (prototypes, seen) tensors, detached; the inputs are not modified.
    """
    present = counts > 0
    divisor = torch.where(present, counts.to(prototypes.dtype), torch.ones((), dtype=prototypes.dtype, device=counts.device))
    batch = sums.detach().to(prototypes.dtype) / divisor.unsqueeze(1)
    blended = momentum * prototypes + (1.0 - momentum) * batch
    if init == "first":
        blended = torch.where(seen.unsqueeze(1), blended, batch)
    new_prototypes = torch.where(present.unsqueeze(1), blended, prototypes)
    return new_prototypes, seen | present


def feature_terms(
    features: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    reference: Union[float, torch.Tensor],
    mode: str = "source",
    ignore_index: int = 255,
    distance: str = "squared_l2",
    filtered: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the compiled backends' fused pass over one feature map returns, from the ops above.

    (sums (C, K), counts (C,), per-class distance sums (C,) (||f - p^_c||^2, or sum_k |f - p^_c|
    with ``distance="l1_mean"``), sum over every vector of the norm-alignment term (of the
    filtered norm with ``filtered``), sum over every vector of the unfiltered ||f||). Clustering
    is clustering_from_sums(...), the norm loss its sum / number of vectors, the batch
    prototypes sums / counts and the mean norm (for f-bar_s) norm_sum / number of vectors.
    """
    num_classes = prototypes.shape[0]
    rows, flat_labels = _as_rows(features, labels)
    index = _class_index(flat_labels, num_classes, ignore_index)
    acc = _accumulate_dtype(features)
    sums, counts = class_feature_stats(features, labels, num_classes, ignore_index)
    dist_sums = _class_distance_sums(rows, index, prototypes, acc, distance)
    per_vector, norms = _norm_terms(rows, reference, mode, filtered, acc)
    return sums, counts, dist_sums, per_vector.sum(), norms.sum()


def prototype_distances(features: torch.Tensor, prototypes: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Distance (``"l2"``: ||f - p_c||) or similarity (``"cosine"``) of every feature vector to
    every prototype: (B, K, h, w) -> (B, C, h, w), (N, K) -> (N, C); prototypes (C, K).

    One GEMM of f with p and the vectors' squared norms: ||f - p||^2 = |f|^2 - 2 f.p + |p|^2.
    Computed in float32 (float64 if either input is float64) and returned in that dtype;
    differentiable w.r.t. both inputs. At a zero distance the gradient is 0 (not NaN), and a
    squared distance within the GEMM's rounding noise (see _L2_NOISE) counts as zero, so the
    gradient stays bounded by about 1 where the two vectors coincide. Cosine: a vector whose
    norm is below COSINE_EPS has similarity 0 with everything and gets no gradient (as in
    perpendicularity_loss).
    """
    acc = torch.float64 if torch.float64 in (features.dtype, prototypes.dtype) else torch.float32
    rows = features.dim() == 2
    f = features.to(acc)
    f = f.unsqueeze(0).transpose(1, 2) if rows else f.reshape(f.shape[0], f.shape[1], f.shape[2] * f.shape[3])
    # A copy (differentiable): autograd saves it, and a PrototypeBank updates its buffer in place
    # between this forward and the backward.
    p = prototypes.to(acc, copy=True)
    dots = torch.matmul(p, f)  # (B, C, N): a batched GEMM that reads NCHW or channels_last in place
    f_sq = f.pow(2).sum(dim=1, keepdim=True)  # (B, 1, N)
    p_sq = p.pow(2).sum(dim=1).view(1, -1, 1)  # (1, C, 1)
    if metric == "l2":
        sq = f_sq - 2 * dots + p_sq
        real = sq > _L2_NOISE[acc] * (f_sq + p_sq).detach()
        # sqrt only where its gradient is finite; the other branch is a constant 0.
        one, zero = torch.ones((), dtype=acc, device=sq.device), torch.zeros((), dtype=acc, device=sq.device)
        out = torch.where(real, torch.where(real, sq, one).sqrt(), zero)
    else:
        # Squares clamped before the sqrt: its gradient at 0 is infinite, and 0 * inf is NaN
        # even in the branch torch.where drops.
        eps_sq = COSINE_EPS * COSINE_EPS
        ok = (f_sq >= eps_sq) & (p_sq >= eps_sq)
        cos = dots / (f_sq.clamp(min=eps_sq).sqrt() * p_sq.clamp(min=eps_sq).sqrt())
        out = torch.where(ok, cos, torch.zeros((), dtype=acc, device=cos.device))
    if rows:
        return out.squeeze(0).t()
    return out.view(features.shape[0], prototypes.shape[0], features.shape[2], features.shape[3])
