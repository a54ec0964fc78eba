"""The trainer, its config, checkpoints and evaluation, on tiny synthetic scenes (CPU)."""

import copy
import glob
import json
import math
import os
import warnings

import pytest
import torch

from lsr_fast.cli import main as cli
from lsr_fast.eval.evaluate import markdown_table, report
from lsr_fast.train import ConfigError, build_config, load_checkpoint, train
from lsr_fast.train.checkpoint import CheckpointError, save_checkpoint
from lsr_fast.train.sampling import StepBatchSampler

TINY = [
    "model.backbone=resnet18", "model.width=4", "model.batchnorm=train", "threads=1",
    "data.source.size=[32, 64]", "data.target.size=[32, 64]", "data.val.size=[32, 64]",
    "data.source.num_images=6", "data.target.num_images=6", "data.val.num_images=2",
    "data.source.name=synthetic", "data.target.name=synthetic", "data.val.name=synthetic",
    "data.source.resize=null", "data.target.resize=null", "data.val.resize=null",
    "data.target.domain=target", "data.val.domain=target", "data.blur_prob=0.5",
    "optim.lr=0.01", "train.steps=4", "train.batch_source=2", "train.batch_target=2", "train.log_every=1",
    "train.val_every=0", "train.checkpoint_every=0", "train.progress=false", "train.tensorboard=false",
    "lsr.preset=gta5", "lsr.prototype_init=first", "device=cpu", "deterministic=true",
]


def tiny_config(tmp_path, *extra, name="run"):
    return build_config(None, [*TINY, f"out_dir={tmp_path / name}", *extra])


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


# ----------------------------------------------------------------------------- config

SYNTHETIC = {"data": {role: {"name": "synthetic"} for role in ("source", "target", "val")}}


def test_config_rejects_unknown_key_and_wrong_types():
    for override, message in (
        ("train.stepz=3", r"unknown config key 'train\.stepz'"),
        ("train.steps=abc", r"train\.steps must be an integer"),
        ("model.backbone=vgg16", r"model\.backbone must be one of"),
        ("data.crop=[1, 2, 3]", r"data\.crop must be \[height, width\]"),
        ("lsr.alpha=1.5", r"lsr\.alpha must be in \[0, 1\]"),
        ("train.steps", "key=value"),
    ):
        with pytest.raises(ConfigError, match=message):
            build_config(SYNTHETIC, [override])
    build_config(SYNTHETIC, ["train.steps=3"])  # and a good one passes


def test_config_preset_then_explicit_keys():
    config = build_config({**SYNTHETIC, "lsr": {"preset": "synthia", "lambda_norm": 0.5}})
    assert config["data"]["num_classes"] == 16
    assert config["lsr"]["lambda_cluster"] == 0.05 and config["lsr"]["alpha"] == 0.0
    assert config["lsr"]["lambda_norm"] == 0.5  # explicit key wins over the preset


