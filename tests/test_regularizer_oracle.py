"""LSRRegularizer against an independent oracle, step by step, on every usable backend.

The oracle below is DESIGN.md's "Semantics" and LSRRegularizer's docstring written out in plain
float64 torch with explicit per-class, per-window and per-pixel Python loops. It uses nothing
from lsr_fast (the backends and lsr_fast.reference share the regulariser's own code, so a
comparison between them cannot see a bug in that code). The batches have absent classes,
classes present but not yet seen, void pixels and cells, non-dividing full-resolution labels and
probabilities as well as already-downsampled ones, and the configurations differ in alpha, the
lambdas, eta, delta, the thresholds, ignore_index and prototype_init. Two configurations use
the released code's loss forms (DESIGN.md): L1-mean clustering, and the relative, filtered norm
terms with n-bar taken from the current source batch and no target hinge.
"""

from types import SimpleNamespace

import pytest
import torch

from lsr_fast import LSRRegularizer
from conftest import all_params

C, K = 5, 4
V = -1  # void placeholder in the designs below, replaced by each configuration's ignore_index
TERM_KEYS = ("clustering_source", "clustering_target", "perpendicularity", "norm_source", "norm_target", "entropy", "total")

# ---------------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------------


def windows(n_in, n_out):
    """[floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)) for each output index i."""
    return [(i * n_in // n_out, -(-(i + 1) * n_in // n_out)) for i in range(n_out)]


def hist_cell(values, cfg):
    """DESIGN.md's rule on one window: void pixels do not vote; keep c1 if n1 > 0 and n2 < T*n1."""
    counts = [sum(1 for v in values if v == c) for c in range(C)]
    c1 = max(range(C), key=lambda c: (counts[c], -c))  # lowest index on ties
    n1 = counts[c1]
    n2 = max(counts[c] for c in range(C) if c != c1)
    return c1 if n1 > 0 and n2 < cfg.T * n1 else cfg.void


def hist_down(labels, size, cfg):
    B, H, W = labels.shape
    out = torch.empty(B, *size, dtype=torch.int64)
    for b in range(B):
        for i, (y0, y1) in enumerate(windows(H, size[0])):
            for j, (x0, x1) in enumerate(windows(W, size[1])):
                out[b, i, j] = hist_cell(labels[b, y0:y1, x0:x1].reshape(-1).tolist(), cfg)
    return out


def window_confidence(probs, size):
    """Per cell, the window mean of the per-pixel max probability."""
    top = probs.detach().max(dim=1).values
    B, H, W = top.shape
    out = torch.empty(B, *size, dtype=torch.float64)
    for b in range(B):
        for i, (y0, y1) in enumerate(windows(H, size[0])):
            for j, (x0, x1) in enumerate(windows(W, size[1])):
                out[b, i, j] = top[b, y0:y1, x0:x1].mean()
    return out


def pseudo_labels(probs, size, cfg):
    labels = hist_down(probs.detach().argmax(dim=1), size, cfg)  # argmax: first maximum
    confident = window_confidence(probs, size) > cfg.conf
    return torch.where(confident, labels, torch.full_like(labels, cfg.void))


def vectors_of(features, labels, c):
    B, _, h, w = features.shape
    return [features[b, :, i, j] for b in range(B) for i in range(h) for j in range(w) if labels[b, i, j] == c]


def all_vectors(features):
    B, _, h, w = features.shape
    return [features[b, :, i, j] for b in range(B) for i in range(h) for j in range(w)]


def cosine(a, b):
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:  # zero-norm prototype: cosine 0
        return a.new_zeros(())
    return a @ b / (na * nb)


def maxsquare(probs, alpha):
    """-1/(B*C) sum_b sum_x w_b(argmax_x) sum_c p^2, w_b(c) = 1/max(N_bc^alpha N^(1-alpha), 1)."""
    B, _, H, W = probs.shape
    N = H * W
    total = probs.new_zeros(())
    for b in range(B):
        prediction = probs[b].detach().argmax(dim=0).reshape(-1).tolist()
        weight = [1.0 / max(prediction.count(c) ** alpha * N ** (1 - alpha), 1.0) for c in range(C)]
        squares = probs[b].pow(2).sum(dim=0).reshape(-1)
        for x in range(N):
            total = total + weight[prediction[x]] * squares[x]  # weights are constants
    return -total / (B * C)


class Oracle:
    def __init__(self, cfg):
        self.cfg = cfg
        self.prototypes = [torch.zeros(K, dtype=torch.float64) for _ in range(C)]  # p^ starts at 0
        self.seen = [False] * C
        self.mean_source_norm = None
        self.steps = 0
        self.trace = []  # what each step exercised, for the coverage checks

    def clustering(self, features, labels):
        """Eq. 5 with p^ and `seen` as they stand (the start of the step); or the released form:
        per qualifying class the mean |p^ - f| over its vectors and channels, summed, over C."""
        per_class = []
        for c in range(C):
            vs = vectors_of(features, labels, c)
            if vs and self.seen[c]:
                if self.cfg.dist == "l1_mean":
                    per_class.append(torch.stack([(self.prototypes[c] - v).abs().mean() for v in vs]).mean())
                else:
                    per_class.append(torch.stack([(self.prototypes[c] - v).pow(2).sum() for v in vs]).mean())
        if not per_class:
            return features.new_zeros(())
        return torch.stack(per_class).sum() / C if self.cfg.dist == "l1_mean" else torch.stack(per_class).mean()

    def step(self, s, labels, t, probs):
        cfg = self.cfg
        src = hist_down(labels, tuple(s.shape[2:]), cfg)
        tgt = pseudo_labels(probs, tuple(t.shape[2:]), cfg)
        out = {"source_labels": src, "pseudo_labels": tgt}
        out["clustering_source"] = self.clustering(s, src)
        out["clustering_target"] = self.clustering(t, tgt)

        batch = {c: torch.stack(vs).mean(0) for c in range(C) if (vs := vectors_of(s, src, c))}
        present = sorted(batch)
        n = len(present)
        pairs = [cosine(batch[i], batch[j]) for i in present for j in present if i != j]
        out["perpendicularity"] = torch.stack(pairs).sum() / (n * (n - 1)) if n >= 2 else s.new_zeros(())

        s_norms = torch.stack([v.norm() for v in all_vectors(s)])  # void vectors too
        t_norms = torch.stack([v.norm() for v in all_vectors(t)])
        if cfg.released:
            # Channels below the vector's own (constant) mean are zeroed; n-bar of this batch.
            kept = lambda v: torch.where(v >= v.detach().mean(), v, torch.zeros((), dtype=v.dtype)).norm()  # noqa: E731
            f_bar = s_norms.mean().detach()
            r = f_bar + cfg.delta
            out["norm_source"] = (r - torch.stack([kept(v) for v in all_vectors(s)])).abs().mean() / f_bar
            out["norm_target"] = (r - torch.stack([kept(v) for v in all_vectors(t)])).abs().mean() / f_bar
        else:
            f_bar = self.mean_source_norm if self.steps else s_norms.mean().detach()
            r = f_bar + cfg.delta
            out["norm_source"] = (r - s_norms).abs().mean()
            out["norm_target"] = (r - t_norms).clamp(min=0).mean()
        out["entropy"] = maxsquare(probs, cfg.alpha)
        out["total"] = (
            cfg.lc * (out["clustering_source"] + out["clustering_target"]) + cfg.lp * out["perpendicularity"]
            + cfg.ln * (out["norm_source"] + out["norm_target"]) + cfg.le * out["entropy"]
        )
        out["source_mean_norm"] = s_norms.mean().detach()
        out["target_mean_norm"] = t_norms.mean().detach()

        target_classes = {int(c) for c in tgt.unique()} - {cfg.void}
        self.trace.append(SimpleNamespace(
            source=set(present), target=target_classes, seen={c for c in range(C) if self.seen[c]},
            source_below=int((s_norms < r).sum()), target_below=int((t_norms < r).sum()),
            vectors=(len(s_norms), len(t_norms)),
        ))
        # EMA after the losses: present classes blend, absent ones keep p^.
        for c, p in batch.items():
            p = p.detach()
            if cfg.init == "first" and not self.seen[c]:
                self.prototypes[c] = p.clone()
            else:
                self.prototypes[c] = cfg.eta * self.prototypes[c] + (1 - cfg.eta) * p
            self.seen[c] = True
        self.mean_source_norm = out["source_mean_norm"]
        self.steps += 1
        return out


# ---------------------------------------------------------------------------------------------
# Configurations and batches
# ---------------------------------------------------------------------------------------------

PAPER = dict(eta=0.8, delta=0.002, T=0.5, conf=0.5, void=255, init="zero", dist="squared_l2", released=False)
CONFIGS = {
    # Published presets (GTA5: alpha 0.2; SYNTHIA: alpha 0) with small sizes and other lambdas.
    "gta5": (
        lambda backend: LSRRegularizer.from_preset(
            "gta5", feature_dim=K, num_classes=C, lambda_cluster=0.7, lambda_perp=0.45, lambda_norm=0.3,
            lambda_entropy=0.6, backend=backend),
        SimpleNamespace(lc=0.7, lp=0.45, ln=0.3, le=0.6, alpha=0.2, **PAPER),
    ),
    "synthia": (
        lambda backend: LSRRegularizer.from_preset(
            "synthia", feature_dim=K, num_classes=C, lambda_cluster=0.9, lambda_perp=0.35, lambda_norm=0.8,
            lambda_entropy=0.5, backend=backend),
        SimpleNamespace(lc=0.9, lp=0.35, ln=0.8, le=0.5, alpha=0.0, **PAPER),
    ),
    "custom": (
        lambda backend: LSRRegularizer(
            C, K, lambda_cluster=1.3, lambda_perp=0.5, lambda_norm=0.2, lambda_entropy=0.25, alpha=0.5,
            momentum=0.6, norm_delta=0.3, label_threshold=0.75, confidence=0.625, ignore_index=9,
            prototype_init="first", backend=backend),
        SimpleNamespace(lc=1.3, lp=0.5, ln=0.2, le=0.25, alpha=0.5, eta=0.6, delta=0.3, T=0.75, conf=0.625,
                        void=9, init="first", dist="squared_l2", released=False),
    ),
    # The released code's forms: the preset (Delta = 0.1) and L1 clustering alone.
    "gta5_released": (
        lambda backend: LSRRegularizer.from_preset(
            "gta5_released", feature_dim=K, num_classes=C, lambda_cluster=0.7, lambda_perp=0.45, lambda_norm=0.3,
            lambda_entropy=0.6, backend=backend),
        SimpleNamespace(lc=0.7, lp=0.45, ln=0.3, le=0.6, alpha=0.2, **{**PAPER, "delta": 0.1, "dist": "l1_mean", "released": True}),
    ),
    "custom_l1": (
        lambda backend: LSRRegularizer(
            C, K, lambda_cluster=1.3, lambda_perp=0.5, lambda_norm=0.2, lambda_entropy=0.25, alpha=0.5,
            momentum=0.6, norm_delta=0.3, prototype_init="first", clustering_distance="l1_mean", backend=backend),
        SimpleNamespace(lc=1.3, lp=0.5, ln=0.2, le=0.25, alpha=0.5, **{**PAPER, "eta": 0.6, "delta": 0.3, "init": "first",
                                                                       "dist": "l1_mean"}),
    ),
}
# The design checks below are about the paper's norm terms (the hinge, r from the previous step).
PAPER_CONFIGS = ("custom", "gta5", "synthia")

# Step 0's full-resolution source labels, (2, 5, 6) onto a 2 x 2 map: rows [0,3) and [2,5)
# overlap. Image 0: cell (1,0) has 5 of class 2 against 3 of class 0 (void for T=0.5, kept for
# T=0.75). Image 1: an all-void cell; void pixels that do not vote; cell (1,1) at n2 = T*n1 for
# T=0.5 (void, the comparison is strict).
STEP0_LABELS = [
    [[0, 0, 0, 1, 1, 1],
     [0, 0, 1, 1, 1, V],
     [0, 0, V, 1, V, V],
     [0, 2, 2, 1, 1, 1],
     [2, 2, 2, 0, 1, 1]],
    [[V, V, V, 0, 0, 0],
     [V, V, V, 0, 1, 0],
     [V, V, V, 0, 0, 1],
     [1, 1, 1, 1, 1, V],
     [1, 1, 0, 1, V, V]],
]


def upsample(design, size):
    """Nearest-neighbour map of a (B, h, w) design onto (B, H, W) (windows need not divide)."""
    design = torch.tensor(design)
    B, h, w = design.shape
    rows = torch.arange(size[0]) * h // size[0]
    cols = torch.arange(size[1]) * w // size[1]
    return design[:, rows][:, :, cols]


def probs_from(design, size, g):
    """Softmax of logits that favour the designed class strongly (flat for void cells, which then
    fall below the confidence threshold), with per-pixel noise."""
    cls = upsample(design, size)
    logits = 0.3 * torch.randn(cls.shape[0], C, *size, generator=g, dtype=torch.float64)
    for c in range(C):
        logits[:, c] += 4.0 * (cls == c)
    return torch.softmax(logits, dim=1)


def make_steps(void):
    """Four (source, labels, target, probs) steps; float64 leaves."""
    g = torch.Generator().manual_seed(2021)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731

    def target(*shape):  # per-vector scales, so the hinge max(0, r - |f|) is active for some only
        return randn(*shape) * (0.3 + 1.2 * torch.rand(shape[0], 1, *shape[2:], generator=g, dtype=torch.float64))

    source0 = randn(2, K, 2, 2)
    source0[1, :, 0, 1] *= 2.5  # pulls f-bar_s up, so the first step's |r - |f|| depends on r

    labels2 = upsample([[[4, 4, V], [4, V, 4], [4, 4, 4]]], (7, 8))
    labels2[0, 0, 1], labels2[0, 3, 3], labels2[0, 6, 0], labels2[0, 5, 7] = 0, V, 0, V  # noise
    source3 = randn(2, K, 2, 3)
    labels3 = torch.tensor([[[0, 1, 2], [3, 4, V]], [[3, 0, 1], [2, 4, 3]]])
    source3 = torch.where((labels3 == 3).unsqueeze(1), torch.zeros(()), source3)  # class 3: zero prototype
    steps = [
        # Full-resolution labels and probabilities (non-dividing windows).
        (source0, torch.tensor(STEP0_LABELS), target(1, K, 2, 3),
         probs_from([[[0, 0, 2], [V, 2, 0]]], (5, 7), g)),
        # Already at feature resolution: classes 2, 3 present but not yet seen; 1 seen but absent.
        (randn(1, K, 2, 3), torch.tensor([[[0, 2, V], [3, 2, 0]]]), target(2, K, 2, 2),
         probs_from([[[1, 4], [V, 0]], [[4, 1], [1, V]]], (2, 2), g)),
        # Source: only class 4 (never seen; void and class-0 pixels outvoted), so perpendicularity has n < 2.
        (randn(1, K, 3, 3), labels2, target(1, K, 2, 3), probs_from([[[2, 3, V], [3, 2, 2]]], (4, 6), g)),
        # Every class, one of them with all-zero vectors.
        (source3, labels3, target(1, K, 3, 2), probs_from([[[0, 1], [3, V], [4, 2]]], (3, 2), g)),
    ]
    out = []
    for s, labels, t, probs in steps:
        labels = torch.where(labels == V, torch.full_like(labels, void), labels)
        out.append(tuple(x.requires_grad_() if x.is_floating_point() else x for x in (s, labels, t, probs)))
    return out


def leaf_copy(x, dtype, device):
    if not x.is_floating_point():
        return x.to(device)
    return x.detach().to(dtype=dtype, device=device).requires_grad_()


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

# float64 end to end (the regulariser's buffers too, via .double()); float32 as trained, against
# the float64 oracle fed the same float32 values.
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-6)}


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_batches_reach_the_conditions_the_planted_bugs_change(config):
    """Guards the design of make_steps (oracle only): without these conditions a regulariser that
    ignores `seen`, counts absent classes or mishandles r would still match the oracle."""
    cfg = CONFIGS[config][1]
    oracle, steps = Oracle(cfg), make_steps(cfg.void)
    for batch in steps:
        oracle.step(*batch)
    trace = oracle.trace
    assert not trace[0].seen  # first step: nothing estimated yet
    # A class present but not seen, beside one present and seen, on both sides.
    assert any((st.source - st.seen) and (st.source & st.seen) for st in trace)
    assert any((st.target - st.seen) and (st.target & st.seen) for st in trace)
    # Perpendicularity over 2 <= n < C present classes: counting absent ones changes n(n-1).
    assert any(2 <= len(st.source) < C for st in trace)
    # The first step's |r - |f|| depends on r (not half the norms on each side); the target hinge
    # is active for some vectors but not all, on every step.
    assert 2 * trace[0].source_below != trace[0].vectors[0]
    assert all(0 < st.target_below < st.vectors[1] for st in trace)
    # No pseudo-label cell sits within float32 rounding (~1e-7) of the confidence threshold: the
    # kernels take the window means in float32.
    for _, _, t, probs in steps:
        margin = (window_confidence(probs, tuple(t.shape[2:])) - cfg.conf).abs().min()
        assert margin > 1e-5


