"""Shared pieces of the Triton backend: interpreter detection, launch configurations, dtypes.

Launch configurations live in module-level tables. On a GPU every kernel is wrapped in
``triton.autotune`` over its table (block sizes and warps; warps and stages only where the block
sizes shape a workspace, which are then picked per shape); under Triton's interpreter
(``TRITON_INTERPRET=1``, CPU tensors, about a millisecond per program instance) autotuning would
only cost time, so every kernel is the plain ``triton.jit`` function, launched with one
configuration chosen for few, wide programs.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Dict, List, NamedTuple, Sequence

import torch
import triton
import triton.language as tl

# Read once, as triton.jit does when the kernel modules are imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The paper's shapes: K = 2048 feature channels, 91 x 161 feature maps, C = 19 classes,
# 720 x 1280 labels and probabilities.
PAPER_SHAPE = dict(K=2048, h=91, w=161, C=19, H=720, W=1280)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision and float32 inputs, float64 for float64 (as the reference)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_accumulate_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_dtype(dtype: torch.dtype):
    """Operand type of the one-hot x features products.

    On a GPU half-precision features multiply in their own type (a 0/1 one-hot is exact in
    it, products are exact and accumulate in float32); float32 uses IEEE (not TF32) products.
    The interpreter multiplies bfloat16 as raw bits, so there everything is float32.
    """
    if dtype == torch.float64:
        return tl.float64
    if not INTERPRET and dtype == torch.float16:
        return tl.float16
    if not INTERPRET and dtype == torch.bfloat16:
        return tl.bfloat16
    return tl.float32


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """About how many program instances fill the device (4 per SM); 1 under the interpreter."""
    if INTERPRET or device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 4 * multiprocessor_count(index)


def autotuned(configs: Sequence[triton.Config], key: List[str], prune: Callable = None):
    """``triton.autotune`` over ``configs`` on a GPU; the kernel unchanged under the interpreter."""

    def wrap(kernel):
        if INTERPRET:
            return kernel
        prune_by = {"early_config_prune": prune} if prune is not None else None
        return triton.autotune(configs=configs, key=key, prune_configs_by=prune_by)(kernel)

    return wrap


def launch_meta(interpreter_meta: Dict[str, int]) -> Dict[str, int]:
    """Extra launch keywords: the interpreter's configuration, nothing when autotuned."""
    return dict(interpreter_meta) if INTERPRET else {}


def window_extent(in_size: int, out_size: int) -> int:
    """Largest adaptive-pooling window along one axis (host integers, no device value)."""
    return max(((i + 1) * in_size + out_size - 1) // out_size - (i * in_size) // out_size for i in range(out_size))


@triton.jit
def sqrt_acc(x, IS_FP64: tl.constexpr):
    """Correctly rounded square root in the accumulation type."""
    if IS_FP64:
        return tl.sqrt(x)  # float64 sqrt is IEEE-rounded
    else:
        return tl.sqrt_rn(x)


@triton.jit
def div_acc(x, y, IS_FP64: tl.constexpr):
    """Correctly rounded x / y in the accumulation type (float32 `/` is approximate on a GPU)."""
    if IS_FP64:
        return x / y  # float64 division is IEEE-rounded
    else:
        return tl.math.div_rn(x, y * 1.0)  # y may be an int (K), or the constant 1


# ---- memory layouts ------------------------------------------------------------------------


class MapLayout(NamedTuple):
    """Where position s of image b and channel k of a (B, K, h, w) map or (N, K) rows live.

    Positions s = y * w + x run over the S = h * w cells of an image. When (y, x) merge into one
    stride (NCHW, channels_last, rows: ``flat``), s is addressed directly, as unit-stride
    (``s_unit``: NCHW, coalesced along positions) or with stride s_x; otherwise via y = s // w.
    ``k_unit``: the channels are unit-stride (channels_last, row-major rows).
    """

    B: int
    K: int
    S: int
    W: int
    s_b: int
    s_k: int
    s_y: int
    s_x: int
    flat: bool
    s_unit: bool
    k_unit: bool

    @property
    def N(self) -> int:
        return self.B * self.S

    def args(self):
        """Runtime kernel arguments (S, W, s_b, s_k, s_y, s_x)."""
        return self.S, self.W, self.s_b, self.s_k, self.s_y, self.s_x

    def constants(self, prefix: str = "") -> dict:
        return {f"{prefix}FLAT": self.flat, f"{prefix}S_UNIT": self.s_unit, f"{prefix}K_UNIT": self.k_unit}


def map_layout(tensor: torch.Tensor) -> MapLayout:
    """The MapLayout of (B, K, h, w) features / (B, C, H, W) probabilities or (N, K) rows."""
    if tensor.dim() == 2:
        N, K = tensor.shape
        B, h, w = 1, 1, N
        s_b, s_k, s_y, s_x = 0, tensor.stride(1), 0, tensor.stride(0)
    else:
        B, K, h, w = tensor.shape
        s_b, s_k, s_y, s_x = tensor.stride()
    if w == 1:  # positions run down the column
        s_x = s_y
    flat = h == 1 or w == 1 or s_y == w * s_x
    return MapLayout(B, K, h * w, max(w, 1), s_b, s_k, s_y, s_x, flat, flat and s_x == 1, s_k == 1)


@triton.jit
def spatial_offsets(b, s, W, s_b, s_y, s_x, FLAT: tl.constexpr, S_UNIT: tl.constexpr):
    """int64 element offsets of positions s (a vector) of image b (a scalar)."""
    base = tl.cast(b, tl.int64) * s_b
    if FLAT:
        if S_UNIT:
            return base + s
        else:
            return base + s.to(tl.int64) * s_x
    else:
        y = s // W
        x = s - y * W
        return base + y.to(tl.int64) * s_y + x.to(tl.int64) * s_x


@triton.jit
def channel_offsets(k, s_k, K_UNIT: tl.constexpr):
    if K_UNIT:
        return k
    else:
        return k.to(tl.int64) * s_k
