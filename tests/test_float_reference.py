"""A float ``reference`` (the norm target of norm_alignment_loss, and 0.0 in every call of
clustering_loss) reaches the fused kernels as a tensor filled on the features' device. Made on
the host and moved, it would be a blocking host-to-device copy on every call on a GPU.

Without a GPU the meta device stands in for one: the backends run on meta features (the ops'
fake kernels), and every tensor an operator reads or makes while they do must be on meta; a
scalar made on the host shows up as a CPU tensor. The values are checked against the reference
on the CPU, in float64, where a scalar rounded to float32 on its way would show.
"""

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lsr_fast
from lsr_fast import reference

# The backends with a fused feature_terms, and the module each is implemented in.
FUSED_BACKENDS = {"cpp": "lsr_fast.ops._compiled", "triton": "lsr_fast.triton"}


def backend_module(name):
    state = lsr_fast.available_backends()[name]
    if state != "available":
        pytest.skip(f"{name}: {state}")
    return importlib.import_module(FUSED_BACKENDS[name])


class TensorDevices(TorchDispatchMode):
    """Records (operator, device) for every tensor an operator reads or returns."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                self.seen.append((str(func), t.device.type))
        return out


@pytest.mark.parametrize("backend", sorted(FUSED_BACKENDS))
def test_float_reference_is_made_on_the_features_device(backend):
    module = backend_module(backend)
    features = torch.empty(2, 6, 3, 4, device="meta")
    labels = torch.zeros(2, 3, 4, dtype=torch.int64, device="meta")
    prototypes = torch.empty(3, 6, device="meta")
    calls = {
        "clustering_loss": lambda: module.clustering_loss(features, labels, prototypes, None, 255),
        "norm_alignment_loss": lambda: module.norm_alignment_loss(features, 2.5, "target"),
    }
    for name, call in calls.items():
        with TensorDevices() as devices:
            call()
        off_device = sorted({op for op, device in devices.seen if device != "meta"})
        assert devices.seen and not off_device, f"{backend} {name}: tensors off the features' device in {off_device}"


@pytest.mark.parametrize("backend", sorted(FUSED_BACKENDS))
@pytest.mark.parametrize("mode", ["source", "target"])
def test_float_reference_keeps_float64(backend, mode):
    backend_module(backend)
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64)
    r = 1000.0 / 3.0  # rounded to float32 it moves by 1e-5, far beyond float64 summation error
    got = lsr_fast.norm_alignment_loss(features, r, mode=mode, backend=backend)
    want = reference.norm_alignment_loss(features, r, mode)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
