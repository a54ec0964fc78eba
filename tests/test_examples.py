"""The three toolkit examples (examples/*.py): each method's loss and gradients against the same
method written here in plain torch (no lsr_fast op in the loss), in float64 on small synthetic
scenes, and each example's main() runs to the end.

The plain versions spell out the definitions: masked average pooling and class means as
explicit per-class sums, distances from differences, cosines from unit vectors (0 for a zero
vector, as lsr_fast defines it), the EMA by hand."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lsr_fast import reference

ROOT = Path(__file__).resolve().parent.parent
C, V = 19, 255
TOL = dict(rtol=1e-9, atol=1e-10)


def load(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data():
    """Four 32x64 scenes of each domain, in float64."""
    module = load("fewshot_segmentation")
    source, target = module.scenes("source", range(4), size=(32, 64)), module.scenes("target", range(4), size=(32, 64))
    return [(images.double(), labels) for images, labels in (source, target)]


def unit(x, dim):
    norm = x.norm(dim=dim, keepdim=True)
    return torch.where(norm >= 1e-8, x / norm.clamp(min=1e-8), torch.zeros_like(x))


def plain_cosine(features, prototypes):
    """(B, K, h, w) x (C, K) -> (B, C, h, w)."""
    return torch.einsum("bkhw,ck->bchw", unit(features, 1), unit(prototypes, 1))


def class_means(features, labels, weights=None):
    """Per class: sum of w * f and sum of w over the vectors labelled c (w = 1 without weights)."""
    sums, totals = [], []
    for c in range(C):
        w = (labels == c).double() * (1 if weights is None else weights)
        sums.append((features * w.unsqueeze(1)).sum((0, 2, 3)))
        totals.append(w.sum())
    return torch.stack(sums), torch.stack(totals)


def ema(prototypes, seen, sums, totals, momentum, first):
    present = totals > 0
    batch = sums / torch.where(present, totals, 1).unsqueeze(1)
    blended = momentum * prototypes + (1 - momentum) * batch
    if first:
        blended = torch.where(seen.unsqueeze(1), blended, batch)
    return torch.where(present.unsqueeze(1), blended, prototypes), seen | present


def grads(loss, module):
    return torch.autograd.grad(loss, list(module.parameters()))


def assert_same(got_loss, want_loss, got_grads, want_grads):
    assert want_loss.abs() > 1e-3 and all(g.abs().sum() > 0 for g in want_grads)  # a real case
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, **TOL)


def test_fewshot_episode_loss_matches_plain_torch(data):
    fs = load("fewshot_segmentation")
    torch.manual_seed(0)
    encoder = fs.make_encoder().double()
    (images, labels) = data[0]
    support, query = (images[:2], labels[:2]), (images[2:], labels[2:])

    def plain():
        s, q = encoder(support[0]), encoder(query[0])
        one_hot = F.one_hot(torch.where(support[1] == V, C, support[1]), C + 1).permute(0, 3, 1, 2).double()
        weight, label = F.adaptive_avg_pool2d(one_hot, s.shape[2:]).max(1)  # majority class, its coverage
        sums, totals = class_means(s, label, weight)
        shown = totals > 0
        prototypes = sums / torch.where(shown, totals, 1).unsqueeze(1)
        logits = F.interpolate(20 * plain_cosine(q, prototypes), size=query[1].shape[1:], mode="bilinear")
        logits = logits.masked_fill(~shown.view(1, -1, 1, 1), float("-inf"))
        target = query[1].clone()
        target[(target != V) & ~shown[target.clamp(max=C - 1)]] = V
        return F.cross_entropy(logits, target, ignore_index=V)

    got, _, target = fs.episode_loss(encoder, *support, *query)
    assert (target != V).any() and (target == V).any()  # some query pixels scored, some not
    assert_same(got, want := plain(), grads(got, encoder), grads(want, encoder))


def test_proda_steps_match_plain_torch(data):
    pd = load("proda_denoising")
    torch.manual_seed(0)
    net = pd.Net().double()
    with torch.no_grad():  # confident predictions, as after the warm-up: some pseudo-labels pass
        net.classifier.weight.mul_(40)
    bank = pd.lsr_fast.PrototypeBank(C, 16, momentum=0.9, init="first").double()
    kept = []
    prototypes, seen = torch.zeros(C, 16, dtype=torch.float64), torch.zeros(C, dtype=torch.bool)

    def plain(source, target):
        nonlocal prototypes, seen
        _, logits_s = net(source[0])
        loss = F.cross_entropy(F.interpolate(logits_s, size=source[1].shape[1:], mode="bilinear"), source[1], ignore_index=V)
        features, logits = net(target[0])
        f, probs = features.detach(), logits.detach().softmax(1)
        confidence, labels = probs.max(1)
        distances = (f.unsqueeze(1) - prototypes.view(1, C, -1, 1, 1)).pow(2).sum(2).sqrt()  # (B, C, h, w)
        weights = torch.softmax(torch.where(seen.view(1, -1, 1, 1), -distances / pd.TAU, -1e300), 1)
        rectified = weights * probs / (weights * probs).sum(1, keepdim=True)
        score, denoised = rectified.max(1)
        pseudo = torch.where(score > pd.THRESHOLD, denoised, V)
        kept.append(float((pseudo != V).double().mean()))
        if kept[-1] > 0:
            loss = loss + 0.5 * F.cross_entropy(logits, pseudo, ignore_index=V)
        prototypes, seen = ema(prototypes, seen, *class_means(f, labels, confidence), 0.9, first=True)
        return loss

    source, target = data
    for step in range(3):  # the first with an empty bank, then with the prototypes of earlier steps
        batch = slice(step, step + 2)
        s, t = (source[0][batch], source[1][batch]), (target[0][batch], target[1][batch])
        got = pd.train_loss(net, bank, s, t)
        assert_same(got, want := plain(s, t), grads(got, net), grads(want, net))
        assert torch.equal(bank.seen, seen)
        torch.testing.assert_close(bank.prototypes, prototypes, **TOL)
    assert seen.sum() >= 2 and max(kept) > 0 and min(kept) < 1, kept  # pseudo-labels kept and dropped


def test_contrastive_steps_match_plain_torch(data):
    pc = load("prototype_contrastive")
    torch.manual_seed(0)
    net = pc.Net().double()
    bank = pc.lsr_fast.PrototypeBank(C, 16, momentum=0.9, init="first").double()
    prototypes, seen = torch.zeros(C, 16, dtype=torch.float64), torch.zeros(C, dtype=torch.bool)

    def plain(images, labels):
        nonlocal prototypes, seen
        features, logits = net(images)
        # Labels at feature resolution from the oracle of hist_downsample (tests/test_hist_downsample.py).
        small = reference.hist_downsample(labels, tuple(features.shape[2:]), C)
        ce = F.cross_entropy(F.interpolate(logits, size=labels.shape[1:], mode="bilinear"), labels, ignore_index=V)
        cos = plain_cosine(features, prototypes) / pc.TEMPERATURE
        log_p = torch.log_softmax(cos.masked_fill(~seen.view(1, -1, 1, 1), float("-inf")), 1)
        keep = (small != V) & seen[small.clamp(max=C - 1)]
        picked = log_p.gather(1, small.clamp(max=C - 1).unsqueeze(1)).squeeze(1)
        contrastive = -(picked * keep).nansum() / keep.sum() if keep.any() else ce.new_zeros(())
        prototypes, seen = ema(prototypes, seen, *class_means(features.detach(), small), 0.9, first=True)
        return ce + pc.LAMBDA * contrastive, contrastive

    images, labels = data[0]
    for step in range(3):
        batch = slice(step, step + 2)
        got, _, got_contrastive = pc.train_loss(net, bank, images[batch], labels[batch])
        want, want_contrastive = plain(images[batch], labels[batch])
        if step > 0:  # nothing is seen at the first step: no contrastive term
            assert want_contrastive > 0
        torch.testing.assert_close(got_contrastive, want_contrastive, **TOL)
        assert_same(got, want, grads(got, net), grads(want, net))
        assert torch.equal(bank.seen, seen)
        torch.testing.assert_close(bank.prototypes, prototypes, **TOL)


@pytest.mark.parametrize("name,kwargs", [
    ("fewshot_segmentation", dict(steps=2)),
    ("proda_denoising", dict(warmup=1, steps=2)),
    ("prototype_contrastive", dict(steps=3)),
])
def test_example_runs(name, kwargs, capsys):
    load(name).main(**kwargs)
    out = capsys.readouterr().out
    assert "mIoU" in out or "steps in" in out
