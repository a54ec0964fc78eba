"""PrototypeBank: the EMA by hand, weighted (float) counts, state_dict round trips, bad input, and
LSRRegularizer built on it loading a checkpoint of the regulariser from before the bank existed.

The bank's distributed contract (every rank equal to one process on the concatenated batch) is
checked with two gloo processes in tests/test_distributed_regularizer.py, which starts them once
for the regulariser and the bank together."""

from pathlib import Path

import pytest
import torch

import lsr_fast
from lsr_fast import LSRRegularizer, PrototypeBank

V = 255
DATA = Path(__file__).parent / "data"


def test_ema_by_hand_zero_init():
    bank = PrototypeBank(3, 2, momentum=0.8)
    assert torch.equal(bank.prototypes, torch.zeros(3, 2)) and not bank.seen.any()
    sums = torch.tensor([[2.0, 4.0], [0.0, 0.0], [9.0, 3.0]])
    bank.update(sums, torch.tensor([2, 0, 3]))
    # Batch prototypes (1, 2) and (3, 1); class 1 absent keeps 0 and stays unseen.
    assert torch.allclose(bank.prototypes, torch.tensor([[0.2, 0.4], [0.0, 0.0], [0.6, 0.2]]))
    assert bank.seen.tolist() == [True, False, True]
    bank.update(torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.0, 0.0]]), torch.tensor([0, 1, 0]))
    assert torch.allclose(bank.prototypes, torch.tensor([[0.2, 0.4], [1.0, 1.0], [0.6, 0.2]]))
    assert bank.seen.all()


def test_ema_first_init_and_weight_sums_below_one():
    bank = PrototypeBank(2, 2, momentum=0.5, init="first")
    # Float weight sums (class_feature_stats with weights): 0.25 is a real divisor, not 1.
    bank.update(torch.tensor([[0.5, 0.25], [0.0, 0.0]]), torch.tensor([0.25, 0.0]))
    assert torch.allclose(bank.prototypes, torch.tensor([[2.0, 1.0], [0.0, 0.0]]))  # taken as is
    bank.update(torch.tensor([[0.0, 0.0], [3.0, 6.0]]), torch.tensor([0.0, 3.0]))
    bank.update(torch.tensor([[4.0, 0.0], [0.0, 0.0]]), torch.tensor([1.0, 0.0]))
    assert torch.allclose(bank.prototypes, torch.tensor([[3.0, 0.5], [1.0, 2.0]]))


def test_update_is_not_differentiable_and_keeps_buffers_in_place():
    bank = PrototypeBank(2, 3)
    prototypes, seen = bank.prototypes, bank.seen
    sums = torch.randn(2, 3, requires_grad=True)
    bank.update(sums * 2, torch.tensor([1, 1]))
    assert bank.prototypes is prototypes and bank.seen is seen  # optimisers/DDP may hold them
    assert not bank.prototypes.requires_grad


def test_state_dict_round_trip(tmp_path):
    bank = PrototypeBank(4, 3, momentum=0.7, init="first")
    bank.update(torch.randn(4, 3), torch.tensor([3, 0, 1, 2]))
    assert list(bank.state_dict()) == ["prototypes", "seen"]
    torch.save(bank.state_dict(), tmp_path / "bank.pt")
    fresh = PrototypeBank(4, 3, momentum=0.7, init="first")
    fresh.load_state_dict(torch.load(tmp_path / "bank.pt", weights_only=True))
    assert torch.equal(fresh.prototypes, bank.prototypes) and torch.equal(fresh.seen, bank.seen)
    # The restored bank continues exactly as the original.
    sums, counts = torch.randn(4, 3), torch.tensor([1, 2, 0, 5])
    bank.update(sums, counts)
    fresh.update(sums, counts)
    assert torch.equal(fresh.prototypes, bank.prototypes) and torch.equal(fresh.seen, bank.seen)


