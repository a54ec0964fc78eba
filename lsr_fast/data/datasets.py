"""GTA5, SYNTHIA-RAND-CITYSCAPES and Cityscapes as PyTorch datasets.

Each dataset's item is ``dict(image=uint8 (3, H, W) RGB, label=int64 (H, W), name=str)`` with
labels in trainIds (19 classes, or the 16-class SYNTHIA subset renumbered 0..15 when
``num_classes=16``) and 255 for void. Nothing is resized here: the transforms do that.

Layouts (``root`` is the folder given):

* GTA5: ``root/images/NAME.png`` and ``root/labels/NAME.png``; labels are paletted PNGs whose
  indices are Cityscapes label ids. Sample name: ``NAME``.
* SYNTHIA-RAND-CITYSCAPES: ``root/RGB/NAME.png`` and ``root/GT/LABELS/NAME.png``; labels are
  16-bit 3-channel PNGs whose R channel is the class id. Sample name: ``NAME``.
* Cityscapes: ``root/leftImg8bit/SPLIT/CITY/BASE_leftImg8bit.png`` and
  ``root/gtFine/SPLIT/CITY/BASE_gtFine_labelIds.png``. Sample name:
  ``CITY/BASE_leftImg8bit``.

A split list is a text file with one sample name per line (a trailing ``.png`` is allowed, so
the lists published with earlier UDA code work as they are; blank lines and lines starting with
``#`` are skipped). The dataset then holds exactly those samples, in that order. An exclude
list (same format) leaves its samples out, e.g. the held-out selection images of a training split.

Converted labels: ``lsr-fast prepare-data ... --write-trainids`` writes each label once as an
8-bit trainId PNG at ``TRAINID_DIR/<label path relative to root>``, where TRAINID_DIR defaults to
``root/lsr_fast_trainids`` (``trainid_dir=`` points elsewhere, ``use_trainids=False`` ignores
them). A sample whose converted file exists is read from it (no 16-bit decoding, no table
lookup); the others are converted on the fly from the raw label.
"""

from __future__ import annotations

import hashlib
import operator
import os
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from .labels import CITYSCAPES_LUT, CLASS_NAMES_16, CLASS_NAMES_19, IGNORE_INDEX, SUBSET16_LUT, SYNTHIA_LUT

KINDS = ("gta5", "synthia", "cityscapes")
TRAINID_DIRNAME = "lsr_fast_trainids"

# Values a converted trainId label may hold: the 19 trainIds and void.
_VALID_TRAINID = np.zeros(256, dtype=bool)
_VALID_TRAINID[:19] = True
_VALID_TRAINID[IGNORE_INDEX] = True


class UnreadableFileError(ValueError):
    """A file exists but cannot be decoded as an image."""


class FileFormatError(ValueError):
    """A file decodes but is not in the expected format (mode, bit depth, channels, values)."""


# --------------------------------------------------------------------------------------------
# Readers


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")


def _open_pil(path: str, what: str) -> Image.Image:
    _require_file(path, what)
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableFileError(f"cannot read {what} {path}: {error}") from None


def read_image(path: str) -> np.ndarray:
    """An RGB image as uint8 (H, W, 3). RGBA is accepted only when fully opaque."""
    im = _open_pil(path, "image")
    if im.mode == "RGB":
        return np.array(im)
    if im.mode == "RGBA":
        array = np.array(im)
        if (array[..., 3] == 255).all():
            return np.ascontiguousarray(array[..., :3])
        raise FileFormatError(f"image {path} has a transparent alpha channel; expected an RGB image")
    raise FileFormatError(f"image {path} is in PIL mode {im.mode!r}; expected an RGB image")


def read_index_label(path: str) -> np.ndarray:
    """A paletted ("P") or 8-bit grey ("L") label as its uint8 (H, W) indices: the palette
    colours are not looked at (GTA5's indices are the Cityscapes label ids)."""
    im = _open_pil(path, "label")
    if im.mode not in ("P", "L"):
        raise FileFormatError(
            f"label {path} is in PIL mode {im.mode!r}; expected a paletted (P) or 8-bit grey (L) PNG of label ids"
        )
    return np.array(im)


