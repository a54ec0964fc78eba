"""LSRRegularizer: EMA of prototypes, f-bar_s bookkeeping, terms and total, state_dict."""

import pytest
import torch

from lsr_fast import LSRRegularizer, reference
from conftest import fast_params

V = 255


def batch(seed, K=4, C=3, present=(0, 1, 2)):
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(1, K, 2, 3, generator=g)
    labels = torch.tensor(list(present) * 6)[:6].view(1, 2, 3)
    target = torch.randn(1, K, 2, 3, generator=g)
    probs = torch.softmax(torch.randn(1, C, 2, 3, generator=g) * 5, 1)
    return source, labels, target, probs


def test_ema_absent_classes_keep_their_prototype():
    reg = LSRRegularizer(3, 4, momentum=0.8)
    s1, l1, t1, p1 = batch(0)
    reg(s1, l1, t1, p1)
    sums, counts = reference.class_feature_stats(s1, l1, 3)
    first = 0.2 * sums / counts.unsqueeze(1)  # p^ starts at 0 (paper)
    torch.testing.assert_close(reg.prototypes, first)
    assert reg.seen.tolist() == [True, True, True]
    # Second batch has only class 1: classes 0 and 2 keep their prototypes.
    s2, l2, t2, p2 = batch(1, present=(1,))
    reg(s2, l2, t2, p2)
    p_batch = s2.reshape(4, -1).mean(1)
    torch.testing.assert_close(reg.prototypes[0], first[0])
    torch.testing.assert_close(reg.prototypes[2], first[2])
    torch.testing.assert_close(reg.prototypes[1], 0.8 * first[1] + 0.2 * p_batch)


def test_prototype_init_first():
    reg = LSRRegularizer(3, 4, prototype_init="first")
    s, l, t, p = batch(0, present=(0, 2))
    reg(s, l, t, p)
    sums, counts = reference.class_feature_stats(s, l, 3)
    torch.testing.assert_close(reg.prototypes[0], sums[0] / counts[0])
    torch.testing.assert_close(reg.prototypes[1], torch.zeros(4))
    assert reg.seen.tolist() == [True, False, True]


def test_norm_reference_bookkeeping():
    reg = LSRRegularizer(3, 4, norm_delta=0.5)
    norms = []
    for step in range(3):
        s, l, t, p = batch(step)
        out = reg(s, l, t, p)
        mean_norm = torch.linalg.vector_norm(s, dim=1).mean()
        # First step: r = f-bar of the current batch + delta; later: of the previous step.
        r = (mean_norm if step == 0 else norms[-1]) + 0.5
        torch.testing.assert_close(out["norm_source"], (r - torch.linalg.vector_norm(s, dim=1)).abs().mean())
        torch.testing.assert_close(out["norm_target"], (r - torch.linalg.vector_norm(t, dim=1)).clamp(min=0).mean())
        torch.testing.assert_close(reg.mean_source_norm, mean_norm)
        norms.append(mean_norm)
    assert reg.steps.item() == 3


def test_terms_and_total():
    reg = LSRRegularizer(3, 4, lambda_cluster=0.3, lambda_perp=0.2, lambda_norm=0.1, lambda_entropy=0.05, alpha=0.2)
    for step in range(2):
        s, l, t, p = batch(step)
        before = reg.prototypes.clone(), reg.seen.clone()
        out = reg(s, l, t, p)
    # Step 2 terms with the prototypes as they stood at its start.
    pseudo = reference.pseudo_label_downsample(p, (2, 3))
    assert torch.equal(out["pseudo_labels"], pseudo)
    torch.testing.assert_close(out["clustering_source"], reference.clustering_loss(s, l, before[0], before[1]))
    torch.testing.assert_close(out["clustering_target"], reference.clustering_loss(t, pseudo, before[0], before[1]))
    sums, counts = reference.class_feature_stats(s, l, 3)
    torch.testing.assert_close(out["perpendicularity"], reference.perpendicularity_loss(sums / counts.unsqueeze(1), counts > 0))
    torch.testing.assert_close(out["entropy"], reference.maxsquare_loss(p, 0.2))
    total = 0.3 * (out["clustering_source"] + out["clustering_target"]) + 0.2 * out["perpendicularity"] \
        + 0.1 * (out["norm_source"] + out["norm_target"]) + 0.05 * out["entropy"]
    torch.testing.assert_close(out["total"], total)
    assert out["clustering_source"] > 0


