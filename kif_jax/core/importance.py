"""Importance estimation (docs/algorithm.md, steps 1-2): EMAs of parameter sensitivity and its uncertainty."""
from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from kif_jax.core.tree import PyTree

Order = Literal["first", "second", "mix"]
ScoreKind = Literal["sens_x_unc", "sens"]


class ImportanceState(NamedTuple):
    """Running importance statistics of one learner (inner or outer); a pytree.

    `sens` and `unc` mirror the parameters' structure in float32; `count` is the int32 number of updates.
    """

    sens: PyTree  # S: EMA of the sensitivity s
    unc: PyTree  # U: EMA of |s - S|
    count: jax.Array  # [] int32


def init_importance(params: PyTree) -> ImportanceState:
    """A fresh state: S = U = 0 (float32, shaped like `params`), count = 0."""
    zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)  # noqa: E731
    return ImportanceState(jax.tree.map(zeros, params), jax.tree.map(zeros, params), jnp.zeros((), jnp.int32))


def sensitivity(p: jax.Array, g: jax.Array, order: Order = "first") -> jax.Array:
    """Taylor sensitivity of one tensor in float32.

    |pg| ("first", reference default), |pg*pg| ("second"), |pg - (pg)^2/2| ("mix").
    """
    pg = jnp.asarray(p, jnp.float32) * jnp.asarray(g, jnp.float32)
    if order == "first":
        return jnp.abs(pg)
    if order == "second":
        return jnp.abs(pg * pg)
    if order == "mix":
        return jnp.abs(pg - 0.5 * pg * pg)
    raise ValueError(f"order must be 'first', 'second' or 'mix', got {order!r}")


def update_importance(
    state: ImportanceState,
    params: PyTree,
    grads: PyTree,
    *,
    beta1: float = 0.85,
    beta2: float = 0.85,
    order: Order = "first",
) -> ImportanceState:
    """One EMA step (the reference code's reading): S <- b1*S + (1-b1)*s; U <- b2*U + (1-b2)*|s - S_new|.

    The reference passes the parameters *after* the optimizer step together with that step's gradient.
    """
    if order not in ("first", "second", "mix"):
        raise ValueError(f"order must be 'first', 'second' or 'mix', got {order!r}")
    # 1 - beta in double precision, then float32, as PyTorch scales a float32 tensor by a Python float.
    return _update(state, params, grads, (beta1, 1.0 - beta1), (beta2, 1.0 - beta2), order)


@functools.partial(jax.jit, static_argnums=(5,))
def _update(
    state: ImportanceState,
    params: PyTree,
    grads: PyTree,
    beta1: tuple[float, float],
    beta2: tuple[float, float],
    order: Order,
) -> ImportanceState:
    # Jitted so eager callers run one compiled program (inlined under an outer jit).
    (b1, c1), (b2, c2) = beta1, beta2

    def one(s_old: jax.Array, u_old: jax.Array, p: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
        s = sensitivity(p, g, order)
        s_new = b1 * s_old + c1 * s
        u_new = b2 * u_old + c2 * jnp.abs(s - s_new)  # the new S, as in the reference
        return s_new.astype(jnp.float32), u_new.astype(jnp.float32)

    treedef = jax.tree.structure(state.sens)
    leaves = zip(*(treedef.flatten_up_to(t) for t in (state.sens, state.unc, params, grads)))
    sens, unc = zip(*(one(*x) for x in leaves)) if treedef.num_leaves else ((), ())
    sens, unc = treedef.unflatten(sens), treedef.unflatten(unc)
    return ImportanceState(sens, unc, state.count + 1)


def importance_scores(state: ImportanceState, *, kind: ScoreKind = "sens_x_unc") -> PyTree:
    """Per-element importance in float32: S*U ("sens_x_unc", reference code) or S ("sens", paper text)."""
    if kind == "sens_x_unc":
        return jax.tree.map(jnp.multiply, state.sens, state.unc)
    if kind == "sens":
        return jax.tree.map(lambda s: s, state.sens)
    raise ValueError(f"kind must be 'sens_x_unc' or 'sens', got {kind!r}")
