"""Input checks shared by every backend of every public op.

Each check raises TypeError (wrong kind of thing) or ValueError (wrong shape or value) with a
message that names the argument and says what was expected. Checks that look at tensor values
(label range, finiteness, signs of weights) read them back, a synchronisation on a GPU, unless a
:class:`DeferredChecks` is active (``with checks:``): then each keeps its verdict on the device
for ``checks`` to read later (_deferred.py). ``lsr_fast.ops.set_value_checks(False)`` turns them
off altogether.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence, Tuple, Union

import torch

from ._deferred import active as _deferred

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What every kernel reads (uint16/32/64 lack most torch ops on the CPU, e.g. aminmax).
_LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_INT64_RANGE = (-(2**63), 2**63 - 1)
# hist_downsample's largest num_classes (csrc/arg_checks.h, kMaxHistClasses): label maps have at
# most 16-bit class ids in practice, and it bounds the CUDA kernels' per-cell histogram work.
MAX_HIST_CLASSES = 2**16
# Every other op's largest class count (num_classes, prototypes' rows, probs' class channels;
# csrc/arg_checks.h, kMaxClasses): the CUDA kernels' 32-bit keys and bounded scratch, far above
# any segmentation label set. The raw ops of both devices check the same bounds.
MAX_CLASSES = 2**24
_value_checks = True


def set_value_checks(enabled: bool) -> None:
    """Turn the value checks (label range, finite features) on or off; shape checks always run."""
    global _value_checks
    _value_checks = bool(enabled)


def value_checks_enabled() -> bool:
    return _value_checks


@contextlib.contextmanager
def value_checks(enabled: bool):
    """``with value_checks(False): ...`` turns the value checks off (or on) inside the block only."""
    previous = _value_checks
    set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


def tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (shape only, no values); lsr_fast ops need tensors with data")
    return value


def float_tensor(name: str, value) -> torch.Tensor:
    tensor(name, value)
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {value.dtype}")
    return value


def integer_labels(name: str, value) -> torch.Tensor:
    tensor(name, value)
    if value.dtype not in _LABEL_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of dtype uint8, int8, int16, int32 or int64, got {value.dtype}")
    return value


def ndim(name: str, value: torch.Tensor, allowed: Sequence[int], layout: str) -> None:
    if value.dim() not in allowed:
        raise ValueError(f"{name} must be {layout}, got a {value.dim()}-d tensor of shape {tuple(value.shape)}")


def positive_int(name: str, value, high: int = _INT64_RANGE[1]) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def class_count(name: str, value: torch.Tensor, dim: int, what: str, low: int = 1) -> int:
    """The class count of a tensor, its size along ``dim`` ((C, K) prototypes: 0, (B, C, H, W)
    probs: 1), in [low, MAX_CLASSES]."""
    count = value.shape[dim]
    if not low <= count <= MAX_CLASSES:
        raise ValueError(f"{name} must have between {low} and {MAX_CLASSES} {what}, got shape {tuple(value.shape)}")
    return count


def integer(name: str, value) -> int:
    """A Python int that fits int64 (what the kernels take)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not _INT64_RANGE[0] <= value <= _INT64_RANGE[1]:
        raise ValueError(f"{name} must fit in int64 [-2**63, 2**63 - 1], got {value}")
    return value