def test_config_file_errors_name_the_path(tmp_path):
    from lsr_fast.train.config import load_config

    with pytest.raises(ConfigError, match="does-not-exist.yaml"):
        load_config(str(tmp_path / "does-not-exist.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  source: {name: gta5, rooot: x}\n")
    with pytest.raises(ConfigError, match=r"data\.source\.rooot.*bad\.yaml"):
        load_config(str(bad))


def test_missing_dataset_root_and_weights_stop_before_training(tmp_path):
    from lsr_fast.train.trainer import Trainer

    config = build_config(None, ["data.source.root=" + str(tmp_path / "no-gta5"), "data.target.root=" + str(tmp_path),
                                 "data.val.root=" + str(tmp_path)])
    with pytest.raises(ConfigError, match=r"data\.source\.root.*no-gta5"):
        Trainer(config)
    config = tiny_config(tmp_path, "model.pretrained=" + str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match=r"model\.pretrained.*missing\.pth"):
        Trainer(config)
    with pytest.raises(ConfigError, match="data.source.root must be set"):
        build_config(None, ["data.source.name=gta5", "data.source.root=null"])


def test_init_from_a_checkpoint_of_another_model_is_an_error(tmp_path):
    first = tiny_config(tmp_path, "train.steps=1", "mode=source_only", name="narrow")
    train(first)
    wider = tiny_config(tmp_path, "model.width=8", f"init={tmp_path / 'narrow' / 'last.pt'}", name="wide")
    with pytest.raises(ConfigError, match=r"init: the weights in .*narrow.*last\.pt do not fit"):
        train(wider)


def test_shipped_configs_load():
    from lsr_fast.train.config import load_config

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    gta5 = load_config(os.path.join(root, "gta5_to_cityscapes.yaml"))
    synthia = load_config(os.path.join(root, "synthia_to_cityscapes.yaml"))
    synthetic = load_config(os.path.join(root, "synthetic.yaml"))
    # The published weights (DESIGN.md).
    assert (gta5["lsr"]["lambda_entropy"], gta5["lsr"]["alpha"], gta5["lsr"]["lambda_norm"], gta5["lsr"]["lambda_perp"], gta5["lsr"]["lambda_cluster"]) == (0.1, 0.2, 0.025, 0.2, 0.1)
    assert (synthia["lsr"]["alpha"], synthia["lsr"]["lambda_norm"], synthia["lsr"]["lambda_cluster"], synthia["data"]["num_classes"]) == (0.0, 0.1, 0.05, 16)
    assert synthetic["data"]["source"]["name"] == "synthetic"


def test_help_documents_every_key(capsys):
    from lsr_fast.train.config import defaults

    with pytest.raises(SystemExit, match="^0$"):  # --help exits with status 0
        cli(["train", "--help"])
    text = capsys.readouterr().out

    def keys(node, prefix=""):
        for k, v in node.items():
            yield from keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    for key in keys(defaults()):
        assert f"  {key} = " in text, key


# ----------------------------------------------------------------------------- sampling

def test_step_sampler_covers_each_epoch_once_and_splits_ranks():
    per_rank = [StepBatchSampler(10, 2, seed=3, domain="source", rank=r, world_size=2) for r in range(2)]
    seen = []
    for step in range(5):  # 5 steps x 2 ranks x 2 images = 20 = two epochs of 10
        for sampler in per_rank:
            seen += [index for index, _ in sampler.keys_for_step(step)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    # A sampler started at step 3 yields what the first one yields at step 3.
    resumed = iter(StepBatchSampler(10, 2, seed=3, domain="source", start_step=3))
    assert next(resumed) == StepBatchSampler(10, 2, seed=3, domain="source").keys_for_step(3)


# ----------------------------------------------------------------------------- training

def test_exact_resume(tmp_path):
    """4 steps in one go == 2 steps, then --resume for 2 more (deterministic CPU mode)."""
    from lsr_fast.train.trainer import Trainer

    straight = tiny_config(tmp_path, name="straight")
    train(straight)

    class StopAfter(Trainer):  # as if SIGTERM arrived during step 2
        def _train_step(self):
            out = super()._train_step()
            if self.step == 1:
                self._stop_signal = 15
            return out

    first_full = tiny_config(tmp_path, name="interrupted")
    StopAfter(first_full).run()
    interrupted = load_checkpoint(os.path.join(first_full["out_dir"], "last.pt"))
    assert interrupted["step"] == 2
    summary = train(first_full, resume="auto")
    assert summary["status"] == "finished" and summary["step"] == 4

    a = load_checkpoint(os.path.join(straight["out_dir"], "last.pt"))
    b = load_checkpoint(os.path.join(first_full["out_dir"], "last.pt"))
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in ("prototypes", "seen", "mean_source_norm", "steps"):
        assert torch.equal(a["regularizer"][key], b["regularizer"][key]), key
    assert a["regularizer"]["seen"].any()
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b))
    # The logged losses of steps 3-4 agree too.
    straight_log = [r for r in read_metrics(straight["out_dir"]) if "train.loss" in r]
    resumed_log = [r for r in read_metrics(first_full["out_dir"]) if "train.loss" in r]
    assert [r["train.loss"] for r in straight_log] == [r["train.loss"] for r in resumed_log]


def test_resume_refuses_a_changed_config(tmp_path):
    config = tiny_config(tmp_path, "train.steps=1")
    train(config)
    changed = tiny_config(tmp_path, "train.steps=2", "lsr.lambda_norm=0.5")
    with pytest.raises(ConfigError, match=r"lsr\.lambda_norm"):
        train(changed, resume="auto")


