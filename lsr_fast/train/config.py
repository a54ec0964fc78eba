"""Training configuration: one schema with a default, a type and a help line per key.

A config is a nested dict. ``load_config`` starts from the defaults, merges a YAML file (read
with ``yaml.safe_load``) and ``key=value`` overrides (values parsed as YAML scalars/lists), and
checks every key and type before anything is built: an unknown key, a wrong type or a value
outside its choices is a ``ConfigError`` naming the dotted key. ``describe()`` renders the
schema for ``lsr-fast train --help``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml


class ConfigError(ValueError):
    """A configuration key, type or value that cannot be used (the message names the key)."""


@dataclass(frozen=True)
class Field:
    default: Any
    kind: str  # "int" | "float" | "bool" | "str" | "size" (two positive ints) | "path"
    help: str
    choices: Optional[Tuple[Any, ...]] = None
    nullable: bool = False


DATASETS = ("synthetic", "gta5", "synthia", "cityscapes")


def _dataset_fields(name: str, split: str, domain: str, resize, n: int, seed: int) -> Dict[str, Field]:
    return {
        "name": Field(name, "str", "dataset: synthetic (built in, no files), gta5, synthia or cityscapes", DATASETS),
        "root": Field(None, "path", "dataset root folder (not used by synthetic)", nullable=True),
        "split": Field(split, "str", "Cityscapes split folder (train or val)", ("train", "val", "test")),
        "split_list": Field(None, "path", "optional text file listing the images to use, one name per line", nullable=True),
        "exclude_list": Field(None, "path", "optional text file listing images to leave out (e.g. the held-out selection "
                              "images of the target's training split)", nullable=True),
        "domain": Field(domain, "str", "synthetic scenes: which look (source = flat synthetic, target = shifted)", ("source", "target")),
        "num_images": Field(n, "int", "synthetic scenes: how many images"),
        "size": Field([128, 256], "size", "synthetic scenes: generated size [height, width]"),
        "seed": Field(seed, "int", "synthetic scenes: generator seed (keep train and val seeds apart)"),
        "resize": Field(resize, "size", "network input size [height, width] (labels nearest; eval labels stay full size)", nullable=True),
        "max_images": Field(None, "int", "use only the first N images (quick runs, validation subsets)", nullable=True),
    }


SCHEMA: Dict[str, Any] = {
    "name": Field("run", "str", "run name (the run folder is out_dir)"),
    "out_dir": Field("runs/run", "path", "run folder: checkpoints, metrics.jsonl, TensorBoard logs, config.yaml"),
    "mode": Field("lsr", "str", "lsr: source CE + LSR terms on source and target; source_only: source CE; "
                  "target_only: CE on labelled target images (the supervised reference for mASR)",
                  ("lsr", "source_only", "target_only")),
    "seed": Field(0, "int", "seed of weights init, sampling order and augmentation"),
    "deterministic": Field(False, "bool", "torch.use_deterministic_algorithms and deterministic cuDNN"),
    "device": Field("auto", "str", "auto (cuda if available), cpu, cuda or cuda:N"),
    "backend": Field("auto", "str", "LSR op backend: auto, reference, cpp, cuda or triton",
                     ("auto", "reference", "cpp", "cuda", "triton")),
    "threads": Field(None, "int", "CPU threads for torch (default: torch's choice)", nullable=True),
    "init": Field(None, "path", "start from this checkpoint's model weights (e.g. the source-only run's best.pt)", nullable=True),
    "model": {
        "backbone": Field("resnet101", "str", "DeepLabV2 backbone", ("resnet101", "resnet50", "resnet18")),
        "width": Field(64, "int", "backbone stem width (64 = standard ResNet; smaller for tiny CPU runs)"),
        "batchnorm": Field("frozen", "str", "frozen (eval-mode BN, as DeepLab UDA code with batch 1) or train", ("frozen", "train")),
        "two_branch_aspp": Field(False, "bool", "reproduce earlier code's ASPP that summed only 2 of its 4 branches"),
        "pretrained": Field(None, "path", "ImageNet ResNet or DeepLab init weights file (torchvision or Scale./module. keys)", nullable=True),
        "channels_last": Field(False, "bool", "run the network in channels_last memory format"),
        "align_corners": Field(False, "bool", "upsample logits to label size with align_corners=True (the released "
                               "code, AdaptSegNet and ADVENT) or False; training, validation, eval and analysis alike"),
    },
    "data": {
        "num_classes": Field(19, "int", "19 (GTA5/Cityscapes) or 16 (SYNTHIA subset)", (19, 16)),
        "normalize": Field("imagenet", "str", "input normalisation matching the weights", ("imagenet", "caffe", "none")),
        "workers": Field(0, "int", "DataLoader worker processes per domain"),
        "crop": Field(None, "size", "random crop [height, width] of training images after resizing", nullable=True),
        "flip": Field(True, "bool", "random horizontal flips of training images"),
        "white_point": Field(75.0, "float", "white-point rebalancing range U(-x, x) per channel (0 = off)"),
        "jitter": Field(25.0, "float", "colour jitter range U(-x, x) per channel (0 = off)"),
        "blur_prob": Field(0.5, "float", "probability of a random Gaussian blur"),
        "source": _dataset_fields("gta5", "train", "source", [720, 1280], 200, 0),
        "target": _dataset_fields("cityscapes", "train", "target", [512, 1024], 200, 1),
        "val": _dataset_fields("cityscapes", "val", "target", [512, 1024], 50, 2),
    },
    "optim": {
        "lr": Field(2.5e-4, "float", "base learning rate of the backbone (SGD)"),
        "momentum": Field(0.9, "float", "SGD momentum"),
        "weight_decay": Field(5e-4, "float", "SGD weight decay"),
        "poly_power": Field(0.9, "float", "poly schedule: lr * (1 - step / poly_steps) ** power"),
        "poly_steps": Field(None, "int", "horizon of the poly schedule (default train.steps; the paper decays over "
                            "250000 and stops at 27450)", nullable=True),
        "classifier_lr_mult": Field(10.0, "float", "learning-rate multiplier of the ASPP classifier"),
    },
    "train": {
        "steps": Field(250000, "int", "optimisation steps: where training stops (the poly horizon is optim.poly_steps)"),
        "batch_source": Field(1, "int", "source images per step (labelled images in target_only mode)"),
        "batch_target": Field(1, "int", "target images per step (lsr mode)"),
        "amp": Field("none", "str", "autocast dtype: none, bf16 or fp16 (fp16 uses a GradScaler)", ("none", "bf16", "fp16")),
        "log_every": Field(50, "int", "read loss values to the host (progress bar, jsonl, TensorBoard) every N steps"),
        "val_every": Field(2000, "int", "validate every N steps (0 = only at the end)"),
        "checkpoint_every": Field(2000, "int", "write last.pt every N steps (0 = only at validation and the end)"),
        "early_stop_patience": Field(None, "int", "stop after N validations without a better mIoU", nullable=True),
        "eval_flip": Field(False, "bool", "validation also averages horizontally flipped predictions"),
        "max_nonfinite": Field(10, "int", "stop with an error after this many non-finite losses in a row (each one is skipped)"),
        "progress": Field(True, "bool", "show a progress bar"),
        "tensorboard": Field(True, "bool", "write TensorBoard scalars under out_dir/tb"),
    },
    "lsr": {
        "preset": Field(None, "str", "start from the published weights of gta5 or synthia, with the paper's equations, "
                        "or of gta5_released / synthia_released with the released code's loss forms they were tuned on",
                        ("gta5", "synthia", "gta5_released", "synthia_released"), nullable=True),
        "lambda_cluster": Field(0.1, "float", "weight of the clustering terms (Eq. 5)"),
        "lambda_perp": Field(0.2, "float", "weight of the perpendicularity term (Eq. 6)"),
        "lambda_norm": Field(0.025, "float", "weight of the norm alignment terms (Eqs. 7-8)"),
        "lambda_entropy": Field(0.1, "float", "weight of the image-wise MaxSquare term (L+); 0 = Eq. 4"),
        "alpha": Field(0.2, "float", "MaxSquare image-wise class weight exponent"),
        "momentum": Field(0.8, "float", "prototype EMA momentum eta"),
        "norm_delta": Field(0.002, "float", "norm increment Delta over the mean source norm"),
        "label_threshold": Field(0.5, "float", "histogram downsampling threshold T_h"),
        "confidence": Field(0.5, "float", "pseudo-label confidence threshold T_p"),
        "prototype_init": Field("zero", "str", "zero (paper) or first (first batch prototype)", ("zero", "first")),
        "clustering_distance": Field("squared_l2", "str", "squared_l2 (Eq. 5) or l1_mean (the released code's form)",
                                     ("squared_l2", "l1_mean")),
        "norm_form": Field("paper", "str", "paper (Eqs. 7-8, r from the previous step) or released (relative, "
                           "filtered, n from the current batch, no target hinge)", ("paper", "released")),
    },
    "experiment": {
        "source_config": Field(None, "path", "lsr-fast experiment: the source pre-training stage's own config file "
                               "(the paper pre-trains with another recipe); default: this config with mode source_only",
                               nullable=True),
        "target_only": Field(True, "bool", "lsr-fast experiment: also train the target-supervised reference of mASR "
                             "(off: mASR against the paper's target-only table)"),
        "adapt_steps": Field(None, "int", "lsr-fast experiment: LSR adaptation steps, starting from the source-only run "
                             "(default train.steps)", nullable=True),
        "adapt_lr": Field(None, "float", "lsr-fast experiment: base learning rate of the LSR run (default optim.lr)", nullable=True),
        "control": Field(True, "bool", "lsr-fast experiment: also continue the source-only run for adapt_steps without LSR "
                         "(same init, steps and lr), which separates LSR's gain from that of more training"),
        "test_images": Field(100, "int", "lsr-fast experiment: held-out synthetic target images of the final table"),
        "test_seed": Field(3, "int", "lsr-fast experiment: seed of those test images (apart from train and val seeds)"),
        "test_split": Field("val", "str", "lsr-fast experiment, Cityscapes: the split of the final table (data.val "
                            "selects checkpoints, e.g. on a held-out list of the train split)", ("train", "val", "test")),
        "test_max_images": Field(None, "int", "lsr-fast experiment, real datasets: score only the first N test images",
                                 nullable=True),
    },
}


def defaults() -> Dict[str, Any]:
    def walk(node):
        return {k: walk(v) if isinstance(v, dict) else copy.deepcopy(v.default) for k, v in node.items()}
    return walk(SCHEMA)


def _check_value(key: str, field: Field, value: Any) -> Any:
    if value is None:
        if field.nullable:
            return None
        raise ConfigError(f"{key} must not be null")
    kind = field.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        value = float(value)
        if value != value or value < 0:
            raise ConfigError(f"{key} must be a number >= 0, got {value}")
    elif kind in ("str", "path"):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key} must be a non-empty string, got {value!r}")
    elif kind == "size":
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            raise ConfigError(f"{key} must be [height, width], two positive integers, got {value!r}")
        value = [int(v) for v in value]
    if field.choices is not None and value not in field.choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, field.choices))}; got {value!r}")
    return value


def _merge(config: Dict[str, Any], schema: Dict[str, Any], update: Dict[str, Any], prefix: str, source: str) -> None:
    if not isinstance(update, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} in {source} must be a mapping, got {type(update).__name__}")
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise ConfigError(f"unknown config key {dotted!r} in {source} (known here: {known})")
        if isinstance(schema[key], dict):
            _merge(config[key], schema[key], value, dotted + ".", source)
        else:
            config[key] = _check_value(dotted, schema[key], value)


def parse_override(text: str) -> Tuple[str, Any]:
    """``a.b.c=value`` -> ("a.b.c", parsed value); the value is read as a YAML scalar or list."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {key}: cannot parse {raw!r} ({error})") from None
    return key, value


