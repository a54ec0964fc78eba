"""The Triton backend ("triton"): torch.ops.lsr_fast_triton.*

Every op is a ``torch.library.custom_op`` under the namespace ``lsr_fast_triton`` (so it does
not clash with the C++ ``lsr_fast`` ops) with a fake implementation, so torch.compile traces
it without a graph break, and an autograd formula whose backward is one more Triton kernel.
The functions at the bottom have the reference's signatures (arguments already checked by
lsr_fast.ops) and are what lsr_fast.ops dispatches to, as lsr_fast/ops/_compiled.py does for
the C++ ops.

On a GPU the kernels run on CUDA tensors; with ``TRITON_INTERPRET=1`` set before this package
is imported they run in Triton's interpreter on CPU tensors (tests).
"""

from __future__ import annotations

import os
import re
from typing import Union

import torch

from ..ops._checks import DISTANCES
from ..ops._derived import losses_from_feature_terms

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    _IMPORT_ERROR = ""
except ImportError as error:  # the optional dependency is missing
    _IMPORT_ERROR = f"triton is not installed ({error})"

NORM_MODES = {"source": 0, "target": 1}


def unavailable_reason(backend: str = "triton") -> str:
    """Empty when the Triton kernels can run here, else why not."""
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpreting:
        return "no CUDA device and TRITON_INTERPRET is not 1"
    if interpreting:
        return _interpreter_problem(triton.__version__, _numpy_version())
    return ""


def _major_minor(version: str) -> tuple[int, int]:
    numbers = re.match(r"(\d+)\.(\d+)", version)
    return (int(numbers.group(1)), int(numbers.group(2))) if numbers else (0, 0)


def _numpy_version() -> str:
    try:
        import numpy
    except ImportError:
        return ""
    return numpy.__version__


def _interpreter_problem(triton_version: str, numpy_version: str) -> str:
    """Why Triton's interpreter cannot run our kernels with these versions, or empty.

    Before Triton 3.7 the interpreter turns a loop bound derived from tl.program_id into a Python
    int with int() of a one-element array, which NumPy 2.4 made an error: every kernel with such
    a loop fails with "only 0-dimensional arrays can be converted to Python scalars". Compiled
    kernels on a GPU are not affected.
    """
    if numpy_version and _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter cannot run with NumPy {numpy_version} "
                "(install triton>=3.7 or numpy<2.4 to run the Triton kernels on CPU tensors)")
    return ""


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if not _IMPORT_ERROR:
    try:
        from .class_feature_stats import class_feature_stats_backward_op, class_feature_stats_op
        from .feature_terms import feature_terms_backward_op, feature_terms_op
        from .hist_downsample import hist_downsample_op, pseudo_label_downsample_op
        from .maxsquare import maxsquare_loss_backward_op, maxsquare_loss_op
    except Exception as error:  # noqa: BLE001 - an optional backend must not break `import lsr_fast`
        # E.g. Triton 3.2's autotune asks for a GPU driver when a kernel is defined; without a GPU
        # that raises. tests/test_backends.py checks the backend loads wherever it should.
        _IMPORT_ERROR = (f"Triton {triton.__version__} could not set up the kernels here "
                         f"({type(error).__name__}: {error}); the backend is tested with triton 3.6 and 3.9")

if not _IMPORT_ERROR:
    OPS = {
        "hist_downsample": hist_downsample_op,
        "pseudo_label_downsample": pseudo_label_downsample_op,
        "class_feature_stats": class_feature_stats_op,
        "class_feature_stats_backward": class_feature_stats_backward_op,
        "feature_terms": feature_terms_op,
        "feature_terms_backward": feature_terms_backward_op,
        "maxsquare_loss": maxsquare_loss_op,
        "maxsquare_loss_backward": maxsquare_loss_backward_op,
    }


# ---- the backend functions (reference signatures, checked arguments) -------------------------


def hist_downsample(labels, size, num_classes, threshold, ignore_index, class_weights):
    if class_weights is not None:
        class_weights = class_weights.to(device=labels.device, dtype=torch.float32).contiguous()
    return torch.ops.lsr_fast_triton.hist_downsample(labels, size[0], size[1], num_classes, threshold, ignore_index, class_weights)


def pseudo_label_downsample(probs, size, threshold, confidence, ignore_index):
    return torch.ops.lsr_fast_triton.pseudo_label_downsample(probs, size[0], size[1], threshold, confidence, ignore_index)


def class_feature_stats(features, labels, num_classes, ignore_index):
    return torch.ops.lsr_fast_triton.class_feature_stats(features, labels, num_classes, ignore_index)


def _reference_tensor(reference: Union[float, torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # A float becomes a device tensor by a fill (no host-to-device copy); a tensor is never read
    # on the host, and is copied (see feature_terms).
    if isinstance(reference, torch.Tensor):
        return reference.detach().to(device=device, dtype=dtype, copy=True)
    return torch.full((), float(reference), dtype=dtype, device=device)


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

    ``distance``: "squared_l2" (||f - p_c||^2) or "l1_mean" (sum_k |f_k - p_ck|; the caller
    averages over K). ``filtered``: the norm-loss sum is of the filtered norms ||f~||."""
    acc = _accumulate_dtype(features.dtype)
    reference = _reference_tensor(reference, acc, features.device)
    # Copies: the op saves them for backward, and callers update their prototype bank (and
    # norm reference) in place before calling backward (LSRRegularizer does, after forward);
    # a (C, K) copy costs nothing next to the pass over the features.
    prototypes = prototypes.detach().to(device=features.device, dtype=acc, memory_format=torch.contiguous_format, copy=True)
    outputs = torch.ops.lsr_fast_triton.feature_terms(
        features, labels, prototypes, reference, NORM_MODES[mode], ignore_index, DISTANCES.index(distance), bool(filtered))
    return tuple(outputs[:5])


clustering_loss, norm_alignment_loss = losses_from_feature_terms(feature_terms)


def maxsquare_loss(probs, alpha):
    return torch.ops.lsr_fast_triton.maxsquare_loss(probs, alpha)[0]
