"""`lsr-fast analyze`: the paper's latent-space figures from one checkpoint, or two compared
(e.g. source-only vs LSR)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from .features import collect
from .figures import FIGURES, Run, class_names, make_figures

DATASETS = ("synthetic", "cityscapes", "gta5", "synthia")


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible")
    return resolved


def _image_indices(length: int, max_images: Optional[int], seed: int) -> list:
    """All images in order, or a seeded random subset of max_images of them (in order): the
    datasets are sorted by city or sequence, so the first N would be one place only."""
    if max_images is None or max_images >= length:
        return list(range(length))
    chosen = torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:max_images]
    return sorted(chosen.tolist())


def _progress(label: str, total: int, log: Callable[[str], None]) -> Callable[[int], None]:
    def report(done: int) -> None:
        if done % 25 == 0 and done < total:  # a real dataset on a CPU takes minutes per checkpoint
            log(f"{label}: {done}/{total} images")
    return report


def _run_label(bundle, path: str) -> str:
    mode = bundle.config.get("mode") if isinstance(bundle.config, dict) else None
    name = os.path.basename(path)
    return f"{mode}: {name}" if mode else name


def analyze_checkpoints(
    checkpoint: str,
    compare: Optional[str] = None,
    *,
    out: str,
    dataset: Optional[str] = None,
    root: Optional[str] = None,
    split: Optional[str] = None,
    samples_per_class: int = 350,
    max_images: Optional[int] = 100,
    tsne_samples: int = 1000,
    seed: int = 0,
    device="cpu",
    backend: str = "auto",
    figures: Sequence[str] = FIGURES,
    log: Callable[[str], None] = print,
) -> Dict[str, Tuple[str, str]]:
    """Load one or two training checkpoints, run each over the same images of the evaluation
    dataset (``checkpoint``'s validation set unless ``dataset``/``root``/``split`` say otherwise)
    and write the requested figures to ``out``. Returns {figure: (png path, json path)}."""
    from ..train.build import build_eval_dataset
    from ..train.checkpoint import load_for_inference

    for name, value, low in (("samples_per_class", samples_per_class, 1), ("tsne_samples", tsne_samples, 5),
                             ("max_images", 1 if max_images is None else max_images, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    unknown = [f for f in figures if f not in FIGURES]
    if unknown:
        raise ValueError(f"figures must be among {list(FIGURES)}, got {unknown}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out {out!r} exists and is not a folder")
    paths = [checkpoint] + ([compare] if compare else [])
    for option, path in zip(("checkpoint", "compare"), paths):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--{option}: no such checkpoint file: {path}")
    device = _resolve_device(str(device))

    bundles = [load_for_inference(path, device=device) for path in paths]
    if len(bundles) == 2 and bundles[0].num_classes != bundles[1].num_classes:
        raise ValueError(f"--compare has {bundles[1].num_classes} classes but --checkpoint has {bundles[0].num_classes}")
    num_classes = bundles[0].num_classes
    data = build_eval_dataset(bundles[0].config, dataset=dataset, root=root, split=split)
    if len(data) == 0:
        raise ValueError("the evaluation dataset has no images")
    indices = _image_indices(len(data), max_images, seed)
    labels = [_run_label(b, p) for b, p in zip(bundles, paths)]
    if len(labels) == 2 and labels[0] == labels[1]:
        labels = [f"{labels[0]} [A]", f"{labels[1]} [B]"]

    needs_vectors = bool({"norms", "tsne"} & set(figures))
    runs = []
    for i, (bundle, label) in enumerate(zip(bundles, labels)):
        start = time.perf_counter()
        stats = collect(
            bundle.model, (data[j] for j in indices), num_classes,
            samples_per_class=samples_per_class if needs_vectors else None, seed=seed, device=device,
            backend=backend, downsampling=(i == 0 and "downsampling" in figures),
            align_corners=bundle.config["model"]["align_corners"],
            progress=_progress(label, len(indices), log),
        )
        log(f"{label}: {stats.images} images, features {stats.feature_size[0]}x{stats.feature_size[1]}"
            f"x{stats.sums.shape[1]}, {time.perf_counter() - start:.1f} s")
        runs.append(Run.from_regularizer(label, stats, bundle.regularizer))
    names = class_names(num_classes)
    return make_figures(runs, out, figures=figures, names=names, tsne_samples=tsne_samples, seed=seed)


def _figure_list(text: str) -> list:
    names = [t for t in text.replace(",", " ").split() if t]
    bad = [n for n in names if n not in FIGURES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"choose among {', '.join(FIGURES)}, got {text!r}")
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "The paper's latent-space figures (PNG, with the numbers behind each in a JSON file of the "
        "same name): label downsampling, feature norms, prototype angles, t-SNE, confusion matrix. "
        "Files named <figure>.png/.json in --out are replaced; nothing else there is touched.")
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (e.g. the LSR run's best.pt)")
    parser.add_argument("--compare", help="a second checkpoint to compare with (e.g. the source-only run's best.pt)")
    parser.add_argument("--dataset", choices=DATASETS, help="default: the checkpoint's validation dataset")
    parser.add_argument("--root", help="dataset root folder (real datasets)")
    parser.add_argument("--split", choices=("train", "val", "test"), help="Cityscapes split (default: the config's)")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--samples-per-class", type=_positive, default=350,
                        help="feature vectors kept per class for the norm and t-SNE figures (default 350)")
    parser.add_argument("--max-images", type=_positive, default=100,
                        help="analyse a seeded random subset of this many images (default 100; all if fewer)")
    parser.add_argument("--tsne-samples", type=_positive, default=1000,
                        help="vectors in the t-SNE, class-balanced (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the image subset, sampling and t-SNE (default 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "cpp", "cuda", "triton"),
                        help="lsr_fast op backend for hist_downsample and class_feature_stats (default auto)")
    parser.add_argument("--figures", type=_figure_list, nargs="+", default=None, metavar="FIGURE",
                        help=f"only these figures (space- or comma-separated): {', '.join(FIGURES)} (default all)")


def run(args: argparse.Namespace) -> int:
    figures = [f for group in args.figures for f in group] if args.figures else list(FIGURES)
    try:
        written = analyze_checkpoints(
            args.checkpoint, args.compare, out=args.out, dataset=args.dataset, root=args.root, split=args.split,
            samples_per_class=args.samples_per_class, max_images=args.max_images, tsne_samples=args.tsne_samples,
            seed=args.seed, device=args.device, backend=args.backend, figures=figures,
        )
    except (ValueError, OSError) as error:
        print(f"lsr-fast analyze: error: {error}", file=sys.stderr)
        return 2
    for figure, (png, js) in written.items():
        print(f"{figure:13s} {png}  (numbers: {js})")
    return 0
