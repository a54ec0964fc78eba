"""The paper-shape GPU tests of the LSRRegularizer step, a second device and a whole training
step in a CUDA graph (issue 17, item 6); the ops, what is covered and how to run it:
tests/test_gpu_paper_shape.py."""

import contextlib
import copy
import functools
import itertools
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import lsr_fast
from lsr_fast import reference
from lsr_fast.cli import street_labels
from lsr_fast.models import DeepLabV2
from conftest import (assert_accumulated_close, assert_rounded_close, feature_terms_magnitudes, sync_debug_error,
                      unusable_reason)

from gpu_paper_shape_inputs import *  # noqa: F401,F403  (constants, parametrisation, inputs)
from test_gpu_paper_shape import (check_class_feature_stats, check_clustering, check_feature_terms,  # the per-op checks
                                  check_maxsquare, check_norm_alignment, check_pseudo_labels, hist_reference)

pytestmark = [
    pytest.mark.gpu_paper_shape,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason=f"paper-shape GPU tests: no CUDA device is visible to torch "
                              f"({DEVICE_ENV}=cpu runs them on the CPU with the cpp backend, as a dry run)"),
]


# ---- the LSRRegularizer step ----------------------------------------------------------------------

REGULARIZER_CASES = [  # (preset, feature dtype, layout, deterministic): one reference run per preset
    ("default", torch.float32, "nchw", False),
    ("default", torch.float32, "channels_last", True),
    ("gta5_released", torch.float32, "nchw", True),
    ("gta5_released", torch.bfloat16, "channels_last", False),
]
SCALAR_TERMS = ("clustering_source", "clustering_target", "perpendicularity", "norm_source", "norm_target", "entropy",
                "total", "source_mean_norm", "target_mean_norm")


def make_regularizer(preset, backend):
    if preset == "default":
        return lsr_fast.LSRRegularizer(19, K, backend=backend)
    return lsr_fast.LSRRegularizer.from_preset(preset, feature_dim=K, backend=backend)


@functools.lru_cache(maxsize=1)
def regularizer_batches():
    """Two steps' inputs on the CPU: float32 source features (B, K, 91, 161) on a 1/32 grid,
    street labels (B, 720, 1280), target features (B, K, 65, 129), probabilities (B, 19, 512,
    1024). The features are exact in bfloat16 too (|v| <= 6 on a 1/32 grid: 8 significant bits),
    so one float64 reference serves both dtypes."""
    batches = []
    for step in range(2):
        probs = probability_case(19, torch.float32, TARGET_HW, "street", seed=40 + step)
        check_confidence_margin(probs, TARGET_FEAT)
        batches.append(SimpleNamespace(
            source=gapped_features((B, K, *SOURCE_FEAT), seed=30 + step, grid=32),
            labels=source_label_maps(50 + step),
            target=gapped_features((B, K, *TARGET_FEAT), seed=60 + step, grid=32),
            probs=probs))
        for features in (batches[-1].source, batches[-1].target):
            assert torch.equal(features.to(torch.bfloat16).float(), features), "test data: not exact in bfloat16"
    return batches


def run_regularizer(preset, backend, dtype, layout, device, det=False):
    """Two training steps, forward + backward of ``total``: per step the terms, labels,
    gradients and the state after it, all on the CPU. The reference runs on float64 copies."""
    regularizer = make_regularizer(preset, backend).to(device).train()
    on_reference = backend == "reference"
    records = []
    for batch in regularizer_batches():
        convert = as_reference if on_reference else (lambda t: t.to(dtype))
        source = place(convert(batch.source), layout, device).requires_grad_()
        target = place(convert(batch.target), layout, device).requires_grad_()
        probs = place(as_reference(batch.probs) if on_reference else batch.probs, layout, device).requires_grad_()
        with deterministic(det):
            terms = regularizer(source, batch.labels.to(device), target, probs)
            terms["total"].backward()
        records.append(SimpleNamespace(
            terms={name: terms[name].detach().cpu() for name in SCALAR_TERMS},
            source_labels=terms["source_labels"].cpu(), pseudo_labels=terms["pseudo_labels"].cpu(),
            grads=[None if x.grad is None else x.grad.cpu() for x in (source, target, probs)],
            state={name: value.detach().cpu().clone() for name, value in regularizer.state_dict().items()}))
    return regularizer, records


@functools.lru_cache(maxsize=1)
def regularizer_reference(preset):
    return run_regularizer(preset, "reference", torch.float64, "nchw", "cpu")


