"""The UDA trainer: source-only, target-supervised and LSR adaptation of DeepLabV2.

One step (mode "lsr"): forward the source and the target batch through the network (one DDP
call), CE on the upsampled source logits, ``LSRRegularizer`` on the layer4 features (label
downsampling, pseudo-labels, the fused clustering/perpendicularity/norm pass and MaxSquare on the
compiled kernels), one backward, one SGD step. Loss values stay on the device and are read every
``train.log_every`` steps; the only per-step host read is the non-finite guard
(``train.max_nonfinite: 0`` turns it off). The regulariser's value checks keep their verdicts on
the device; the trainer reads them at its log steps and before every checkpoint (so no
checkpoint holds a state that a failed check touched), and a failure stops the run naming the
step it happened at.

The non-finite guard (``train.max_nonfinite`` > 0) runs the LSR forward with the ops' value
checks off (``lsr_fast.value_checks(False)``): a NaN or inf in a feature map or in the target
probabilities then raises in no op (which would end one rank while the others wait in a
collective) but reaches the guard. Its one host read per step, decided the same on every rank, asks
whether these are finite: the loss; the source and target mean feature norms (sums over every
vector, so any bad feature shows, where the target hinge max(0, r - ||f||) would hide an inf);
the target probabilities' min and max (with ``lambda_entropy`` 0 they reach the loss only
through integer pseudo-labels). A non-finite step is skipped: no backward, and the buffers
the forward changed (the regulariser's prototypes, seen mask, f-bar_s and step count; trainable
BatchNorm statistics) are put back, so a bad batch leaves no trace. Label values stay checked:
the cross-entropy rejects the same labels first. With the guard off the value checks stay as
``lsr_fast.set_value_checks`` left them (on by default), deferred as above, and a non-finite LSR
input stops the run with ``NonFiniteLossError`` naming the tensor and the step.

Resume is exact: the checkpoint holds the model, optimiser, scheduler, grad scaler, regulariser
buffers, RNG states, step, best/early-stop bookkeeping and config; the images and augmentations
of step s are a function of (seed, s) (see sampling.py).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import time
import warnings
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .. import __version__
from ..ops import ValueCheckError, value_checks
from ..eval.evaluate import autocast, evaluate, report
from . import distributed
from .build import build_eval_dataset, build_model, build_regularizer, build_train_dataset, check_datasets
from .._atomic import atomic_write_text
from .checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .config import ConfigError, build_config, check_paths, check_protocol, poly_steps, to_yaml
from .sampling import StepBatchSampler

# Keys that may differ between a run and its resumption (they do not change the numbers). A
# longer or shorter train.steps is fine; the poly horizon is compared as resolved (poly_steps()).
RESUME_FREE_KEYS = {
    "train.steps", "optim.poly_steps", "train.log_every", "train.progress", "train.tensorboard", "data.workers", "threads",
    "train.val_every", "train.checkpoint_every", "train.early_stop_patience", "device", "out_dir",
}
LOG_TERMS = ("loss", "ce", "clustering_source", "clustering_target", "perpendicularity", "norm_source",
             "norm_target", "entropy", "source_mean_norm", "target_mean_norm")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row (or, with the guard off, one): the message says which
    and names the last checkpoint written."""


def versions() -> Dict[str, str]:
    import lsr_fast

    info = {"lsr_fast": __version__, "torch": str(torch.__version__), "python": platform.python_version(),
            "backends": json.dumps(lsr_fast.available_backends())}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def config_changes(saved: Dict[str, Any], config: Dict[str, Any]) -> list:
    """(key, saved value, value now) for every key in which ``config`` would not continue the
    run ``saved`` describes: all but RESUME_FREE_KEYS, and the poly horizon as resolved."""
    was, now = _flatten(saved), _flatten(config)
    changed = [(k, was.get(k), v) for k, v in now.items() if k not in RESUME_FREE_KEYS and was.get(k) != v]
    if poly_steps(saved) != poly_steps(config):
        changed.append(("optim.poly_steps", poly_steps(saved), poly_steps(config)))
    return changed


