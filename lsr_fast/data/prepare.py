"""``lsr-fast prepare-data``: check a dataset folder and, once, write its labels as 8-bit trainIds.

    lsr-fast prepare-data gta5 /data/GTA5 --write-trainids
    lsr-fast prepare-data cityscapes /data/cityscapes --split val

Validation decodes every image and label of the selection and reports, by file: unreadable
files, files in the wrong format (image not RGB, GTA5/Cityscapes label not paletted or 8-bit
grey, SYNTHIA label not 16-bit 3-channel), images without labels and labels without images,
image/label size mismatches, and label ids that the dataset's class list does not have (GTA5 and
Cityscapes ids above 33, SYNTHIA ids above 22; known ids that are not trained on, such as 0,
are fine and become void).

Converted labels go to ``OUT/<label path relative to ROOT>`` (OUT defaults to
``ROOT/lsr_fast_trainids``, where the datasets look for them). Existing files are never replaced
without ``--overwrite``, raw labels never, and nothing is deleted.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from .._atomic import atomic_write
from .datasets import (
    KINDS,
    TRAINID_DIRNAME,
    FileFormatError,
    Listing,
    UnreadableFileError,
    raw_to_trainid,
    read_image,
    read_raw_label,
    read_split_list,
    trainid_path,
)
from .labels import CITYSCAPES_LABEL_NAMES, SYNTHIA_LABEL_NAMES

Progress = Optional[Callable[[int, int], None]]


@dataclass
class ValidationReport:
    """What validate_dataset found. Paths are as found under the root; ``ok`` is True when no
    problem of any kind was found."""

    kind: str
    root: str
    splits: List[str] = field(default_factory=list)
    num_images: int = 0
    num_labels: int = 0
    unreadable: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)
    wrong_format: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)
    images_without_labels: List[Tuple[str, str]] = field(default_factory=list)  # (image, expected label)
    labels_without_images: List[str] = field(default_factory=list)
    size_mismatches: List[Tuple[str, str, Tuple[int, int], Tuple[int, int]]] = field(default_factory=list)  # (image, label, (W, H), (W, H))
    unknown_ids: Dict[str, List[int]] = field(default_factory=dict)  # label -> offending ids
    split_list_missing: List[Tuple[str, str]] = field(default_factory=list)  # (split list, name)

    @property
    def problems(self) -> int:
        return (
            len(self.unreadable) + len(self.wrong_format) + len(self.images_without_labels)
            + len(self.labels_without_images) + len(self.size_mismatches) + len(self.unknown_ids)
            + len(self.split_list_missing)
        )

    @property
    def ok(self) -> bool:
        return self.problems == 0

    def lines(self) -> List[str]:
        """The report as text, one line per problem file."""
        splits = f" (splits: {', '.join(self.splits)})" if self.splits else ""
        out = [f"{self.kind} dataset at {self.root}{splits}", f"  images: {self.num_images}, labels: {self.num_labels}"]
        out += [f"  split list {lst}: {name!r} has no image" for lst, name in self.split_list_missing]
        out += [f"  unreadable: {path}: {reason}" for path, reason in self.unreadable]
        out += [f"  wrong format: {path}: {reason}" for path, reason in self.wrong_format]
        out += [f"  image without label: {image} (expected {label})" for image, label in self.images_without_labels]
        out += [f"  label without image: {label}" for label in self.labels_without_images]
        out += [
            f"  size mismatch: image {image} is {isize[0]}x{isize[1]} but label {label} is {lsize[0]}x{lsize[1]} (WxH)"
            for image, label, isize, lsize in self.size_mismatches
        ]
        known = len(SYNTHIA_LABEL_NAMES if self.kind == "synthia" else CITYSCAPES_LABEL_NAMES)
        out += [
            f"  unknown label ids in {label}: {values} (known ids are 0..{known - 1})"
            for label, values in self.unknown_ids.items()
        ]
        out.append("  no problems found" if self.ok else f"  {self.problems} problem(s) found")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _splits(kind: str, root: str, split: Optional[str], split_list: Optional[str]) -> List[Optional[str]]:
    if kind != "cityscapes":
        if split is not None:
            raise ValueError(f"--split applies to cityscapes only; {kind} has one folder of images (use --split-list)")
        return [None]
    if split is not None:
        return [split]
    if split_list is not None:
        raise ValueError("cityscapes: give --split with --split-list (the list names samples of one split)")
    image_root = os.path.join(os.fspath(root), "leftImg8bit")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"cityscapes image folder {image_root} does not exist (or is not a folder)")
    found = sorted(d for d in os.listdir(image_root) if os.path.isdir(os.path.join(image_root, d)))
    if not found:
        raise FileNotFoundError(f"cityscapes image folder {image_root} has no split folders (train, val, ...)")
    return found


def _selection(listing: Listing, split_list: Optional[str]) -> Tuple[List[str], List[str]]:
    """(names with an image, names of the split list without one)."""
    if split_list is None:
        return sorted(listing.images), []
    names = read_split_list(split_list)
    return [n for n in names if n in listing.images], [n for n in names if n not in listing.images]


def validate_dataset(
    kind: str, root: str, *, split_list: Optional[str] = None, split: Optional[str] = None, progress: Progress = None
) -> ValidationReport:
    """Check every image and label of a dataset folder (see the module docstring). A missing root
    or folder raises FileNotFoundError; everything about individual files goes in the report.
    Cityscapes checks every split found unless ``split`` names one."""
    if kind not in KINDS:
        raise ValueError(f"dataset kind must be one of {', '.join(KINDS)}, got {kind!r}")
    root = os.fspath(root)
    splits = _splits(kind, root, split, split_list)
    report = ValidationReport(kind, root, [s for s in splits if s is not None])
    known = len(SYNTHIA_LABEL_NAMES if kind == "synthia" else CITYSCAPES_LABEL_NAMES)
    listings = [Listing(kind, root, s) for s in splits]
    work = []  # (listing, name) pairs to check
    for listing in listings:
        names, missing = _selection(listing, split_list)
        report.split_list_missing += [(os.fspath(split_list), n) for n in missing]
        work += [(listing, n) for n in names]
        if split_list is None:  # with a list, labels outside it are simply not selected
            orphans = sorted(set(listing.labels) - set(listing.images))
            report.labels_without_images += [listing.labels[n] for n in orphans]
            report.num_labels += len(orphans)

    for done, (listing, name) in enumerate(work, 1):
        image_path, label_path = listing.images[name], listing.label_path(name)
        report.num_images += 1
        image = label = None
        try:
            image = read_image(image_path)
        except UnreadableFileError as error:
            report.unreadable.append((image_path, str(error)))
        except FileFormatError as error:
            report.wrong_format.append((image_path, str(error)))
        if not os.path.isfile(label_path):
            report.images_without_labels.append((image_path, label_path))
        else:
            report.num_labels += 1
            try:
                label = read_raw_label(kind, label_path)
            except UnreadableFileError as error:
                report.unreadable.append((label_path, str(error)))
            except FileFormatError as error:
                report.wrong_format.append((label_path, str(error)))
        if label is not None:
            values = np.unique(label)
            unknown = [int(v) for v in values if v >= known]
            if unknown:
                report.unknown_ids[label_path] = unknown
        if image is not None and label is not None and image.shape[:2] != label.shape:
            report.size_mismatches.append(
                (image_path, label_path, (image.shape[1], image.shape[0]), (label.shape[1], label.shape[0]))
            )
        if progress is not None:
            progress(done, len(work))
    return report


def write_png_atomic(path: str, array: np.ndarray) -> None:
    """Write a uint8 (H, W) array as an 8-bit grey PNG, atomically (lsr_fast._atomic)."""
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))


def write_trainid_labels(
    kind: str,
    root: str,
    *,
    out_dir: Optional[str] = None,
    overwrite: bool = False,
    split_list: Optional[str] = None,
    split: Optional[str] = None,
    progress: Progress = None,
) -> List[str]:
    """Convert every raw label of the selection (all of them by default; cityscapes: every split
    unless ``split`` is given) to an 8-bit trainId PNG (19 classes, void 255) and return the paths
    written. Targets are ``out_dir/<label path relative to root>``, out_dir defaulting to
    ``root/lsr_fast_trainids``.

    Refuses (FileExistsError, before writing anything) when a target exists and ``overwrite`` is
    False; refuses always when a target would be a raw label. A label that cannot be read or is
    in the wrong format raises, naming it (the files written before it stay, each complete).
    """
    if kind not in KINDS:
        raise ValueError(f"dataset kind must be one of {', '.join(KINDS)}, got {kind!r}")
    root = os.fspath(root)
    out_dir = os.fspath(out_dir) if out_dir is not None else os.path.join(root, TRAINID_DIRNAME)
    pairs = []  # (raw label, target)
    sources = set()
    for s in _splits(kind, root, split, split_list):
        listing = Listing(kind, root, s)
        sources |= {os.path.realpath(p) for p in listing.labels.values()}
        if split_list is None:
            paths = [listing.labels[n] for n in sorted(listing.labels)]
        else:
            names = read_split_list(split_list)
            missing = [n for n in names if n not in listing.labels]
            if missing:
                raise FileNotFoundError(
                    f"split list {os.fspath(split_list)}: {missing[0]!r} has no label "
                    f"({listing.label_path(missing[0])}){f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}"
                )
            paths = [listing.labels[n] for n in names]
        pairs += [(p, trainid_path(root, p, out_dir)) for p in paths]

    for source, target in pairs:
        if os.path.realpath(target) in sources:
            raise ValueError(f"refusing to write {target}: it is a raw label of the dataset (choose another --out)")
    if not overwrite:
        existing = [t for _, t in pairs if os.path.lexists(t)]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise FileExistsError(f"{existing[0]} already exists{more}; pass --overwrite (overwrite=True) to replace")

    written = []
    for done, (source, target) in enumerate(pairs, 1):
        write_png_atomic(target, raw_to_trainid(kind, read_raw_label(kind, source)))
        written.append(target)
        if progress is not None:
            progress(done, len(pairs))
    return written


# --------------------------------------------------------------------------------------------
# CLI glue


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``lsr-fast prepare-data`` to ``parser``."""
    parser.description = (
        "Check a GTA5, SYNTHIA-RAND-CITYSCAPES or Cityscapes folder file by file, and optionally "
        "write its labels once as 8-bit trainId PNGs so training reads no raw labels."
    )
    parser.add_argument("kind", choices=KINDS, help="which dataset the folder holds")
    parser.add_argument(
        "root",
        help="dataset folder: gta5 has images/ and labels/; synthia has RGB/ and GT/LABELS/; "
             "cityscapes has leftImg8bit/ and gtFine/",
    )
    parser.add_argument(
        "--split-list", metavar="FILE", default=None,
        help="check only the samples named in FILE, one per line (e.g. 00001.png, or "
             "frankfurt/frankfurt_000000_000294_leftImg8bit.png for cityscapes)",
    )
    parser.add_argument(
        "--split", choices=("train", "val"), default=None,
        help="cityscapes only: the split to check (default: every split found)",
    )
    parser.add_argument(
        "--write-trainids", action="store_true",
        help=f"after checking, write every label as an 8-bit trainId PNG under --out "
             f"(default ROOT/{TRAINID_DIRNAME}, where the datasets find them)",
    )
    parser.add_argument(
        "--out", metavar="DIR", default=None,
        help=f"with --write-trainids: folder for the converted labels (default ROOT/{TRAINID_DIRNAME}); "
             "give it to the datasets as trainid_dir",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="with --write-trainids: replace converted labels that already exist (raw labels are never touched)",
    )
    return parser