def run_case(config, device, backend, dtype):
    make, cfg = CONFIGS[config]
    reg = make(backend).to(device=device, dtype=dtype)
    oracle = Oracle(cfg)
    steps = make_steps(cfg.void)
    tol = TOL[dtype]
    for index, batch in enumerate(steps):
        inputs = [leaf_copy(x, dtype, device) for x in batch]
        # The oracle sees exactly the values the regulariser sees, in float64.
        mine = [x.detach().double().cpu().requires_grad_() if x.is_floating_point() else x.cpu() for x in inputs]
        want = oracle.step(*mine)
        got = reg(*inputs)
        where = f"{config}, step {index}"
        assert torch.equal(got["source_labels"].cpu(), want["source_labels"]), where
        assert torch.equal(got["pseudo_labels"].cpu(), want["pseudo_labels"]), where
        for key in TERM_KEYS + ("source_mean_norm", "target_mean_norm"):
            torch.testing.assert_close(got[key].detach().cpu().double(), want[key].detach(), **tol,
                                       msg=lambda m, key=key: f"{where}, {key}: {m}")
        if index == 0:  # zero-initialised EMA: no class is valid yet
            assert got["clustering_source"].item() == 0.0 and got["clustering_target"].item() == 0.0, where

        want["total"].backward()
        got["total"].backward()
        for name, a, b in zip(("source_features", "target_features", "target_probs"),
                              (inputs[0], inputs[2], inputs[3]), (mine[0], mine[2], mine[3])):
            torch.testing.assert_close(a.grad.cpu().double(), b.grad, **tol,
                                       msg=lambda m, name=name: f"{where}, d total / d {name}: {m}")

        # Buffers after the step.
        torch.testing.assert_close(reg.prototypes.cpu().double(), torch.stack(oracle.prototypes), **tol,
                                   msg=lambda m: f"{where}, prototypes: {m}")
        assert reg.seen.cpu().tolist() == oracle.seen, where
        torch.testing.assert_close(reg.mean_source_norm.cpu().double(), oracle.mean_source_norm, **tol)
        assert reg.steps.item() == index + 1


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("device,backend", all_params())
def test_matches_oracle_float64(config, device, backend):
    run_case(config, device, backend, torch.float64)


