"""LSRRegularizer: the latent-space terms of Eq. 4 (and L+) with their state in buffers."""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.distributed as dist

from . import ops, reference
from .bank import DISTRIBUTED, PrototypeBank, all_reduce_sum
from .ops._checks import value_checks_enabled
from .ops._deferred import DeferredChecks, named_as as _named_as

# Weights published with the authors' code (DESIGN.md): GTA5 -> Cityscapes, SYNTHIA -> Cityscapes.
# "gta5"/"synthia" pair them with the paper's equations; "*_released" with the loss forms of the
# released code they were tuned on (L1-mean clustering, relative filtered norms, Delta = 0.1).
# With the equations, lambda_C = 0.1 on a squared L2 over K = 2048 channels weighs clustering
# thousands of times more than when it was tuned.
_GTA5 = dict(num_classes=19, lambda_cluster=0.1, lambda_perp=0.2, lambda_norm=0.025, lambda_entropy=0.1, alpha=0.2)
_SYNTHIA = dict(num_classes=16, lambda_cluster=0.05, lambda_perp=0.2, lambda_norm=0.1, lambda_entropy=0.1, alpha=0.0)
_RELEASED = dict(clustering_distance="l1_mean", norm_form="released", norm_delta=0.1)
PRESETS = {
    "gta5": _GTA5,
    "synthia": _SYNTHIA,
    "gta5_released": {**_GTA5, **_RELEASED},
    "synthia_released": {**_SYNTHIA, **_RELEASED},
}
NORM_FORMS = ("paper", "released")

TERMS = ("clustering_source", "clustering_target", "perpendicularity", "norm_source", "norm_target", "entropy")


