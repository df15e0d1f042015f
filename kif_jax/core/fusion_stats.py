"""Statistics of one fusion, computed inside the jitted cycle, and their compact metrics.jsonl records.

Recurrent-KIF logs them at every fusion (kif_jax/methods/recurrent_kif.py); the report's analogues of
the paper's Figure 5 are drawn from them (kif_jax/report/plots.py). `fusion_stats` computes small
arrays. On unsharded trees the whole-tree counts (histograms, mask overlaps) run over the small leaves
joined into buckets of at most BUCKET_SIZE entries, so that XLA compiles one fused reduction a bucket, not
one a leaf (for the demo's 52 leaves, 18 s of compile time became 6 s); on sharded trees joining would
gather, so they count leaf by leaf. The records are:

  {"event": "fusion_leaves", "method", "phase", "names": [L leaf paths], "sizes": [L],
   "factors": [G last path names, e.g. lora_a, lora_b],
   "hist_edges": [edges of the |tau| / mean |tau| bins]}       (at the first fusion of each task)
  {"event": "fusion_stats", "method", "phase", "task", "step",
   "in_frac", "out_frac": [L] share of each leaf in the inner / outer mask,
   "tau_in_mean": mean |tau_in| over all entries, "tau_in_ratio": mean |tau_in| inside the inner
       mask / mean |tau_in| outside it, "tau_in_inside", "tau_in_outside": [G] the same two means
       per LoRA factor, in units of tau_in_mean (null where there are none); "tau_out_*" likewise,
   "hist_in", "hist_out": [[entries per |tau| bin], [important entries per bin]],
   "jaccard_in", "jaccard_out": |prev & cur| / |prev | cur| against the previous fusion's mask,
   "kept_in", "kept_out": |prev & cur| / |prev| (null at the first fusion of a run)}

Vectors are rounded to 3 significant digits: about 2.4 KB per fusion for SmolLM2's 120 LoRA tensors
(30 layers x q, v x A, B), and a 6 KB "fusion_leaves" record per task.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kif_jax.core.tree import PyTree, leaf_groups, tree_path_names

#: Edges of the magnitude bins: |tau| divided by the mean |tau| of the whole tree (scale-free), log2-spaced.
HIST_EDGES: tuple[float, ...] = tuple(2.0 ** k for k in range(-6, 4))
#: The most entries joined into one bucket for the whole-tree counts (16 MB of float32).
BUCKET_SIZE = 1 << 22


def _buckets(leaves: list[jax.Array], join: bool) -> list[jax.Array]:
    """With `join`, the leaves in order as few arrays as possible: runs of small leaves flattened and
    concatenated into buckets of at most BUCKET_SIZE entries, a larger leaf a bucket of its own, as it is;
    else the leaves. For counts only (integer sums do not depend on the order of summation)."""
    if not join:
        return leaves
    buckets: list[jax.Array] = []
    run: list[jax.Array] = []
    size = 0

    def close() -> None:
        nonlocal run, size
        if run:
            buckets.append(jnp.concatenate(run) if len(run) > 1 else run[0])
        run, size = [], 0

    for leaf in leaves:
        if leaf.size > BUCKET_SIZE:
            close()
            buckets.append(leaf)
            continue
        if size + leaf.size > BUCKET_SIZE:
            close()
        run.append(leaf.ravel())
        size += leaf.size
    close()
    return buckets


def _factor_groups(tree: PyTree) -> tuple[list[int], list[str]]:
    """Group id of every leaf by its last path name (the LoRA factor, `lora_a` / `lora_b`), and the names."""
    groups, _ = leaf_groups(tree, "per_factor")
    names: dict[int, str] = {}
    for g, path in zip(groups, tree_path_names(tree)):
        names.setdefault(g, path[-1] if path else "")
    return groups, [names[g] for g in sorted(names)]


def _learner_stats(tau: PyTree, mask: PyTree, prev: PyTree | None, join: bool) -> dict[str, jax.Array]:
    taus = [jnp.abs(jnp.asarray(t, jnp.float32)) for t in jax.tree.leaves(tau)]
    masks = [jnp.asarray(m, bool) for m in jax.tree.leaves(mask)]
    if len(taus) != len(masks):
        raise ValueError(f"task vector has {len(taus)} leaves, mask {len(masks)}")
    f32 = jnp.float32
    nan = jnp.float32(jnp.nan)
    sizes = [int(t.size) for t in taus]
    count = [jnp.sum(m, dtype=jnp.int32).astype(f32) for m in masks]
    s_inside = [jnp.sum(jnp.where(m, t, 0)) for t, m in zip(taus, masks)]
    s_outside = [jnp.sum(jnp.where(m, 0, t)) for t, m in zip(taus, masks)]
    frac = jnp.stack([c / max(n, 1) for c, n in zip(count, sizes)])

    def means(leaves: list[int]) -> tuple[jax.Array, jax.Array]:
        """Mean |tau| over the leaves' entries inside the mask, and outside it (NaN where none)."""
        k = sum((count[i] for i in leaves), f32(0))
        n = sum(sizes[i] for i in leaves)
        inside = sum((s_inside[i] for i in leaves), f32(0))
        outside = sum((s_outside[i] for i in leaves), f32(0))
        return (jnp.where(k > 0, inside / jnp.maximum(k, 1), nan),
                jnp.where(k < n, outside / jnp.maximum(n - k, 1), nan))

    # Magnitudes per LoRA factor (their scales differ) in units of the mean |tau| over every entry.
    groups, names = _factor_groups(tau)
    all_in, all_out = means(list(range(len(taus))))
    total = sum(sizes)
    tree_mean = (sum(s_inside, f32(0)) + sum(s_outside, f32(0))) / max(total, 1)
    mean = jnp.where(tree_mean > 0, tree_mean, 1.0)
    by_factor = [means([i for i, g in enumerate(groups) if g == k]) for k in range(len(names))]
    inside = jnp.stack([m[0] for m in by_factor]) / mean if by_factor else jnp.zeros((0,), f32)
    outside = jnp.stack([m[1] for m in by_factor]) / mean if by_factor else jnp.zeros((0,), f32)
    # Magnitude bins of |tau| / mean |tau|: bin b holds ratios in [edge_{b-1}, edge_b).
    edges = jnp.asarray(HIST_EDGES, f32)
    bins = jnp.arange(len(HIST_EDGES) + 1)
    hist = jnp.zeros((2, len(HIST_EDGES) + 1), f32)
    for t, m in zip(_buckets(taus, join), _buckets(masks, join)):
        index = jnp.sum((t / mean)[..., None] >= edges, axis=-1)
        onehot = index[..., None] == bins
        axes = tuple(range(t.ndim))
        hist = hist + jnp.stack([jnp.sum(onehot, axis=axes, dtype=jnp.int32),
                                 jnp.sum(onehot & m[..., None], axis=axes, dtype=jnp.int32)]).astype(f32)
    out = {"frac": frac, "inside": inside, "outside": outside, "hist": hist, "mean": tree_mean,
           "ratio": all_in / all_out}
    if prev is not None:
        prevs = [jnp.asarray(p, bool) for p in jax.tree.leaves(prev)]
        prevs, current = _buckets(prevs, join), _buckets(masks, join)
        inter = sum(jnp.sum(p & m, dtype=jnp.int32).astype(f32) for p, m in zip(prevs, current))
        union = sum(jnp.sum(p | m, dtype=jnp.int32).astype(f32) for p, m in zip(prevs, current))
        before = sum(jnp.sum(p, dtype=jnp.int32).astype(f32) for p in prevs)
        out["jaccard"] = jnp.where(before > 0, inter / jnp.maximum(union, 1), nan)
        out["kept"] = jnp.where(before > 0, inter / jnp.maximum(before, 1), nan)
    else:
        out["jaccard"] = out["kept"] = nan
    return out


