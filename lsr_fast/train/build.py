"""From a checked config to the objects of a run: model, regulariser, datasets."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..regularizer import LSRRegularizer


def build_model(config: Dict[str, Any]) -> torch.nn.Module:
    from ..models import DeepLabV2

    m = config["model"]
    return DeepLabV2(config["data"]["num_classes"], m["backbone"], width=m["width"],
                     two_branch_aspp=m["two_branch_aspp"], batchnorm=m["batchnorm"])


def build_regularizer(config: Dict[str, Any], feature_dim: int) -> LSRRegularizer:
    lsr = {k: v for k, v in config["lsr"].items() if k != "preset"}
    # check_every=0: the trainer reads the deferred value checks itself, at its log steps and
    # before every checkpoint, where it synchronises anyway.
    return LSRRegularizer(config["data"]["num_classes"], feature_dim, backend=config["backend"], check_every=0, **lsr)


class _SynthiaSubsetLabels(torch.utils.data.Dataset):
    """19-class trainId labels renumbered to the 16-class SYNTHIA subset (for 16-class runs on
    the synthetic scenes)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        from ..data.labels import trainid_to_subset16

        item = dict(self.dataset[index])
        item["label"] = trainid_to_subset16(item["label"])
        return item


def _base_dataset(spec: Dict[str, Any], num_classes: int, *, role: str):
    from .. import data

    name = spec["name"]
    if name == "synthetic":
        dataset = data.SyntheticScenes(spec["domain"], spec["num_images"], size=tuple(spec["size"]), seed=spec["seed"])
        if num_classes == 16:
            dataset = _SynthiaSubsetLabels(dataset)
    elif name == "gta5":
        dataset = data.GTA5Dataset(spec["root"], split_list=spec["split_list"], exclude_list=spec["exclude_list"],
                                   num_classes=num_classes)
    elif name == "synthia":
        dataset = data.SynthiaDataset(spec["root"], split_list=spec["split_list"], exclude_list=spec["exclude_list"],
                                      num_classes=num_classes)
    elif name == "cityscapes":
        dataset = data.CityscapesDataset(spec["root"], split=spec["split"], split_list=spec["split_list"],
                                         exclude_list=spec["exclude_list"], num_classes=num_classes)
    else:  # the config schema only admits the names above
        raise ValueError(f"data.{role}.name: unknown dataset {name!r}")
    if spec["max_images"] is not None and spec["max_images"] < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(spec["max_images"]))
    return dataset


def check_datasets(config: Dict[str, Any], source: str = "config") -> None:
    """Every dataset the run uses can be listed: folders, split and exclude lists against them,
    a label for every image (no image is read). Raises ConfigError naming the key."""
    from .config import ConfigError

    labelled = "target" if config["mode"] == "target_only" else "source"
    for role in dict.fromkeys([labelled, "val"] + (["target"] if config["mode"] == "lsr" else [])):
        try:
            _base_dataset(config["data"][role], config["data"]["num_classes"], role=role)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(f"data.{role} ({source}): {error}") from None


def build_train_dataset(config: Dict[str, Any], role: str):
    """The augmented training set of ``role`` ("source" or "target"); items are keyed by
    (index, sample_seed) so augmentation is reproducible (see sampling.py)."""
    from ..data import AugmentedDataset, TrainTransform

    d = config["data"]
    spec = d[role]
    transform = TrainTransform(
        resize=None if spec["resize"] is None else tuple(spec["resize"]),
        crop=None if d["crop"] is None else tuple(d["crop"]), flip=d["flip"], white_point=d["white_point"],
        jitter=d["jitter"], blur_prob=d["blur_prob"], normalize=d["normalize"],
    )
    return AugmentedDataset(_base_dataset(spec, d["num_classes"], role=role), transform, seed=config["seed"])


def build_eval_dataset(config: Dict[str, Any], *, dataset: Optional[str] = None, root: Optional[str] = None,
                       split: Optional[str] = None, role: str = "val"):
    """Images at the network's input size, labels at full resolution. ``dataset``/``root``/
    ``split`` override the config's ``data.<role>`` entry (e.g. to evaluate on Cityscapes val a
    model whose config validated elsewhere)."""
    from ..data import AugmentedDataset, EvalTransform

    spec = dict(config["data"][role])
    if dataset is not None:
        spec["name"] = dataset
        if dataset != config["data"][role]["name"]:
            spec["root"], spec["split_list"], spec["exclude_list"] = None, None, None
    if root is not None:
        spec["root"] = root
    if split is not None:
        spec["split"] = split
    if spec["name"] != "synthetic" and spec["root"] is None:
        raise ValueError(f"the {spec['name']} dataset needs a root folder (--root)")
    base = _base_dataset(spec, config["data"]["num_classes"], role=role)
    transform = EvalTransform(resize=None if spec["resize"] is None else tuple(spec["resize"]), normalize=config["data"]["normalize"])
    return AugmentedDataset(base, transform, seed=0)
