"""Inputs, parametrisation and device placement shared by the paper-shape GPU tests
(tests/test_gpu_paper_shape.py: the ops; tests/test_gpu_paper_shape_step.py: the regulariser
step, a second device, a CUDA graph). What they cover, how to run them and how the inputs keep
every decision away from its threshold: the docstring of tests/test_gpu_paper_shape.py."""

import contextlib
import copy
import functools
import itertools
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import lsr_fast
from lsr_fast import reference
from lsr_fast.cli import street_labels
from lsr_fast.models import DeepLabV2
from conftest import assert_accumulated_close, assert_rounded_close, feature_terms_magnitudes, unusable_reason

DEVICE_ENV = "LSR_FAST_GPU_TEST_DEVICE"
DEVICE = os.environ.get(DEVICE_ENV, "cuda")
if DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"{DEVICE_ENV}={DEVICE!r}: expected 'cuda' (the default) or 'cpu' (a dry run with the cpp backend)")
# The backends compared with the reference: the GPU ones, or cpp in a CPU dry run.
BACKENDS = ("cuda", "triton") if DEVICE == "cuda" else ("cpp",)


V = 255  # ignore_index
B, K = 2, 2048
SOURCE_HW, SOURCE_FEAT = (720, 1280), (91, 161)  # GTA5 labels -> DeepLabV2 (output stride 8) features
TARGET_HW, TARGET_FEAT = (512, 1024), (65, 129)  # Cityscapes at 512x1024
LARGE_FEAT = (33, 61)  # the large-C feature cases
FLOAT_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float64: "float64"}


# ---- parametrisation ------------------------------------------------------------------------------


def backend_params():
    """The backends compared here; one that cannot run is a skipped case with the reason. Ids
    are ``{device}-{backend}`` as in conftest (compute-sanitizer's stage selects ``cuda-cuda``)."""
    params = []
    for name in BACKENDS:
        reason = unusable_reason(DEVICE, name) if (DEVICE == "cpu" or torch.cuda.is_available()) else ""
        marks = [pytest.mark.skip(reason=f"{name} backend on {DEVICE} tensors: {reason}")] if reason else []
        params.append(pytest.param(name, id=f"{DEVICE}-{name}", marks=marks))
    return params


def _ident(value):
    if isinstance(value, torch.dtype):
        return FLOAT_NAMES.get(value, str(value).replace("torch.", ""))
    if isinstance(value, bool):
        return "det-on" if value else "det-off"
    return str(value)


def matrix(*axes):
    """The product of ``axes`` (lists of plain values or pytest.params with one value each) as
    pytest.params, the first axis varying slowest: cases sharing a cached reference run in a row."""
    def entries(axis):
        out = []
        for item in axis:
            if isinstance(item, type(pytest.param(0))):
                out.append((item.values[0], item.id or _ident(item.values[0]), list(item.marks)))
            elif isinstance(item, tuple):  # several argument values under one id
                out.append((item, "-".join(_ident(v) for v in item), []))
            else:
                out.append((item, _ident(item), []))
        return out

    params = []
    for combo in itertools.product(*(entries(axis) for axis in axes)):
        values = []
        for value, _, _ in combo:
            values.extend(value if isinstance(value, tuple) else (value,))
        params.append(pytest.param(*values, id="-".join(i for _, i, _ in combo),
                                   marks=[m for _, _, marks in combo for m in marks]))
    return params


LAYOUTS = ["nchw", "channels_last"]
DETERMINISTIC = [False, True]
DTYPES = [torch.float32, torch.bfloat16]


def _variant(*values):
    return pytest.param(values, id="-".join(f"C{v}" if isinstance(v, int) and not isinstance(v, bool) else _ident(v)
                                            for v in values))


# The paper's settings: every (dtype, layout, deterministic) combination, with C = 19 or 16
# alternating (C = dtype xor layout xor deterministic: a 2^(4-1) design in which every pair of
# the four settings occurs too), ordered by (C, dtype) so that cases sharing a reference run in a
# row. Half as many cases as the full product; each is seconds of CPU-side comparison.
PAPER_VARIANTS = [
    _variant(c, dtype, layout, det)
    for c in (19, 16) for dtype in DTYPES for layout in LAYOUTS for det in DETERMINISTIC
    if (c == 19) == ((DTYPES.index(dtype) + LAYOUTS.index(layout) + int(det)) % 2 == 0)
]
# (dtype, layout, deterministic) with deterministic = dtype xor layout: each pair of the three once.
HALF_VARIANTS = [
    _variant(dtype, layout, det)
    for dtype in DTYPES for layout in LAYOUTS for det in DETERMINISTIC
    if det == bool((DTYPES.index(dtype) + LAYOUTS.index(layout)) % 2)
]


