"""Benchmark fixtures. Run: .venv/bin/python -m pytest benchmarks --benchmark-only
(add -k small for the quick shapes)."""

import pytest
import torch

import lsr_fast

# (name, labels H x W, features h x w, K, C): the paper's GTA5 shape and a small one.
SHAPES = {
    "paper": dict(H=720, W=1280, h=91, w=161, K=2048, C=19),
    "small": dict(H=128, W=256, h=17, w=33, K=256, C=19),
}


def cpu_backends():
    report = lsr_fast.available_backends()
    return ["reference"] + (["cpp"] if report["cpp"] == "available" else [])


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.benchmark(min_rounds=3, warmup=True))


@pytest.fixture(params=list(SHAPES), ids=list(SHAPES))
def shape(request):
    return SHAPES[request.param]


def make_inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = shape
    coarse = torch.randint(0, s["C"], (1, s["H"] // 16 + 1, s["W"] // 16 + 1), generator=g)
    labels = coarse.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, : s["H"], : s["W"]].contiguous()
    labels[:, ::11, ::7] = 255
    probs = torch.softmax(torch.randn(1, s["C"], s["H"], s["W"], generator=g) * 2, 1)
    features = torch.randn(1, s["K"], s["h"], s["w"], generator=g).relu_()
    small = lsr_fast.reference.hist_downsample(labels, (s["h"], s["w"]), s["C"])
    prototypes = torch.randn(s["C"], s["K"], generator=g)
    return labels, probs, features, small, prototypes
