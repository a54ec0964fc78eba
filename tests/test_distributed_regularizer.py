"""LSRRegularizer under torch.distributed: two gloo processes on the CPU against one process
fed the concatenated batches.

Each rank wraps a tiny network (1x1 conv features, 1x1 conv classifier) in
DistributedDataParallel, feeds it its own share of each step's source and target images
(unequal shares on purpose), runs the regulariser, backpropagates ``total`` and takes an SGD
step. One process runs the same steps on the concatenation of all ranks' images. What must
hold, and is checked for every backend:
- prototypes, ``seen``, ``mean_source_norm``, ``steps`` and every term are bitwise equal across
  ranks and equal (float32 summation order aside) to the single process's;
- rank r's gradient w.r.t. its own features is R times the single process's gradient w.r.t.
  the same feature vectors (R = 2), because the all-reduce's backward sums the ranks' equal
  upstream gradients;
- so DDP's mean over ranks of the parameter gradients equals the single process's parameter
  gradients, and the weights stay equal step after step.

Run as a script (``--worker``) this file is one rank; the test starts both ranks as
subprocesses with a timeout, so a hang fails the test instead of blocking it.
"""

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import lsr_fast
from lsr_fast import LSRRegularizer, PrototypeBank, reference

WORLD = 2
SOURCE_SPLIT = (2, 1)  # source images of rank 0, rank 1: ranks may hold different batch sizes
TARGET_SPLIT = (1, 2)
C, K, IN_CHANNELS = 3, 5, 3
STEPS = 3
TIMEOUT_S = 60  # a normal run takes 10-20 s, mostly importing torch; a hang fails after this
V = 255
TERM_KEYS = (
    "total", "clustering_source", "clustering_target", "perpendicularity", "norm_source",
    "norm_target", "entropy", "source_mean_norm", "target_mean_norm",
)
STATE_KEYS = ("prototypes", "seen", "mean_source_norm", "steps")
# float32 throughout; the only differences are summation orders.
TOL = dict(rtol=1e-5, atol=1e-6)

# backend -> how the regulariser is set to run distributed: "auto" on the world group, and
# "on" with a process group of its own (kept apart from DDP's gradient buckets).
SETTINGS = {"reference": ("auto", False), "cpp": ("on", True)}
BACKENDS = [b for b in SETTINGS if lsr_fast.available_backends()[b] == "available"]
# Every backend is a case; one not usable here is skipped with the reason, not left out.
BACKEND_PARAMS = [
    pytest.param(b, marks=[] if b in BACKENDS else [pytest.mark.skip(reason=f"{b} backend: {lsr_fast.available_backends()[b]}")])
    for b in SETTINGS
]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():  # the same weights in every process; global RNG untouched
            torch.manual_seed(0)
            self.features = nn.Conv2d(IN_CHANNELS, K, 1)
            self.classifier = nn.Conv2d(K, C, 1)

    def forward(self, x):
        features = self.features(x)
        return features, self.classifier(features)


def global_batch(step):
    """All ranks' images of one step: source and target inputs (4x6), source labels (8x12)."""
    g = torch.Generator().manual_seed(1000 + step)
    source = torch.randn(sum(SOURCE_SPLIT), IN_CHANNELS, 4, 6, generator=g)
    target = torch.randn(sum(TARGET_SPLIT), IN_CHANNELS, 4, 6, generator=g)
    labels = torch.randint(0, C, (sum(SOURCE_SPLIT), 4, 6), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.2] = V
    labels = labels.repeat_interleave(2, 1).repeat_interleave(2, 2)  # downsampled inside
    return source, labels, target


def share(tensor, split, rank):
    start = sum(split[:rank])
    return tensor[start:start + split[rank]]


def make_regularizer(backend, distributed, group=None):
    return LSRRegularizer(
        C, K, lambda_cluster=0.3, lambda_perp=0.2, lambda_norm=0.1, lambda_entropy=0.5, alpha=0.2,
        norm_delta=0.5, confidence=0.0, backend=backend, distributed=distributed, process_group=group,
    )