def test_weighted_class_feature_stats_feed_the_bank():
    # Confidence-weighted prototypes: the bank holds sum(w f) / sum(w) per class.
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(1, 3, 4, 4, generator=g), torch.randint(0, 2, (1, 4, 4), generator=g)
    weights = torch.rand(1, 4, 4, generator=g)
    sums, counts = lsr_fast.class_feature_stats(features, labels, 2, weights=weights, backend="reference")
    bank = PrototypeBank(2, 3, momentum=0.0)
    bank.update(sums, counts)
    for c in range(2):
        w = weights[0] * (labels[0] == c)
        want = (features[0] * w).sum((1, 2)) / w.sum()
        torch.testing.assert_close(bank.prototypes[c], want)


def test_bad_input():
    for kwargs, match in (
        (dict(num_classes=0, dim=3), "num_classes must be a positive int"),
        (dict(num_classes=2, dim=0), "dim must be a positive int"),
        (dict(num_classes=2, dim=3, momentum=1.5), r"momentum must be in \[0, 1\]"),
        (dict(num_classes=2, dim=3, momentum=float("nan")), r"momentum must be in \[0, 1\]"),
        (dict(num_classes=2, dim=3, init="mean"), "init must be 'zero'"),
        (dict(num_classes=2, dim=3, distributed="yes"), "distributed must be 'auto', 'on' or 'off'"),
    ):
        with pytest.raises(ValueError, match=match):
            PrototypeBank(**kwargs)
    bank = PrototypeBank(2, 3)
    sums, counts = torch.ones(2, 3), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"sums must have shape \(2, 3\), got \(2, 4\)"):
        bank.update(torch.ones(2, 4), counts)
    with pytest.raises(ValueError, match=r"counts must have shape \(2,\), got \(3,\)"):
        bank.update(sums, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="sums must be a floating-point"):
        bank.update(sums.long(), counts)
    with pytest.raises(TypeError, match="counts must be an integer or floating-point"):
        bank.update(sums, counts > 0)
    with pytest.raises(ValueError, match="counts must be finite and >= 0"):
        bank.update(sums, torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match="counts must be finite and >= 0"):
        bank.update(sums, torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="sums contains non-finite"):
        bank.update(torch.full((2, 3), float("inf")), counts)
    with pytest.raises(ValueError, match="sums is a meta tensor"):
        bank.update(sums.to("meta"), counts)
    assert not bank.seen.any()  # nothing above reached the buffers
    with pytest.raises(RuntimeError, match="distributed='on' but torch.distributed is not initialised"):
        PrototypeBank(2, 3, distributed="on").update(sums, counts)


def _old_batch(step):
    """The inputs tests/data/lsr_regularizer_v0_1_0.pt was made with (see test below)."""
    g = torch.Generator().manual_seed(step)
    source = torch.randn(2, 4, 3, 5, generator=g)
    target = torch.randn(1, 4, 3, 5, generator=g)
    labels = torch.randint(0, 3, (2, 6, 10), generator=g)
    labels[:, 0] = V
    probs = torch.softmax(3 * torch.randn(1, 3, 6, 10, generator=g), 1)
    return source, labels, target, probs


def test_regularizer_is_a_bank_and_loads_a_checkpoint_from_before_the_bank():
    # tests/data/lsr_regularizer_v0_1_0.pt was written by LSRRegularizer as it was before
    # PrototypeBank (commit d8dcbe5): LSRRegularizer(3, 4, prototype_init="first",
    # lambda_entropy=0.1, norm_delta=0.5, confidence=0.0, backend="reference") after two training
    # calls on _old_batch(0), _old_batch(1); then its terms and state after _old_batch(2).
    saved = torch.load(DATA / "lsr_regularizer_v0_1_0.pt", weights_only=True)
    reg = LSRRegularizer(3, 4, prototype_init="first", lambda_entropy=0.1, norm_delta=0.5, confidence=0.0,
                         backend="reference")
    assert isinstance(reg, PrototypeBank)
    assert list(reg.state_dict()) == list(saved["state_dict"]) == ["prototypes", "seen", "mean_source_norm", "steps"]
    reg.load_state_dict(saved["state_dict"])  # strict: same keys, shapes and dtypes
    assert reg.seen.all() and int(reg.steps) == 2
    out = reg(*_old_batch(2))
    for key, want in saved["next_terms"].items():
        torch.testing.assert_close(out[key].detach(), want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    for key, want in saved["next_state"].items():
        torch.testing.assert_close(getattr(reg, key), want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