@pytest.mark.parametrize("device,backend", all_params())
def test_matches_oracle_float32(device, backend):
    run_case("gta5", device, backend, torch.float32)


def test_oracle_step_by_hand():
    """Two steps of the oracle on one batch worked out by hand: vectors a = (1,0,0,0) (class 0),
    b = (1,1,0,0) (class 1), c = (3,4,0,0) (void); target the same vectors, every pixel predicting
    class 0 with probability 0.9 (0.025 for the others)."""
    cfg = SimpleNamespace(lc=1.0, lp=1.0, ln=1.0, le=1.0, alpha=0.2, eta=0.8, delta=0.0, T=0.5, conf=0.5,
                          void=255, init="zero", dist="squared_l2", released=False)
    f = torch.tensor([[1.0, 1.0, 3.0], [0.0, 1.0, 4.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    f = f.view(1, K, 1, 3)
    labels = torch.tensor([[[0, 1, 255]]])
    probs = torch.full((1, C, 1, 3), 0.025, dtype=torch.float64)
    probs[:, 0] = 0.9
    oracle = Oracle(cfg)
    r = (1 + 2 ** 0.5 + 5) / 3  # f-bar_s of the batch itself on the first step, delta = 0
    for step in range(2):
        out = oracle.step(f, labels, f, probs)
        assert out["pseudo_labels"].tolist() == [[[0, 0, 0]]]
        assert out["perpendicularity"].item() == pytest.approx(2 ** -0.5, rel=1e-12)  # 2 cos(a, b) / (2 * 1)
        assert out["norm_source"].item() == pytest.approx((r + 4 - 2 ** 0.5) / 3, rel=1e-12)
        assert out["norm_target"].item() == pytest.approx((2 * r - 1 - 2 ** 0.5) / 3, rel=1e-12)
        # sum p^2 = 0.81 + 4 * 0.025^2 = 0.8125 per pixel; N_0 = N = 3, so w = 1/3.
        assert out["entropy"].item() == pytest.approx(-0.8125 / 5, rel=1e-12)
        if step == 0:
            assert out["clustering_source"].item() == 0 and out["clustering_target"].item() == 0
    # Step 2: p^_0 = 0.2 a, p^_1 = 0.2 b. Source: (|0.8 a|^2 + |0.8 b|^2) / 2 = (0.64 + 1.28) / 2.
    assert out["clustering_source"].item() == pytest.approx(0.96, rel=1e-12)
    # Target: every vector is class 0: (|0.8 a|^2 + |b - 0.2 a|^2 + |c - 0.2 a|^2) / 3.
    assert out["clustering_target"].item() == pytest.approx((0.64 + 1.64 + 23.84) / 3, rel=1e-12)
    want = torch.zeros(C, K, dtype=torch.float64)
    want[0, 0], want[1, 0], want[1, 1] = 0.36, 0.36, 0.36  # 0.8 * 0.2 f + 0.2 f
    torch.testing.assert_close(torch.stack(oracle.prototypes), want, rtol=1e-12, atol=1e-15)
    assert oracle.seen == [True, True, False, False, False]


def test_oracle_hand_checks():
    """The oracle's own building blocks on values worked out by hand."""
    assert windows(5, 2) == [(0, 3), (2, 5)] and windows(6, 2) == [(0, 3), (3, 6)] and windows(7, 3) == [(0, 3), (2, 5), (4, 7)]
    half = SimpleNamespace(T=0.5, void=255)
    assert hist_down(torch.tensor(STEP0_LABELS).where(torch.tensor(STEP0_LABELS) != V, 255), (2, 2), half).tolist() == [
        [[0, 1], [255, 1]], [[255, 0], [1, 255]]]
    three_quarters = SimpleNamespace(T=0.75, void=255)
    assert hist_down(torch.tensor(STEP0_LABELS).where(torch.tensor(STEP0_LABELS) != V, 255), (2, 2), three_quarters).tolist() == [
        [[0, 1], [2, 1]], [[255, 0], [1, 1]]]
    # MaxSquare, one 2x2 image (N = 4), C = 5: three pixels predict class 0 with sum p^2 = 1,
    # one predicts class 1 with p = (0.25, 0.75, 0, 0, 0), sum p^2 = 0.625.
    probs = torch.zeros(1, C, 2, 2, dtype=torch.float64)
    probs[0, 0] = torch.tensor([[1.0, 1.0], [1.0, 0.25]])
    probs[0, 1, 1, 1] = 0.75
    assert maxsquare(probs, 0.0).item() == pytest.approx(-(3 + 0.625) / 4 / 5, rel=1e-12)  # w = 1/N
    # alpha = 0.5: w_0 = 1/(sqrt(3) * 2), w_1 = 1/(1 * 2); alpha = 1: w_0 = 1/3, w_1 = 1.
    assert maxsquare(probs, 0.5).item() == pytest.approx(-(3 / (2 * 3 ** 0.5) + 0.625 / 2) / 5, rel=1e-12)
    assert maxsquare(probs, 1.0).item() == pytest.approx(-(1 + 0.625) / 5, rel=1e-12)
    assert cosine(torch.zeros(3), torch.ones(3)).item() == 0.0
