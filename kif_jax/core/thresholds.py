"""Knowledge identification (docs/algorithm.md, step 3): quantile thresholds of importance scores, and masks.

Both methods return the linearly interpolated `quantile` of a group's scores (numpy's and torch's
default): with the group's n scores sorted ascending as x_0..x_{n-1}, v = quantile * (n - 1),
i = floor(v), t = v - i, threshold = lerp(x_i, x_{min(i+1, n-1)}, t), with torch.quantile's rank
and lerp formulas (numpy's lerp too), in float32 like torch on float32 scores.

- "exact" concatenates the group's scores and sorts them (on sharded arrays this gathers).
- "bisect" never concatenates, reshapes or gathers: it finds x_i exactly by a 32-step binary search
  over the 2**32 float32 bit patterns in value order (uint32 keys), each step counting `key <= mid`
  over every leaf (one reduction per leaf, an all-reduce when sharded), then x_{i+1} by one more
  count and min pass, and applies the same lerp. Relation to "exact": the same two order statistics, bit for bit,
  and the same formula, so the thresholds are equal up to how the compiler rounds the final lerp
  (bit-identical on XLA:CPU in the tests), and exactly x_i in both when t == 0 or x_i == x_{i+1}.
  Masks: no score lies strictly between x_i and x_{i+1}, so any threshold in [x_i, x_{i+1}) gives
  the same mask {score > x_i}; the two methods' masks differ only if one lerp rounds onto x_{i+1}
  itself, possible only when x_i and x_{i+1} are within a few ulps (near-ties).
  Cost: 34 reductions over the scores (32 counts, one count, one min) instead of a concatenation
  and a sort. Counts are uint32: < 2**32 scores per group.

Masks are `score > threshold` (strict). Degenerate case: if a group's scores are all equal (e.g. all
zero in the first cycle, before any importance update), the threshold is that value and the mask is
all False, so fusion applies the "neither" weights. An empty group gets threshold 0.0. Scores must
be finite (-0.0 counts as +0.0); NaN or inf scores give unspecified thresholds.
"""
from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from kif_jax.core.tree import PyTree, Scope, leaf_groups

Method = Literal["exact", "bisect"]

_U32_MAX = 0xFFFFFFFF


def _u32(v: int) -> jax.Array:
    # Explicit uint32: Python ints >= 2**31 overflow JAX's weak int32 typing.
    return jnp.asarray(v, jnp.uint32)


def _check_quantile(quantile: float) -> float:
    try:
        q = float(quantile)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise TypeError(f"quantile must be a static Python float, got {quantile!r}") from e
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be a number in [0, 1], got {quantile!r}")
    return q


def _positions(n: int, q: float) -> tuple[int, int, float]:
    """Static (i, i+1 clipped, fraction t) of the linear quantile of n sorted values."""
    v = q * (n - 1)
    i = min(max(math.floor(v), 0), n - 1)
    return i, min(i + 1, n - 1), v - i


def _lerp(a: jax.Array, b: jax.Array, t: jax.Array, one_minus_t: jax.Array) -> jax.Array:
    """numpy's `_lerp`: a + (b-a)t for t < 1/2, b - (b-a)(1-t) otherwise; exactly a when a == b."""
    d = b - a
    r = jnp.where(t >= 0.5, b - d * one_minus_t, a + d * t)
    return jnp.where((a == b) | (t == 0), a, r)


def _canonical(x: jax.Array) -> jax.Array:
    """float32 scores with -0.0 (and, where the backend flushes subnormals, those too) as +0.0.

    Both methods rank these values, so they agree bit for bit with or without subnormal flushing.
    """
    x = jnp.asarray(x, jnp.float32)
    return jnp.where(x == 0, jnp.float32(0), x)