@contextlib.contextmanager
def deterministic(enabled):
    """torch.use_deterministic_algorithms(enabled) inside the block, restored after. cuBLAS
    (the Gram matrix of perpendicularity_loss) needs CUBLAS_WORKSPACE_CONFIG in that mode."""
    previous, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if enabled and workspace is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def place(tensor, layout="nchw", device=DEVICE):
    """A copy of a CPU tensor on the test device, in ``layout`` (4-d tensors). Always a copy: the
    cached inputs must not become leaves that collect gradients (in the CPU dry run)."""
    tensor = tensor.to(device, copy=True)
    if layout == "channels_last":
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def on_device(tensor, device):
    """Whether ``tensor`` is on ``device`` ("cuda" means any CUDA device, "cuda:1" that one)."""
    device = torch.device(device)
    return tensor.device.type == device.type and device.index in (None, tensor.device.index)


def as_reference(tensor):
    """The float64 CPU copy the reference runs on (floats), or the tensor itself (labels)."""
    return tensor.detach().to(torch.float64, copy=True) if tensor.is_floating_point() else tensor


# ---- inputs ---------------------------------------------------------------------------------------


def gapped_features(shape, seed, grid=None):
    """(B, K, h, w) float32 features whose per-vector decisions are far from float rounding (see
    the module docstring). ``grid``: round to multiples of 1/grid (exact sums in float32)."""
    b, k, h, w = shape
    g = torch.Generator().manual_seed(seed)
    vectors = b * h * w
    low = torch.rand(vectors, k, generator=g) - 0.5
    high = torch.rand(vectors, k, generator=g) + 3.0
    # Exactly k/2 high channels per vector: a random pattern, rotated by a random shift per vector.
    pattern = torch.zeros(k, dtype=torch.bool)
    pattern[torch.randperm(k, generator=g)[: k // 2]] = True
    shift = torch.randint(0, k, (vectors, 1), generator=g)
    rows = torch.where(pattern[(torch.arange(k).unsqueeze(0) + shift) % k], high, low)
    del low, high
    rows *= torch.where(torch.rand(vectors, 1, generator=g) < 0.5, 0.5, 1.5)
    if grid is not None:
        rows = torch.round(rows * grid) / grid
    return rows.reshape(b, h, w, k).permute(0, 3, 1, 2).contiguous()


def middle_norm(k):
    """Between the two norm clusters of gapped_features (0.5 and 1.5 times about 2.49 sqrt(K))."""
    return 2.49 * math.sqrt(k)


@functools.lru_cache(maxsize=4)
def source_label_maps(seed, num_classes=19):
    """Street-like (B, 720, 1280) trainId maps with a void border (lsr_fast.cli.street_labels);
    its classes (0-13) are valid for C = 16 too."""
    labels = street_labels(B, *SOURCE_HW, seed)
    assert int(labels[labels != V].max()) < num_classes
    return labels


@functools.lru_cache(maxsize=4)
def feature_labels(num_classes, size=SOURCE_FEAT, seed=1):
    """Labels at feature resolution: the reference's hist_downsample of street-like maps at the
    image size (void cells at class edges and the border), for C = 19 and 16; for larger C,
    street blocks remapped to random classes beside random classes, with the void border."""
    if size == SOURCE_FEAT:
        return reference.hist_downsample(source_label_maps(seed), size, num_classes)
    g = torch.Generator().manual_seed(seed + num_classes)
    street = street_labels(B, *size, seed)
    remap = torch.randperm(num_classes, generator=g)[:14]
    labels = torch.randint(0, num_classes, (B, *size), generator=g)
    half = size[1] // 2
    labels[..., :half] = torch.where(street[..., :half] == V, V, remap[street[..., :half].clamp(max=13)])
    labels[..., : max(1, size[1] // 100)] = V
    labels[torch.rand(labels.shape, generator=g) < 0.05] = V
    return labels


def label_dtype(num_classes):
    """The label dtype a case uses (every integer width gets a turn): uint8 for C <= 40, else wider."""
    return {19: torch.int64, 16: torch.uint8, 40: torch.uint8, 300: torch.int32, 1100: torch.int64}[num_classes]


@functools.lru_cache(maxsize=2)
def feature_case(num_classes, dtype, labels_case="street"):
    """CPU inputs of the feature ops: features (B, K, h, w) in ``dtype`` (NCHW), labels,
    prototypes (C, K) float32 (not on the features' values), valid (C,) with one present class
    not estimated yet, the norm reference r and the released form's n."""
    size = SOURCE_FEAT if num_classes in (19, 16) else LARGE_FEAT
    features = gapped_features((B, K, *size), seed=10 + num_classes).to(dtype)
    labels = feature_labels(num_classes, size)
    if labels_case == "all_void":
        labels = torch.full_like(labels, V)
    elif labels_case == "one_class":
        labels = torch.where(labels == V, V, num_classes - 1)
    g = torch.Generator().manual_seed(20 + num_classes)
    prototypes = (1.75 + 0.6 * torch.randn(num_classes, K, generator=g)).float()
    valid = torch.ones(num_classes, dtype=torch.bool)
    present = torch.bincount(labels[labels != V].long().reshape(-1), minlength=num_classes) > 0
    if present.any():
        valid[int(present.nonzero()[0])] = False
    r = middle_norm(K)
    return SimpleNamespace(features=features, labels=labels.to(label_dtype(num_classes)), prototypes=prototypes,
                           valid=valid, r=r, n=r * 0.9)


def window_confidence(max_prob, size):
    """float64 window means of the per-pixel max probability (adaptive_avg_pool2d's windows)."""
    return F.adaptive_avg_pool2d(max_prob.double().unsqueeze(1), size).squeeze(1)


@functools.lru_cache(maxsize=2)
def probability_case(num_classes, dtype, size, case, seed=3):
    """(B, C, H, W) probabilities in ``dtype`` (NCHW) from street-like maps.

    street: the predicted class (the street label, void predicted as 0, 10% of pixels another
    class) has probability 0.95, or 0.3 in uncertain blocks and the border; the others share the
    rest. With windows of 64, 72 or 81 pixels, no window mean is within 5e-4 of 0.5 (asserted).
    softmax: softmax of noisy street logits (continuous confidences; cells within 1e-4 of the
    threshold are left out of the comparison, as README allows). ties: every class 1/C (argmax
    0 everywhere). one_class: class C-1 at 0.95 everywhere.
    """
    H, W = size
    g = torch.Generator().manual_seed(seed + num_classes)
    labels = street_labels(B, H, W, seed)
    predicted = torch.where(labels == V, 0, labels)
    if case == "ties":
        return torch.full((B, num_classes, H, W), 1.0 / num_classes).to(dtype)
    if case == "one_class":
        predicted = torch.full_like(predicted, num_classes - 1)
    noise = torch.rand(B, H, W, generator=g) < 0.1
    if case != "one_class":
        predicted = torch.where(noise, torch.randint(0, num_classes, (B, H, W), generator=g), predicted)
    if case == "softmax":
        logits = 4.0 * F.one_hot(predicted, num_classes).permute(0, 3, 1, 2).float()
        logits += 1.5 * torch.randn(B, num_classes, H, W, generator=g)
        return torch.softmax(logits, 1).to(dtype)
    blocks = torch.rand(B, 1, H // 37 + 1, W // 53 + 1, generator=g) < 0.3
    unsure = F.interpolate(blocks.float(), size=(H, W), mode="nearest")[:, 0].bool() | (labels == V)
    if case == "one_class":
        unsure.fill_(False)
    top = torch.where(unsure, torch.tensor(0.3), torch.tensor(0.95))
    probs = ((1.0 - top) / (num_classes - 1)).unsqueeze(1).expand(B, num_classes, H, W).clone()
    probs.scatter_(1, predicted.unsqueeze(1), top.unsqueeze(1))
    probs = probs.to(dtype)
    return probs


def check_confidence_margin(probs, size, confidence=0.5, margin=5e-4):
    """Test-data sanity: no window mean of the max probability within ``margin`` of ``confidence``."""
    means = window_confidence(probs.max(1).values, size)
    closest = float((means - confidence).abs().min())
    assert closest > margin, f"test data: a window mean is within {closest:.2e} of the confidence threshold"
