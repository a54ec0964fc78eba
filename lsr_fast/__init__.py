"""lsr_fast: fast kernels for Latent Space Regularization (Barbato et al., CVPRW 2021).

    import lsr_fast
    lsr_fast.available_backends()
    labels_small = lsr_fast.hist_downsample(labels, (91, 161), num_classes=19)
"""

from . import reference
from .ops import (
    BACKENDS,
    DeferredChecks,
    ValueCheckError,
    available_backends,
    class_feature_stats,
    clustering_loss,
    feature_terms,
    hist_downsample,
    maxsquare_loss,
    norm_alignment_loss,
    perpendicularity_loss,
    prototype_distances,
    pseudo_label_downsample,
    set_value_checks,
    value_checks,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "available_backends",
    "set_value_checks",
    "value_checks",
    "DeferredChecks",
    "ValueCheckError",
    "hist_downsample",
    "pseudo_label_downsample",
    "class_feature_stats",
    "clustering_loss",
    "perpendicularity_loss",
    "norm_alignment_loss",
    "maxsquare_loss",
    "prototype_distances",
    "reference",
]

from .eval.metrics import confusion_matrix, masr, mean_iou, per_class_iou  # noqa: E402
from .bank import PrototypeBank  # noqa: E402
from .regularizer import PRESETS, LSRRegularizer  # noqa: E402

# Load every backend now, not at the first op call: an import inside torch.compile(fullgraph=True)
# would break the graph.
available_backends()

__all__ += ["LSRRegularizer", "PrototypeBank", "PRESETS", "confusion_matrix", "per_class_iou", "mean_iou", "masr", "feature_terms"]