def read_synthia_label(path: str) -> np.ndarray:
    """SYNTHIA class ids as uint16 (H, W): the R channel of a 16-bit 3-channel PNG."""
    import cv2  # only SYNTHIA needs OpenCV (PIL cannot read 16-bit colour PNGs)

    _require_file(path, "label")
    with open(path, "rb") as f:
        data = np.frombuffer(f.read(), dtype=np.uint8)
    # imdecode is cv2.imread's decoder on bytes: it needs no path encoding and returns None,
    # rather than raising, for data it cannot decode.
    array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if array is None:
        raise UnreadableFileError(f"cannot read label {path}: not an image OpenCV can decode")
    if array.dtype != np.uint16:
        raise FileFormatError(
            f"label {path} has {array.dtype} samples; SYNTHIA labels are 16-bit PNGs "
            f"(a converted trainId label belongs under {TRAINID_DIRNAME}/, not GT/LABELS)"
        )
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        channels = 1 if array.ndim == 2 else array.shape[2]
        raise FileFormatError(f"label {path} has {channels} channel(s); SYNTHIA labels have 3 (class id in R)")
    return np.ascontiguousarray(array[:, :, 2])  # OpenCV orders channels B, G, R(, A)


def read_trainid_label(path: str) -> np.ndarray:
    """A converted label (8-bit grey PNG of trainIds 0..18 and 255) as uint8 (H, W)."""
    im = _open_pil(path, "converted trainId label")
    if im.mode != "L":
        raise FileFormatError(f"converted trainId label {path} is in PIL mode {im.mode!r}; expected 8-bit grey (L)")
    array = np.array(im)
    bad = ~_VALID_TRAINID[array]
    if bad.any():
        values = sorted(int(v) for v in np.unique(array[bad]))
        raise FileFormatError(f"converted trainId label {path} holds values {values} that are not trainIds (0..18, 255)")
    return array


def read_raw_label(kind: str, path: str) -> np.ndarray:
    """The raw ids of one label file: uint8 for GTA5/Cityscapes, uint16 for SYNTHIA."""
    return read_synthia_label(path) if kind == "synthia" else read_index_label(path)


def raw_to_trainid(kind: str, raw: np.ndarray) -> np.ndarray:
    """Raw ids -> uint8 19-class trainIds (unlisted ids -> 255)."""
    return (SYNTHIA_LUT if kind == "synthia" else CITYSCAPES_LUT)[raw]


# --------------------------------------------------------------------------------------------
# Listing files


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path} does not exist (or is not a folder)")


def _pngs(folder: str) -> List[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(".png") and os.path.isfile(os.path.join(folder, f)))


class Listing:
    """What one dataset folder holds: images and raw labels found, keyed by sample name."""

    def __init__(self, kind: str, root: str, split: Optional[str] = None):
        if kind not in KINDS:
            raise ValueError(f"dataset kind must be one of {', '.join(KINDS)}, got {kind!r}")
        root = os.fspath(root)
        _require_dir(root, f"{kind} dataset root")
        self.kind, self.root, self.split = kind, root, split
        self.images: Dict[str, str] = {}
        self.labels: Dict[str, str] = {}
        if kind in ("gta5", "synthia"):
            if split is not None:
                raise ValueError(f"split applies to cityscapes only; {kind} has one folder of images (use a split list)")
            image_dir, label_dir = (("images", "labels") if kind == "gta5" else ("RGB", os.path.join("GT", "LABELS")))
            self.image_dir = os.path.join(root, image_dir)
            self.label_dir = os.path.join(root, label_dir)
            _require_dir(self.image_dir, f"{kind} image folder")
            _require_dir(self.label_dir, f"{kind} label folder")
            self.images = {f[:-4]: os.path.join(self.image_dir, f) for f in _pngs(self.image_dir)}
            self.labels = {f[:-4]: os.path.join(self.label_dir, f) for f in _pngs(self.label_dir)}
        else:
            if not split:
                raise ValueError("cityscapes needs a split (e.g. 'train' or 'val')")
            self.image_dir = os.path.join(root, "leftImg8bit", split)
            self.label_dir = os.path.join(root, "gtFine", split)
            _require_dir(self.image_dir, "cityscapes image folder")
            _require_dir(self.label_dir, "cityscapes label folder")
            for city in sorted(os.listdir(self.image_dir)):
                folder = os.path.join(self.image_dir, city)
                if os.path.isdir(folder):
                    for f in _pngs(folder):
                        if f.endswith("_leftImg8bit.png"):
                            self.images[f"{city}/{f[:-4]}"] = os.path.join(folder, f)
            for city in sorted(os.listdir(self.label_dir)):
                folder = os.path.join(self.label_dir, city)
                if os.path.isdir(folder):
                    for f in _pngs(folder):
                        if f.endswith("_gtFine_labelIds.png"):
                            base = f[: -len("_gtFine_labelIds.png")]
                            self.labels[f"{city}/{base}_leftImg8bit"] = os.path.join(folder, f)

    def label_path(self, name: str) -> str:
        """Where the raw label of sample ``name`` is (whether or not it exists)."""
        if self.kind == "cityscapes":
            city, stem = name.split("/", 1)
            base = stem[: -len("_leftImg8bit")]
            return os.path.join(self.label_dir, city, f"{base}_gtFine_labelIds.png")
        return os.path.join(self.label_dir, f"{name}.png")