def _flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class TwoDomainNet(torch.nn.Module):
    """Runs the network on the source and (optionally) the target batch inside one forward call,
    so DDP sees one forward per backward although the weights are used twice."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, source: torch.Tensor, target: Optional[torch.Tensor] = None):
        out_source = self.model(source)
        return out_source, (self.model(target) if target is not None else None)


def _upsample(logits: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=align_corners)


def _resolve_device(name: str, env: distributed.DistEnv) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: CUDA is not available here (torch {torch.__version__})")
        if name == "cuda":
            return torch.device("cuda", env.local_rank)
    return torch.device(name)


class Trainer:
    def __init__(self, config: Dict[str, Any], *, resume: Optional[str] = None):
        """``resume``: a checkpoint path, or "auto" for ``out_dir``/last.pt."""
        self.config = config
        self.resume_path = os.path.join(config["out_dir"], "last.pt") if resume == "auto" else resume
        if self.resume_path is not None and not os.path.isfile(self.resume_path):
            raise FileNotFoundError(f"cannot resume: checkpoint {self.resume_path} does not exist")
        check_paths(config)
        check_protocol(config)
        check_datasets(config)  # lists against folders, before a model is built or anything written
        if self.resume_path is None:
            existing = [n for n in ("last.pt", "best.pt") if os.path.exists(os.path.join(config["out_dir"], n))]
            if existing:
                raise ConfigError(f"out_dir {config['out_dir']} already holds a run ({', '.join(existing)}); "
                                  "continue it with --resume or choose another out_dir (nothing is overwritten)")
        self._stop_signal: Optional[int] = None

    # ----------------------------------------------------------------------------- setup
    def _setup(self) -> None:
        c = self.config
        if c["deterministic"]:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        if c["threads"]:
            torch.set_num_threads(c["threads"])
        device_kind = "cuda" if (c["device"].startswith("cuda") or (c["device"] == "auto" and torch.cuda.is_available())) else "cpu"
        self.env = distributed.setup(device_kind)
        self.device = _resolve_device(c["device"], self.env)
        torch.manual_seed(c["seed"])  # same initial weights on every rank

        checkpoint = load_checkpoint(self.resume_path) if self.resume_path else None
        if checkpoint is not None:
            changed = config_changes(build_config(checkpoint["config"], source=self.resume_path), c)
            if changed:
                raise ConfigError(f"cannot resume from {self.resume_path}: the config differs in "
                                  + ", ".join(f"{k} ({was!r} -> {now!r})" for k, was, now in changed))

        self.model = build_model(c)
        if c["model"]["pretrained"] and checkpoint is None:
            from ..models import load_pretrained

            try:
                load_report = load_pretrained(self.model, c["model"]["pretrained"], normalize=c["data"]["normalize"])
            except ValueError as error:  # a file that fits nothing, or Caffe weights fed ImageNet input
                raise ConfigError(f"model.pretrained: {error}") from None
            self._print(f"pretrained weights {c['model']['pretrained']}:\n{load_report}")
        if c["init"] and checkpoint is None:
            init = load_checkpoint(c["init"])
            try:
                self.model.load_state_dict(init["model"])
            except RuntimeError as error:
                raise ConfigError(f"init: the weights in {c['init']} do not fit this model "
                                  f"(model.* or data.num_classes differ?): {error}") from None
            self._print(f"initialised the model from {c['init']} (step {init['step']})")
        if c["model"]["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.to(self.device)
        self.regularizer = None
        if c["mode"] == "lsr":
            self.regularizer = build_regularizer(c, self.model.feature_dim).to(self.device)
            if self.env.enabled:  # its own group: its collectives never interleave with DDP's buckets
                self.regularizer.process_group = torch.distributed.new_group()
        net = TwoDomainNet(self.model)
        self.net = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None) if self.env.enabled else net

        from ..models import parameter_groups

        o = c["optim"]
        self.optimizer = torch.optim.SGD(parameter_groups(self.model, o["lr"], o["classifier_lr_mult"]), lr=o["lr"],
                                         momentum=o["momentum"], weight_decay=o["weight_decay"])
        steps, power = poly_steps(c), o["poly_power"]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: max(0.0, 1.0 - s / steps) ** power)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=c["train"]["amp"] == "fp16")

        self.step, self.best, self.since_best, self.nonfinite, self.history = 0, None, 0, 0, []
        self._last_checkpoint: Optional[tuple] = None  # (path, step) of the newest last.pt or the resume point
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            self.scaler.load_state_dict(checkpoint["scaler"])
            if self.regularizer is not None:
                self.regularizer.load_state_dict(checkpoint["regularizer"])
            restore_rng(checkpoint["rng"])
            self.step, self.best = int(checkpoint["step"]), checkpoint["best"]
            self.since_best, self.nonfinite = int(checkpoint["early_stop"]), int(checkpoint["nonfinite"])
            self.history = list(checkpoint["history"])
            self._last_checkpoint = (self.resume_path, self.step)
            self._print(f"resumed {self.resume_path} at step {self.step}")
        self._forward_buffers = self._buffers_updated_by_forward()
        self._saved_buffers = [b.detach().clone() for b in self._forward_buffers]

        train_role = "target" if c["mode"] == "target_only" else "source"
        self.loaders = {"labelled": self._loader(train_role, c["train"]["batch_source"])}
        if c["mode"] == "lsr":
            self.loaders["target"] = self._loader("target", c["train"]["batch_target"])
        self.val_dataset = build_eval_dataset(c)
        val = c["data"]["val"]
        self.selection = {"dataset": val["name"], "split": val["split"] if val["name"] == "cityscapes" else f"seed {val['seed']}",
                          "split_list": val["split_list"], "exclude_list": val["exclude_list"],
                          "images": len(self.val_dataset), "metric": "mIoU"}

    def _buffers_updated_by_forward(self) -> list:
        """The buffers one training forward changes: trainable BatchNorm's running statistics and
        the regulariser's state (after every .to(), which replaces buffer tensors)."""
        from torch.nn.modules.batchnorm import _BatchNorm

        from ..models.resnet import FrozenBatchNorm2d

        buffers = [b for m in self.model.modules()
                   if isinstance(m, _BatchNorm) and not isinstance(m, FrozenBatchNorm2d) and m.track_running_stats
                   for b in m.buffers(recurse=False)]
        if self.regularizer is not None:
            buffers += list(self.regularizer.buffers())
        return buffers

    def _loader(self, role: str, batch_size: int):
        dataset = build_train_dataset(self.config, role)
        sampler = StepBatchSampler(len(dataset), batch_size, seed=self.config["seed"], domain=role,
                                   start_step=self.step, rank=self.env.rank, world_size=self.env.world_size)
        workers = self.config["data"]["workers"]
        return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                                pin_memory=self.device.type == "cuda", persistent_workers=workers > 0))

    def _print(self, text: str) -> None:
        if self.env.is_main:
            print(text, flush=True)

    # ----------------------------------------------------------------------------- one step
    def _train_step(self):
        """One optimisation step; returns the loss values (on the device) and whether the
        weights were updated (False: a non-finite loss on some rank, step skipped)."""
        c, device = self.config, self.device
        labelled = next(self.loaders["labelled"])
        images = labelled["image"].to(device, non_blocking=True)
        labels = labelled["label"].to(device, non_blocking=True)
        target_images = None
        if self.regularizer is not None:
            target_images = next(self.loaders["target"])["image"].to(device, non_blocking=True)
        if c["model"]["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
            if target_images is not None:
                target_images = target_images.contiguous(memory_format=torch.channels_last)

        guard = c["train"]["max_nonfinite"] > 0
        if guard and self._forward_buffers:  # device copies, no sync; put back if the step is skipped
            torch._foreach_copy_(self._saved_buffers, self._forward_buffers)
            norm_initialised = self.regularizer._norm_initialised if self.regularizer is not None else None
        watched = {}  # device scalars whose finiteness the guard reads with the loss
        with autocast(device, c["train"]["amp"]):
            (logits, features), target_out = self.net(images, target_images)
            ce = F.cross_entropy(_upsample(logits, labels.shape[-2:], c["model"]["align_corners"]), labels, ignore_index=255)
            values = {"ce": ce.detach()}
            loss = ce
            if self.regularizer is not None:
                terms, watched = self._lsr_terms(features, labels, target_out, target_images.shape[-2:], guard)
                loss = ce + terms["total"]
                for name in LOG_TERMS[2:]:
                    values[name] = terms[name].detach()
        values["loss"] = loss.detach()

        self.optimizer.zero_grad(set_to_none=True)
        if guard:
            finite = torch.stack([torch.isfinite(loss.detach().float()),
                                  *[torch.isfinite(v.float()).all() for v in watched.values()]])
            # The guard's host read; every rank skips together or none does.
            if distributed.any_rank(not bool(finite.all()), self.env, self.device):
                if self._forward_buffers:
                    torch._foreach_copy_(self._forward_buffers, self._saved_buffers)
                    if self.regularizer is not None:
                        self.regularizer._norm_initialised = norm_initialised
                bad = [name for name, ok in zip(["loss", *watched], finite.tolist()) if not ok]
                self._nonfinite_what = ", ".join(bad) if bad else "loss or inputs of another rank"
                return values, False
        self._last_source = (features.detach(), labels)  # for the latent-space scalars at log steps
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return values, True

    def _lsr_terms(self, features, labels, target_out, target_size, guard: bool):
        """The regulariser's terms, and the device values the guard checks with the loss:
        ``(terms, watched)``."""
        target_logits, target_features = target_out
        target_probs = torch.softmax(_upsample(target_logits, target_size, self.config["model"]["align_corners"]), 1)
        if not guard:
            return self.regularizer(features, labels, target_features, target_probs), {}
        with value_checks(False):
            terms = self.regularizer(features, labels, target_features, target_probs)
        low, high = target_probs.detach().aminmax()  # NaN and +-inf reach min or max
        return terms, {"source features": terms["source_mean_norm"], "target features": terms["target_mean_norm"],
                       "target probabilities": torch.stack([low, high]).float()}

    def _check_values(self) -> None:
        """Read the regulariser's deferred value checks (all ranks together); a non-finite input
        becomes the trainer's NonFiniteLossError, any other failure is raised as it is."""
        if self.regularizer is None:
            return
        try:
            self.regularizer.check_values()
        except ValueCheckError as error:
            if error.check != "finite":
                raise
            what = {"source_features": "source features", "target_features": "target features",
                    "target_probs": "target probabilities"}.get(error.argument, error.argument)
            raise NonFiniteLossError(
                f"step {error.step}: non-finite values (NaN or inf) in the {what} ({error}); "
                f"train.max_nonfinite is 0, so the non-finite guard is off and this stops the run "
                f"(set it > 0 to skip such steps); {self._checkpoint_note()}") from error

    def _checkpoint_note(self) -> str:
        if self._last_checkpoint is None:
            return "no checkpoint of this run has been written yet"
        path, step = self._last_checkpoint
        return f"last good checkpoint: {path} (step {step})"

    # ----------------------------------------------------------------------------- bookkeeping
    def _payload(self) -> Dict[str, Any]:
        return {
            "step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "regularizer": None if self.regularizer is None else self.regularizer.state_dict(),
            "rng": capture_rng(), "config": self.config, "versions": versions(), "best": self.best,
            "selection": self.selection, "early_stop": self.since_best, "nonfinite": self.nonfinite,
            "history": self.history,
        }

    def _save(self, name: str) -> None:
        self._check_values()  # no checkpoint holds a state computed from a failed check
        path = os.path.join(self.config["out_dir"], name)
        if self.env.is_main:
            save_checkpoint(path, self._payload())
        distributed.barrier(self.env)
        if name == "last.pt":
            self._last_checkpoint = (path, self.step)

    def _log(self, record: Dict[str, Any]) -> None:
        if not self.env.is_main:
            return
        with open(os.path.join(self.config["out_dir"], "metrics.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and value == value:
                    self.writer.add_scalar(key.replace(".", "/"), value, record["step"])
            self.writer.flush()

    def _latent_scalars(self) -> Dict[str, float]:
        """Mean inter-prototype angle and per-class mean feature norms of the last source batch
        (lsr_fast.analysis; read at log steps only)."""
        from ..analysis.stats import latent_scalars
        from ..eval.metrics import class_names

        features, labels = self._last_source
        num_classes = self.config["data"]["num_classes"]
        return latent_scalars(regularizer=self.regularizer, features=features.float(), labels=labels,
                              num_classes=num_classes, class_names=class_names(num_classes), backend=self.config["backend"])

    def _validate(self) -> Dict[str, Any]:
        self._check_values()
        c = self.config
        confusion = evaluate(self.model, self.val_dataset, c["data"]["num_classes"], device=self.device,
                             flip=c["train"]["eval_flip"], amp=c["train"]["amp"], channels_last=c["model"]["channels_last"],
                             align_corners=c["model"]["align_corners"],
                             rank=self.env.rank, world_size=self.env.world_size, progress=False)
        confusion = distributed.all_reduce_sum(confusion.to(self.device), self.env).cpu()
        result = report(confusion)
        improved = self.best is None or result["miou"] > self.best["miou"]
        if improved:
            self.best = {"miou": result["miou"], "step": self.step}
            self.since_best = 0
        else:
            self.since_best += 1
        self.history.append({"step": self.step, "miou": result["miou"]})
        self._log({"step": self.step, "val.miou": result["miou"], **{f"val_iou.{k}": v for k, v in result["per_class_iou"].items() if v is not None}})
        if improved:
            self._save("best.pt")
        return result

    def _trim_metrics(self) -> None:
        """On resume, drop the records a killed run logged after its last checkpoint (they are
        logged again), so metrics.jsonl reads as one uninterrupted run."""
        path = os.path.join(self.config["out_dir"], "metrics.jsonl")
        if self.step == 0 or not os.path.exists(path):
            return
        with open(path, "r", encoding="utf-8") as handle:
            lines = handle.readlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= self.step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(kept))

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    # ----------------------------------------------------------------------------- the loop
    def run(self) -> Dict[str, Any]:
        self._setup()
        c, t = self.config, self.config["train"]
        if self.env.is_main:
            os.makedirs(c["out_dir"], exist_ok=True)
            atomic_write_text(os.path.join(c["out_dir"], "config.yaml"), to_yaml(c))
            self._trim_metrics()
        self.writer = None
        if self.env.is_main and t["tensorboard"]:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(c["out_dir"], "tb"), purge_step=self.step)
            except ImportError:
                warnings.warn("tensorboard is not installed: no TensorBoard logs (metrics.jsonl is still written)", stacklevel=2)
        bar = None
        if self.env.is_main and t["progress"]:
            from tqdm import tqdm

            bar = tqdm(total=t["steps"], initial=self.step, desc=f"{c['name']} ({c['mode']})", dynamic_ncols=True)

        handlers = {}
        if self._in_main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        self.model.train()
        if self.regularizer is not None:
            self.regularizer.train()
        sums: Optional[torch.Tensor] = None
        window_start, window_steps = time.perf_counter(), 0
        stopped_early = False
        status = "finished"
        try:
            while self.step < t["steps"]:
                values, finite = self._train_step()
                if not finite:
                    self.nonfinite += 1
                    warnings.warn(f"step {self.step}: non-finite loss (NaN or inf in the {self._nonfinite_what}), "
                                  f"step skipped ({self.nonfinite} in a row)", stacklevel=2)
                    if self.nonfinite >= t["max_nonfinite"]:
                        raise NonFiniteLossError(
                            f"{self.nonfinite} non-finite losses in a row (train.max_nonfinite = {t['max_nonfinite']}); "
                            f"{self._checkpoint_note()}")
                else:
                    self.nonfinite = 0
                    stacked = torch.stack([values.get(k, values["loss"].new_zeros(())).float() for k in LOG_TERMS])
                    sums = stacked if sums is None else sums + stacked
                with warnings.catch_warnings():
                    # A skipped step advances the schedule on purpose (step s has the lr of step s
                    # whatever was skipped before it), which torch warns about before any optimizer.step().
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                    self.scheduler.step()
                self.step += 1
                window_steps += 1
                if bar is not None:
                    bar.update(1)

                if self.step % t["log_every"] == 0 or self.step == t["steps"]:
                    self._check_values()
                    if sums is not None:
                        means = (sums / window_steps).tolist()  # the one host read per log window
                        elapsed = time.perf_counter() - window_start
                        record = {"step": self.step, **{f"train.{k}": v for k, v in zip(LOG_TERMS, means)},
                                  "lr": self.optimizer.param_groups[0]["lr"], "steps_per_s": window_steps / elapsed}
                        record.update(self._latent_scalars())
                        self._log(record)
                        if bar is not None:
                            shown = {"loss": means[0], "ce": means[1]}
                            if self.regularizer is not None:
                                shown.update(clu=means[2] + means[3], perp=means[4], norm=means[5] + means[6], ent=means[7])
                            bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})
                    sums, window_steps = None, 0
                if t["val_every"] and self.step % t["val_every"] == 0 and self.step < t["steps"]:
                    result = self._validate()
                    self._print(f"\nstep {self.step}: val mIoU {result['miou']:.2f} (best {self.best['miou']:.2f} at {self.best['step']})")
                    self._save("last.pt")
                    if t["early_stop_patience"] is not None and self.since_best >= t["early_stop_patience"]:
                        self._print(f"early stop: no better val mIoU for {self.since_best} validations")
                        stopped_early = True
                        status = "early_stop"
                        break
                elif t["checkpoint_every"] and self.step % t["checkpoint_every"] == 0:
                    self._save("last.pt")
                if window_steps == 0:  # a new log window starts after validation and checkpoints, not before
                    window_start = time.perf_counter()
                if distributed.any_rank(self._stop_signal is not None, self.env, self.device):
                    self._save("last.pt")
                    status = "interrupted"
                    self._print(f"\nstopped by signal at step {self.step}; resume with --resume "
                                f"(checkpoint {os.path.join(c['out_dir'], 'last.pt')})")
                    break
            if status == "finished" or stopped_early:
                if status == "finished" and (not self.history or self.history[-1]["step"] != self.step):
                    result = self._validate()
                    self._print(f"\nstep {self.step}: val mIoU {result['miou']:.2f} (best {self.best['miou']:.2f} at {self.best['step']})")
                self._save("last.pt")
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if bar is not None:
                bar.close()
            if self.writer is not None:
                self.writer.close()
        summary = {"status": status, "step": self.step, "best": self.best, "selection": self.selection,
                   "out_dir": c["out_dir"], "nonfinite_in_a_row": self.nonfinite}
        if self.env.is_main:
            atomic_write_text(os.path.join(c["out_dir"], "summary.json"), json.dumps(summary, indent=2) + "\n")
        return summary

    @staticmethod
    def _in_main_thread() -> bool:
        import threading

        return threading.current_thread() is threading.main_thread()


def train(config: Dict[str, Any], *, resume: Optional[str] = None) -> Dict[str, Any]:
    trainer = Trainer(config, resume=resume)
    try:
        return trainer.run()
    finally:
        if hasattr(trainer, "env"):
            distributed.teardown(trainer.env)
