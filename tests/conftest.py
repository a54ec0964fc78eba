"""Shared fixtures: which backends the op tests run on, and per-dtype tolerances."""

import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be chosen
# before any Triton kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lsr_fast  # noqa: E402

# Tolerances per feature dtype for losses and gradients (kernels accumulate in float32).
TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def usable_backends(device="cpu"):
    """Backends that run on tensors of ``device`` here (always at least "reference")."""
    available = lsr_fast.available_backends()
    names = ["reference"]
    if device == "cpu" and available["cpp"] == "available":
        names.append("cpp")
    if device == "cuda" and available["cuda"] == "available":
        names.append("cuda")
    if available["triton"] == "available" and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        names.append("triton")
    return names


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# (device, backend) pairs of every fast backend usable here: what gets compared with the reference.
FAST = [(d, b) for d in devices() for b in usable_backends(d) if b != "reference"]
ALL = [(d, b) for d in devices() for b in usable_backends(d)]


def fast_params():
    """Parametrisation over fast backends; a single skipped case when none is built."""
    if FAST:
        return [pytest.param(d, b, id=f"{d}-{b}") for d, b in FAST]
    return [pytest.param("cpu", "none", id="no-fast-backend", marks=pytest.mark.skip(reason="no compiled or Triton backend is usable here"))]


def all_params():
    return [pytest.param(d, b, id=f"{d}-{b}") for d, b in ALL]
