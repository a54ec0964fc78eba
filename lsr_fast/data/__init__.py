"""Datasets (GTA5, SYNTHIA-RAND-CITYSCAPES, Cityscapes, built-in synthetic scenes), label tables,
transforms, and the ``prepare-data`` checks."""

from .datasets import (
    TRAINID_DIRNAME,
    AugmentedDataset,
    CityscapesDataset,
    FileFormatError,
    GTA5Dataset,
    SynthiaDataset,
    UnreadableFileError,
    read_split_list,
)
from .labels import (
    CITYSCAPES_ID_TO_TRAINID,
    CITYSCAPES_LUT,
    CLASS_NAMES_13,
    CLASS_NAMES_16,
    CLASS_NAMES_19,
    IGNORE_INDEX,
    PALETTE_16,
    PALETTE_19,
    SUBSET16_INVERSE_LUT,
    SUBSET16_LUT,
    SUBSET16_TO_TRAINID,
    SYNTHIA_ID_TO_TRAINID,
    SYNTHIA_LUT,
    TRAINID_TO_SUBSET16,
    cityscapes_to_trainid,
    colorize,
    subset16_to_trainid,
    synthia_to_trainid,
    trainid_to_subset16,
)
from .prepare import ValidationReport, validate_dataset, write_trainid_labels
from .synthetic import SyntheticScenes
from .transforms import (
    NORMALIZE_MODES,
    PAPER_SIZES,
    EvalTransform,
    TrainTransform,
    denormalize_image,
    normalize_image,
)

__all__ = [
    "GTA5Dataset", "SynthiaDataset", "CityscapesDataset", "AugmentedDataset", "SyntheticScenes",
    "TRAINID_DIRNAME", "UnreadableFileError", "FileFormatError", "read_split_list",
    "TrainTransform", "EvalTransform", "normalize_image", "denormalize_image", "PAPER_SIZES", "NORMALIZE_MODES",
    "validate_dataset", "write_trainid_labels", "ValidationReport",
    "IGNORE_INDEX", "CLASS_NAMES_19", "CLASS_NAMES_16", "CLASS_NAMES_13", "PALETTE_19", "PALETTE_16",
    "CITYSCAPES_ID_TO_TRAINID", "SYNTHIA_ID_TO_TRAINID", "TRAINID_TO_SUBSET16", "SUBSET16_TO_TRAINID",
    "CITYSCAPES_LUT", "SYNTHIA_LUT", "SUBSET16_LUT", "SUBSET16_INVERSE_LUT",
    "cityscapes_to_trainid", "synthia_to_trainid", "trainid_to_subset16", "subset16_to_trainid", "colorize",
]
