"""The arithmetic of the baselines (O-LoRA, TaSL, EWC) and of the +Adaptive ablation, as pure functions.

Every function takes pytrees (a LoRA `nnx.State`, a dict, ...) and is traceable under `jax.jit`; the
training programs (`kif_jax/train/steps.py`) call them inside their jitted steps. Layouts are kif_jax's:
a LoRA factor `lora_a` is [in, r] and `lora_b` is [r, out] (peft stores A as [r, in]), so peft's
A_old A_new^T ([r_old, r]) is A_old^T A_new here, and peft's "rows of A stacked" are columns here.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kif_jax.core.tree import PyTree, path_names

F32 = jnp.float32


def _factor(path: Any) -> str:
    names = path_names(path)
    return names[-1] if names else ""


# --- O-LoRA --------------------------------------------------------------------------------------
def lora_concat(old: PyTree, new: PyTree) -> PyTree:
    """The branches side by side: A = [A_old | A_new] ([in, r_old + r]), B = [B_old ; B_new] ([r_old + r, out]).

    x A B = x A_old B_old + x A_new B_new, so a LoRA layer given the concatenation computes both branches
    with one dropout mask and one scale (O-LoRA's forward). `old` may be () (no earlier task): `new`.
    """
    if not jax.tree.leaves(old):
        return new

    def cat(path: Any, a: jax.Array, b: jax.Array) -> jax.Array:
        kind = _factor(path)
        if kind not in ("lora_a", "lora_b"):
            raise ValueError(f"O-LoRA branches hold LoRA factors only, got a leaf {'.'.join(path_names(path))}")
        return jnp.concatenate([a, b.astype(a.dtype)], axis=1 if kind == "lora_a" else 0)

    return jax.tree_util.tree_map_with_path(cat, old, new)


def lora_zeros(new: PyTree, tasks: int) -> PyTree:
    """Zeros shaped like an old branch of `tasks` branches of `new`'s rank: A [in, tasks r], B [tasks r, out]."""

    def zeros(path: Any, x: jax.Array) -> jax.Array:
        shape = list(jnp.shape(x))
        shape[1 if _factor(path) == "lora_a" else 0] *= tasks
        return jnp.zeros(shape, x.dtype)

    return jax.tree_util.tree_map_with_path(zeros, new)


def orthogonality_loss(old: PyTree, new: PyTree) -> jax.Array:
    """O-LoRA's O: sum over adapted modules of sum_ij |(A_old^T A_new)_ij| (peft's |A_old A_new^T|); 0 without `old`."""
    if not jax.tree.leaves(old):
        return jnp.zeros((), F32)
    flat_old, treedef = jax.tree_util.tree_flatten_with_path(old)
    total = jnp.zeros((), F32)
    for (path, a_old), a_new in zip(flat_old, treedef.flatten_up_to(new)):
        if _factor(path) == "lora_a":
            prod = jnp.dot(a_old.astype(F32).T, a_new.astype(F32), precision=jax.lax.Precision.HIGHEST)
            total = total + jnp.sum(jnp.abs(prod))
    return total


def _safe_norm(x: jax.Array) -> jax.Array:
    """Frobenius norm whose gradient at 0 is 0 (PyTorch's), not 0/0 (B starts at zero)."""
    ss = jnp.sum(jnp.square(x.astype(F32)))
    positive = ss > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, ss, 1.0)), 0.0)


def l2_loss(new: PyTree) -> jax.Array:
    """O-LoRA's L2: sum over the new branch's tensors (every A and B) of their Frobenius norm (not squared)."""
    return sum((_safe_norm(x) for x in jax.tree.leaves(new)), jnp.zeros((), F32))


def o_lora_loss(old: PyTree, new: PyTree, *, lambda1: float, lambda2: float) -> jax.Array:
    """lambda1 * O + lambda2 * L2, the term O-LoRA adds to the cross-entropy (static zeros skip their term)."""
    total = jnp.zeros((), F32)
    if lambda1:
        total = total + jnp.float32(lambda1) * orthogonality_loss(old, new)
    if lambda2:
        total = total + jnp.float32(lambda2) * l2_loss(new)
    return total


# --- EWC -----------------------------------------------------------------------------------------
def ewc_penalty(params: PyTree, star: PyTree, fisher: PyTree, *, lam: float) -> jax.Array:
    """(lam / 2) * sum F (theta - theta*)^2, in float32."""
    terms = jax.tree.map(lambda p, s, f: jnp.sum(f.astype(F32) * jnp.square(p.astype(F32) - s.astype(F32))),
                         params, star, fisher)
    return jnp.float32(lam / 2) * sum(jax.tree.leaves(terms), jnp.zeros((), F32))