def _nest(key: str, value: Any) -> Dict[str, Any]:
    node: Dict[str, Any] = {}
    cursor = node
    parts = key.split(".")
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value
    return node


def read_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, "r", encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def build_config(base: Optional[Dict[str, Any]] = None, overrides: Iterable[str] = (), *, source: str = "config") -> Dict[str, Any]:
    """Defaults, then ``base`` (a nested dict), then ``key=value`` overrides; all checked."""
    config = defaults()
    if base:
        preset = base.get("lsr", {}).get("preset") if isinstance(base.get("lsr"), dict) else None
        _apply_preset(config, preset, source)
        _merge(config, SCHEMA, base, "", source)
    for text in overrides:
        key, value = parse_override(text)
        if key == "lsr.preset":
            _apply_preset(config, value, "overrides")
        _merge(config, SCHEMA, _nest(key, value), "", "overrides")
    validate(config, source)
    return config


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    return build_config(read_yaml(path) if path else None, overrides, source=path or "config")


def _apply_preset(config: Dict[str, Any], preset: Any, source: str) -> None:
    """A preset sets the published weights first; explicit lsr.* keys then override them."""
    if preset is None:
        return
    from ..regularizer import PRESETS

    if preset not in PRESETS:
        raise ConfigError(f"lsr.preset in {source} must be one of {', '.join(sorted(PRESETS))}, got {preset!r}")
    for key, value in PRESETS[preset].items():
        if key == "num_classes":
            config["data"]["num_classes"] = value
        else:
            config["lsr"][key] = value


