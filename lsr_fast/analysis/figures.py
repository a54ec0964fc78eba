"""The paper's analysis figures (Barbato et al. 2021, Figs. 3b/4, 5, 6, 7) and an evaluation
figure, each as a PNG with the numbers behind it in a JSON file of the same name.

Each figure has a ``*_numbers`` function (plain numbers, JSON-ready) and a ``plot_*`` function
that draws those numbers; ``make_figures`` does both for a list of runs (one per checkpoint).
Matplotlib is used through its Agg canvas only (no pyplot, no global backend switch).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ..eval.metrics import SUBSET_16, class_names, per_class_iou
from ._io import save_figure, write_json
from .features import DownsampleStats, FeatureStats
from .stats import angle_matrix, angles_to_prototype, mean_angle_to_others, norm_interval, row_normalise

FIGURES = ("downsampling", "norms", "angles", "tsne", "confusion")

# Cityscapes trainId colours (the dataset's official palette); void is black.
CITYSCAPES_PALETTE_19 = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
RUN_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def class_colours(num_classes: int) -> np.ndarray:
    """(C, 3) uint8 colours: the Cityscapes palette for 19 and 16 classes, else tab20."""
    if num_classes == 19:
        return np.array(CITYSCAPES_PALETTE_19, dtype=np.uint8)
    if num_classes == 16:
        return np.array([CITYSCAPES_PALETTE_19[i] for i in SUBSET_16], dtype=np.uint8)
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return np.array([[int(255 * v) for v in cmap(c % 20)[:3]] for c in range(num_classes)], dtype=np.uint8)


def colourise(labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) uint8 image in the class palette; anything else is black."""
    labels = labels.detach().cpu().long().numpy()
    lut = np.zeros((num_classes + 1, 3), dtype=np.uint8)  # the last row (black) is for void
    lut[:num_classes] = class_colours(num_classes)
    index = np.where((labels >= 0) & (labels < num_classes), labels, num_classes)
    return lut[index]


@dataclass
class Run:
    """One checkpoint's analysis: a display label, what ``collect`` gathered, and the EMA
    prototypes of its LSR regulariser when it has one."""

    label: str
    stats: FeatureStats
    ema_prototypes: Optional[torch.Tensor] = None  # (C, K)
    ema_seen: Optional[torch.Tensor] = None  # (C,) bool

    @classmethod
    def from_regularizer(cls, label: str, stats: FeatureStats, regularizer=None) -> "Run":
        if regularizer is None:
            return cls(label, stats)
        return cls(label, stats, regularizer.prototypes.detach().cpu().float(), regularizer.seen.detach().cpu().bool())


def _round(values, digits: int = 6) -> list:
    """Per-vector lists are stored with 6 significant digits to keep the JSON small."""
    return [float(f"{v:.{digits}g}") for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _class_axis(ax, names: Sequence[str]) -> None:
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)


# ---------------------------------------------------------------- 1. downsampling (Figs. 3b, 4)


def downsampling_numbers(stats: DownsampleStats, names: Sequence[str]) -> dict:
    """Class counts and fractions at full resolution and after nearest and histogram-aware
    downsampling. ``fractions`` are over non-void pixels/cells; ``void_fraction`` over all."""
    schemes = {}
    for scheme in ("full", "nearest", "hist"):
        bins = getattr(stats, scheme).to(torch.int64)
        classes, void = bins[:-1], int(bins[-1])
        labelled = int(classes.sum())
        total = labelled + void
        schemes[scheme] = dict(
            counts=classes.tolist(), void=void,
            fractions=[c / labelled if labelled else float("nan") for c in classes.tolist()],
            void_fraction=void / total if total else float("nan"),
        )
    example = stats.example
    return dict(
        figure="downsampling",
        description="class distribution of the labels at full resolution and downsampled to feature "
                    "resolution: nearest neighbour vs histogram-aware (lsr_fast.hist_downsample)",
        classes=list(names), threshold=stats.threshold, schemes=schemes,
        example=dict(
            name=example.get("name"),
            label_size=list(example["label"].shape) if "label" in example else None,
            feature_size=list(example["hist"].shape) if "hist" in example else None,
            nearest=example.get("nearest"), hist=example.get("hist"),
        ),
    )


