"""Every op, reference vs compiled CPU kernels, forward and forward+backward."""

import pytest
import torch

import lsr_fast
from lsr_fast import reference
from conftest import cpu_backends, make_inputs


@pytest.mark.parametrize("backend", cpu_backends())
def test_hist_downsample(benchmark, backend, shape):
    labels, *_ = make_inputs(shape)
    benchmark(lsr_fast.hist_downsample, labels, (shape["h"], shape["w"]), shape["C"], backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_pseudo_label_downsample(benchmark, backend, shape):
    _, probs, *_ = make_inputs(shape)
    benchmark(lsr_fast.pseudo_label_downsample, probs, (shape["h"], shape["w"]), backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_class_feature_stats_fwd_bwd(benchmark, backend, shape):
    _, _, features, small, _ = make_inputs(shape)
    features.requires_grad_()
    grad = torch.randn(shape["C"], shape["K"])

    def step():
        sums, _ = lsr_fast.class_feature_stats(features, small, shape["C"], backend=backend)
        (sums * grad).sum().backward()

    benchmark(step)


@pytest.mark.parametrize("backend", cpu_backends())
def test_losses_fwd_bwd(benchmark, backend, shape):
    """Clustering + norm alignment + perpendicularity of one feature map, forward and backward."""
    _, _, features, small, prototypes = make_inputs(shape)
    features.requires_grad_()

    def step():
        sums, counts, sq, norm_loss, _ = lsr_fast.feature_terms(features, small, prototypes, 10.0, backend=backend)
        loss = reference.clustering_from_sums(sq, counts) + norm_loss / small.numel() \
            + lsr_fast.perpendicularity_loss(sums / counts.clamp(min=1).unsqueeze(1), counts > 0)
        loss.backward()

    benchmark(step)


@pytest.mark.parametrize("backend", cpu_backends())
def test_maxsquare_fwd_bwd(benchmark, backend, shape):
    _, probs, *_ = make_inputs(shape)
    probs.requires_grad_()
    benchmark(lambda: lsr_fast.maxsquare_loss(probs, backend=backend).backward())