def poly_steps(config: Dict[str, Any]) -> int:
    """The poly schedule's horizon: optim.poly_steps, or train.steps when it is null."""
    return config["optim"]["poly_steps"] if config["optim"]["poly_steps"] is not None else config["train"]["steps"]


def validate(config: Dict[str, Any], source: str = "config") -> None:
    """Checks across keys (single keys were checked while merging); ``source`` names the file."""
    steps, horizon = config["train"]["steps"], config["optim"]["poly_steps"]
    if horizon is not None and horizon < steps:
        raise ConfigError(f"train.steps ({steps}) exceeds optim.poly_steps ({horizon}) in {source}: the learning rate "
                          f"would reach 0 at step {horizon} and stay there; raise optim.poly_steps or lower train.steps")
    crop = config["data"]["crop"]
    if crop is not None:
        roles = ("target",) if config["mode"] == "target_only" else ("source", "target") if config["mode"] == "lsr" else ("source",)
        for role in roles:
            spec = config["data"][role]
            size = spec["resize"] if spec["resize"] is not None else (spec["size"] if spec["name"] == "synthetic" else None)
            if size is not None and (crop[0] > size[0] or crop[1] > size[1]):
                key = f"data.{role}.resize" if spec["resize"] is not None else f"data.{role}.size"
                raise ConfigError(f"data.crop {crop} is larger than the {role} images ({key} {size}) in {source}")
    for key in ("momentum", "alpha", "label_threshold", "confidence"):
        if not 0.0 <= config["lsr"][key] <= 1.0:
            raise ConfigError(f"lsr.{key} must be in [0, 1], got {config['lsr'][key]}")
    if not 0.0 <= config["data"]["blur_prob"] <= 1.0:
        raise ConfigError(f"data.blur_prob must be in [0, 1], got {config['data']['blur_prob']}")
    if horizon is not None and horizon < 1:
        raise ConfigError(f"optim.poly_steps must be >= 1, got {horizon}")
    for key in ("steps", "batch_source", "batch_target", "log_every"):
        if config["train"][key] < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {config['train'][key]}")
    if config["model"]["width"] < 1:
        raise ConfigError(f"model.width must be >= 1, got {config['model']['width']}")
    for role in ("source", "target", "val"):
        spec = config["data"][role]
        if spec["name"] != "synthetic" and spec["root"] is None:
            raise ConfigError(f"data.{role}.root must be set for the {spec['name']} dataset")
        if spec["name"] == "synthetic" and spec["num_images"] < 1:
            raise ConfigError(f"data.{role}.num_images must be >= 1")
    device = config["device"]
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")