def fusion_stats(tau_in: PyTree, tau_out: PyTree, mask_in: PyTree, mask_out: PyTree,
                 prev_masks: tuple[PyTree, PyTree] | None = None, *, join_leaves: bool = True) -> dict[str, jax.Array]:
    """Summary statistics of one fusion (traceable), see the module doc: per leaf (`jax.tree.leaves`
    order) the mask shares, per LoRA factor the mean |tau| inside / outside the masks, histograms, overlaps.

    `prev_masks` is the (inner, outer) mask pair of the previous fusion; with None, or an empty
    previous mask, the overlaps are NaN. Cost: a few elementwise passes and reductions over the
    trained parameters; results are two [L] and four [factors] vectors, two [2, 11] histograms, scalars.
    `join_leaves=False` for sharded trees: the counts then run leaf by leaf (same results, no gathers,
    slower compiles).
    """
    prev_in, prev_out = prev_masks if prev_masks is not None else (None, None)
    stats: dict[str, jax.Array] = {}
    for name, tau, mask, prev in (("in", tau_in, mask_in, prev_in), ("out", tau_out, mask_out, prev_out)):
        s = _learner_stats(tau, mask, prev, join_leaves)
        stats[f"{name}_frac"] = s["frac"]
        stats[f"tau_{name}_mean"] = s["mean"]
        stats[f"tau_{name}_ratio"] = s["ratio"]
        stats[f"tau_{name}_inside"] = s["inside"]
        stats[f"tau_{name}_outside"] = s["outside"]
        stats[f"hist_{name}"] = s["hist"]
        stats[f"jaccard_{name}"] = s["jaccard"]
        stats[f"kept_{name}"] = s["kept"]
    return stats


def _round(x: Any, digits: int) -> float | None:
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def fusion_record(stats: dict[str, Any]) -> dict[str, Any]:
    """`fusion_stats` output (fetched to the host) as compact JSON: vectors to 3 significant digits,
    scalars to 4, histogram counts as integers, null for NaN."""
    record: dict[str, Any] = {}
    for key, value in stats.items():
        arr = np.asarray(value)
        if key.startswith("hist_"):
            record[key] = np.rint(arr).astype(np.int64).tolist()
        elif arr.ndim == 0:
            record[key] = _round(arr, 4)
        else:
            record[key] = [_round(v, 3) for v in arr.ravel()]
    return record


def leaf_layout(params: PyTree) -> dict[str, Any]:
    """The leaf names and sizes of the trained tree, and its LoRA factors (the order of `fusion_stats`' vectors)."""
    return {"names": ["/".join(n) for n in tree_path_names(params)],
            "sizes": [int(np.prod(np.shape(x))) for x in jax.tree.leaves(params)],
            "factors": _factor_groups(params)[1], "hist_edges": list(HIST_EDGES)}