# --- min-max normalisation (TaSL, +Adaptive) -----------------------------------------------------
def minmax(x: jax.Array) -> jax.Array:
    """(x - min) / (max - min) over the whole array; all zeros when max == min (the reference divides 0/0)."""
    x = jnp.asarray(x, F32)
    lo, hi = jnp.min(x), jnp.max(x)
    span = hi - lo
    return jnp.where(span > 0, (x - lo) / jnp.where(span > 0, span, 1.0), jnp.zeros_like(x))


# --- TaSL ----------------------------------------------------------------------------------------
# Weight of the CURRENT task's tensor for the cases (neither, only previous, only current, both), indexed
# by 2 * important_current + important_previous; the previous (consolidated) tensor gets 1 - w.
TASL_CURRENT_WEIGHT = (0.5, 0.0, 1.0, 0.3)


def unit_scores(scores: PyTree) -> jax.Array:
    """One score per skill unit (one tensor): the mean of its elementwise scores, float32 [units]."""
    return jnp.stack([jnp.mean(jnp.asarray(s, F32)) for s in jax.tree.leaves(scores)])


def tasl_weights(current: jax.Array, previous: jax.Array, *, quantile: float = 0.8) -> tuple[jax.Array, jax.Array]:
    """Per-unit weight of the current tensors [units], and the next accumulated scores [units].

    Both score vectors are min-max normalised; each is thresholded at its own `quantile` (numpy's
    linear percentile) and a unit is important where its score lies strictly above it. The accumulated
    scores become minmax(0.3 current + 0.7 previous) of the normalised scores.
    """
    cur, prev = minmax(current), minmax(previous)
    imp_cur = cur > jnp.quantile(cur, quantile)
    imp_prev = prev > jnp.quantile(prev, quantile)
    table = jnp.asarray(TASL_CURRENT_WEIGHT, F32)
    w = table[2 * imp_cur.astype(jnp.int32) + imp_prev.astype(jnp.int32)]
    return w, minmax(0.3 * cur + 0.7 * prev)


def tasl_merge(previous_params: PyTree, current_params: PyTree, w_current: jax.Array) -> PyTree:
    """unit u <- w_u * current_u + (1 - w_u) * previous_u (in float32, back in each tensor's dtype)."""
    prev_leaves, treedef = jax.tree.flatten(previous_params)
    cur_leaves = treedef.flatten_up_to(current_params)
    merged = [(w_current[i] * c.astype(F32) + (1.0 - w_current[i]) * p.astype(F32)).astype(c.dtype)
              for i, (p, c) in enumerate(zip(prev_leaves, cur_leaves))]
    return treedef.unflatten(merged)


# --- +Adaptive -----------------------------------------------------------------------------------
def _tree_minmax(scores: PyTree) -> PyTree:
    """Scores min-max normalised over ALL elements of the tree (one learner); zeros when they are all equal."""
    leaves = [jnp.asarray(s, F32) for s in jax.tree.leaves(scores)]
    lo = jnp.min(jnp.stack([jnp.min(s) for s in leaves]))
    hi = jnp.max(jnp.stack([jnp.max(s) for s in leaves]))
    span = hi - lo
    return jax.tree.map(lambda s: jnp.where(span > 0, (s.astype(F32) - lo) / jnp.where(span > 0, span, 1.0), 0.0),
                        scores)


def adaptive_weights(scores_in: PyTree, scores_out: PyTree) -> tuple[PyTree, PyTree]:
    """+Adaptive (our reading): w_in = S_in / (S_in + S_out), w_out = 1 - w_in, elementwise.

    S_in and S_out are each min-max normalised over all of their learner's elements first; where both
    are 0 (0/0) the weights are 0.5 / 0.5.
    """
    n_in, n_out = _tree_minmax(scores_in), _tree_minmax(scores_out)

    def w(a: jax.Array, b: jax.Array) -> jax.Array:
        total = a + b
        return jnp.where(total > 0, a / jnp.where(total > 0, total, 1.0), 0.5).astype(F32)

    w_in = jax.tree.map(w, n_in, n_out)
    return w_in, jax.tree.map(lambda x: 1.0 - x, w_in)