def fraction(name: str, value, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (low <= value <= high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return float(value)


def output_size(name: str, size: Union[int, Sequence[int]], input_hw: Tuple[int, int]) -> Tuple[int, int]:
    """A (h, w) no larger than the input's (H, W); an int means a square size."""
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2:
        raise TypeError(f"{name} must be an int or a pair (h, w), got {size!r}")
    h, w = (positive_int(f"{name}[{i}]", int(s) if isinstance(s, torch.SymInt) else s) for i, s in enumerate(size))
    H, W = input_hw
    if h > H or w > W:
        raise ValueError(f"{name} must not be larger than the input's spatial size {(H, W)}, got {(h, w)}")
    return h, w


def label_values(name: str, labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Every value is in [0, num_classes) or equals ignore_index; names the first bad value."""
    if not _value_checks or labels.numel() == 0:
        return
    message = f"{name} contains the value {{value}}, which is neither a class in [0, {num_classes}) nor ignore_index={ignore_index}"
    deferred = _deferred()
    if deferred is not None:
        low, high = _non_void_range(labels, ignore_index)
        bad = (low < 0) | (high >= num_classes)
        if num_classes < 1:  # no class at all: any non-void label fails
            bad = (labels != ignore_index).any()
        # When bad, a real non-void label: the fill 0 is never below low, nor above a high >= 1.
        deferred.record("labels", name, message, bad, torch.where(low < 0, low, high))
        return
    low, high = (int(v) for v in labels.aminmax())
    if 0 <= low and high < num_classes:
        return  # one cheap pass decides the common case
    low, high = (int(v) for v in _non_void_range(labels, ignore_index))
    if num_classes >= 1 and low >= 0 and high < num_classes:
        return  # the values outside [0, C) are all ignore_index
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bool(bad.any()):
        raise ValueError(message.format(value=labels[bad].reshape(-1)[0].item()))


def _non_void_range(labels: torch.Tensor, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(min, max) as int64 device scalars of the labels with void set to 0: with num_classes
    >= 1 (0 is a class), the exact test of the non-void labels against [0, num_classes)."""
    low, high = torch.where(labels == ignore_index, 0, labels).aminmax()
    return low.long(), high.long()


def flag(name: str, bad: torch.Tensor, message: str, check: str = "finite",
         value: Optional[torch.Tensor] = None) -> None:
    """Raise ``message`` (``{value}`` in it: ``value``) if the 0-dim device flag ``bad`` is set,
    which reads it back; inside ``with DeferredChecks():`` record it there instead."""
    deferred = _deferred()
    if deferred is not None:
        deferred.record(check, name, message, bad, value)
    elif bool(bad):
        raise ValueError(message.format(value=None if value is None else value.item()))


def finite(name: str, value: torch.Tensor) -> None:
    # min and max propagate NaN and reach +-inf, so both are finite iff every value is; one
    # reduction, about 10x cheaper than materialising isfinite(value).
    if _value_checks and value.numel():
        low, high = value.detach().aminmax()
        flag(name, ~(torch.isfinite(low) & torch.isfinite(high)), f"{name} contains non-finite values (NaN or inf)")


def features_and_labels(features, labels, features_name="features", labels_name="labels") -> None:
    """(B, K, h, w) features with (B, h, w) labels, or (N, K) rows with (N,) labels."""
    float_tensor(features_name, features)
    integer_labels(labels_name, labels)
    ndim(features_name, features, (2, 4), "(B, K, h, w) or (N, K)")
    expected = (features.shape[0],) if features.dim() == 2 else (features.shape[0], *features.shape[2:])
    if tuple(labels.shape) != tuple(expected):
        raise ValueError(
            f"{labels_name} must have shape {tuple(expected)} to match {features_name} of shape "
            f"{tuple(features.shape)}, got {tuple(labels.shape)}"
        )
    if labels.device != features.device:
        raise ValueError(f"{labels_name} is on {labels.device} but {features_name} is on {features.device}")
    finite(features_name, features)


def class_mask(name: str, value: Optional[torch.Tensor], num_classes: int, device) -> Optional[torch.Tensor]:
    if value is None:
        return None
    tensor(name, value)
    if value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {value.dtype}")
    if tuple(value.shape) != (num_classes,):
        raise ValueError(f"{name} must have shape ({num_classes},), got {tuple(value.shape)}")
    return value.to(device)


def class_weights(value: Optional[torch.Tensor], num_classes: int) -> Optional[torch.Tensor]:
    if value is None:
        return None
    float_tensor("class_weights", value)
    if tuple(value.shape) != (num_classes,):
        raise ValueError(f"class_weights must have shape ({num_classes},), got {tuple(value.shape)}")
    if _value_checks:
        flag("class_weights", ~(torch.isfinite(value) & (value >= 0)).all(), "class_weights must be finite and >= 0",
             check="weights")
    return value


def vector_weights(value: Optional[torch.Tensor], labels: torch.Tensor) -> Optional[torch.Tensor]:
    """None, or per-vector weights: a float tensor shaped like ``labels`` on its device, finite
    and >= 0 (a value check); returned detached (they are constants)."""
    if value is None:
        return None
    float_tensor("weights", value)
    if tuple(value.shape) != tuple(labels.shape):
        raise ValueError(f"weights must have the shape of labels {tuple(labels.shape)}, got {tuple(value.shape)}")
    if value.device != labels.device:
        raise ValueError(f"weights is on {value.device} but labels is on {labels.device}")
    if _value_checks and value.numel():
        low, high = value.detach().aminmax()  # NaN fails both tests; -inf fails low >= 0
        flag("weights", ~(torch.isfinite(high) & (low >= 0)),
             "weights must be finite and >= 0 (got a negative, NaN or infinite weight)", check="weights")
    return value.detach()


# The clustering distances, in the order of the raw ops' `distance` code (0, 1).
DISTANCES = ("squared_l2", "l1_mean")


def choice(name: str, value, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}, got {value!r}")
    return value


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def relative_to(value) -> Union[None, float, torch.Tensor]:
    """None, or the positive, finite constant the norm term is divided by (a float or a 0-dim
    tensor; a tensor's sign is a value check)."""
    if value is None:
        return None
    value = reference_value(value, "relative_to")
    if isinstance(value, torch.Tensor):
        if _value_checks and value.numel():
            flag("relative_to", ~(value.detach() > 0), "relative_to must be > 0, got {value}", check="positive",
                 value=value.detach())
        return value.detach()
    if value <= 0:
        raise ValueError(f"relative_to must be > 0, got {value}")
    return value


def reference_value(value, name: str = "reference") -> Union[float, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        float_tensor(name, value)
        if value.dim() != 0:
            raise ValueError(f"{name} must be a float or a 0-dim tensor, got shape {tuple(value.shape)}")
        finite(name, value)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)
