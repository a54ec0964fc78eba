"""Atomic file writes for the analysis outputs (temporary file in the same folder, fsync, rename)."""

from __future__ import annotations

import io
import json
import math
import os
import uuid

import numpy as np
import torch


def atomic_write_bytes(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open with 0o666 leaves the permissions to the umask, like an ordinary file (mkstemp: 0600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


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
