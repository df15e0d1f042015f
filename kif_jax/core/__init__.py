"""The functional KIF core: importance EMAs, quantile masks and fusion, pure functions on any pytree.

Options (order, kind, quantile, scope, scheme, method) are static: under `jax.jit`, bind them with
`functools.partial` or `static_argnames`; arrays and pytrees are ordinary traced arguments.
"""
from kif_jax.core.fusion import fuse, fuse_with_masks, fuse_with_weights, fusion_weights, task_vector
from kif_jax.core.importance import (
    ImportanceState,
    importance_scores,
    init_importance,
    sensitivity,
    update_importance,
)
from kif_jax.core.thresholds import importance_masks, importance_thresholds, mask_fractions
from kif_jax.core.tree import leaf_groups, path_names, tree_add, tree_path_names, tree_scale, tree_sub

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
    "leaf_groups",
    "mask_fractions",
    "path_names",
    "sensitivity",
    "task_vector",
    "tree_add",
    "tree_path_names",
    "tree_scale",
    "tree_sub",
    "update_importance",
]
