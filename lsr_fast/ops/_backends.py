"""Which backend runs an op: the name the user asked for, or the fastest usable one ("auto").

A backend is a module that implements some of the ops with the reference's signatures (the
arguments already checked). ``reference`` implements all of them and runs anywhere; the
compiled (``cpp``, ``cuda``) and ``triton`` backends register themselves here when they can be
imported, and say why not when they cannot.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Callable, Dict, Optional, Tuple

import torch

BACKENDS = ("reference", "cpp", "cuda", "triton")

# name -> (module path, device type it runs on, or None for any)
_MODULES: Dict[str, Tuple[str, Optional[str]]] = {
    "reference": ("lsr_fast.reference", None),
    "cpp": ("lsr_fast.ops._compiled", "cpu"),
    "cuda": ("lsr_fast.ops._compiled", "cuda"),
    "triton": ("lsr_fast.triton", "cuda"),
}

# Preference of "auto" per device type, fastest first (see README, "Backends").
_AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}

_loaded: Dict[str, Tuple[Optional[ModuleType], str]] = {}


def _load(name: str) -> Tuple[Optional[ModuleType], str]:
    """(module or None, reason it is not usable) for a backend, cached."""
    if name not in _loaded:
        path, device_type = _MODULES[name]
        try:
            module = importlib.import_module(path)
        except ImportError as error:
            _loaded[name] = (None, f"not importable: {error}")
        else:
            probe = getattr(module, "unavailable_reason", None)
            reason = probe(name) if probe is not None else ""
            if not reason and device_type == "cuda" and not torch.cuda.is_available() and not _interpreted(name):
                reason = "no CUDA device is visible to torch"
            _loaded[name] = (None if reason else module, reason)
    return _loaded[name]


def available_backends() -> Dict[str, str]:
    """Every backend name mapped to "available" or the reason it cannot be used here."""
    return {name: (_load(name)[1] or "available") for name in BACKENDS}


def resolve(op: str, backend: str, device: torch.device) -> Callable:
    """The implementation of ``op`` for tensors on ``device``.

    A backend asked for by name must exist, be usable and run on that device, else ValueError /
    RuntimeError says why; "auto" silently takes the first usable backend of ``_AUTO_ORDER``.
    """
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            module, _ = _load(name)
            if module is not None and hasattr(module, op) and _runs_on(name, device):
                return getattr(module, op)
        return getattr(_load("reference")[0], op)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    module, reason = _load(backend)
    if module is None:
        raise RuntimeError(f"backend {backend!r} is not usable here: {reason}")
    if not _runs_on(backend, device):
        raise ValueError(f"backend {backend!r} runs on {_MODULES[backend][1]} tensors, but the inputs are on {device}")
    if not hasattr(module, op):
        raise RuntimeError(f"backend {backend!r} does not implement {op}")
    return getattr(module, op)


def _interpreted(name: str) -> bool:
    # Triton's interpreter runs kernels on CPU tensors (tests, TRITON_INTERPRET=1).
    return name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def _runs_on(name: str, device: torch.device) -> bool:
    device_type = _MODULES[name][1]
    if _interpreted(name) and device.type == "cpu":
        return True
    return device_type is None or device.type == device_type