def _ordered_key(x: jax.Array) -> jax.Array:
    """uint32 key with key(a) < key(b) iff a < b for non-NaN float32, +0.0 above -0.0."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >= _u32(0x80000000), ~bits, bits | _u32(0x80000000))


def _key_to_float(k: jax.Array) -> jax.Array:
    bits = jnp.where(k >= _u32(0x80000000), k & _u32(0x7FFFFFFF), ~k)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _count_le(k: jax.Array, ref: jax.Array) -> jax.Array:
    """uint32 count of keys <= ref over one leaf, without reshaping it (no data movement if sharded)."""
    # Integer compares are exact whether or not the backend flushes subnormals. A float32 sum of 0/1
    # is exact at any summation order while it stays <= 2**24, and vectorises better than an integer
    # sum on CPU; larger leaves are summed in float32 along the last axis only.
    hit = (k <= ref).astype(jnp.float32)
    if k.size <= 2**24:
        return jnp.sum(hit).astype(jnp.uint32)
    if k.shape[-1] <= 2**24:
        return jnp.sum(jnp.sum(hit, axis=-1).astype(jnp.uint32), dtype=jnp.uint32)
    return jnp.sum(k <= ref, dtype=jnp.uint32)


def _replicated(x: jax.Array) -> jax.Array:
    """x gathered onto every device where its mesh axes are explicit (a reshape of a sharded axis is
    a typing error there); on auto meshes and single devices x unchanged (the compiler gathers)."""
    sharding = jax.typeof(x).sharding
    mesh = getattr(sharding, "mesh", None)
    explicit = mesh is not None and not mesh.empty and any(t == AxisType.Explicit for t in mesh.axis_types)
    if not explicit or all(p is None for p in sharding.spec):
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec()))


def _exact(xs: list[jax.Array], q: float) -> jax.Array:
    """Linear quantile of one group by concatenation and sort (gathers a sharded group)."""
    x = jnp.sort(jnp.concatenate([jnp.ravel(_replicated(x)) for x in xs]))
    i, j, t = _positions(x.size, q)
    return _lerp(x[i], x[j], jnp.float32(t), jnp.float32(1.0 - t))


def _bisect(xs: list[jax.Array], groups: list[int], sizes: list[int], q: float) -> jax.Array:
    """Linear quantiles of all groups at once by counting; returns [G] float32."""
    n_groups = len(sizes)
    pos = [_positions(max(n, 1), q) for n in sizes]
    need_lo = jnp.asarray([i + 1 for i, _, _ in pos], jnp.uint32)  # count(x <= x_i) >= i + 1
    need_hi = jnp.asarray([j + 1 for _, j, _ in pos], jnp.uint32)
    # Keys once, outside the loop: each step then reads one uint32 per score.
    members = [[_ordered_key(x) for x, g in zip(xs, groups) if g == k] for k in range(n_groups)]

    def counts(ref: jax.Array) -> jax.Array:
        # Per group: number of its keys <= its reference key (static sums over leaves, no scatter).
        return jnp.stack([sum((_count_le(k, ref[g]) for k in m), _u32(0)) for g, m in enumerate(members)])

    def step(_: int, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = carry
        mid = lo + (hi - lo) // 2
        ok = counts(mid) >= need_lo
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    init = (jnp.zeros(n_groups, jnp.uint32), jnp.full(n_groups, _U32_MAX, jnp.uint32))
    k_lo, _ = lax.fori_loop(0, 32, step, init)  # 32 halvings of [0, 2**32) leave one key

    t = [p[2] for p in pos]
    if any(t):
        # x_{i+1}: x_i again if enough ties, else the smallest key above x_i's.
        def above(k: jax.Array, g: int) -> jax.Array:
            return jnp.min(jnp.where(k > k_lo[g], k, _u32(_U32_MAX)), initial=_u32(_U32_MAX))

        k_next = jnp.stack([functools.reduce(jnp.minimum, (above(k, g) for k in m)) for g, m in enumerate(members)])
        k_hi = jnp.where(counts(k_lo) >= need_hi, k_lo, k_next)
    else:
        k_hi = k_lo
    tt = jnp.asarray(t, jnp.float32)
    one_minus = jnp.asarray([1.0 - x for x in t], jnp.float32)
    return _lerp(_key_to_float(k_lo), _key_to_float(k_hi), tt, one_minus)


def importance_thresholds(
    scores: PyTree,
    *,
    quantile: float = 0.8,
    scope: Scope = "global",
    method: Method = "exact",
) -> PyTree:
    """The threshold applying to each leaf (a float32 scalar per leaf): the `quantile` of its group's scores.

    scope "global" (reference code): one group of all leaves; "per_tensor": each leaf alone ("local");
    "per_factor": leaves grouped by last path name (all `lora_a`, all `lora_b`); or a callable on path names.
    """
    return _thresholds(scores, _validate(scores, quantile, scope, method), scope, method)


def _validate(scores: PyTree, quantile: float, scope: Scope, method: Method) -> float:
    """Checks the options eagerly (clear errors before tracing); returns the quantile as a float."""
    q = _check_quantile(quantile)
    if method not in ("exact", "bisect"):
        raise ValueError(f"method must be 'exact' or 'bisect', got {method!r}")
    leaf_groups(scores, scope)
    return q


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _thresholds(scores: PyTree, q: float, scope: Scope, method: Method) -> PyTree:
    # Jitted so eager callers compile once per tree structure and options; inlined under an outer jit.
    leaves, treedef = jax.tree.flatten(scores)
    if not leaves:
        return treedef.unflatten([])
    groups, n_groups = leaf_groups(scores, scope)
    xs = [_canonical(x) for x in leaves]
    sizes = [0] * n_groups
    for x, g in zip(xs, groups):
        sizes[g] += x.size
    if max(sizes) >= 2**32:
        raise ValueError(f"a threshold group has {max(sizes)} scores; at most 2**32 - 1 are supported")

    if method == "exact":
        members = [[x for x, g in zip(xs, groups) if g == k and x.size] for k in range(n_groups)]
        thr = [_exact(m, q) if m else jnp.float32(0) for m in members]
    else:
        by_group = _bisect(xs, groups, sizes, q)
        thr = [by_group[k] if sizes[k] else jnp.float32(0) for k in range(n_groups)]
    return treedef.unflatten([thr[g] for g in groups])


def importance_masks(
    scores: PyTree,
    *,
    quantile: float = 0.8,
    scope: Scope = "global",
    method: Method = "exact",
) -> PyTree:
    """Boolean masks `score > threshold` (strict, as the reference): True marks the important elements.

    With quantile 0.8 and untied scores, the top 20% of each group (see `importance_thresholds`).
    """
    return _masks(scores, _validate(scores, quantile, scope, method), scope, method)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _masks(scores: PyTree, q: float, scope: Scope, method: Method) -> PyTree:
    thr = _thresholds(scores, q, scope, method)
    return jax.tree.map(lambda s, t: jnp.asarray(s, jnp.float32) > t, scores, thr)


def mask_fractions(masks: PyTree) -> jax.Array:
    """Fraction (float32 scalar) of True entries over all leaves together; 0 for an empty tree."""
    leaves = jax.tree.leaves(masks)
    total = sum(int(m.size) for m in leaves)
    if total == 0:
        return jnp.float32(0)
    # Integer counts: a float32 sum would drop units beyond 2**24 elements.
    count = sum(jnp.sum(m, dtype=jnp.int32) for m in leaves)
    return (count.astype(jnp.float32) / jnp.float32(total)).astype(jnp.float32)