def term_magnitudes(regularizer, want, previous):
    """sum |terms| of each scalar term (see conftest): |want| for terms of one sign; the norm
    terms carry r and the mean norms; perpendicularity is a mean of cosines (<= 1); the total
    the weighted sum of its parts'."""
    t = {name: value.abs() for name, value in want.terms.items()}
    released = regularizer.norm_form == "released"
    source_norm = want.terms["source_mean_norm"]
    base = source_norm if (released or previous is None) else previous.terms["source_mean_norm"]
    r = base + regularizer.norm_delta
    scale = source_norm if released else 1.0
    t["norm_source"] = (r + source_norm) / scale
    t["norm_target"] = (r + want.terms["target_mean_norm"]) / scale
    t["perpendicularity"] = torch.tensor(1.0, dtype=torch.float64)
    t["total"] = (regularizer.lambda_cluster * (t["clustering_source"] + t["clustering_target"])
                  + regularizer.lambda_perp * t["perpendicularity"]
                  + regularizer.lambda_norm * (t["norm_source"] + t["norm_target"])
                  + regularizer.lambda_entropy * t["entropy"])
    return t


def check_regularizer(preset, dtype, layout, det, backend, device=DEVICE):
    ref_regularizer, wants = regularizer_reference(preset)
    _, gots = run_regularizer(preset, backend, dtype, layout, device, det)
    previous = None
    for step, (got, want) in enumerate(zip(gots, wants)):
        where = f"step {step + 1}"
        assert torch.equal(got.source_labels, want.source_labels), f"{where}: source labels"
        assert torch.equal(got.pseudo_labels, want.pseudo_labels), f"{where}: pseudo-labels"
        magnitudes = term_magnitudes(ref_regularizer, want, previous)
        for name in SCALAR_TERMS:
            assert_accumulated_close(got.terms[name], want.terms[name].float(), dtype, magnitudes[name], f"{where} {name}")
        for name, g, w, dt in zip(("source", "target", "probability"), got.grads, want.grads, (dtype, dtype, torch.float32)):
            if w is None:  # no MaxSquare term (lambda_entropy = 0): no probability gradient
                assert g is None, f"{where}: {name} gradient where the reference has none"
            else:
                assert_rounded_close(g, w.to(dt), dt, f"{where}: {name} gradient")
        for name, value in want.state.items():
            if value.is_floating_point():
                assert_rounded_close(got.state[name], value.float(), torch.float32, f"{where}: state {name}")
            else:
                assert torch.equal(got.state[name], value), f"{where}: state {name}"
        previous = want
    assert wants[1].terms["clustering_source"] > 0  # the second step has estimated prototypes


@pytest.mark.parametrize("preset,dtype,layout,det,backend", matrix(REGULARIZER_CASES, backend_params()))
def test_regularizer_step(preset, dtype, layout, det, backend):
    """Two steps (the first has no clustering term: zero-initialised prototypes) of the
    regulariser on the backend against the same regulariser on the reference backend."""
    check_regularizer(preset, dtype, layout, det, backend)


# ---- a second device --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
def test_second_device(backend):
    """Every op and the regulariser with their tensors on cuda:1 while cuda:0 is current: the
    kernels must launch on the tensors' device and stream."""
    if DEVICE != "cuda" or torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA devices (torch.cuda.device_count() = "
                    f"{torch.cuda.device_count() if torch.cuda.is_available() else 0})")
    device = "cuda:1"
    assert torch.cuda.current_device() == 0
    labels, weights, want = hist_reference(19, "street")
    got = lsr_fast.hist_downsample(labels.to(device), SOURCE_FEAT, 19, backend=backend)
    assert got.device == torch.device(device) and torch.equal(got.cpu(), want)
    check_pseudo_labels(19, SOURCE_HW, "street", torch.float32, "nchw", False, backend, device)
    check_class_feature_stats(19, torch.float32, "channels_last", False, backend, device=device)
    check_clustering(19, torch.float32, "nchw", False, backend, "l1_mean", device)
    check_norm_alignment(torch.float32, "nchw", False, backend, "released", device)
    check_feature_terms(19, torch.float32, "nchw", True, backend, "released", device=device)
    check_maxsquare(19, torch.float32, "nchw", False, backend, device=device)
    check_regularizer("gta5_released", torch.float32, "nchw", False, backend, device)
    assert torch.cuda.current_device() == 0


# ---- a whole training step in a CUDA graph ------------------------------------------------------------

GRAPH_IMAGE = (256, 512)


def graph_batches(steps):
    g = torch.Generator().manual_seed(5)
    batches = []
    for step in range(steps):
        batches.append((torch.randn(B, 3, *GRAPH_IMAGE, generator=g), street_labels(B, *GRAPH_IMAGE, 70 + step),
                        torch.randn(B, 3, *GRAPH_IMAGE, generator=g)))
    return batches