def check_paths(config: Dict[str, Any]) -> None:
    """Files and folders the run needs exist (checked before training starts)."""
    checks: List[Tuple[str, Optional[str], str]] = [
        ("init", config["init"], "file"), ("model.pretrained", config["model"]["pretrained"], "file"),
    ]
    for role in ("source", "target", "val"):
        spec = config["data"][role]
        if spec["name"] != "synthetic":
            checks.append((f"data.{role}.root", spec["root"], "dir"))
            checks.append((f"data.{role}.split_list", spec["split_list"], "file"))
            checks.append((f"data.{role}.exclude_list", spec["exclude_list"], "file"))
    for key, path, kind in checks:
        if path is None:
            continue
        exists = os.path.isdir(path) if kind == "dir" else os.path.isfile(path)
        if not exists:
            raise ConfigError(f"{key}: {'folder' if kind == 'dir' else 'file'} {path} does not exist")


def check_protocol(config: Dict[str, Any], source: str = "config") -> None:
    """Checks a run makes before it starts, reading list files but no images: BatchNorm frozen
    with nothing to freeze, and selection images that the run also trains on."""
    m = config["model"]
    if m["batchnorm"] == "frozen" and m["pretrained"] is None and config["init"] is None:
        # Frozen BN keeps identity statistics without weights; through ResNet-101 the activations
        # then grow by orders of magnitude (CE 3e5 at step 1, NaN at step 2 when tried).
        raise ConfigError(f"model.batchnorm is frozen but neither model.pretrained nor init gives BatchNorm statistics "
                          f"to freeze ({source}); set one of them, or model.batchnorm: train to learn the statistics")
    val = config["data"]["val"]
    train_role = "target" if config["mode"] == "target_only" else "source"
    roles = [train_role] + (["target"] if config["mode"] == "lsr" else [])
    for role in roles:
        spec = config["data"][role]
        if spec["name"] != val["name"] or spec["name"] == "synthetic" or spec["root"] != val["root"]:
            continue
        if spec["name"] == "cityscapes" and spec["split"] != val["split"]:
            continue
        overlap = _overlap(spec, val)
        if overlap:
            raise ConfigError(
                f"data.val selects on images that data.{role} trains on ({len(overlap)} shared, e.g. {sorted(overlap)[0]!r}) "
                f"in {source}: give data.val.split_list a held-out list and leave it out of data.{role} "
                f"(data.{role}.exclude_list or a disjoint data.{role}.split_list)")


def _list_names(path: Optional[str]) -> Optional[set]:
    if path is None:
        return None
    from ..data.datasets import read_split_list

    return set(read_split_list(path))


def _overlap(train: Dict[str, Any], val: Dict[str, Any]) -> set:
    """Names both sets use, from their lists alone; a side without a list stands for the whole
    split (named "(every image of the split)" when neither side has a list)."""
    train_names, val_names = _list_names(train["split_list"]), _list_names(val["split_list"])
    excluded = _list_names(train["exclude_list"]) or set()
    val_excluded = _list_names(val["exclude_list"]) or set()
    if train_names is not None:
        train_names -= excluded
        return train_names & (val_names - val_excluded) if val_names is not None else train_names - val_excluded
    if val_names is not None:
        return val_names - val_excluded - excluded
    return {"(every image of the split)"}


def describe() -> str:
    """Every key with its default and help, for --help."""
    lines: List[str] = []

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                default = "null" if value.default is None else yaml.safe_dump(value.default, default_flow_style=True).strip().removesuffix("...").strip()
                lines.append(f"  {prefix}{key} = {default}\n      {value.help}")
    walk(SCHEMA, "")
    return "\n".join(lines)


def to_yaml(config: Dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