class LSRRegularizer(PrototypeBank):
    """Clustering (Eq. 5), perpendicularity (Eq. 6), norm alignment (Eqs. 7-8) and, for L+, the
    image-wise MaxSquare term, over one source and one target feature map per call.

    Buffers: ``prototypes`` (C, K) float32, the EMA prototypes p^ (Eqs. 2-3), and ``seen`` (C,),
    the classes whose p^ has been estimated, are those of the :class:`PrototypeBank` it extends
    (so the state_dict keys are those of every earlier version); ``mean_source_norm``, f-bar_s of
    the last step; and ``steps``, the number of training-mode calls. In eval mode nothing is
    updated.

    Loss forms. ``clustering_distance="squared_l2"`` is Eq. 5, ``"l1_mean"`` the released code's
    L1 mean over the class's vectors and channels, summed over classes and divided by C.
    ``norm_form="paper"`` is Eqs. 7-8 with r = f-bar_s of the previous step + Delta;
    ``"released"`` is the released code's |‖f~‖ - (n + Delta)| / n on both domains (no hinge on
    the target), f~ the vector with its channels below its own mean channel value zeroed, n the
    current source batch's mean unfiltered norm (detached; one extra read of the source map,
    since n is needed before the fused pass).

    Order within a step (a choice DESIGN.md leaves open, made so each domain is one fused pass):
    both clustering terms use p^ and ``seen`` as they stood at the start of the step; the EMA is
    then updated with this step's source batch prototypes. So on the first step no class is
    valid and both clustering terms are 0.

    ``forward`` returns every term and ``total``, the weighted sum of the terms; the trainer adds
    the source cross-entropy CE_s to it.

    Distributed training (torchrun + DistributedDataParallel, NCCL or gloo): with
    ``distributed="auto"`` (the default) a training-mode call all-reduces its per-class sums and
    counts, per-class squared-distance sums, norm sums and the weighted MaxSquare sum over
    ``process_group`` (default: the world) whenever torch.distributed is initialised with more
    than one rank; ``"on"`` requires it to be initialised, ``"off"`` never communicates. Then,
    on every rank, the prototypes, ``seen``, ``mean_source_norm`` (also the first step's f-bar_s)
    and every returned term equal those of one process fed the concatenation of all ranks'
    source batches and of all ranks' target batches (up to float summation order; ranks may hold
    different batch sizes). The differentiable sums go through an all-reduce whose backward
    all-reduces the gradient, so rank r's gradient w.r.t. its own features (and probabilities)
    is R * dL/df_r, R the world size and L the loss of the concatenated batch; DDP's mean over
    ranks of the parameter gradients is then exactly dL/dtheta of the concatenated batch (CE_s
    averaged per rank follows DDP's usual convention). Every rank must call forward and
    backward in the same order, as with DDP itself. Each step costs two collectives (three on
    the first) and no host synchronisation. Eval-mode calls never communicate (like
    SyncBatchNorm), so validation may run on one rank; their terms are local.
    ``process_group=dist.new_group()`` keeps these collectives apart from DDP's buckets.

    Value checks (label range, finite features and probabilities; see lsr_fast.set_value_checks)
    read nothing back in a training-mode call: their verdicts stay on the device in
    ``self.checks`` (a :class:`lsr_fast.DeferredChecks`, labelled with ``steps``) and are read by
    :meth:`check_values`, which this module calls every ``check_every`` training calls (0: never
    on its own) and before its state_dict is taken. A failed check then raises
    :class:`lsr_fast.ValueCheckError` with the op's message, named with forward's arguments, and
    the step it first failed at; the steps in between ran with out-of-range labels as void and
    NaNs propagating. Distributed, every rank reads at the same call and all raise together.
    Eval-mode calls check at once.
    """

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        *,
        lambda_cluster: float = 0.1,
        lambda_perp: float = 0.2,
        lambda_norm: float = 0.025,
        lambda_entropy: float = 0.0,
        alpha: float = 0.2,
        momentum: float = 0.8,
        norm_delta: float = 0.002,
        label_threshold: float = 0.5,
        confidence: float = 0.5,
        ignore_index: int = 255,
        prototype_init: str = "zero",
        clustering_distance: str = "squared_l2",
        norm_form: str = "paper",
        backend: str = "auto",
        distributed: str = "auto",
        process_group: Optional[dist.ProcessGroup] = None,
        check_every: int = 100,
    ):
        for name, value in (("num_classes", num_classes), ("feature_dim", feature_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        # `value < 0` is False for NaN, so finiteness is checked first: a NaN or inf weight would
        # only surface later as a NaN or inf total.
        for name, value in (
            ("lambda_cluster", lambda_cluster), ("lambda_perp", lambda_perp), ("lambda_norm", lambda_norm),
            ("lambda_entropy", lambda_entropy), ("norm_delta", norm_delta),
        ):
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name, value in (("alpha", alpha), ("momentum", momentum), ("label_threshold", label_threshold), ("confidence", confidence)):
            if not _is_number(value) or not math.isfinite(value) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
            raise ValueError(f"check_every must be an int >= 0, got {check_every!r}")
        if clustering_distance not in ops.DISTANCES:
            raise ValueError(f"clustering_distance must be one of {ops.DISTANCES}, got {clustering_distance!r}")
        if norm_form not in NORM_FORMS:
            raise ValueError(f"norm_form must be one of {NORM_FORMS}, got {norm_form!r}")
        if prototype_init not in ("zero", "first"):
            raise ValueError(f"prototype_init must be 'zero' (paper) or 'first', got {prototype_init!r}")
        if distributed not in DISTRIBUTED:
            raise ValueError(f"distributed must be 'auto', 'on' or 'off', got {distributed!r}")
        super().__init__(num_classes, feature_dim, momentum=momentum, init=prototype_init, distributed=distributed,
                         process_group=process_group)
        self.feature_dim = feature_dim
        self.lambda_cluster, self.lambda_perp = float(lambda_cluster), float(lambda_perp)
        self.lambda_norm, self.lambda_entropy = float(lambda_norm), float(lambda_entropy)
        self.alpha, self.norm_delta = float(alpha), float(norm_delta)
        self.label_threshold, self.confidence = float(label_threshold), float(confidence)
        self.ignore_index, self.prototype_init, self.backend = ignore_index, prototype_init, backend
        self.clustering_distance, self.norm_form = clustering_distance, norm_form
        self.register_buffer("mean_source_norm", torch.zeros(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        # Host copies of `steps` and `steps > 0`, so forward never reads a device value (no sync).
        self._host_steps = 0
        self._norm_initialised = False
        self.check_every = check_every
        self.checks = DeferredChecks()
        self.register_state_dict_pre_hook(_read_checks_first)

    @classmethod
    def from_preset(cls, name: str, feature_dim: int = 2048, **overrides) -> "LSRRegularizer":
        """The published weights: ``"gta5"`` (19 classes) or ``"synthia"`` (16 classes), L+ form,
        with the paper's equations, or ``"gta5_released"``/``"synthia_released"`` with the
        released code's loss forms (what the weights were tuned on)."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(feature_dim=feature_dim, **{**PRESETS[name], **overrides})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "steps" in state_dict:
            self._host_steps = int(state_dict[prefix + "steps"])
            self._norm_initialised = self._host_steps > 0

    def _sync_group(self):
        """The process group this call all-reduces over, or None: eval-mode calls stay local."""
        return self.sync_group() if self.training else None

    def _labels_at(self, labels: torch.Tensor, size) -> torch.Tensor:
        if tuple(labels.shape[-2:]) == tuple(size):
            return labels
        return ops.hist_downsample(
            labels, size, self.num_classes, threshold=self.label_threshold,
            ignore_index=self.ignore_index, backend=self.backend,
        )

    def _check_inputs(self, source_features, source_labels, target_features, target_probs) -> None:
        """Shape checks that name forward's own arguments (the ops would name theirs: `labels`,
        `size`, or `reference` when an empty source batch makes f-bar_s NaN). No device sync."""
        for name, value in (("source_features", source_features), ("target_features", target_features)):
            if not isinstance(value, torch.Tensor) or value.dim() != 4 or value.shape[1] != self.feature_dim:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name} must be (B, {self.feature_dim}, h, w), got {shape}")
            if value.numel() == 0:  # a mean over no vectors is NaN
                raise ValueError(f"{name} must hold at least one feature vector, got shape {tuple(value.shape)}")
        if not isinstance(target_probs, torch.Tensor) or target_probs.dim() != 4 or target_probs.shape[1] != self.num_classes:
            shape = tuple(target_probs.shape) if isinstance(target_probs, torch.Tensor) else type(target_probs).__name__
            raise ValueError(f"target_probs must be (B, {self.num_classes}, H, W) probabilities, got {shape}")
        if not isinstance(source_labels, torch.Tensor) or source_labels.dim() != 3:
            shape = tuple(source_labels.shape) if isinstance(source_labels, torch.Tensor) else type(source_labels).__name__
            raise ValueError(f"source_labels must be a (B, H, W) integer tensor, got {shape}")
        if source_labels.dtype.is_floating_point or source_labels.dtype.is_complex or source_labels.dtype == torch.bool:
            raise TypeError(f"source_labels must be an integer tensor, got {source_labels.dtype}")
        if not target_probs.dtype.is_floating_point:
            raise TypeError(f"target_probs must be a floating-point tensor, got {target_probs.dtype}")
        for features_name, features, name, value, layout in (
            ("source_features", source_features, "source_labels", source_labels, "(B, H, W)"),
            ("target_features", target_features, "target_probs", target_probs, f"(B, {self.num_classes}, H, W)"),
        ):
            if value.shape[0] != features.shape[0]:
                raise ValueError(
                    f"{name} must hold one map per image of {features_name}: batch size {features.shape[0]}, "
                    f"got {value.shape[0]} (shape {tuple(value.shape)})"
                )
            (h, w), (H, W) = features.shape[2:], value.shape[-2:]
            if H < h or W < w:  # also catches an empty map
                raise ValueError(
                    f"{name} must be {layout} at the resolution of {features_name} {(h, w)} or finer, "
                    f"got spatial size {(H, W)}"
                )

    def forward(
        self,
        source_features: torch.Tensor,
        source_labels: torch.Tensor,
        target_features: torch.Tensor,
        target_probs: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        """Source features (B, K, h, w) with labels (B, H, W) or (B, h, w); target features
        (B', K, h', w') with softmax probabilities (B', C, H', W') or (B', C, h', w')."""
        self._check_inputs(source_features, source_labels, target_features, target_probs)
        if not (self.training and value_checks_enabled()):
            return self._terms(source_features, source_labels, target_features, target_probs)
        self.checks.step = self._host_steps
        with self.checks:
            terms = self._terms(source_features, source_labels, target_features, target_probs)
        if self.check_every and self._host_steps % self.check_every == 0:
            self.check_values()
        return terms

    def check_values(self) -> None:
        """Read the deferred value checks (one copy; distributed, a collective first, so every
        rank raises) and raise :class:`lsr_fast.ValueCheckError` if one failed."""
        group = self.sync_group()
        elsewhere = ""
        if group is not None and int(all_reduce_sum([self.checks.failed_count(self.prototypes.device)], group)[0]):
            elsewhere = "a value check of LSRRegularizer failed on another rank (its error names it)"
        self.checks.raise_if_failed(elsewhere)

    def _terms(self, source_features, source_labels, target_features, target_probs) -> Dict[str, torch.Tensor]:
        with _named_as(labels="source_labels"):
            source_labels = self._labels_at(source_labels, source_features.shape[2:])
        with _named_as(probs="target_probs"):
            pseudo_labels = ops.pseudo_label_downsample(
                target_probs.detach(), tuple(target_features.shape[2:]), threshold=self.label_threshold,
                confidence=self.confidence, ignore_index=self.ignore_index, backend=self.backend,
            )

        group = self._sync_group()
        released = self.norm_form == "released"
        if self._norm_initialised and not released:
            f_bar = self.mean_source_norm
        else:  # first step, or every step of the released form: the current batch's (all ranks'), detached
            # Accumulated as the losses are (float64 stays float64, half precision goes to float32).
            acc = torch.float64 if source_features.dtype == torch.float64 else torch.float32
            norms = torch.linalg.vector_norm(source_features.detach().to(acc), dim=1)
            if group is None:
                f_bar = norms.mean()
            else:
                norm_sum, count = all_reduce_sum([norms.sum(), norms.new_full((), norms.numel())], group)
                f_bar = norm_sum / count
        norm_reference = f_bar + self.norm_delta

        prototypes = self.prototypes.detach()  # the backends copy what they save for backward
        common = dict(ignore_index=self.ignore_index, distance=self.clustering_distance, filtered=released,
                      backend=self.backend)
        with _named_as(features="source_features", labels="source_labels"):
            s_sums, s_counts, s_sq, s_norm_loss, s_norm_sum = ops.feature_terms(
                source_features, source_labels, prototypes, norm_reference, mode="source", **common)
        with _named_as(features="target_features"):
            t_sums, t_counts, t_sq, t_norm_loss, t_norm_sum = ops.feature_terms(
                target_features, pseudo_labels, prototypes, norm_reference, mode="source" if released else "target",
                **common)
        source_vectors = source_features.shape[0] * source_features.shape[2] * source_features.shape[3]
        target_vectors = target_features.shape[0] * target_features.shape[2] * target_features.shape[3]
        if self.lambda_entropy > 0:
            with _named_as(probs="target_probs"):
                entropy = ops.maxsquare_loss(target_probs, alpha=self.alpha, backend=self.backend)
        else:
            entropy = s_norm_loss.new_zeros(())

        if group is not None:
            # The concatenated batch's sums: one differentiable all-reduce (gradients summed
            # back over the ranks) and one plain one for the counts. MaxSquare is a mean over
            # images, so its per-rank sum over images is reduced and divided by all images.
            target_images = target_probs.shape[0]
            s_sums, s_sq, t_sq, s_norm_loss, t_norm_loss, entropy_sum, s_norm_sum, t_norm_sum = all_reduce_sum(
                [s_sums, s_sq, t_sq, s_norm_loss, t_norm_loss, entropy * target_images,
                 s_norm_sum.detach(), t_norm_sum.detach()], group, differentiable=True)
            sizes = torch.stack([s_counts.new_full((), n) for n in (source_vectors, target_vectors, target_images)])
            s_counts, t_counts, sizes = all_reduce_sum([s_counts, t_counts, sizes], group)
            source_vectors, target_vectors = sizes[0], sizes[1]
            entropy = entropy_sum / sizes[2]

        batch_prototypes = s_sums / s_counts.clamp(min=1).unsqueeze(1).to(s_sums.dtype)
        clustering_form = dict(distance=self.clustering_distance, width=self.feature_dim)
        norm_scale = f_bar if released else 1.0  # the released form is relative to n
        terms = {
            "clustering_source": reference.clustering_from_sums(s_sq, s_counts, self.seen, **clustering_form),
            "clustering_target": reference.clustering_from_sums(t_sq, t_counts, self.seen, **clustering_form),
            "perpendicularity": ops.perpendicularity_loss(batch_prototypes, s_counts > 0),
            "norm_source": s_norm_loss / source_vectors / norm_scale,
            "norm_target": t_norm_loss / target_vectors / norm_scale,
        }
        terms["entropy"] = entropy
        terms["total"] = (
            self.lambda_cluster * (terms["clustering_source"] + terms["clustering_target"])
            + self.lambda_perp * terms["perpendicularity"]
            + self.lambda_norm * (terms["norm_source"] + terms["norm_target"])
            + self.lambda_entropy * terms["entropy"]
        )
        terms["source_mean_norm"] = (s_norm_sum / source_vectors).detach()
        terms["target_mean_norm"] = (t_norm_sum / target_vectors).detach()
        terms["source_labels"] = source_labels
        terms["pseudo_labels"] = pseudo_labels

        if self.training:
            self._update_state(s_sums, s_counts, terms["source_mean_norm"])
        return terms

    @torch.no_grad()
    def _update_state(self, sums: torch.Tensor, counts: torch.Tensor, source_mean_norm: torch.Tensor) -> None:
        self._blend(sums, counts)  # sums and counts are all ranks' already (forward reduced them)
        self.mean_source_norm.copy_(source_mean_norm)
        self.steps.add_(1)
        self._host_steps += 1
        self._norm_initialised = True

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, lambda_cluster={self.lambda_cluster}, "
            f"lambda_perp={self.lambda_perp}, lambda_norm={self.lambda_norm}, lambda_entropy={self.lambda_entropy}, "
            f"alpha={self.alpha}, momentum={self.momentum}, norm_delta={self.norm_delta}, "
            f"clustering_distance={self.clustering_distance!r}, norm_form={self.norm_form!r}, backend={self.backend!r}"
        )


def _read_checks_first(module: LSRRegularizer, prefix: str, keep_vars: bool) -> None:
    """state_dict pre-hook: a failed deferred check raises before any state is handed out (a
    module-level function, so the module stays picklable)."""
    module.checks.raise_if_failed()


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
