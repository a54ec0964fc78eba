"""Deferred value checks (lsr_fast/ops/_deferred.py): a training step with the default checks
reads nothing back to the host, and a failed check surfaces later with the message the check
gives at once, the step it failed at, and forward's argument names."""

import collections
import contextlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lsr_fast
from lsr_fast import DeferredChecks, LSRRegularizer, PrototypeBank, ValueCheckError
from conftest import all_params, sync_debug_error

aten = torch.ops.aten
# item(), bool(), int(), float() of a tensor reach the host through _local_scalar_dense; boolean
# indexing and nonzero need the count of True values on the host.
READ_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}


class _ReadOps(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READ_OPS:
            self.counter[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads(monkeypatch):
    """Counts every way a tensor's values reach Python inside the block: the read ops above, and
    tolist()/numpy(), which do not dispatch (patched here). On a GPU each is a synchronisation."""
    counter = collections.Counter()
    for name in ("tolist", "numpy"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            counter[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with _ReadOps(counter):
        yield counter
    monkeypatch.undo()


def batch(seed, C=4, K=6, bad_label=None):
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(2, K, 5, 7, generator=g)
    labels = torch.randint(0, C, (2, 20, 28), generator=g)
    labels[:, :4] = 255
    if bad_label is not None:
        labels[1, 10, 3] = bad_label
    target = torch.randn(2, K, 5, 7, generator=g)
    probs = torch.softmax(3 * torch.randn(2, C, 20, 28, generator=g), 1)
    return [source.requires_grad_(), labels, target.requires_grad_(), probs]


# ---- a training step reads nothing back ---------------------------------------------------------

@pytest.mark.parametrize("device,backend", all_params())
@pytest.mark.parametrize("form", ["paper", "released"])
def test_a_training_step_with_the_default_checks_reads_nothing_back(device, backend, form, monkeypatch):
    preset = "gta5" if form == "paper" else "gta5_released"
    reg = LSRRegularizer.from_preset(preset, feature_dim=6, num_classes=4, backend=backend).to(device)
    for step in range(3):  # the first step (f-bar_s from the batch) and later ones (from the buffer)
        inputs = [t.detach().to(device).requires_grad_(t.requires_grad) for t in batch(step)]
        with host_reads(monkeypatch) as reads, sync_debug_error(device):
            terms = reg(*inputs)
            terms["total"].backward()
        assert not reads, f"step {step}: {dict(reads)}"
    assert len(reg.checks._verdicts) >= 5  # labels, probabilities, both feature maps, the reference
    assert reg.checks.errors() == []


def test_the_read_counter_sees_the_reads_of_checks_made_at_once(monkeypatch):
    """The same regulariser in eval mode checks at once: the counter must see those reads (else
    the test above could not fail)."""
    reg = LSRRegularizer(4, 6).eval()
    with host_reads(monkeypatch) as reads:
        reg(*batch(0))
    assert reads["_local_scalar_dense"] >= 4


# ---- a deferred verdict says what the check says at once -----------------------------------------

def _cases():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 4, 5, generator=g)
    labels = torch.randint(0, 4, (2, 4, 5), generator=g)
    big_labels = torch.randint(0, 4, (2, 8, 10), generator=g)
    probs = torch.softmax(torch.randn(2, 4, 8, 10, generator=g), 1)
    prototypes = torch.randn(4, 3, generator=g)

    def put(t, index, value):
        t = t.clone()
        t[index] = value
        return t

    return {
        "label above C": lambda: lsr_fast.hist_downsample(put(big_labels, (1, 2, 3), 9), (4, 5), 4),
        "negative label": lambda: lsr_fast.class_feature_stats(features, put(labels, (0, 1, 1), -2), 4),
        "label beside void": lambda: lsr_fast.feature_terms(features, put(put(labels, (0, 0, 0), 255), (1, 3, 4), 4),
                                                            prototypes, 1.0),
        "label with no class at all": lambda: lsr_fast.feature_terms(features[:, :, :1, :2], torch.tensor([[[255, 0]]]).expand(2, 1, 2),
                                                                     prototypes[:0], 1.0, backend="reference"),
        "NaN probabilities": lambda: lsr_fast.pseudo_label_downsample(put(probs, (1, 2, 3, 4), math.nan), (4, 5)),
        "inf features": lambda: lsr_fast.clustering_loss(put(features, (1, 2, 0, 0), math.inf), labels, prototypes),
        "NaN prototypes": lambda: lsr_fast.perpendicularity_loss(put(prototypes, (2, 1), math.nan)),
        "NaN reference": lambda: lsr_fast.norm_alignment_loss(features, torch.tensor(math.nan)),
        "negative relative_to": lambda: lsr_fast.norm_alignment_loss(features, 1.0, relative_to=torch.tensor(-0.5)),
        # The reference: the raw CPU kernel checks its class weights itself (raw-op contract).
        "NaN class weight": lambda: lsr_fast.hist_downsample(big_labels, (4, 5), 4, backend="reference",
                                                             class_weights=torch.tensor([1.0, math.nan, 1.0, 1.0])),
        "negative vector weight": lambda: lsr_fast.class_feature_stats(features, labels, 4,
                                                                       weights=put(torch.rand(2, 4, 5), (0, 0, 1), -1.0)),
        "negative bank count": lambda: PrototypeBank(4, 3).update(torch.zeros(4, 3), torch.tensor([1.0, -1.0, 0.0, 2.0])),
        "NaN bank sums": lambda: PrototypeBank(4, 3).update(put(torch.zeros(4, 3), (0, 0), math.nan), torch.ones(4)),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_a_deferred_verdict_reads_as_the_check_made_at_once(case, monkeypatch):
    call = _cases()[case]
    with pytest.raises(ValueError) as at_once:
        call()
    checks = DeferredChecks()
    checks.step = 7
    with host_reads(monkeypatch) as reads, checks:
        call()  # runs on: no error, nothing read
    assert not reads, dict(reads)
    errors = checks.errors()
    assert [str(e) for e in errors] == [f"{at_once.value} (first failed at step 7)"]
    assert isinstance(errors[0], ValueError) and errors[0].step == 7
    with pytest.raises(ValueCheckError, match=r"\(first failed at step 7\)$"):
        checks.raise_if_failed()
    assert checks.errors() == []  # raising forgets them


def test_good_inputs_leave_every_verdict_clear():
    checks = DeferredChecks()
    g = torch.Generator().manual_seed(1)
    features, labels = torch.randn(2, 3, 4, 5, generator=g), torch.randint(0, 4, (2, 4, 5), generator=g)
    with checks:
        lsr_fast.feature_terms(features, labels, torch.randn(4, 3, generator=g), torch.tensor(2.0))
        lsr_fast.hist_downsample(torch.full((1, 4, 4), 255), (2, 2), 4)  # all void is fine
    assert len(checks._verdicts) >= 3 and checks.errors() == []
    assert checks.failed_count("cpu").item() == 0
    checks.raise_if_failed()


def test_the_first_failing_step_and_its_value_are_kept():
    checks = DeferredChecks()
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    for step, bad in ((0, None), (1, None), (2, 6), (3, None), (4, 9)):
        checks.step = step
        current = labels.clone()
        if bad is not None:
            current[0, 1, 1] = bad
        with checks:
            lsr_fast.hist_downsample(current, (2, 2), 5)
    assert checks.failed_count("cpu").item() == 1
    (error,) = checks.errors()
    assert error.step == 2 and error.check == "labels" and error.argument == "labels"
    assert str(error).startswith("labels contains the value 6, which is neither a class in [0, 5)")


def test_several_failed_checks_are_all_named_earliest_step_first():
    checks = DeferredChecks()
    features = torch.randn(1, 2, 3, 3)
    with checks:
        checks.step = 4
        lsr_fast.hist_downsample(torch.full((1, 3, 3), 7), (1, 1), 5)
        checks.step = 2
        lsr_fast.norm_alignment_loss(features * math.nan, 1.0)
    assert [(e.step, e.check) for e in checks.errors()] == [(2, "finite"), (4, "labels")]
    with pytest.raises(ValueCheckError, match=r"features contains non-finite .* \(and 1 more: labels contains the value 7"):
        checks.raise_if_failed()


def test_value_checks_off_record_nothing():
    checks = DeferredChecks()
    with lsr_fast.value_checks(False), checks:
        lsr_fast.hist_downsample(torch.full((1, 3, 3), 7), (1, 1), 5)
    assert not checks._verdicts


# ---- LSRRegularizer: when and how the verdicts are read -----------------------------------------

def test_the_regulariser_raises_at_its_next_check_naming_forward_argument_and_step():
    reg = LSRRegularizer(4, 6, check_every=4)
    for step in range(3):  # calls 0, 1, 2; call 2 carries a bad label
        reg(*batch(step, bad_label=11 if step == 2 else None))
    with pytest.raises(ValueCheckError) as caught:
        reg(*batch(3))  # call 3: the 4th training call reads
    assert str(caught.value) == ("source_labels contains the value 11, which is neither a class in [0, 4) nor "
                                 "ignore_index=255 (first failed at step 2)")
    assert caught.value.argument == "source_labels" and caught.value.step == 2
    reg(*batch(4))  # the failure was reported once; good calls go on
    reg.check_values()


def test_non_finite_target_features_are_named_as_forward_names_them():
    reg = LSRRegularizer(4, 6, check_every=1)
    inputs = batch(0)
    inputs[2] = inputs[2].detach().clone()
    inputs[2][0, 0, 0, 0] = math.inf
    with pytest.raises(ValueCheckError, match=r"^target_features contains non-finite values \(NaN or inf\) \(first failed at step 0\)"):
        reg(*inputs)


def test_check_every_zero_leaves_the_read_to_the_caller_and_state_dict_reads_first():
    reg = LSRRegularizer(4, 6, check_every=0)
    for step in range(5):
        reg(*batch(step, bad_label=-4 if step == 1 else None))
    with pytest.raises(ValueCheckError, match=r"^source_labels contains the value -4,.*\(first failed at step 1\)"):
        reg.state_dict()  # no checkpoint of state computed from a failed step
    assert set(reg.state_dict()) >= {"prototypes", "seen", "steps"}  # reported once, then clear


def test_eval_mode_and_value_checks_off_behave_as_before():
    reg = LSRRegularizer(4, 6)
    reg.eval()
    with pytest.raises(ValueError, match="^source_labels contains the value 11") as caught:
        reg(*batch(0, bad_label=11))
    assert not isinstance(caught.value, ValueCheckError)  # checked at once
    reg.train()
    with lsr_fast.value_checks(False):
        reg(*batch(0, bad_label=11))  # void in every backend, recorded nowhere
    reg.check_values()


def test_check_every_is_validated():
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="check_every must be an int >= 0"):
            LSRRegularizer(4, 6, check_every=bad)


def test_a_resumed_regulariser_labels_steps_from_its_saved_count():
    reg = LSRRegularizer(4, 6, check_every=0)
    for step in range(3):
        reg(*batch(step))
    resumed = LSRRegularizer(4, 6, check_every=0)
    resumed.load_state_dict(reg.state_dict())
    resumed(*batch(3, bad_label=5))
    with pytest.raises(ValueCheckError, match=r"\(first failed at step 3\)$"):
        resumed.check_values()


def test_deferred_checks_trace_into_one_compiled_graph():
    """torch.compile(fullgraph=True) of a step whose checks are deferred (checks made at once
    read a value, which would break the graph): the verdicts are recorded by the compiled code."""
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (1, 16, 20), generator=g)
    features, prototypes = torch.randn(1, 5, 4, 5, generator=g), torch.randn(3, 5, generator=g)

    def step(f, labels):
        small = lsr_fast.hist_downsample(labels, (4, 5), 3)
        sums, counts, sq, norm_loss, _ = lsr_fast.feature_terms(f, small, prototypes, 1.5)
        return lsr_fast.reference.clustering_from_sums(sq, counts) + norm_loss / 20

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    bad = labels.clone()
    bad[0, 3, 4] = 7
    checks = DeferredChecks()
    with checks:
        for step_index, current in enumerate((labels, bad, labels)):
            checks.step = step_index
            f = features.clone().requires_grad_()
            compiled(f, current).backward()
            assert f.grad is not None
    (error,) = checks.errors()
    assert str(error) == ("labels contains the value 7, which is neither a class in [0, 3) nor ignore_index=255 "
                          "(first failed at step 1)")


def test_a_regulariser_with_pending_verdicts_pickles_and_keeps_them(tmp_path):
    reg = LSRRegularizer(4, 6, check_every=0)
    reg(*batch(0, bad_label=8))
    torch.save(reg, tmp_path / "reg.pt")  # the whole module: no lambda among its hooks
    loaded = torch.load(tmp_path / "reg.pt", weights_only=False)
    with pytest.raises(ValueCheckError, match=r"^source_labels contains the value 8,.*\(first failed at step 0\)$"):
        loaded.check_values()
