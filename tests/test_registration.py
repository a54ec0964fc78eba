"""The compiled and Triton ops as torch ops: opcheck (schema, fake kernels, autograd
registration), torch.compile(fullgraph=True) through the public API, and run-to-run determinism."""

import pytest
import torch

import lsr_fast
from lsr_fast import reference
from conftest import fast_params

V = 255


def sample_args(namespace):
    """(op name, args) for every op of a namespace, on small CPU inputs."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (2, 12, 14), generator=g)
    labels[0, :3] = V
    probs = torch.softmax(torch.randn(2, 4, 12, 14, generator=g), 1)
    features = torch.randn(2, 6, 3, 4, generator=g, requires_grad=True)
    small = torch.randint(0, 4, (2, 3, 4), generator=g)
    small[1, 0] = V
    prototypes = torch.randn(4, 6, generator=g)
    r = torch.tensor(2.0)
    ops = getattr(torch.ops, namespace)
    cases = [
        (ops.hist_downsample, (labels, 3, 4, 4, 0.5, V, None)),
        (ops.hist_downsample, (labels.to(torch.uint8), 5, 5, 4, 0.3, V, torch.rand(4, generator=g))),
        (ops.pseudo_label_downsample, (probs, 3, 4, 0.5, 0.4, V)),
        (ops.class_feature_stats, (features, small, 4, V)),
        (ops.class_feature_stats, (features.detach().to(memory_format=torch.channels_last).requires_grad_(), small.int(), 4, V)),
        (ops.feature_terms, (features, small, prototypes, r, 0, V)),
        (ops.feature_terms, (features, small, prototypes, r, 1, V)),
        (ops.maxsquare_loss, (probs.clone().requires_grad_(), 0.2)),
    ]
    return cases


NAMESPACES = {"cpp": "lsr_fast", "triton": "lsr_fast_triton"}


@pytest.mark.parametrize("device,backend", fast_params())
def test_opcheck(device, backend):
    pytest.importorskip("expecttest")  # torch.library.opcheck needs it
    for op, args in sample_args(NAMESPACES["cpp" if backend == "cuda" else backend]):
        args = tuple(a.detach().to(device).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device,backend", fast_params())
def test_torch_compile_fullgraph(device, backend):
    """A whole LSR step through the public ops traces into one graph (aot_eager: no C++ codegen)."""
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (1, 16, 20), generator=g).to(device)
    probs = torch.softmax(torch.randn(1, 3, 16, 20, generator=g), 1).to(device)
    features = torch.randn(1, 5, 4, 5, generator=g).to(device)
    prototypes = torch.randn(3, 5, generator=g).to(device)
    lsr_fast.set_value_checks(False)  # value checks read tensors; a captured step turns them off
    try:
        def step(f):
            small = lsr_fast.hist_downsample(labels, (4, 5), 3, backend=backend)
            pseudo = lsr_fast.pseudo_label_downsample(probs, (4, 5), confidence=0.3, backend=backend)
            sums, counts, sq, norm_loss, _ = lsr_fast.feature_terms(f, small, prototypes, 1.5, backend=backend)
            loss = reference.clustering_from_sums(sq, counts) + norm_loss / 20 \
                + lsr_fast.perpendicularity_loss(sums / counts.clamp(min=1).unsqueeze(1), counts > 0) \
                + lsr_fast.clustering_loss(f, pseudo, prototypes, backend=backend) \
                + lsr_fast.maxsquare_loss(probs, backend=backend)
            return loss

        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        a = features.clone().requires_grad_()
        b = features.clone().requires_grad_()
        want = step(a)
        got = compiled(b)
        want.backward()
        got.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(b.grad, a.grad)
    finally:
        lsr_fast.set_value_checks(True)


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("deterministic", [False, True])
def test_run_to_run_bitwise_identical(device, backend, deterministic):
    """CPU and Triton kernels reduce in a fixed order always; the CUDA kernels when
    torch.use_deterministic_algorithms(True) asks (they use float atomics otherwise)."""
    if device == "cuda" and backend == "cuda" and not deterministic:
        pytest.skip("the default CUDA path sums with float atomics")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        check_bitwise_identical(device, backend)
    finally:
        torch.use_deterministic_algorithms(previous)


def check_bitwise_identical(device, backend):
    g = torch.Generator().manual_seed(2)
    features = torch.randn(2, 33, 7, 9, generator=g).to(device)
    labels = torch.randint(0, 5, (2, 7, 9), generator=g).to(device)
    prototypes = torch.randn(5, 33, generator=g).to(device)
    results = []
    for _ in range(2):
        f = features.clone().requires_grad_()
        terms = lsr_fast.feature_terms(f, labels, prototypes, 3.0, backend=backend)
        (terms[0].sum() + terms[2].sum() + terms[3]).backward()
        results.append([t.detach() for t in terms] + [f.grad])
    for a, b in zip(*results):
        assert torch.equal(a, b)
