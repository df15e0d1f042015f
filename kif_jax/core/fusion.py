"""Knowledge fusion (docs/algorithm.md, step 4): theta_t + w_in * tau_in + w_out * tau_out, elementwise."""
from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from kif_jax.core.thresholds import Method, importance_masks
from kif_jax.core.tree import PyTree, Scope

Scheme = Literal["reference", "binary", "no_share"]

# (w_in, w_out) for the mask cases (neither, only out, only in, both), indexed by 2*m_in + m_out.
_TABLES: dict[str, tuple[tuple[float, float], ...]] = {
    "reference": ((0.5, 0.5), (0.0, 1.0), (1.0, 0.0), (0.4, 0.6)),  # authors' code
    "binary": ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)),  # paper's formula
    "no_share": ((0.5, 0.5), (0.0, 1.0), (1.0, 0.0), (0.0, 0.0)),  # "-Share" ablation (our reading)
}


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32, or wider when the parameters are wider: low-precision leaves are fused in float32."""
    return jnp.promote_types(dtype, jnp.float32)


@jax.jit
def task_vector(new: PyTree, old: PyTree) -> PyTree:
    """tau = new - old per leaf, in float32 (or wider), so that old + tau rounds back to new exactly."""
    wide = lambda x: jnp.asarray(x, _compute_dtype(jnp.result_type(x)))  # noqa: E731
    return jax.tree.map(lambda a, b: wide(a) - wide(b), new, old)


def fusion_weights(
    mask_in: PyTree, mask_out: PyTree, *, scheme: Scheme = "reference"
) -> tuple[PyTree, PyTree]:
    """Per-element float32 weights (w_in, w_out), two trees shaped like the masks.

    "reference" (authors' code): in only (1,0), out only (0,1), both (0.4,0.6), neither (0.5,0.5);
    "binary" (paper's formula): (m_in, m_out); "no_share": reference but both -> (0,0).
    """
    if scheme not in _TABLES:
        raise ValueError(f"scheme must be one of {sorted(_TABLES)}, got {scheme!r}")
    return _weights(mask_in, mask_out, scheme)


@functools.partial(jax.jit, static_argnums=(2,))
def _weights(mask_in: PyTree, mask_out: PyTree, scheme: Scheme) -> tuple[PyTree, PyTree]:
    table = _TABLES[scheme]

    def pick(mi: jax.Array, mo: jax.Array, col: int) -> jax.Array:
        mi, mo = jnp.asarray(mi, bool), jnp.asarray(mo, bool)
        w = [jnp.float32(row[col]) for row in table]
        return jnp.where(mi, jnp.where(mo, w[3], w[2]), jnp.where(mo, w[1], w[0]))

    w_in = jax.tree.map(lambda a, b: pick(a, b, 0), mask_in, mask_out)
    w_out = jax.tree.map(lambda a, b: pick(a, b, 1), mask_in, mask_out)
    return w_in, w_out


def fuse_with_weights(params: PyTree, tau_in: PyTree, tau_out: PyTree, w_in: PyTree, w_out: PyTree) -> PyTree:
    """params + w_in * tau_in + w_out * tau_out, computed in float32 (or wider), returned in params' dtypes.

    Weight trees mirror params (leaves broadcastable), e.g. importance-normalised for "+Adaptive".
    """
    return _fuse_weights(params, tau_in, tau_out, w_in, w_out)


@jax.jit
def _fuse_weights(params: PyTree, tau_in: PyTree, tau_out: PyTree, w_in: PyTree, w_out: PyTree) -> PyTree:
    # Jitted so eager and jitted callers run the same fused arithmetic.

    def one(p: jax.Array, ti: jax.Array, to: jax.Array, wi: jax.Array, wo: jax.Array) -> jax.Array:
        p = jnp.asarray(p)
        ct = _compute_dtype(p.dtype)
        c = lambda x: jnp.asarray(x, ct)  # noqa: E731
        return (c(p) + c(wi) * c(ti) + c(wo) * c(to)).astype(p.dtype)

    return jax.tree.map(one, params, tau_in, tau_out, w_in, w_out)


def fuse_with_masks(
    params: PyTree,
    tau_in: PyTree,
    tau_out: PyTree,
    mask_in: PyTree,
    mask_out: PyTree,
    *,
    scheme: Scheme = "reference",
) -> PyTree:
    """theta_{t+1} = params + w_in * tau_in + w_out * tau_out with weights from the caller's masks."""
    w_in, w_out = fusion_weights(mask_in, mask_out, scheme=scheme)
    return fuse_with_weights(params, tau_in, tau_out, w_in, w_out)


def fuse(
    params: PyTree,
    tau_in: PyTree,
    tau_out: PyTree,
    scores_in: PyTree,
    scores_out: PyTree,
    *,
    quantile: float = 0.8,
    scope: Scope = "global",
    scheme: Scheme = "reference",
    method: Method = "exact",
) -> PyTree:
    """One Recurrent-KIF fusion (steps 3-4): masks `score > quantile threshold` per learner, weighted sum.

    `params` is theta_t (the cycle's start). Same structure and dtypes as `params`. For logging, call
    `importance_masks` + `mask_fractions` + `fuse_with_masks` instead (same result, masks kept).
    """
    kw = dict(quantile=quantile, scope=scope, method=method)
    mask_in = importance_masks(scores_in, **kw)
    mask_out = importance_masks(scores_out, **kw)
    return fuse_with_masks(params, tau_in, tau_out, mask_in, mask_out, scheme=scheme)
