"""PrototypeBank: EMA class prototypes and their distributed synchronisation, in buffers.

The state LSRRegularizer keeps (Eqs. 2-3), on its own, for any prototype-based method:
feed it the per-class sums and counts of a batch (``class_feature_stats``, with or without
per-vector weights) and read ``prototypes`` and ``seen``.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from . import reference
from .ops import _checks as check

INITS = ("zero", "first")
DISTRIBUTED = ("auto", "on", "off")


class PrototypeBank(nn.Module):
    """EMA prototypes of ``num_classes`` classes in ``dim`` channels, with the mask of classes
    estimated so far.

    Buffers (so ``state_dict`` and ``.to(device)`` carry them): ``prototypes`` (C, dim) float32,
    starting at 0, and ``seen`` (C,) bool. :meth:`update` takes a batch's per-class ``sums``
    (C, dim) and ``counts`` (C,), the outputs of ``class_feature_stats`` (int64 counts, or float
    weight sums with ``weights=``): each class with ``counts > 0`` gets its batch prototype
    p_c = sums_c / counts_c blended in, p^_c <- momentum * p^_c + (1 - momentum) * p_c; absent
    classes keep p^_c. With ``init="first"`` a class's first batch prototype replaces the 0 it
    started at (``"zero"``, the paper, blends it in like any other).

    Distributed training: with ``distributed="auto"`` (the default) :meth:`update` sums
    ``sums`` and ``counts`` over ``process_group`` (default: the world) in one all-reduce
    whenever torch.distributed is initialised with more than one rank, so every rank holds the
    bank of one process fed the concatenation of all ranks' batches (up to float summation
    order; ranks may hold different batch sizes). ``"on"`` requires torch.distributed to be
    initialised, ``"off"`` never communicates. Every rank must call :meth:`update` in the same
    order. No call synchronises with the host except the value checks (see
    ``lsr_fast.set_value_checks``).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        momentum: float = 0.8,
        init: str = "zero",
        distributed: str = "auto",
        process_group: Optional[dist.ProcessGroup] = None,
    ):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")  # NaN fails the range too
        if init not in INITS:
            raise ValueError(f"init must be 'zero' (paper) or 'first', got {init!r}")
        if distributed not in DISTRIBUTED:
            raise ValueError(f"distributed must be 'auto', 'on' or 'off', got {distributed!r}")
        self.num_classes, self.dim = num_classes, dim
        self.momentum, self.init = float(momentum), init
        self.distributed, self.process_group = distributed, process_group
        self.register_buffer("prototypes", torch.zeros(num_classes, dim))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    def sync_group(self) -> Optional[dist.ProcessGroup]:
        """The process group :meth:`update` all-reduces over, or None for a single process."""
        if self.distributed == "off":
            return None
        if not (dist.is_available() and dist.is_initialized()):
            if self.distributed == "on":
                raise RuntimeError(
                    "distributed='on' but torch.distributed is not initialised; call "
                    "torch.distributed.init_process_group first, or pass distributed='auto'"
                )
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if self.distributed == "auto" and dist.get_world_size(group) < 2:
            return None
        return group

    @torch.no_grad()
    def update(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Blend one batch's prototypes ``sums / counts`` into the bank (all ranks' batches when
        distributed). ``sums`` (C, dim) float, ``counts`` (C,) int or float, >= 0, on the bank's
        device; no gradient flows."""
        check.float_tensor("sums", sums)
        check.tensor("counts", counts)
        if counts.dtype == torch.bool or counts.is_complex():
            raise TypeError(f"counts must be an integer or floating-point tensor, got {counts.dtype}")
        if tuple(sums.shape) != (self.num_classes, self.dim):
            raise ValueError(f"sums must have shape ({self.num_classes}, {self.dim}), got {tuple(sums.shape)}")
        if tuple(counts.shape) != (self.num_classes,):
            raise ValueError(f"counts must have shape ({self.num_classes},), got {tuple(counts.shape)}")
        for name, value in (("sums", sums), ("counts", counts)):
            if value.device != self.prototypes.device:
                raise ValueError(f"{name} is on {value.device} but the bank is on {self.prototypes.device}")
        check.finite("sums", sums)
        if check.value_checks_enabled() and counts.numel():
            low, high = counts.double().aminmax()
            check.flag("counts", ~(torch.isfinite(high) & (low >= 0)), "counts must be finite and >= 0", check="weights")
        group = self.sync_group()
        if group is not None:
            # One collective; float64 keeps integer counts exact (float32 stops at 2^24).
            sums, counts = all_reduce_sum([sums.double(), counts.double()], group)
        self._blend(sums, counts)

    @torch.no_grad()
    def _blend(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """The EMA step on (already all-reduced) sums and counts; no checks, no communication."""
        new_prototypes, new_seen = reference.update_prototypes(
            self.prototypes, self.seen, sums.detach().to(self.prototypes.dtype), counts,
            momentum=self.momentum, init=self.init,
        )
        self.prototypes.copy_(new_prototypes)
        self.seen.copy_(new_seen)

    def mean_prototype_angle(self) -> torch.Tensor:
        """Mean angle in degrees over pairs of distinct seen prototypes (the LSR paper's Fig. 6
        diagnostic); NaN when fewer than two classes have been seen."""
        unit = self.prototypes / torch.linalg.vector_norm(self.prototypes, dim=1, keepdim=True).clamp(min=reference.COSINE_EPS)
        angles = torch.rad2deg(torch.acos((unit @ unit.t()).clamp(-1.0, 1.0)))
        eye = torch.eye(self.num_classes, dtype=torch.bool, device=self.seen.device)
        pairs = self.seen.unsqueeze(0) & self.seen.unsqueeze(1) & ~eye
        return (angles * pairs).sum() / pairs.sum()

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.dim}, momentum={self.momentum}, init={self.init!r}, "
                f"distributed={self.distributed!r}")


class _AllReduceSumFunction(torch.autograd.Function):
    """Sum over the ranks whose backward sums the gradients over the ranks too (what
    torch.distributed.nn.functional.all_reduce does; that one warns FutureWarning on every call)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSumFunction.apply(grad, ctx.group), None


def all_reduce_sum(parts: List[torch.Tensor], group, differentiable: bool = False) -> List[torch.Tensor]:
    """Each tensor of ``parts`` summed over the ranks of ``group``, in one collective; returned
    with its own shape and dtype (they travel in the promoted dtype of all of them). With
    ``differentiable`` the backward all-reduces the gradients as well."""
    flat = torch.cat([part.reshape(-1) for part in parts])
    if differentiable:
        flat = _AllReduceSumFunction.apply(flat, group)
    else:
        dist.all_reduce(flat, group=group)
    chunks = flat.split([part.numel() for part in parts])
    return [chunk.view(part.shape).to(part.dtype) for chunk, part in zip(chunks, parts)]