def test_full_resolution_labels_are_downsampled_inside():
    reg_full = LSRRegularizer(3, 4)
    reg_small = LSRRegularizer(3, 4)
    s, _, t, _ = batch(0)
    labels = torch.randint(0, 3, (1, 2, 3)).repeat_interleave(4, 1).repeat_interleave(4, 2)
    probs = torch.softmax(torch.randn(1, 3, 2, 3) * 5, 1).repeat_interleave(4, 2).repeat_interleave(4, 3)
    a = reg_full(s, labels, t, probs)
    b = reg_small(s, reference.hist_downsample(labels, (2, 3), 3), t, probs[:, :, ::4, ::4])
    assert torch.equal(a["source_labels"], b["source_labels"])
    assert torch.equal(a["pseudo_labels"], b["pseudo_labels"])
    torch.testing.assert_close(reg_full.prototypes, reg_small.prototypes)


def test_gradient_reaches_features_and_probs_not_prototypes():
    reg = LSRRegularizer.from_preset("gta5", feature_dim=4, num_classes=3)
    for step in range(2):
        s, l, t, p = batch(step)
        s.requires_grad_()
        t.requires_grad_()
        logits = torch.randn(1, 3, 2, 3, requires_grad=True)
        out = reg(s, l, t, torch.softmax(logits, 1))
        out["total"].backward()
    assert s.grad.abs().sum() > 0 and t.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0
    assert reg.prototypes.grad is None


def test_eval_mode_does_not_update_state():
    reg = LSRRegularizer(3, 4).eval()
    reg(*batch(0))
    assert reg.steps.item() == 0 and not reg.seen.any()


def test_state_dict_round_trip():
    reg = LSRRegularizer(3, 4)
    for step in range(2):
        reg(*batch(step))
    clone = LSRRegularizer(3, 4)
    clone.load_state_dict(reg.state_dict())
    for name in ("prototypes", "seen", "mean_source_norm", "steps"):
        assert torch.equal(getattr(clone, name), getattr(reg, name))
    # Both continue identically (the restored one uses the stored f-bar, not the batch's).
    a, b = reg(*batch(5)), clone(*batch(5))
    for key in ("norm_source", "clustering_source", "total"):
        assert torch.equal(a[key], b[key])


def test_presets_and_bad_arguments():
    gta = LSRRegularizer.from_preset("gta5")
    assert (gta.num_classes, gta.lambda_entropy, gta.alpha, gta.lambda_norm, gta.lambda_perp, gta.lambda_cluster) == (19, 0.1, 0.2, 0.025, 0.2, 0.1)
    syn = LSRRegularizer.from_preset("synthia")
    assert (syn.num_classes, syn.alpha, syn.lambda_norm, syn.lambda_cluster) == (16, 0.0, 0.1, 0.05)
    with pytest.raises(ValueError, match="preset must be one of"):
        LSRRegularizer.from_preset("cityscapes")
    with pytest.raises(ValueError, match="momentum must be in"):
        LSRRegularizer(3, 4, momentum=1.5)
    with pytest.raises(ValueError, match="prototype_init"):
        LSRRegularizer(3, 4, prototype_init="random")
    reg = LSRRegularizer(3, 4)
    s, l, t, p = batch(0)
    with pytest.raises(ValueError, match=r"source_features must be \(B, 4, h, w\)"):
        reg(s[:, :3], l, t, p)
    with pytest.raises(ValueError, match=r"target_probs must be \(B, 3, H, W\)"):
        reg(s, l, t, p[:, :2])