def trainid_path(root: str, label_path: str, trainid_dir: Optional[str] = None) -> str:
    """Where the converted trainId label of ``label_path`` lives: its path relative to ``root``,
    under ``trainid_dir`` (default ``root/lsr_fast_trainids``)."""
    root = os.fspath(root)
    base = os.fspath(trainid_dir) if trainid_dir is not None else os.path.join(root, TRAINID_DIRNAME)
    return os.path.join(base, os.path.relpath(label_path, root))


def read_split_list(path: str) -> List[str]:
    """Sample names from a split list: one per line, an optional ``.png`` dropped, blank lines
    and ``#`` comments skipped."""
    path = os.fspath(path)
    _require_file(path, "split list")
    names = []
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            name = line.strip()
            if not name or name.startswith("#"):
                continue
            names.append(name[:-4] if name.endswith(".png") else name)
    return names


def select_names(listing: Listing, split_list: Optional[str], exclude_list: Optional[str] = None) -> List[str]:
    """The listing's sample names, sorted, or those of the split list in its order, less those
    of the exclude list (a listed name without an image is an error naming the list and the name)."""
    names = sorted(listing.images) if split_list is None else read_split_list(split_list)
    lists = [(split_list, names)] if split_list is not None else []
    excluded = read_split_list(exclude_list) if exclude_list is not None else []
    if exclude_list is not None:
        lists.append((exclude_list, excluded))
    for path, listed in lists:
        for name in listed:
            if name not in listing.images:
                raise ValueError(f"split list {os.fspath(path)}: {name!r} has no image in {listing.image_dir}")
    if excluded:
        dropped = set(excluded)
        names = [n for n in names if n not in dropped]
    return names


# --------------------------------------------------------------------------------------------
# Datasets


class _SegmentationDataset(torch.utils.data.Dataset):
    kind = ""

    def __init__(
        self,
        root: str,
        *,
        split: Optional[str],
        split_list: Optional[str],
        exclude_list: Optional[str] = None,
        num_classes: int,
        trainid_dir: Optional[str],
        use_trainids: bool,
    ):
        if num_classes not in (19, 16):
            raise ValueError(f"num_classes must be 19 or 16 (the SYNTHIA subset), got {num_classes!r}")
        self.num_classes = num_classes
        self.class_names = CLASS_NAMES_19 if num_classes == 19 else CLASS_NAMES_16
        listing = Listing(self.kind, root, split)
        self.root = listing.root
        self.image_dir, self.label_dir = listing.image_dir, listing.label_dir
        self.trainid_dir = (
            os.fspath(trainid_dir) if trainid_dir is not None else os.path.join(self.root, TRAINID_DIRNAME)
        )
        names = select_names(listing, split_list, exclude_list)
        if not names:
            where = f"split list {os.fspath(split_list)}" if split_list is not None else listing.image_dir
            raise ValueError(f"{self.kind} dataset is empty: no images in {where}")
        # (name, image path, label path, True when the label is a converted trainId file)
        self.samples: List[Tuple[str, str, str, bool]] = []
        for name in names:
            raw = listing.label_path(name)
            converted = trainid_path(self.root, raw, self.trainid_dir)
            if use_trainids and os.path.isfile(converted):
                self.samples.append((name, listing.images[name], converted, True))
            elif os.path.isfile(raw):
                self.samples.append((name, listing.images[name], raw, False))
            else:
                raise FileNotFoundError(f"image {listing.images[name]} has no label: {raw} does not exist")

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r}, {len(self)} samples, num_classes={self.num_classes})"

    @property
    def names(self) -> List[str]:
        return [s[0] for s in self.samples]

    def load_trainids(self, index: int) -> np.ndarray:
        """The 19-class trainId label of sample ``index`` as uint8 (H, W)."""
        _, _, label_path, converted = self.samples[index]
        if converted:
            return read_trainid_label(label_path)
        return raw_to_trainid(self.kind, read_raw_label(self.kind, label_path))

    def __getitem__(self, index: int) -> dict:
        name, image_path, label_path, _ = self.samples[index]
        image = read_image(image_path)
        label = self.load_trainids(index)
        if image.shape[:2] != label.shape:
            raise ValueError(
                f"image {image_path} is {image.shape[1]}x{image.shape[0]} but label {label_path} is "
                f"{label.shape[1]}x{label.shape[0]} (width x height)"
            )
        if self.num_classes == 16:
            label = SUBSET16_LUT[label]
        return dict(
            image=torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            label=torch.from_numpy(label.astype(np.int64)),
            name=name,
        )