def run_steps(backend, rank=None, distributed="off", own_group=False):
    """STEPS training steps; rank None: one process on the concatenated batches."""
    net = Net()
    model = net
    group = None
    if rank is not None:
        model = nn.parallel.DistributedDataParallel(net)
        group = dist.new_group() if own_group else None
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    reg = make_regularizer(backend, distributed, group)
    records = []
    for step in range(STEPS):
        source, labels, target = global_batch(step)
        if rank is not None:
            source, labels, target = share(source, SOURCE_SPLIT, rank), share(labels, SOURCE_SPLIT, rank), share(target, TARGET_SPLIT, rank)
        n = source.shape[0]
        features, logits = model(torch.cat([source, target]))  # one DDP forward per backward
        features.retain_grad()
        probs = torch.softmax(F.interpolate(logits[n:], scale_factor=2, mode="nearest") * 4, 1)
        out = reg(features[:n], labels, features[n:], probs)
        optimizer.zero_grad()
        out["total"].backward()
        records.append({
            "terms": {key: out[key].detach().clone() for key in TERM_KEYS},
            "source_labels": out["source_labels"].clone(),
            "pseudo_labels": out["pseudo_labels"].clone(),
            "state": {key: getattr(reg, key).clone() for key in STATE_KEYS},
            "source_feature_grad": features.grad[:n].clone(),
            "target_feature_grad": features.grad[n:].clone(),
            "param_grads": {name: p.grad.clone() for name, p in net.named_parameters()},
            "params": {name: p.detach().clone() for name, p in net.named_parameters()},
        })
        optimizer.step()
    return reg, records


def eval_is_local(reg, rank):
    """Rank 0 alone calls an eval-mode forward of a trained distributed regulariser (as a
    validation loop may): it must not communicate, and gives the terms of its local batch."""
    if rank != 0:
        return None
    local = make_regularizer(reg.backend, "off")
    local.load_state_dict(reg.state_dict())
    source, labels, target = global_batch(STEPS)
    features = Net()(torch.cat([source, target]))[0].detach()
    probs = torch.softmax(torch.randn(target.shape[0], C, 4, 6), 1)
    n = source.shape[0]
    got = reg.eval()(features[:n], labels, features[n:], probs)
    want = local.eval()(features[:n], labels, features[n:], probs)
    return {key: (got[key], want[key]) for key in TERM_KEYS}


def bank_steps(rank=None):
    """PrototypeBank updates from each rank's share of STEPS batches (rank None: one process on
    the concatenation): integer counts with the zero init, and float weight sums (confidences)
    with init="first". Returns both banks' (prototypes, seen) after every step."""
    banks = (PrototypeBank(C, K), PrototypeBank(C, K, momentum=0.6, init="first"))
    records = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(2000 + step)
        features = torch.randn(sum(SOURCE_SPLIT), K, 3, 4, generator=g)
        labels = torch.randint(0, C, (sum(SOURCE_SPLIT), 3, 4), generator=g)
        labels[torch.rand(labels.shape, generator=g) < 0.3] = V
        weights = torch.rand(labels.shape, generator=g)
        if rank is not None:
            features, labels, weights = (share(t, SOURCE_SPLIT, rank) for t in (features, labels, weights))
        sums, counts = reference.class_feature_stats(features, labels, C)
        one_hot = torch.nn.functional.one_hot(torch.where(labels == V, C, labels), C + 1)[..., :C].float()
        w = one_hot * weights.unsqueeze(-1)  # (B, h, w, C)
        banks[0].update(sums, counts)
        banks[1].update(torch.einsum("bkhw,bhwc->ck", features, w), w.sum((0, 1, 2)))
        records.append([(b.prototypes.clone(), b.seen.clone()) for b in banks])
    return records


def deferred_check_on_one_rank(rank):
    """Rank 1 feeds a label outside [0, C) at call 1; check_every=3 reads at call 2 on both
    ranks. Returns the message each rank raised (both must raise, or the other would hang)."""
    reg = make_regularizer("reference", "auto")
    reg.check_every = 3
    for step in range(3):
        source, labels, target = global_batch(step)
        source, labels, target = share(source, SOURCE_SPLIT, rank), share(labels, SOURCE_SPLIT, rank), share(target, TARGET_SPLIT, rank)
        if rank == 1 and step == 1:
            labels = labels.clone()
            labels[0, 0, 0] = C + 4
        probs = torch.softmax(torch.randn(target.shape[0], C, 8, 8), 1)
        features = torch.randn(source.shape[0], K, 4, 4), torch.randn(target.shape[0], K, 4, 4)
        try:
            reg(features[0], labels[:, :8, :8], features[1], probs)
        except lsr_fast.ValueCheckError as error:
            return f"call {step}: {error}"
    return None


