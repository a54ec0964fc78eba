"""Training as a separate process: SIGKILL at any step then resume is exact, SIGTERM saves and
exits cleanly, and a two-process (gloo) torchrun job trains, checkpoints and resumes."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lsr_fast.train import load_checkpoint

from test_train import TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _train_cmd(out, *extra):
    return [sys.executable, "-m", "lsr_fast.cli", "train", *TINY, f"out_dir={out}", *extra]


def _wait_for_checkpoint(process, path, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint at {path} after {timeout} s")


def _assert_same_state(a_path, b_path):
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["regularizer"]:
        assert torch.equal(a["regularizer"][key], b["regularizer"][key]), key


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    steps = ["train.steps=8", "train.checkpoint_every=1"]
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(straight, *steps), check=True, env=_env(), cwd=REPO, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_train_cmd(killed, *steps), env=_env(), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        running = _wait_for_checkpoint(process, str(killed / "last.pt"))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert running, "the run finished before it could be killed"
    step_at_kill = load_checkpoint(str(killed / "last.pt"))["step"]
    assert 1 <= step_at_kill < 8
    resumed = subprocess.run(_train_cmd(killed, *steps, "--resume"), env=_env(), cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {killed / 'last.pt'} at step" in resumed.stdout
    _assert_same_state(str(straight / "last.pt"), str(killed / "last.pt"))


def test_sigterm_saves_a_resumable_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(_train_cmd(out, "train.steps=100000", "train.checkpoint_every=2"), env=_env(), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for_checkpoint(process, str(out / "last.pt"))
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "stopped by signal" in stdout
    checkpoint = load_checkpoint(str(out / "last.pt"))
    assert 0 < checkpoint["step"] < 100000
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["step"] == checkpoint["step"]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
def test_two_process_gloo_training_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "lsr_fast.train", *TINY, f"out_dir={out}"]
    first = subprocess.run([*torchrun, "train.steps=2", "optim.poly_steps=3"], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert load_checkpoint(str(out / "last.pt"))["step"] == 2
    second = subprocess.run([*torchrun, "train.steps=3", "--resume"], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    checkpoint = load_checkpoint(str(out / "last.pt"))
    assert checkpoint["step"] == 3 and checkpoint["regularizer"]["seen"].any()
    # Rank 0 alone logs: one line per step, not two.
    with open(out / "metrics.jsonl") as handle:
        steps = [line for line in handle if '"train.loss"' in line]
    assert len(steps) == 3


POISON_RANK_1 = """
import os, sys
import torch
from lsr_fast.train import trainer as trainer_module

real = trainer_module.TwoDomainNet.forward
calls = {"n": 0}


def forward(self, source, target=None):
    (logits, features), (target_logits, target_features) = real(self, source, target)
    calls["n"] += 1
    if calls["n"] == 2 and os.environ["RANK"] == "1":  # NaN target probabilities on rank 1 only
        target_logits = target_logits + torch.full_like(target_logits, float("nan"))
    return (logits, features), (target_logits, target_features)


trainer_module.TwoDomainNet.forward = forward
from lsr_fast.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
def test_two_process_gloo_a_nan_on_one_rank_skips_the_step_on_both(tmp_path):
    # lambda_entropy 0: rank 1's NaN probabilities reach only its own pseudo-labels, so rank 0's
    # loss stays finite and only the guard's all-rank decision makes it skip too (else rank 0
    # would wait in DDP's gradient all-reduce for a rank that never runs backward).
    script = tmp_path / "poison.py"
    script.write_text(POISON_RANK_1)
    out = tmp_path / "ddp"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), *TINY, f"out_dir={out}", "train.steps=3", "train.max_nonfinite=2",
                          "lsr.lambda_entropy=0"], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 1: non-finite loss (NaN or inf in the target probabilities), step skipped (1 in a row)" in run.stderr
    assert "step 1: non-finite loss (NaN or inf in the loss or inputs of another rank), step skipped" in run.stderr
    checkpoint = load_checkpoint(str(out / "last.pt"))
    assert checkpoint["step"] == 3 and int(checkpoint["regularizer"]["steps"]) == 2  # forward 2 left no trace