@pytest.mark.parametrize("device,backend", fast_params())  # the reference is the other side
def test_backends_agree_over_steps(device, backend):
    ref = LSRRegularizer(3, 4, lambda_entropy=0.1, backend="reference")
    fast = LSRRegularizer(3, 4, lambda_entropy=0.1, backend=backend).to(device)
    for step in range(3):
        s, l, t, p = batch(step)
        want = ref(s, l, t, p)
        got = fast(s.to(device), l.to(device), t.to(device), p.to(device))
        for key in ("total", "clustering_source", "clustering_target", "perpendicularity", "norm_source", "norm_target", "entropy"):
            torch.testing.assert_close(got[key].cpu(), want[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.prototypes.cpu(), ref.prototypes, rtol=1e-5, atol=1e-6)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("name,value", [
    *[(name, value) for name in ("lambda_cluster", "lambda_perp", "lambda_norm", "lambda_entropy", "norm_delta")
      for value in (NAN, INF, -INF, -0.5, "0.1", True)],
])
def test_weights_and_delta_must_be_finite_and_non_negative(name, value):
    # NaN slipped through `value < 0` (False for NaN) and came back as a NaN total.
    with pytest.raises(ValueError, match=f"^{name} must be a finite number >= 0, got"):
        LSRRegularizer(3, 4, **{name: value})
    with pytest.raises(ValueError, match=f"^{name} must be a finite number >= 0, got"):
        LSRRegularizer.from_preset("gta5", feature_dim=4, **{name: value})


@pytest.mark.parametrize("name", ["alpha", "momentum", "label_threshold", "confidence"])
@pytest.mark.parametrize("value", [NAN, INF, -INF, -0.1, 1.5, None])
def test_fractions_must_be_finite_and_in_unit_interval(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be in \[0, 1\], got"):
        LSRRegularizer(3, 4, **{name: value})


@pytest.mark.parametrize("value", ["255", 2.5, True, None])
def test_ignore_index_must_be_an_int(value):
    with pytest.raises(ValueError, match="^ignore_index must be an int, got"):
        LSRRegularizer(3, 4, ignore_index=value)


def test_edge_values_of_hyper_parameters_are_accepted():
    reg = LSRRegularizer(3, 4, lambda_cluster=0, lambda_perp=0.0, lambda_norm=0, lambda_entropy=0, norm_delta=0,
                         alpha=1, momentum=0, label_threshold=1.0, confidence=0.0, ignore_index=-1)
    assert (reg.lambda_cluster, reg.alpha, reg.momentum, reg.confidence, reg.ignore_index) == (0.0, 1.0, 0.0, 0.0, -1)


def _bad_inputs():
    s, l, t, p = batch(0)  # s, t: (1, 4, 2, 3); l: (1, 2, 3); p: (1, 3, 2, 3)
    s2, l2 = s.repeat(2, 1, 1, 1), l.repeat(2, 1, 1)
    no_vector = r"^{} must hold at least one feature vector, got shape \({}\)"
    too_coarse = r"^{} must be \({}\) at the resolution of {} \(2, 3\) or finer, got spatial size \({}\)"
    one_per_image = r"^{} must hold one map per image of {}: batch size {}, got {}"
    return [
        # Batches with no vectors: their mean norm (f-bar_s, the target norm term) would be NaN.
        ("empty source batch", (s[:0], l[:0], t, p), no_vector.format("source_features", "0, 4, 2, 3")),
        ("empty source map", (s[:, :, :0], l, t, p), no_vector.format("source_features", "1, 4, 0, 3")),
        ("empty target batch", (s, l, t[:0], p[:0]), no_vector.format("target_features", "0, 4, 2, 3")),
        ("empty target map", (s, l, t[:, :, :, :0], p), no_vector.format("target_features", "1, 4, 2, 0")),
        ("empty labels", (s, l[:, :0], t, p), too_coarse.format("source_labels", "B, H, W", "source_features", "0, 3")),
        ("empty probs", (s, l, t, p[:, :, :, :0]), too_coarse.format("target_probs", "B, 3, H, W", "target_features", "2, 0")),
        ("coarser labels", (s, l[:, :1], t, p), too_coarse.format("source_labels", "B, H, W", "source_features", "1, 3")),
        ("coarser probs", (s, l, t, p[:, :, :, :2]), too_coarse.format("target_probs", "B, 3, H, W", "target_features", "2, 2")),
        # Batch sizes that disagree between features and their labels / probabilities.
        ("source features batch size", (s2, l, t, p), one_per_image.format("source_labels", "source_features", 2, 1)),
        ("source labels batch size", (s, l2, t, p), one_per_image.format("source_labels", "source_features", 1, 2)),
        ("target batch size", (s, l, t, p.repeat(3, 1, 1, 1)), one_per_image.format("target_probs", "target_features", 1, 3)),
        ("labels rank", (s, l[0], t, p), r"^source_labels must be a \(B, H, W\) integer tensor, got \(2, 3\)"),
    ]


@pytest.mark.parametrize("what", [what for what, _, _ in _bad_inputs()])
def test_forward_rejects_empty_and_mismatched_batches(what):
    args, message = {w: (a, m) for w, a, m in _bad_inputs()}[what]
    reg = LSRRegularizer(3, 4)  # lambda_entropy 0: MaxSquare's own check on probs never runs
    with pytest.raises(ValueError, match=message):
        reg(*args)
    # Nothing was updated by the failed call.
    assert reg.steps.item() == 0 and not reg.seen.any() and not reg.prototypes.any(), what


def test_forward_rejects_wrong_dtypes_naming_the_argument():
    s, l, t, p = batch(0)
    reg = LSRRegularizer(3, 4)
    with pytest.raises(TypeError, match="^source_labels must be an integer tensor, got torch.float32"):
        reg(s, l.float(), t, p)
    with pytest.raises(TypeError, match="^target_probs must be a floating-point tensor, got torch.int64"):
        reg(s, l, t, p.long())
