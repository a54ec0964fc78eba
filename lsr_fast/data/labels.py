"""Label tables: raw dataset ids -> Cityscapes trainIds, the SYNTHIA 16-class subset, palette.

Every table is given as a dict (the facts, readable) and as a lookup table (LUT) indexed by the
raw value, so a whole label map is converted with one fancy-indexing step. Unlisted values map
to ``IGNORE_INDEX`` (255), the void label of every loss and metric in the package.

    trainids = cityscapes_to_trainid(label_ids)        # numpy or torch, same type back
    subset = trainid_to_subset16(trainids)             # SYNTHIA->Cityscapes evaluation
"""

from __future__ import annotations

from typing import Dict, Union

import numpy as np
import torch

from ..eval.metrics import CLASS_NAMES_19, SUBSET_13, SUBSET_16

IGNORE_INDEX = 255

# Cityscapes labelIds -> trainIds (GTA5's paletted label indices are these same ids).
CITYSCAPES_ID_TO_TRAINID: Dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
# All Cityscapes label ids (0..33); ids outside this range are not Cityscapes classes at all,
# which data validation reports (ids inside it but not trained on, e.g. 0 "unlabeled", are fine).
CITYSCAPES_LABEL_NAMES = (
    "unlabeled", "ego vehicle", "rectification border", "out of roi", "static", "dynamic",
    "ground", "road", "sidewalk", "parking", "rail track", "building", "wall", "fence",
    "guard rail", "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan",
    "trailer", "train", "motorcycle", "bicycle",
)

# SYNTHIA-RAND-CITYSCAPES class ids (R channel of the 16-bit labels) -> trainIds.
SYNTHIA_ID_TO_TRAINID: Dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9,
    1: 10, 10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}
# SYNTHIA's own class list (ids 0..22), for validation reports.
SYNTHIA_LABEL_NAMES = (
    "void", "sky", "building", "road", "sidewalk", "fence", "vegetation", "pole", "car",
    "traffic sign", "pedestrian", "bicycle", "motorcycle", "parking-slot", "road-work",
    "traffic light", "terrain", "rider", "truck", "bus", "train", "wall", "lanemarking",
)

# The 16-class SYNTHIA subset: trainId SUBSET_16[k] is subset class k (and back).
TRAINID_TO_SUBSET16: Dict[int, int] = {t: k for k, t in enumerate(SUBSET_16)}
SUBSET16_TO_TRAINID: Dict[int, int] = dict(enumerate(SUBSET_16))

CLASS_NAMES_16 = tuple(CLASS_NAMES_19[t] for t in SUBSET_16)
CLASS_NAMES_13 = tuple(CLASS_NAMES_19[t] for t in SUBSET_13)

# The standard Cityscapes colours of the 19 trainIds (RGB).
PALETTE_19 = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)
PALETTE_16 = PALETTE_19[list(SUBSET_16)]


def _make_lut(table: Dict[int, int], size: int) -> np.ndarray:
    lut = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for source, target in table.items():
        lut[source] = target
    lut.setflags(write=False)  # shared module state: nobody may edit it by accident
    return lut


# LUTs, indexed by the raw value. Cityscapes/GTA5 ids are 8-bit; SYNTHIA's are 16-bit.
CITYSCAPES_LUT = _make_lut(CITYSCAPES_ID_TO_TRAINID, 256)
SYNTHIA_LUT = _make_lut(SYNTHIA_ID_TO_TRAINID, 65536)
SUBSET16_LUT = _make_lut(TRAINID_TO_SUBSET16, 256)
SUBSET16_INVERSE_LUT = _make_lut(SUBSET16_TO_TRAINID, 256)

ArrayLike = Union[np.ndarray, torch.Tensor]


def apply_lut(lut: np.ndarray, values: ArrayLike) -> ArrayLike:
    """``lut[values]`` for a numpy array (uint8 result) or a torch tensor (int64 result, on the
    tensor's device). A value outside [0, len(lut)) is an error, never wrapped or clamped."""
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {values.dtype}")
        if values.numel():
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= len(lut):
                bad = low if low < 0 else high
                raise ValueError(f"label value {bad} is outside the table's range [0, {len(lut)})")
        return torch.tensor(lut, dtype=torch.int64, device=values.device)[values.long()]
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"labels must be an integer array, got {values.dtype}")
    if values.size:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= len(lut):
            bad = low if low < 0 else high
            raise ValueError(f"label value {bad} is outside the table's range [0, {len(lut)})")
    return lut[values]


def cityscapes_to_trainid(label_ids: ArrayLike) -> ArrayLike:
    """Cityscapes (or GTA5) label ids in [0, 255] -> trainIds, 255 for every unlisted id."""
    return apply_lut(CITYSCAPES_LUT, label_ids)


def synthia_to_trainid(class_ids: ArrayLike) -> ArrayLike:
    """SYNTHIA class ids in [0, 65535] -> trainIds, 255 for every unlisted id."""
    return apply_lut(SYNTHIA_LUT, class_ids)


def trainid_to_subset16(trainids: ArrayLike) -> ArrayLike:
    """19-class trainIds -> the 16-class subset ids (terrain, truck, train and void -> 255)."""
    return apply_lut(SUBSET16_LUT, trainids)


def subset16_to_trainid(subset_ids: ArrayLike) -> ArrayLike:
    """16-class subset ids -> 19-class trainIds (255 stays 255)."""
    return apply_lut(SUBSET16_INVERSE_LUT, subset_ids)


def colorize(labels: ArrayLike, num_classes: int = 19) -> np.ndarray:
    """Colour a (H, W) trainId map (19 classes, or the 16-class subset) with the Cityscapes
    palette: uint8 (H, W, 3), void (255) black. Any other value outside [0, C) is an error."""
    if num_classes == 19:
        palette = PALETTE_19
    elif num_classes == 16:
        palette = PALETTE_16
    else:
        raise ValueError(f"num_classes must be 19 or 16 for the Cityscapes palette, got {num_classes}")
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a (H, W) map, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(f"label value {labels[bad][0]} is neither in [0, {num_classes}) nor {IGNORE_INDEX}")
    # Row num_classes of the extended palette is black, for void.
    extended = np.concatenate([palette, np.zeros((1, 3), np.uint8)])
    return extended[np.where(labels == IGNORE_INDEX, num_classes, labels)]
