"""Training: config, trainer, checkpoints, the main job (``lsr-fast train|experiment``)."""

from .checkpoint import load_checkpoint, load_for_inference, save_checkpoint
from .config import ConfigError, build_config, load_config
from .trainer import Trainer, train

__all__ = ["ConfigError", "Trainer", "build_config", "load_checkpoint", "load_config", "load_for_inference",
           "save_checkpoint", "train"]
