"""Small pytree helpers of the KIF core: leaf path names, leaf grouping, elementwise tree algebra."""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, Union

import jax
import jax.numpy as jnp

PyTree = Any
Path = tuple[str, ...]
# Groups of leaves that share one threshold: a name, or a function of a leaf's path names.
Scope = Union[Literal["global", "per_tensor", "per_factor"], Callable[[Path], Hashable]]

# The key a `flax.nnx.Variable` (and similar boxes) adds for the array it wraps.
_WRAPPER_KEYS = ("value", "raw_value")


def _key_name(key: Any) -> str:
    """One path entry as a string: dict key, attribute name, sequence index."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_names(path: Sequence[Any]) -> Path:
    """A `jax.tree_util` key path as a tuple of strings, without the trailing `.value` of a wrapper.

    For a `flax.nnx.State` leaf `{'attn': {'lora_a': LoRAParam(value=...)}}` this is ('attn', 'lora_a').
    """
    names = [_key_name(k) for k in path]
    if names and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] in _WRAPPER_KEYS:
        names.pop()
    return tuple(names)


def tree_path_names(tree: PyTree) -> list[Path]:
    """The path names of every leaf of `tree`, in `jax.tree.leaves` order."""
    return [path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _factor_name(names: Path) -> Hashable:
    # LoRA factors are the leaves named `lora_a` / `lora_b`; the last path name groups them.
    return names[-1] if names else ""


def leaf_groups(tree: PyTree, scope: Scope) -> tuple[list[int], int]:
    """Group id of every leaf (in `jax.tree.leaves` order) and the number of groups.

    "global": one group; "per_tensor": one per leaf; "per_factor": by the last path name
    (`lora_a`, `lora_b`); a callable maps a leaf's path names to any hashable group key.
    """
    names = tree_path_names(tree)
    if scope == "global":
        return [0] * len(names), min(len(names), 1)
    if scope == "per_tensor":
        return list(range(len(names))), len(names)
    if scope == "per_factor":
        key_fn: Callable[[Path], Hashable] = _factor_name
    elif callable(scope):
        key_fn = scope
    else:
        raise ValueError(f"scope must be 'global', 'per_tensor', 'per_factor' or a callable, got {scope!r}")
    ids: dict[Hashable, int] = {}
    groups = [ids.setdefault(key_fn(n), len(ids)) for n in names]
    return groups, len(ids)


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise a + b (JAX type promotion)."""
    return jax.tree.map(jnp.add, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise a - b (JAX type promotion)."""
    return jax.tree.map(jnp.subtract, a, b)


def tree_scale(a: PyTree, s: jax.typing.ArrayLike) -> PyTree:
    """Leafwise s * a, keeping each leaf's dtype (s is a Python or JAX scalar)."""
    return jax.tree.map(lambda x: (x * s).astype(x.dtype), a)