def test_fast_and_reference_paths_give_the_same_losses(tmp_path):
    """Same weights, same batches: every loss term and every weight gradient of the cpp path
    equals the reference path's, on the first step (no clustering yet) and the second (p^ set)."""
    import lsr_fast
    from lsr_fast.train.trainer import Trainer

    if lsr_fast.available_backends()["cpp"] != "available":
        pytest.skip("the cpp backend is not built")
    trainers = {}
    for backend in ("reference", "cpp"):
        trainer = Trainer(tiny_config(tmp_path, f"backend={backend}", "deterministic=false", name=backend))
        trainer._setup()
        trainers[backend] = trainer
    for step in range(2):
        values, grads = {}, {}
        for backend, trainer in trainers.items():
            trainer.optimizer.step = lambda: None  # keep the weights: compare gradients of one state
            values[backend], stepped = trainer._train_step()
            assert stepped
            grads[backend] = [p.grad.clone() for p in trainer.model.parameters()]
        for key, value in values["reference"].items():
            assert float(values["cpp"][key]) == pytest.approx(float(value), rel=1e-4, abs=1e-5), (step, key)
        if step == 1:
            assert float(values["reference"]["clustering_source"]) > 0
        for ref, fast in zip(grads["reference"], grads["cpp"]):
            torch.testing.assert_close(fast, ref, rtol=1e-3, atol=1e-5)
        assert not torch.equal(grads["reference"][0], torch.zeros_like(grads["reference"][0]))