def worker(rank, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S))
    results = {}
    for backend in BACKENDS:
        reg, results[backend] = run_steps(backend, rank, *SETTINGS[backend])
    results["eval"] = eval_is_local(reg, rank)
    results["bank"] = bank_steps(rank)
    results["deferred"] = deferred_check_on_one_rank(rank)
    torch.save(results, out_file)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Per-rank results of both gloo processes."""
    tmp = tmp_path_factory.mktemp("gloo")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(rank), str(tmp / "store"), str(tmp / f"rank{rank}.pt")],
            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(WORLD)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.communicate()
        pytest.fail(f"the {WORLD} gloo ranks did not finish within {TIMEOUT_S} s (a hang in a collective?)")
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log}"
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    """One process on the concatenated batches, per backend."""
    return {backend: run_steps(backend)[1] for backend in BACKENDS}


def close(got, want, what):
    torch.testing.assert_close(got, want, **TOL, msg=lambda message: f"{what}: {message}")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_state_and_terms_equal_across_ranks_and_to_one_process(ranks, single, backend):
    for step in range(STEPS):
        rank0, rank1 = (ranks[r][backend][step] for r in range(WORLD))
        want = single[backend][step]
        for key in STATE_KEYS:
            assert torch.equal(rank0["state"][key], rank1["state"][key]), f"step {step}: {key} differs across ranks"
            close(rank0["state"][key], want["state"][key], f"step {step} {key}")
        for key in TERM_KEYS:
            assert torch.equal(rank0["terms"][key], rank1["terms"][key]), f"step {step}: {key} differs across ranks"
            close(rank0["terms"][key], want["terms"][key], f"step {step} {key}")
        # Labels are per rank: each rank's are its share of the single process's.
        for r in range(WORLD):
            got = ranks[r][backend][step]
            assert torch.equal(got["source_labels"], share(want["source_labels"], SOURCE_SPLIT, r))
            assert torch.equal(got["pseudo_labels"], share(want["pseudo_labels"], TARGET_SPLIT, r))
    # The case exercises every term: classes seen, target pseudo-labels, entropy.
    last = single[backend][-1]
    assert last["state"]["seen"].all() and last["state"]["steps"] == STEPS
    for key in ("clustering_source", "clustering_target", "perpendicularity", "norm_source", "norm_target", "entropy"):
        assert last["terms"][key].abs() > 1e-4, key


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_feature_gradients_are_world_size_times_the_full_batch_gradient(ranks, single, backend):
    for step in range(STEPS):
        want = single[backend][step]
        for r in range(WORLD):
            got = ranks[r][backend][step]
            for domain, split in (("source", SOURCE_SPLIT), ("target", TARGET_SPLIT)):
                key = f"{domain}_feature_grad"
                close(got[key], WORLD * share(want[key], split, r), f"step {step} rank {r} {key}")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_ddp_parameter_gradients_equal_the_full_batch_gradient(ranks, single, backend):
    for step in range(STEPS):
        want = single[backend][step]
        for r in range(WORLD):
            got = ranks[r][backend][step]
            for name, grad in want["param_grads"].items():
                assert grad.abs().sum() > 0, name
                # DDP has averaged the ranks' gradients: the full-batch gradient, on every rank.
                close(got["param_grads"][name], grad, f"step {step} rank {r} {name} gradient")
                close(got["params"][name], want["params"][name], f"step {step} rank {r} {name}")


def test_eval_mode_does_not_communicate(ranks):
    # Rank 0 ran an eval forward alone (no hang) and got its local terms.
    assert ranks[1]["eval"] is None
    for key, (got, want) in ranks[0]["eval"].items():
        assert torch.equal(got, want), key


def test_prototype_bank_equals_one_process_on_every_rank(ranks):
    want = bank_steps()
    for step in range(STEPS):
        for i, (prototypes, seen) in enumerate(want[step]):
            assert prototypes.abs().sum() > 0
            for r in range(WORLD):
                got_prototypes, got_seen = ranks[r]["bank"][step][i]
                assert torch.equal(got_seen, seen), f"step {step} bank {i} rank {r}: seen"
                close(got_prototypes, prototypes, f"step {step} bank {i} rank {r}: prototypes")
            assert torch.equal(ranks[0]["bank"][step][i][0], ranks[1]["bank"][step][i][0])


def test_a_deferred_check_failing_on_one_rank_raises_on_every_rank(ranks):
    assert ranks[1]["deferred"] == (f"call 2: source_labels contains the value {C + 4}, which is neither a class in "
                                    f"[0, {C}) nor ignore_index={V} (first failed at step 1)")
    assert ranks[0]["deferred"] == "call 2: a value check of LSRRegularizer failed on another rank (its error names it)"


def test_distributed_argument():
    with pytest.raises(ValueError, match="distributed must be 'auto', 'on' or 'off'"):
        LSRRegularizer(3, 4, distributed="yes")
    assert not dist.is_initialized()
    source = torch.randn(1, 4, 2, 3)
    labels = torch.zeros(1, 2, 3, dtype=torch.int64)
    probs = torch.softmax(torch.randn(1, 3, 2, 3), 1)
    with pytest.raises(RuntimeError, match="distributed='on' but torch.distributed is not initialised"):
        LSRRegularizer(3, 4, distributed="on")(source, labels, source, probs)
    # Without a process group, "auto" is the single-process regulariser (tests/test_regularizer.py).
    LSRRegularizer(3, 4, distributed="auto")(source, labels, source, probs)
    # In eval mode "on" needs no process group: eval never communicates.
    LSRRegularizer(3, 4, distributed="on").eval()(source, labels, source, probs)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(int(sys.argv[2]), sys.argv[3], sys.argv[4])