def lsr_step(model, regularizer, optimizer, images, labels, target_images):
    """Forward, CE + the LSR terms, backward and the SGD step, with no host read: the value
    checks are on (the default) and keep their verdicts on the device (check_every=0, read by
    the test after the steps). Returns the loss values, on the device."""
    logits, features = model(images)
    ce = F.cross_entropy(F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False),
                         labels, ignore_index=V)
    target_logits, target_features = model(target_images)
    target_probs = torch.softmax(F.interpolate(target_logits, size=target_images.shape[-2:], mode="bilinear",
                                               align_corners=False), 1)
    terms = regularizer(features, labels, target_features, target_probs)
    loss = ce + terms["total"]
    loss.backward()
    optimizer.step()
    return torch.stack([loss.detach(), ce.detach()] + [terms[name].detach() for name in SCALAR_TERMS])


def graph_setup(preset, backend, device):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DeepLabV2(19, "resnet18", width=16)
    regularizer = lsr_fast.LSRRegularizer.from_preset(preset, feature_dim=model.feature_dim, backend=backend,
                                                      check_every=0)
    model, regularizer = model.to(device).train(), regularizer.to(device).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    return model, regularizer, optimizer


@pytest.mark.parametrize("preset,backend", matrix(["gta5", "gta5_released"], backend_params()))
def test_training_step_cuda_graph(preset, backend):
    """DeepLabV2-ResNet-18 (width 16) + LSRRegularizer: three warm-up steps, then steps 4 and 5
    eagerly under sync debug mode "error" (no host synchronisation) and, on an identical copy,
    captured once in a CUDA graph (warm-up on a side stream, static inputs, as in PyTorch's
    "whole network capture") and replayed: the losses, terms, weights and regulariser state equal
    the eager ones within float32 tolerance (float atomics may sum in another order)."""
    device = DEVICE
    warmup, steps = 3, 5
    batches = [tuple(t.to(device) for t in batch) for batch in graph_batches(steps)]
    eager = graph_setup(preset, backend, device)
    graphed = copy.deepcopy(eager)  # the optimizer's copy holds the copied model's parameters

    eager_out = []
    for step, batch in enumerate(batches):
        eager[2].zero_grad(set_to_none=True)
        with sync_debug_error(device) if step >= warmup else contextlib.nullcontext():
            out = lsr_step(*eager, *batch)
        eager_out.append(out.cpu())
    assert all(torch.isfinite(out).all() for out in eager_out)

    static = [t.clone() for t in batches[0]]
    model, regularizer, optimizer = graphed
    if device != "cuda":  # dry run: the same steps eagerly on the copy, then skip the capture
        graph_out = []
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            graph_out.append(lsr_step(*graphed, *batch).cpu())
        compare_graph_run(eager, graphed, eager_out[warmup:], graph_out[warmup:])
        pytest.skip("CUDA graph capture needs a CUDA device (the eager steps ran and agree)")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for batch in batches[:warmup]:
            for dst, src in zip(static, batch):
                dst.copy_(src)
            optimizer.zero_grad(set_to_none=True)
            lsr_step(*graphed, *static)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)  # backward allocates .grad from the graph's pool
    with torch.cuda.graph(graph):
        static_out = lsr_step(*graphed, *static)
    graph_out = []
    for batch in batches[warmup:]:
        for dst, src in zip(static, batch):
            dst.copy_(src)
        graph.replay()
        graph_out.append(static_out.cpu())
    compare_graph_run(eager, graphed, eager_out[warmup:], graph_out)


def compare_graph_run(eager, graphed, eager_out, graph_out):
    for regularizer in (eager[1], graphed[1]):  # the deferred value checks ran and all passed
        assert regularizer.checks.errors() == [] and regularizer.checks.failed_count(DEVICE).item() == 0
        assert len(regularizer.checks._verdicts) >= 4, "the value checks did not run"
    names = ["loss", "ce", *SCALAR_TERMS]
    for step, (got, want) in enumerate(zip(graph_out, eager_out)):
        for name, g, w in zip(names, got, want):
            assert_rounded_close(g.reshape(1), w.reshape(1), torch.float32, f"replay {step + 1}: {name}")
    for (name, got), (_, want) in zip(graphed[0].state_dict().items(), eager[0].state_dict().items()):
        if got.is_floating_point():
            assert_rounded_close(got, want, torch.float32, f"model {name}")
        else:
            assert torch.equal(got.cpu(), want.cpu()), f"model {name}"
    for (name, got), (_, want) in zip(graphed[1].state_dict().items(), eager[1].state_dict().items()):
        if got.is_floating_point():
            assert_rounded_close(got, want, torch.float32, f"regularizer {name}")
        else:
            assert torch.equal(got.cpu(), want.cpu()), f"regularizer {name}"