def test_cli_train_eval_and_resume(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli(["train", *TINY, "train.steps=2", "optim.poly_steps=3", f"out_dir={out}"]) == 0
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file() and (out / "config.yaml").is_file()
    records = read_metrics(out)
    assert [r["step"] for r in records if "train.loss" in r] == [1, 2]
    assert any("val.miou" in r for r in records)
    # Where training stops may change on resume; the poly horizon may not.
    capsys.readouterr()
    assert cli(["train", *TINY, "train.steps=3", "optim.poly_steps=4", f"out_dir={out}", "--resume"]) == 2
    assert "optim.poly_steps (3 -> 4)" in capsys.readouterr().err
    assert cli(["train", *TINY, "train.steps=3", f"out_dir={out}", "--resume"]) == 0  # horizon still 3
    assert load_checkpoint(str(out / "last.pt"))["step"] == 3
    assert cli(["eval", "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev.json").read_text())
    assert result["step"] == 3 and set(result["protocols"]) == {"full_resolution", "input_resolution"}
    for protocol in result["protocols"].values():
        assert 0 <= protocol["miou"] <= 100 and "masr" in protocol
    markdown = (tmp_path / "ev.md").read_text()
    assert "| **mIoU** |" in markdown and "labels at full resolution" in markdown and "network input size" in markdown
    # Errors name what is wrong and exit 2, no traceback.
    assert cli(["train", *TINY, "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err
    assert cli(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2


def test_bf16_autocast_channels_last_and_tensorboard(tmp_path, monkeypatch):
    """bf16 autocast + channels_last against fp32 with the same config, seed and batches."""
    from lsr_fast import LSRRegularizer
    from lsr_fast.train import trainer as trainer_module
    from lsr_fast.train.trainer import Trainer

    common = ("train.steps=2", "deterministic=false")
    initial = Trainer(tiny_config(tmp_path, *common, name="initial"))
    initial._setup()  # the seeded initial weights both runs start from
    start = {k: v.clone() for k, v in initial.model.state_dict().items() if v.is_floating_point()}
    fp32 = tiny_config(tmp_path, *common, name="fp32")
    train(fp32)

    real_net, real_lsr = trainer_module.TwoDomainNet.forward, LSRRegularizer.forward
    seen, totals = [], []

    def recording_net(self, source, target=None):
        out = real_net(self, source, target)
        seen.append((source.is_contiguous(memory_format=torch.channels_last), out[0][1].dtype))
        return out

    def recording_lsr(self, *args):
        terms = real_lsr(self, *args)
        totals.append((terms["total"].dtype, terms["total"].requires_grad))
        return terms

    monkeypatch.setattr(trainer_module.TwoDomainNet, "forward", recording_net)
    monkeypatch.setattr(LSRRegularizer, "forward", recording_lsr)
    bf16 = tiny_config(tmp_path, "train.amp=bf16", "model.channels_last=true", "train.tensorboard=true", *common, name="bf16")
    summary = train(bf16)
    assert summary["status"] == "finished"
    # The images went in channels_last, the network ran in bf16, and the weights are channels_last
    # (torch.save keeps strides): a dropped flag or a disabled autocast fails here.
    assert seen == [(True, torch.bfloat16)] * 2
    assert totals == [(torch.float32, True)] * 2  # the LSR loss accumulated in fp32, its gradient kept
    weights = load_checkpoint(os.path.join(bf16["out_dir"], "last.pt"))["model"]
    convs = [k for k, v in weights.items() if v.dim() == 4 and v.shape[2] > 1]
    assert convs and all(weights[k].is_contiguous(memory_format=torch.channels_last) for k in convs)

    # bf16 keeps 8 significant bits (3 decimal digits): one rounding is 2^-9 = 0.2% relative,
    # and the loss terms are means of values a few roundings deep (measured: <= 0.5% on these
    # two steps). 1% leaves 2x to 5x of headroom yet fails a term summed in bf16 (its sum
    # stalls once the ulp exceeds the addends), dropped, or computed on other inputs.
    reference, records = ([r for r in read_metrics(c["out_dir"]) if "train.loss" in r] for c in (fp32, bf16))
    assert [r["step"] for r in records] == [r["step"] for r in reference] == [1, 2]
    for ours, theirs in zip(records, reference):
        for key in ("train.loss", "train.ce", "train.clustering_source", "train.clustering_target",
                    "train.perpendicularity", "train.norm_source", "train.norm_target", "train.entropy"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-2, abs=1e-6), (ours["step"], key)
    assert records[1]["train.clustering_source"] > 0  # step 2 has prototypes: every term is live
    # The weight update of the two steps (gradients through bf16 activations: measured 1.0%
    # relative). 4% fails a lost CE gradient, a wrong lr or a skipped update; it cannot see a cut
    # LSR gradient (cutting the source side moves this update 2.8%: LSR is ~7% of these losses);
    # the requires_grad check above catches only the whole LSR loss cut off.
    final = load_checkpoint(os.path.join(fp32["out_dir"], "last.pt"))["model"]
    delta32 = torch.cat([(final[k].float() - start[k].float()).flatten() for k in start])
    delta16 = torch.cat([(weights[k].float() - start[k].float()).flatten() for k in start])
    assert delta32.norm() > 0 and not torch.equal(delta16, delta32)  # a real update, not fp32 again
    assert float((delta16 - delta32).norm() / delta32.norm()) < 4e-2
    assert any(k.startswith("latent/norm/") for k in records[-1])  # per-class mean norms logged
    events = [f for f in os.listdir(os.path.join(bf16["out_dir"], "tb")) if f.startswith("events.out.tfevents")]
    assert events, "no TensorBoard event file"


def test_eval_with_flip_and_a_supervised_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert cli(["train", *TINY, "train.steps=1", f"out_dir={out}"]) == 0
    checkpoint = str(out / "last.pt")
    # mASR against the checkpoint itself is 100 by definition (Eq. 9 with IoU_adapted = IoU_supervised).
    assert cli(["eval", "--checkpoint", checkpoint, "--flip", "--supervised-checkpoint", checkpoint,
                "--out", str(tmp_path / "self")]) == 0
    result = json.loads((tmp_path / "self.json").read_text())
    assert result["flip"] is True
    for protocol in ("full_resolution", "input_resolution"):  # each protocol against the same protocol
        assert result["protocols"][protocol]["masr"] == pytest.approx(100.0)
    table = tmp_path / "table.json"
    table.write_text(json.dumps([50.0] * 19))
    assert cli(["eval", "--checkpoint", checkpoint, "--supervised-table", str(table), "--out", str(tmp_path / "t")]) == 0
    for result in json.loads((tmp_path / "t.json").read_text())["protocols"].values():
        ious = [v for v in result["per_class_iou"].values() if v is not None]
        assert result["masr"] == pytest.approx(sum(v / 50.0 for v in ious) / len(ious) * 100)


def test_target_only_and_source_only_modes(tmp_path):
    for mode in ("target_only", "source_only"):
        config = tiny_config(tmp_path, f"mode={mode}", "train.steps=1", name=mode)
        train(config)
        ckpt = load_checkpoint(os.path.join(config["out_dir"], "last.pt"))
        assert ckpt["regularizer"] is None and ckpt["selection"]["metric"] == "mIoU"
        assert all("train.clustering_source" not in r or r["train.clustering_source"] == 0 for r in read_metrics(config["out_dir"]))


def test_nonfinite_losses_are_skipped_then_stop(tmp_path, monkeypatch):
    from lsr_fast.train import trainer as trainer_module

    config = tiny_config(tmp_path, "train.max_nonfinite=2", "train.steps=6", "mode=source_only")
    real_ce = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def flaky_ce(*args, **kwargs):
        calls["n"] += 1
        value = real_ce(*args, **kwargs)
        return value * float("nan") if calls["n"] in (2, 4, 5) else value  # steps 2, 4, 5 are non-finite

    monkeypatch.setattr(trainer_module.F, "cross_entropy", flaky_ce)
    with pytest.warns(UserWarning, match="non-finite loss"):
        with pytest.raises(trainer_module.NonFiniteLossError, match="2 non-finite losses in a row"):
            train(config)
    # Weights stayed finite, and the checkpoint-writer refuses NaN weights.
    bad = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(RuntimeError, match="non-finite"):
        save_checkpoint(str(tmp_path / "x.pt"), {"model": bad})
    assert not (tmp_path / "x.pt").exists()


def poison_forward(monkeypatch, site, bad_calls):
    """Make the network's output hold one NaN at ``site`` on the given forward calls (1-based):
    ``source_features``, ``target_features`` or ``target_logits`` (so NaN target probabilities)."""
    from lsr_fast.train import trainer as trainer_module

    real = trainer_module.TwoDomainNet.forward
    calls = {"n": 0}

    def with_nan(x):
        poison = torch.zeros_like(x)
        poison.view(-1)[0] = float("nan")
        return x + poison

    def forward(self, source, target=None):
        (logits, features), target_out = real(self, source, target)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            target_logits, target_features = target_out
            if site == "source_features":
                features = with_nan(features)
            elif site == "target_features":
                target_features = with_nan(target_features)
            else:
                target_logits = with_nan(target_logits)
            target_out = (target_logits, target_features)
        return (logits, features), target_out

    monkeypatch.setattr(trainer_module.TwoDomainNet, "forward", forward)


@pytest.mark.parametrize("site, what, extra", [
    ("source_features", "source features", []),
    ("target_features", "target features", []),
    # lambda_entropy 0: NaN probabilities reach the loss only through integer pseudo-labels, so
    # the guard must watch them itself.
    ("target_logits", "target probabilities", ["lsr.lambda_entropy=0"]),
])
def test_nan_in_the_lsr_forward_goes_through_the_nonfinite_policy(tmp_path, monkeypatch, site, what, extra):
    from lsr_fast.train import trainer as trainer_module

    config = tiny_config(tmp_path, "train.max_nonfinite=2", "train.steps=6", "train.checkpoint_every=1", *extra)
    poison_forward(monkeypatch, site, bad_calls=(2, 4, 5))
    # Forward 1 -> step 1 saved; 2 skipped (step 2 saved, weights of step 1); 3 good (step 3);
    # 4 skipped (step 4 saved); 5 skipped: 2 in a row, stop naming last.pt of step 4. A value
    # check raising inside the regulariser would end the run at forward 2 with a ValueError.
    with pytest.warns(UserWarning, match=f"non-finite loss .*{what}") as record:
        with pytest.raises(trainer_module.NonFiniteLossError,
                           match=r"2 non-finite losses in a row \(train\.max_nonfinite = 2\); last good checkpoint: "
                                 rf".*last\.pt \(step 4\)"):
            train(config)
    skipped = [str(w.message) for w in record if "non-finite loss" in str(w.message)]
    assert [m.split(":")[0] for m in skipped] == ["step 1", "step 3", "step 4"]
    assert all(what in m for m in skipped)
    last = load_checkpoint(os.path.join(config["out_dir"], "last.pt"))
    assert last["step"] == 4 and last["nonfinite"] == 1
    # The skipped forwards left no trace in the regulariser: it counts forwards 1 and 3 only, and
    # its prototypes and f-bar_s are finite (a NaN there would make every later step NaN).
    assert int(last["regularizer"]["steps"]) == 2
    for key in ("prototypes", "mean_source_norm"):
        assert torch.isfinite(last["regularizer"][key]).all(), key


def test_nan_in_the_lsr_forward_with_the_guard_off_is_a_clear_error(tmp_path, monkeypatch):
    from lsr_fast.train import trainer as trainer_module

    config = tiny_config(tmp_path, "train.max_nonfinite=0", "train.steps=3")
    poison_forward(monkeypatch, "source_features", bad_calls=(1,))
    with pytest.raises(trainer_module.NonFiniteLossError,
                       match=r"step 0: non-finite values \(NaN or inf\) in the source features .*"
                             r"train\.max_nonfinite is 0.*no checkpoint of this run has been written yet") as caught:
        train(config)
    assert isinstance(caught.value.__cause__, ValueError)  # the op's own message is kept as the cause


def test_with_the_guard_off_a_failed_check_is_read_before_the_next_checkpoint(tmp_path, monkeypatch):
    """The value checks read nothing inside a step: a NaN at step 2 is reported when the next
    checkpoint is due, naming step 2, and the last checkpoint written is the one before it."""
    from lsr_fast.train import trainer as trainer_module

    config = tiny_config(tmp_path, "train.max_nonfinite=0", "train.steps=6", "train.checkpoint_every=2",
                         "train.log_every=100", "train.val_every=0")
    poison_forward(monkeypatch, "target_features", bad_calls=(3,))
    with pytest.raises(trainer_module.NonFiniteLossError,
                       match=r"^step 2: non-finite values \(NaN or inf\) in the target features \(target_features "
                             r"contains non-finite values \(NaN or inf\) \(first failed at step 2\)\).*"
                             r"last good checkpoint: .*last\.pt \(step 2\)$"):
        train(config)
    last = load_checkpoint(os.path.join(config["out_dir"], "last.pt"))
    assert last["step"] == 2  # written after steps 0 and 1; the one due after step 3 was refused
    assert torch.isfinite(last["regularizer"]["prototypes"]).all()


def test_a_skipped_step_leaves_batchnorm_and_regulariser_state_as_it_was(tmp_path, monkeypatch):
    from lsr_fast.train.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path, "model.batchnorm=train", "train.max_nonfinite=3"))
    trainer._setup()
    trainer.model.train()
    assert trainer._train_step()[1]  # one good step: BN statistics and prototypes are set
    state = {**{f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items() if "running" in k or "tracked" in k},
             **{f"reg.{k}": v.clone() for k, v in trainer.regularizer.state_dict().items()}}
    assert any(k.endswith("running_mean") for k in state) and "reg.prototypes" in state
    # NaN images: every BN sees NaN (and would keep it in its running mean), so do the features.
    real = trainer.net.forward
    monkeypatch.setattr(trainer.net, "forward", lambda s, t=None: real(s * float("nan"), t * float("nan")))
    values, stepped = trainer._train_step()
    assert not stepped and not math.isfinite(float(values["loss"]))
    now = {**{f"model.{k}": v for k, v in trainer.model.state_dict().items()},
           **{f"reg.{k}": v for k, v in trainer.regularizer.state_dict().items()}}
    for key, value in state.items():
        assert torch.equal(now[key], value), key


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_nan_in_the_first_steps_source_features_is_skipped(tmp_path, monkeypatch, backend):
    """On the first step f-bar_s comes from the batch itself, so a NaN there is also the norm
    reference: it must reach the guard as a NaN loss (no kernel may raise on it) and leave no
    trace in the regulariser's state."""
    import lsr_fast
    from lsr_fast.train import trainer as trainer_module

    if lsr_fast.available_backends()[backend] != "available":
        pytest.skip(f"the {backend} backend is not built")
    config = tiny_config(tmp_path, "train.max_nonfinite=2", "train.steps=2", f"backend={backend}")
    poison_forward(monkeypatch, "source_features", bad_calls=(1,))
    with warnings.catch_warnings(record=True) as record:  # not pytest.warns: let a RuntimeError through
        warnings.simplefilter("always")
        summary = train(config)
    messages = [str(w.message) for w in record if "non-finite" in str(w.message)]
    assert messages == ["step 0: non-finite loss (NaN or inf in the loss, source features), step skipped (1 in a row)"]
    assert summary["status"] == "finished" and summary["step"] == 2
    last = load_checkpoint(os.path.join(config["out_dir"], "last.pt"))
    assert int(last["regularizer"]["steps"]) == 1 and torch.isfinite(last["regularizer"]["mean_source_norm"])


def test_truncated_checkpoint_is_an_error_naming_the_file(tmp_path):
    config = tiny_config(tmp_path, "train.steps=1", "mode=source_only")
    train(config)
    path = os.path.join(config["out_dir"], "last.pt")
    data = open(path, "rb").read()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_checkpoint(str(broken))
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(str(tmp_path / "nothing.pt"))
    # Checkpoint writes leave no temporary files behind.
    assert not [f for f in os.listdir(config["out_dir"]) if f.endswith(".tmp")]


# ----------------------------------------------------------------------------- evaluation

def test_report_against_hand_computed_ious():
    # 3 classes; rows = ground truth, columns = prediction.
    confusion = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    # IoU_0 = 5 / (5 + 2 + 1) = 0.625; IoU_1 = 3 / (3 + 1 + 2) = 0.5; class 2 absent -> NaN.
    result = report(confusion, supervised_iou=[0.5, 1.0, 0.8])
    assert result["per_class_iou"]["0"] == pytest.approx(62.5)
    assert result["per_class_iou"]["1"] == pytest.approx(50.0)
    assert result["per_class_iou"]["2"] is None
    assert result["miou"] == pytest.approx(56.25)
    # mASR = mean(0.625 / 0.5, 0.5 / 1.0) over the classes with an IoU.
    assert result["masr"] == pytest.approx(100 * (1.25 + 0.5) / 2)
    table = markdown_table({"a": result})
    assert "| **mIoU** | 56.2 |" in table and "| 2 |" not in table


def test_report_16_classes_gives_13_class_numbers():
    confusion = torch.diag(torch.arange(1, 17))
    confusion[0, 1] = 1  # road pixel predicted as sidewalk
    result = report(confusion)
    iou_road, iou_sidewalk = 1 / 2, 2 / 3
    assert result["per_class_iou"]["road"] == pytest.approx(100 * iou_road)
    expected16 = (iou_road + iou_sidewalk + 14) / 16 * 100
    assert result["miou"] == pytest.approx(expected16)
    expected13 = (iou_road + iou_sidewalk + 11) / 13 * 100
    assert result["miou13"] == pytest.approx(expected13)
    assert not math.isnan(result["masr13"])


# DESIGN.md's target-only IoUs (percent), typed in here rather than read from the code under test.
PAPER = {
    "road": 96.5, "sidewalk": 73.8, "building": 88.4, "wall": 42.2, "fence": 43.7, "pole": 40.7,
    "light": 46.1, "sign": 58.6, "vegetation": 88.5, "terrain": 54.9, "sky": 91.9, "person": 68.7,
    "rider": 46.2, "car": 90.7, "truck": 68.8, "bus": 69.9, "train": 48.8, "motorcycle": 47.6,
    "bicycle": 64.5,
}


def test_report_19_classes_against_the_paper_table_by_hand():
    names = list(PAPER)
    confusion = 10 * torch.eye(19, dtype=torch.int64)
    confusion[0, 1] = 10  # 10 road pixels predicted sidewalk: road 10/20, sidewalk 10/20
    confusion[2, 3] = 5   # 5 building pixels predicted wall: building 10/15, wall 10/15
    confusion[16, 16] = 0  # train absent from labels and prediction: no IoU, left out
    iou = {n: 1.0 for n in names if n != "train"}
    iou.update(road=0.5, sidewalk=0.5, building=2 / 3, wall=2 / 3)
    result = report(confusion)
    assert result["per_class_iou"]["train"] is None
    assert result["per_class_iou"]["building"] == pytest.approx(100 * 2 / 3)
    assert result["miou"] == pytest.approx(100 * (0.5 + 0.5 + 2 / 3 + 2 / 3 + 14) / 18)
    expected = 100 * sum(iou[n] / (PAPER[n] / 100) for n in iou) / 18
    assert result["masr"] == pytest.approx(expected, rel=1e-12)
    assert result["masr_classes"] == names and "masr13" not in result


def test_report_16_and_13_classes_against_the_paper_table_by_hand():
    names16 = [n for n in PAPER if n not in ("terrain", "truck", "train")]
    names13 = [n for n in names16 if n not in ("wall", "fence", "pole")]
    confusion = 10 * torch.eye(16, dtype=torch.int64)
    confusion[0, 1] = 10  # road 10/20, sidewalk 10/20
    confusion[3, 4] = 5   # wall 10/15, fence 10/15: both outside the 13 classes
    bus = names16.index("bus")
    confusion[bus, bus] = 0  # bus absent: left out of every mean
    iou = {n: 1.0 for n in names16 if n != "bus"}
    iou.update(road=0.5, sidewalk=0.5, wall=2 / 3, fence=2 / 3)
    result = report(confusion)
    assert result["miou"] == pytest.approx(100 * (0.5 + 0.5 + 2 / 3 + 2 / 3 + 11) / 15)
    assert result["masr"] == pytest.approx(100 * sum(iou[n] / (PAPER[n] / 100) for n in iou) / 15, rel=1e-12)
    in13 = [n for n in names13 if n != "bus"]
    assert len(in13) == 12
    assert result["miou13"] == pytest.approx(100 * (0.5 + 0.5 + 10) / 12)
    assert result["masr13"] == pytest.approx(100 * sum(iou[n] / (PAPER[n] / 100) for n in in13) / 12, rel=1e-12)


def test_report_refuses_a_percent_table():
    confusion = torch.tensor([[5, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"supervised_iou has a value 80 > 1: .*divided by 100"):
        report(confusion, supervised_iou=[50.0, 80.0])
    with pytest.raises(ValueError, match="supervised_iou has 3 classes, the evaluation 2"):
        report(confusion, supervised_iou=[0.5, 0.8, 0.9])
    with pytest.raises(ValueError, match=r"confusion has a negative count \(-2\)"):
        report(torch.tensor([[5, 1], [-2, 3]]))


def test_experiment_runs_three_trainings_and_one_table(tmp_path, capsys):
    """The main job, tiny: target_only, source_only, then LSR from the source-only weights; one
    table on held-out images with mASR relative to the target_only run."""
    from lsr_fast.train.experiment import run_experiment

    config = tiny_config(tmp_path, "train.steps=2", "experiment.adapt_steps=1", "experiment.test_images=2",
                         "experiment.adapt_lr=0.001", name="experiment")
    result = run_experiment(config, analyze=False)
    assert set(result["results"]) == {"target_only", "source_only", "lsr", "source_only_continued"}
    assert result["results"]["target_only"]["masr"] == pytest.approx(100.0)
    lsr_config = load_checkpoint(os.path.join(config["out_dir"], "lsr", "last.pt"))["config"]
    assert lsr_config["init"].endswith(os.path.join("source_only", "best.pt"))
    assert lsr_config["optim"]["lr"] == 0.001 and lsr_config["train"]["steps"] == 1
    control = load_checkpoint(os.path.join(config["out_dir"], "source_only_continued", "last.pt"))
    assert control["config"]["mode"] == "source_only" and control["config"]["init"] == lsr_config["init"]
    assert control["config"]["optim"]["lr"] == 0.001 and control["regularizer"] is None
    table = open(result["summary"]).read()
    assert "| | target_only | source_only | lsr | source_only_continued |" in table and "held-out synthetic target images (seed 3)" in table
    assert "## labels at full resolution" in table and "## labels at network input size (nearest)" in table
    assert set(result["protocols"]) == {"full_resolution", "input_resolution"}
    assert result["protocols"]["full_resolution"] == result["results"]
    # Run again: every stage is finished, so nothing trains and nothing is rewritten.
    stamps = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(config["out_dir"], "**", "*.*"), recursive=True)}
    capsys.readouterr()
    again = run_experiment(config, analyze=False)
    assert again["seconds"] == {} and again["results"] == json.loads(json.dumps(result["results"]))
    assert "finished in" in capsys.readouterr().out
    assert stamps == {p: os.stat(p).st_mtime_ns for p in stamps}
    # A finished stage asked for with another recipe is refused, not retrained over.
    changed = copy.deepcopy(config)
    changed["optim"]["lr"] = 0.02
    with pytest.raises(ConfigError, match=r"stage target_only .* another config .*optim.lr"):
        run_experiment(changed, analyze=False)
    longer = copy.deepcopy(config)
    longer["optim"]["poly_steps"] = 9  # the same steps, another schedule
    with pytest.raises(ConfigError, match=r"stage target_only .* another config .*optim.poly_steps: 2 -> 9"):
        run_experiment(longer, analyze=False)
