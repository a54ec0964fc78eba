"""The paper's latent-space analysis (Barbato et al. 2021, Figs. 3b/4-7) and training-time scalars.

    stats = collect(model, batches, num_classes)          # one bounded-memory pass per checkpoint
    make_figures([Run.from_regularizer("LSR", stats, reg)], "out/")
    lsr-fast analyze --checkpoint A.pt --compare B.pt --out figures/   # the same from the shell

For TensorBoard during training: ``class_mean_norms``, ``latent_scalars``, ``log_latent_scalars``.
"""

from .cli import analyze_checkpoints
from .features import DownsampleStats, FeatureStats, collect
from .figures import FIGURES, Run, class_colours, class_names, make_figures
from .sampler import ClassReservoir
from .stats import (
    angle_matrix,
    angles_to_prototype,
    class_histogram,
    class_mean_norms,
    latent_scalars,
    log_latent_scalars,
    mean_angle_to_others,
    mean_prototype_angle,
    nearest_downsample,
    norm_interval,
    row_normalise,
)

__all__ = [
    "FIGURES", "Run", "analyze_checkpoints", "ClassReservoir", "DownsampleStats", "FeatureStats", "collect", "make_figures",
    "class_names", "class_colours", "angle_matrix", "angles_to_prototype", "class_histogram",
    "class_mean_norms", "latent_scalars", "log_latent_scalars", "mean_angle_to_others",
    "mean_prototype_angle", "nearest_downsample", "norm_interval", "row_normalise",
]
