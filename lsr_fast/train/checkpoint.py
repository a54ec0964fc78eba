"""Checkpoints: atomic writes, safe loads, everything needed to resume exactly.

A checkpoint is a dict of tensors, numbers, strings and plain containers (loadable with
``torch.load(weights_only=True)``):
  format, step, model, optimizer, scheduler, regularizer (buffers or None), scaler, rng,
  config, versions, best (mIoU and step of the best validation), selection (the dataset and split
  used to pick ``best``), early_stop (validations since the best), nonfinite (skips in a row),
  history (validation results so far).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch

from .._atomic import atomic_write

FORMAT = "lsr_fast-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (the message names the file)."""


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save through an atomic write (see lsr_fast._atomic)."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def nonfinite_tensors(state_dict: Dict[str, torch.Tensor]) -> list:
    return [name for name, value in state_dict.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


def save_checkpoint(path: str, payload: Dict[str, Any]) -> None:
    """Writes ``payload`` atomically; refuses weights that hold NaN or inf."""
    bad = nonfinite_tensors(payload["model"])
    if bad:
        raise RuntimeError(f"refusing to write {path}: non-finite values in {', '.join(bad[:5])}")
    atomic_torch_save({"format": FORMAT, **payload}, path)


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, wrong file type, unsafe pickle ...
        raise CheckpointError(f"checkpoint {path} is truncated, corrupt or holds objects a safe load refuses ({type(error).__name__}: {error})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an lsr_fast training checkpoint (no format {FORMAT!r}); "
                              "pretrained weights go to model.pretrained instead")
    for key in ("model", "config", "step"):
        if key not in data:
            raise CheckpointError(f"checkpoint {path} lacks {key!r}")
    bad = nonfinite_tensors(data["model"])
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite weights in {', '.join(bad[:5])}")
    return data


def capture_rng() -> Dict[str, Any]:
    """Every RNG a step can touch, as plain data."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
    }


def restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@dataclass
class InferenceBundle:
    model: torch.nn.Module
    regularizer: Optional[torch.nn.Module]
    config: Dict[str, Any]
    num_classes: int
    step: int
    path: str


def load_for_inference(path: str, device: Any = "cpu") -> InferenceBundle:
    """The model of a training checkpoint in eval mode on ``device``, and its regulariser's
    buffers (prototypes, seen, mean_source_norm) when the run had one."""
    from .build import build_model, build_regularizer
    from .config import build_config

    data = load_checkpoint(path)
    config = build_config(data["config"], source=path)
    model = build_model(config)
    model.load_state_dict(data["model"])
    model.to(device).eval()
    regularizer = None
    if data.get("regularizer") is not None:
        regularizer = build_regularizer(config, model.feature_dim)
        regularizer.load_state_dict(data["regularizer"])
        regularizer.to(device).eval()
    return InferenceBundle(model, regularizer, config, config["data"]["num_classes"], int(data["step"]), path)