def _stderr_progress(what: str) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        if done % 500 == 0 or (done == total and total >= 500):
            print(f"  {what} {done}/{total}", file=sys.stderr, flush=True)
    return report


def run(args: argparse.Namespace) -> int:
    """Run ``prepare-data``: print the report; 0 when clean, 1 when problems were found or the
    labels could not be written, 2 for unusable arguments or a missing folder."""
    if (args.out is not None or args.overwrite) and not args.write_trainids:
        print("prepare-data: --out and --overwrite only apply with --write-trainids", file=sys.stderr)
        return 2
    try:
        report = validate_dataset(
            args.kind, args.root, split_list=args.split_list, split=args.split, progress=_stderr_progress("checked")
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"prepare-data: {error}", file=sys.stderr)
        return 2
    print(report)
    status = 0 if report.ok else 1
    if not args.write_trainids:
        return status
    if report.unreadable or report.wrong_format or report.images_without_labels or report.split_list_missing:
        print("trainId labels not written: fix the unreadable, wrong-format or missing files above first")
        return 1
    try:
        written = write_trainid_labels(
            args.kind, args.root, out_dir=args.out, overwrite=args.overwrite, split_list=args.split_list,
            split=args.split, progress=_stderr_progress("written"),
        )
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"trainId labels not written: {error}")
        return 1
    out_dir = args.out if args.out is not None else os.path.join(args.root, TRAINID_DIRNAME)
    print(f"wrote {len(written)} trainId label(s) under {out_dir}")
    return status