def plot_downsampling(numbers: dict, example: dict, path: str) -> None:
    names = numbers["classes"]
    C = len(names)
    fig = _new_figure(13, 7.5)
    grid = fig.add_gridspec(2, 3, height_ratios=(1, 1.1))
    titles = dict(label="label, full resolution", nearest="nearest", hist=f"histogram-aware (T_h={numbers['threshold']})")
    for column, key in enumerate(("label", "nearest", "hist")):
        ax = fig.add_subplot(grid[0, column])
        if key in example:
            ax.imshow(colourise(example[key], C), interpolation="nearest")
            h, w = example[key].shape
            ax.set_title(f"{titles[key]}  {h}x{w}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    ax = fig.add_subplot(grid[1, :])
    width = 0.27
    x = np.arange(C)
    for offset, (scheme, colour, title) in zip((-1, 0, 1), (("full", "0.6", "full resolution"),
                                                             ("nearest", "tab:red", "nearest"),
                                                             ("hist", "tab:blue", "histogram-aware"))):
        s = numbers["schemes"][scheme]
        fractions = np.array([np.nan if v is None else v for v in s["fractions"]], dtype=float) * 100
        ax.bar(x + offset * width, fractions, width, color=colour,
               label=f"{title} (void {100 * s['void_fraction']:.1f}%)" if s["void_fraction"] == s["void_fraction"] else title)
    _class_axis(ax, names)
    ax.set_yscale("log")
    ax.set_ylabel("% of non-void pixels / cells")
    ax.legend(fontsize=8)
    fig.suptitle(f"Label downsampling over the analysed images (example: {numbers['example']['name']})", fontsize=11)
    save_figure(fig, path)


# ---------------------------------------------------------------- 2. feature norms (Fig. 5)


def norms_numbers(runs: Sequence[Run], names: Sequence[str], coverage: float = 0.95) -> dict:
    """Per run and class: the norms of the sampled vectors, their angles (degrees) to the class
    prototype (the class mean of all analysed features of that class), the median norm and the
    central ``coverage`` interval."""
    out_runs = []
    for run in runs:
        means = run.stats.class_means
        reservoir = run.stats.reservoir
        if reservoir is None:
            raise ValueError(f"run {run.label!r} has no sampled vectors (collect(..., samples_per_class=None))")
        classes = []
        for c, name in enumerate(names):
            vectors = reservoir.class_vectors(c)
            if vectors.numel() == 0 or not bool(run.stats.present[c]):
                classes.append(dict(name=name, n=0, median=None, low=None, high=None, norms=[], angles=[]))
                continue
            norms = torch.linalg.vector_norm(vectors.double(), dim=1)
            angles = angles_to_prototype(vectors.double(), means[c])
            summary = norm_interval(norms, coverage)
            classes.append(dict(name=name, **summary, norms=_round(norms), angles=_round(angles)))
        out_runs.append(dict(label=run.label, classes=classes))
    return dict(
        figure="norms", coverage=coverage,
        description="target feature norms (log radius) and angle to the class prototype (position inside "
                    "the class's sector); median and central interval per class",
        prototype="class mean of all analysed features of the class (labels hist-downsampled)",
        runs=out_runs,
    )


def plot_norms(numbers: dict, path: str) -> None:
    runs = numbers["runs"]
    names = [c["name"] for c in runs[0]["classes"]]
    C = len(names)
    colours = class_colours(C) / 255.0
    all_angles = [a for r in runs for c in r["classes"] for a in c["angles"]]
    span = 90.0 if not all_angles or max(all_angles) <= 90.0 else 180.0
    all_norms = [v for r in runs for c in r["classes"] for v in c["norms"] if v > 0]
    floor = min(all_norms) / 2 if all_norms else 1e-3
    top = max(all_norms) * 1.5 if all_norms else 1.0
    sector = 2 * math.pi / C

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    fig = _new_figure(6.5 * len(runs), 10.5)
    grid = fig.add_gridspec(2, len(runs), height_ratios=(1.6, 1))
    for i, run in enumerate(runs):
        ax = fig.add_subplot(grid[0, i], projection="polar")
        ax.set_rscale("log")
        for c, cls in enumerate(run["classes"]):
            reference = c * sector + 0.1 * sector  # angle 0 to the prototype
            ax.plot([reference, reference], [floor, top], color="0.85", lw=0.6, zorder=0)
            if not cls["n"]:
                continue
            theta = reference + 0.8 * sector * np.asarray(cls["angles"]) / span
            r = np.maximum(np.asarray(cls["norms"]), floor)
            ax.scatter(theta, r, s=2, color=colours[c], alpha=0.6, linewidths=0)
            ax.plot([reference, reference], [max(cls["low"], floor), cls["high"]], color="k", lw=1.5)
            ax.plot([reference], [max(cls["median"], floor)], "o", color="k", ms=3)
        for c in range(C + 1):  # sector boundaries
            ax.plot([c * sector, c * sector], [floor, top], color="0.6", lw=0.8, zorder=0)
        ax.xaxis.grid(False)
        ax.set_xticks([c * sector + 0.5 * sector for c in range(C)])
        ax.set_xticklabels(names, fontsize=7)
        ax.set_rlim(floor, top)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(run["label"], fontsize=10)
    ax = fig.add_subplot(grid[1, :])
    x = np.arange(C)
    for i, run in enumerate(runs):
        shift = (i - (len(runs) - 1) / 2) * 0.25
        med = np.array([np.nan if c["median"] is None else c["median"] for c in run["classes"]], dtype=float)
        low = np.array([np.nan if c["low"] is None else c["low"] for c in run["classes"]], dtype=float)
        high = np.array([np.nan if c["high"] is None else c["high"] for c in run["classes"]], dtype=float)
        ax.errorbar(x + shift, med, yerr=[med - low, high - med], fmt="o", ms=4, capsize=2,
                    color=RUN_COLOURS[i % len(RUN_COLOURS)], label=run["label"])
    _class_axis(ax, names)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_ylabel(f"feature norm: median, {100 * numbers['coverage']:.0f}% interval")
    ax.legend(fontsize=8)
    fig.suptitle(f"Target feature norms (log radius); angle to the class prototype = position in the class's "
                 f"sector, grey line 0° to {span:.0f}°\nprototype: {numbers['prototype']}", fontsize=10)
    save_figure(fig, path)


# ---------------------------------------------------------------- 3. prototype angles (Fig. 6)


def _angle_summary(prototypes: torch.Tensor, present: torch.Tensor) -> dict:
    prototypes = torch.nan_to_num(prototypes.double(), nan=0.0)
    per_class = mean_angle_to_others(prototypes, present)
    defined = ~torch.isnan(per_class)
    matrix = angle_matrix(prototypes)
    matrix = torch.where(present.unsqueeze(0) & present.unsqueeze(1), matrix, torch.full_like(matrix, float("nan")))
    return dict(
        present=present.tolist(),
        mean_angle_to_others=per_class.tolist(),
        mean_angle=float(per_class[defined].mean()) if bool(defined.any()) else float("nan"),
        matrix=matrix.tolist(),
    )


def angle_numbers(runs: Sequence[Run], names: Sequence[str]) -> dict:
    """Per run: the mean angle between each class's prototype and the other present ones, the
    overall mean and the angle matrix, for the class means of the analysed features and, when the
    checkpoint has an LSR regulariser, for its EMA prototypes (classes it has seen)."""
    out_runs = []
    for run in runs:
        entry = dict(label=run.label, class_means=_angle_summary(run.stats.class_means, run.stats.present), ema=None)
        if run.ema_prototypes is not None:
            entry["ema"] = _angle_summary(run.ema_prototypes, run.ema_seen)
        out_runs.append(entry)
    return dict(
        figure="angles", classes=list(names), reference_angle=90.0,
        description="average angle (degrees) between each class prototype and the other classes' prototypes",
        prototypes=dict(class_means="class means of all analysed features (labels hist-downsampled)",
                        ema="the checkpoint's EMA prototypes (LSRRegularizer buffers), seen classes"),
        runs=out_runs,
    )


def plot_angles(numbers: dict, path: str) -> None:
    names = numbers["classes"]
    runs = numbers["runs"]
    kinds = ["class_means"] + (["ema"] if any(r["ema"] is not None for r in runs) else [])
    titles = dict(class_means="prototypes = class means of the analysed features",
                  ema="prototypes = the checkpoint's EMA prototypes (regulariser buffers)")
    fig = _new_figure(12, 4.2 * len(kinds))
    x = np.arange(len(names))
    width = 0.8 / len(runs)
    for row, kind in enumerate(kinds):
        ax = fig.add_subplot(len(kinds), 1, row + 1)
        for i, run in enumerate(runs):
            summary = run[kind]
            if summary is None:
                continue
            values = np.array([np.nan if v is None else v for v in summary["mean_angle_to_others"]], dtype=float)
            mean = summary["mean_angle"]
            label = f"{run['label']} (mean {mean:.1f}°)" if mean == mean else run["label"]
            ax.bar(x + (i - (len(runs) - 1) / 2) * width, values, width, label=label,
                   color=RUN_COLOURS[i % len(RUN_COLOURS)])
        ax.axhline(90.0, color="k", ls="--", lw=1, label="90°")
        _class_axis(ax, names)
        ax.set_ylabel("mean angle to the others (°)")
        ax.set_title(titles[kind], fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Average angle between each prototype and the other classes' prototypes", fontsize=11)
    save_figure(fig, path)


# ---------------------------------------------------------------- 4. t-SNE (Fig. 7)


def l2_normalise(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    vectors = vectors.double()
    return vectors / torch.linalg.vector_norm(vectors, dim=1, keepdim=True).clamp(min=1e-12)


def tsne_numbers(runs: Sequence[Run], names: Sequence[str], *, samples: int = 1000, seed: int = 0) -> dict:
    """Per run: a 2-D t-SNE (scikit-learn, PCA init, fixed seed) of a class-balanced subset of
    about ``samples`` sampled vectors, L2-normalised first."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    out_runs = []
    for run in runs:
        if run.stats.reservoir is None:
            raise ValueError(f"run {run.label!r} has no sampled vectors (collect(..., samples_per_class=None))")
        vectors, labels = run.stats.reservoir.subsample(samples)
        n = int(labels.numel())
        if n < 5:
            raise ValueError(f"t-SNE needs at least 5 sampled vectors, run {run.label!r} has {n}")
        perplexity = float(min(30.0, (n - 1) / 3.0))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, n_jobs=1)
        # One thread: on a busy machine OpenMP/BLAS threads made this 10-25x slower (measured).
        with threadpool_limits(1):
            embedding = tsne.fit_transform(l2_normalise(vectors).numpy())
        out_runs.append(dict(label=run.label, n=n, perplexity=perplexity, labels=labels.tolist(),
                             x=_round(embedding[:, 0]), y=_round(embedding[:, 1]),
                             counts=torch.bincount(labels, minlength=len(names)).tolist()))
    return dict(figure="tsne", classes=list(names), seed=seed,
                description="t-SNE of L2-normalised target feature vectors, class-balanced sample", runs=out_runs)


def plot_tsne(numbers: dict, path: str) -> None:
    names = numbers["classes"]
    colours = class_colours(len(names)) / 255.0
    runs = numbers["runs"]
    fig = _new_figure(6.5 * len(runs), 6.5)
    for i, run in enumerate(runs):
        ax = fig.add_subplot(1, len(runs), i + 1)
        labels = np.asarray(run["labels"])
        x, y = np.asarray(run["x"]), np.asarray(run["y"])
        for c, name in enumerate(names):
            keep = labels == c
            if keep.any():
                ax.scatter(x[keep], y[keep], s=4, color=colours[c], label=name, linewidths=0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{run['label']}  (n={run['n']})", fontsize=10)
        if i == len(runs) - 1:
            ax.legend(fontsize=7, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("t-SNE of L2-normalised target features", fontsize=11)
    save_figure(fig, path)


# ---------------------------------------------------------------- 5. evaluation


def confusion_numbers(runs: Sequence[Run], names: Sequence[str]) -> dict:
    """Per run: the confusion matrix (rows = ground truth), its row-normalised form, per-class
    IoU (fractions, NaN when a class is absent from prediction and ground truth) and mIoU (%)."""
    out_runs = []
    for run in runs:
        iou = per_class_iou(run.stats.confusion)
        defined = ~torch.isnan(iou)
        out_runs.append(dict(
            label=run.label, images=run.stats.images, counts=run.stats.confusion.tolist(),
            row_normalised=row_normalise(run.stats.confusion).tolist(), iou=iou.tolist(),
            miou=float(iou[defined].mean()) * 100 if bool(defined.any()) else float("nan"),
        ))
    return dict(figure="confusion", classes=list(names), runs=out_runs,
                description="evaluation over the analysed images: rows = ground truth, columns = prediction")


def plot_confusion(numbers: dict, path: str) -> None:
    names = numbers["classes"]
    runs = numbers["runs"]
    C = len(names)
    fig = _new_figure(6.5 * len(runs) + 1, 11)
    grid = fig.add_gridspec(2, len(runs), height_ratios=(1.5, 1))
    image = None
    for i, run in enumerate(runs):
        ax = fig.add_subplot(grid[0, i])
        matrix = np.array([[np.nan if v is None else v for v in row] for row in run["row_normalised"]], dtype=float)
        image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(C))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_yticks(range(C))
        ax.set_yticklabels(names, fontsize=7)
        ax.set_xlabel("prediction")
        ax.set_ylabel("ground truth")
        ax.set_title(f"{run['label']}  ({run['images']} images)", fontsize=10)
    fig.colorbar(image, ax=fig.axes[: len(runs)], shrink=0.8, label="fraction of the row")
    ax = fig.add_subplot(grid[1, :])
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        iou = np.array([np.nan if v is None else v for v in run["iou"]], dtype=float) * 100
        miou = run["miou"]
        label = f"{run['label']} (mIoU {miou:.1f})" if miou is not None and miou == miou else run["label"]
        ax.bar(np.arange(C) + (i - (len(runs) - 1) / 2) * width, iou, width, label=label,
               color=RUN_COLOURS[i % len(RUN_COLOURS)])
    _class_axis(ax, names)
    ax.set_ylim(0, 100)
    ax.set_ylabel("IoU (%)")
    ax.legend(fontsize=8)
    fig.suptitle("Row-normalised confusion matrix and per-class IoU", fontsize=11)
    save_figure(fig, path)


# ---------------------------------------------------------------- all of them


def make_figures(
    runs: Sequence[Run],
    out_dir: str,
    *,
    figures: Sequence[str] = FIGURES,
    names: Optional[Sequence[str]] = None,
    tsne_samples: int = 1000,
    seed: int = 0,
) -> Dict[str, Tuple[str, str]]:
    """Write ``<out_dir>/<figure>.png`` and ``<figure>.json`` for each requested figure; files of
    those names are replaced, nothing else in ``out_dir`` is touched. Returns {figure: (png, json)}.
    The downsampling figure uses the first run's label histograms (labels do not depend on the
    model, only on its feature size)."""
    if not runs:
        raise ValueError("runs must hold at least one Run")
    unknown = [f for f in figures if f not in FIGURES]
    if unknown:
        raise ValueError(f"figures must be among {list(FIGURES)}, got {unknown}")
    num_classes = runs[0].stats.num_classes
    if any(r.stats.num_classes != num_classes for r in runs):
        raise ValueError("every run must have the same number of classes")
    names = list(names) if names is not None else class_names(num_classes)
    if len(names) != num_classes:
        raise ValueError(f"names has {len(names)} entries but the runs have {num_classes} classes")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {out_dir!r} exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)

    written = {}
    for figure in FIGURES:
        if figure not in figures:
            continue
        png, js = os.path.join(out_dir, figure + ".png"), os.path.join(out_dir, figure + ".json")
        if figure == "downsampling":
            stats = runs[0].stats.downsampling
            if stats is None:
                raise ValueError("the first run was collected with downsampling=False")
            numbers = downsampling_numbers(stats, names)
            write_json(js, numbers)
            plot_downsampling(numbers, stats.example, png)
        else:
            numbers = dict(norms=lambda: norms_numbers(runs, names), angles=lambda: angle_numbers(runs, names),
                           tsne=lambda: tsne_numbers(runs, names, samples=tsne_samples, seed=seed),
                           confusion=lambda: confusion_numbers(runs, names))[figure]()
            write_json(js, numbers)
            dict(norms=plot_norms, angles=plot_angles, tsne=plot_tsne, confusion=plot_confusion)[figure](numbers, png)
        written[figure] = (png, js)
    return written
