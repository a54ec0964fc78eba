"""JSON and PNG outputs of the analysis, written atomically (lsr_fast._atomic)."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import torch

from .._atomic import atomic_write_bytes


def jsonable(value):
    """Plain JSON values: tensors and arrays become lists, NaN and infinities become null
    (strict JSON has no NaN)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return jsonable(value.tolist() if value.dim() else value.item())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str, obj) -> None:
    text = json.dumps(jsonable(obj), indent=1, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """Render a matplotlib Figure to PNG with the Agg canvas and write it atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