class GTA5Dataset(_SegmentationDataset):
    """GTA5: ``root/images/*.png`` with paletted ``root/labels/*.png`` (indices = Cityscapes ids)."""

    kind = "gta5"

    def __init__(self, root, *, split_list=None, exclude_list=None, num_classes=19, trainid_dir=None, use_trainids=True):
        super().__init__(root, split=None, split_list=split_list, exclude_list=exclude_list, num_classes=num_classes,
                         trainid_dir=trainid_dir, use_trainids=use_trainids)


class SynthiaDataset(_SegmentationDataset):
    """SYNTHIA-RAND-CITYSCAPES: ``root/RGB/*.png`` with 16-bit ``root/GT/LABELS/*.png``
    (class id in the R channel). ``num_classes`` defaults to the 16-class subset."""

    kind = "synthia"

    def __init__(self, root, *, split_list=None, exclude_list=None, num_classes=16, trainid_dir=None, use_trainids=True):
        super().__init__(root, split=None, split_list=split_list, exclude_list=exclude_list, num_classes=num_classes,
                         trainid_dir=trainid_dir, use_trainids=use_trainids)


class CityscapesDataset(_SegmentationDataset):
    """Cityscapes: ``root/leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with
    ``root/gtFine/{split}/{city}/*_gtFine_labelIds.png``."""

    kind = "cityscapes"

    def __init__(self, root, *, split="val", split_list=None, exclude_list=None, num_classes=19, trainid_dir=None,
                 use_trainids=True):
        super().__init__(root, split=split, split_list=split_list, exclude_list=exclude_list, num_classes=num_classes,
                         trainid_dir=trainid_dir, use_trainids=use_trainids)


def derive_seed(seed: int, index: int, sample_seed: int) -> int:
    """A 63-bit generator seed from (dataset seed, sample index, per-draw seed), the same in every
    process and Python version (hash() of a tuple is not guaranteed to be)."""
    digest = hashlib.sha256(f"lsr_fast/{seed}/{index}/{sample_seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class AugmentedDataset(torch.utils.data.Dataset):
    """A dataset with a random transform whose draws depend on the key alone.

    ``dataset[key]``: key is an index, or an ``(index, sample_seed)`` tuple (an index alone means
    sample_seed 0). The transform gets a ``torch.Generator`` seeded from (seed, index,
    sample_seed), so the same key gives the same augmented sample in any worker, epoch or run:
    a trainer that records its keys resumes exactly. Returns dict(image=float32 (3, h, w),
    label=int64 (h, w), name, index).
    """

    def __init__(self, dataset, transform: Callable, seed: int = 0):
        self.dataset = dataset
        self.transform = transform
        self.seed = operator.index(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"AugmentedDataset({self.dataset!r}, {self.transform!r}, seed={self.seed})"

    def generator(self, index: int, sample_seed: int = 0) -> torch.Generator:
        """The generator the transform gets for (index, sample_seed)."""
        return torch.Generator().manual_seed(derive_seed(self.seed, index, sample_seed))

    def __getitem__(self, key) -> dict:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise TypeError(f"key must be an index or an (index, sample_seed) pair, got {key!r}")
            index, draw = operator.index(key[0]), operator.index(key[1])
        else:
            index, draw = operator.index(key), 0
        n = len(self.dataset)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for a dataset of {n} samples")
        index %= n  # -1 and n-1 are the same sample, with the same augmentation
        item = self.dataset[index]
        image, label = self.transform(item["image"], item["label"], self.generator(index, draw))
        return dict(image=image, label=label, name=item["name"], index=index)
