"""kif_jax: Recurrent-KIF (ACL 2025) in JAX. The top level exports only the functional KIF core."""
from kif_jax.core import (
    ImportanceState,
    fuse,
    fuse_with_masks,
    fuse_with_weights,
    fusion_weights,
    importance_masks,
    importance_scores,
    importance_thresholds,
    init_importance,
    mask_fractions,
    task_vector,
    update_importance,
)

__version__ = "0.1.0"

__all__ = [
    "ImportanceState",
    "fuse",
    "fuse_with_masks",
    "fuse_with_weights",
    "fusion_weights",
    "importance_masks",
    "importance_scores",
    "importance_thresholds",
    "init_importance",
    "mask_fractions",
    "task_vector",
    "update_importance",
]
