"""Quantile thresholds and masks: hand example, count invariants, scopes, exact == bisect, edge cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kif_jax
from kif_jax.core.tree import leaf_groups, path_names

METHODS = ("exact", "bisect")


@pytest.mark.parametrize("method", METHODS)
def test_hand_example(method):
    scores = {"a": jnp.array([[0.1, 0.9], [0.5, 0.3]]), "b": jnp.array([0.7, 0.2, 0.8, 0.4])}
    # Sorted: .1 .2 .3 .4 .5 .7 .8 .9; v = 0.5 * 7 = 3.5 -> halfway between .4 and .5.
    thr = kif_jax.importance_thresholds(scores, quantile=0.5, method=method)
    np.testing.assert_allclose([thr["a"], thr["b"]], [0.45, 0.45], rtol=1e-6)
    masks = kif_jax.importance_masks(scores, quantile=0.5, method=method)
    np.testing.assert_array_equal(masks["a"], [[False, True], [True, False]])
    np.testing.assert_array_equal(masks["b"], [True, False, True, False])
    # q = 0.8: v = 5.6 -> .7 + 0.6 * (.8 - .7) = .76; only .8 and .9 are above.
    thr = kif_jax.importance_thresholds(scores, method=method)
    np.testing.assert_allclose(thr["a"], 0.76, rtol=1e-6)
    assert float(kif_jax.mask_fractions(kif_jax.importance_masks(scores, method=method))) == 0.25


def test_global_count_matches_exact_threshold_and_numpy():
    rng = np.random.default_rng(1)
    leaves = [rng.standard_normal(s).astype(np.float32) for s in ((37, 5), (200,), (3, 4, 6))]
    flat = np.concatenate([x.ravel() for x in leaves])
    n = flat.size
    for q in (0.25, 0.8):
        thr = float(kif_jax.importance_thresholds(leaves, quantile=q)[0])
        np.testing.assert_allclose(thr, np.quantile(flat.astype(np.float64), q), rtol=1e-6, atol=1e-7)
        masks = kif_jax.importance_masks(leaves, quantile=q)
        count = sum(int(m.sum()) for m in masks)
        assert count == int((flat > np.float32(thr)).sum())
        assert count == n - 1 - int(np.floor(q * (n - 1)))  # tie-free: everything above rank floor(v)
        np.testing.assert_allclose(kif_jax.mask_fractions(masks), count / n, rtol=1e-7)


def test_per_tensor_differs_from_global_when_scales_differ():
    rng = np.random.default_rng(2)
    scores = {"small": jnp.asarray(rng.random(100) * 1e-3), "large": jnp.asarray(rng.random(100))}
    glob = kif_jax.importance_masks(scores)
    local = kif_jax.importance_masks(scores, scope="per_tensor")
    assert int(glob["small"].sum()) == 0 and int(glob["large"].sum()) == 40  # 40 of 200 overall
    assert int(local["small"].sum()) == 20 and int(local["large"].sum()) == 20  # 20% of each
    thr = kif_jax.importance_thresholds(scores, scope="per_tensor")
    assert float(thr["small"]) < 1e-3 < float(thr["large"])


def test_per_factor_groups_lora_a_and_b_of_nnx_state():
    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.q = nnx.LoRA(4, 2, 3, rngs=rngs)
            self.v = nnx.LoRA(4, 2, 3, rngs=rngs)

    _, state = nnx.split(Block(nnx.Rngs(0)), nnx.LoRAParam)
    names = [path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert names == [("q", "lora_a"), ("q", "lora_b"), ("v", "lora_a"), ("v", "lora_b")]
    assert leaf_groups(state, "per_factor") == ([0, 1, 0, 1], 2)
    # A entries around 1, B entries around 100: global marks only B, per_factor 20% of each.
    rng = np.random.default_rng(3)
    scores = jax.tree.map(lambda x: jnp.asarray(rng.random(x.shape), jnp.float32), state)
    scores = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 100 if path_names(p)[-1] == "lora_b" else x, scores)
    glob = kif_jax.importance_masks(scores)
    fact = kif_jax.importance_masks(scores, scope="per_factor", method="bisect")
    count = lambda m, k: int(m["q"][k][...].sum() + m["v"][k][...].sum())  # noqa: E731
    assert (count(glob, "lora_a"), count(glob, "lora_b")) == (0, 6)  # 28 values: v = 21.6, 27 - 21 above
    assert (count(fact, "lora_a"), count(fact, "lora_b")) == (3, 3)  # A: v = 12 of 0..15; B: v = 8.8 of 0..11
    by_fn = kif_jax.importance_masks(scores, scope=lambda path: path[-1])
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), by_fn, fact))


def test_exact_and_bisect_agree_on_several_shapes_and_dtypes():
    rng = np.random.default_rng(4)
    spec = [((), jnp.float32), ((7,), jnp.bfloat16), ((3, 5), jnp.float16), ((2, 3, 4), jnp.float32)]
    sizes = [int(np.prod(s)) for s, _ in spec]
    offs = np.cumsum([0] + sizes)
    # 47 distinct values k / 128, |k| < 256: exact in every dtype above, some negative.
    distinct = rng.permutation(np.arange(-15, 32)) / 128.0
    tied = rng.integers(-2, 3, offs[-1]).astype(np.float64)
    special = tied.copy()  # signed zeros, subnormals and extremes in the float32 leaves
    special[offs[3]:offs[3] + 9] = [-0.0, 0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38, 1.2e-38, 1e-40]
    special[0] = -0.0
    cases = [("global", 0.8), ("per_tensor", 0.8), ("global", 1.0), ("per_tensor", 0.0)]
    for data in (distinct, tied, special):  # all reuse the same compilations
        tree = {f"l{i}": jnp.asarray(data[offs[i]:offs[i + 1]].reshape(s), d) for i, (s, d) in enumerate(spec)}
        for scope, q in cases:
            te = kif_jax.importance_thresholds(tree, quantile=q, scope=scope, method="exact")
            tb = kif_jax.importance_thresholds(tree, quantile=q, scope=scope, method="bisect")
            for k in tree:  # bit-identical thresholds, ties included
                np.testing.assert_array_equal(te[k], tb[k], err_msg=f"{k} {scope} {q}")
        me = kif_jax.importance_masks(tree, method="exact")
        mb = kif_jax.importance_masks(tree, method="bisect")
        assert all(bool((me[k] == mb[k]).all()) for k in tree)
        if data is distinct:  # tie-free: 47 values, v = 36.8, so the top 10 are marked
            assert sum(int(m.sum()) for m in mb.values()) == 10
    np.testing.assert_array_equal([te["l0"], te["l3"]], np.float32([0.0, -3e38]))  # per_tensor, q = 0: the minima


@pytest.mark.parametrize("method", METHODS)
def test_degenerate_scores_give_all_false_masks(method):
    zeros = {"a": jnp.zeros((3, 2)), "b": -jnp.zeros(4)}  # -0.0 counts as 0.0
    assert float(kif_jax.mask_fractions(kif_jax.importance_masks(zeros, method=method))) == 0.0
    thr = kif_jax.importance_thresholds({"c": jnp.full(5, 2.5), "e": jnp.zeros(0)}, scope="per_tensor", method=method)
    assert (float(thr["c"]), float(thr["e"])) == (2.5, 0.0)
    assert kif_jax.importance_masks({}, method=method) == {}
    assert float(kif_jax.mask_fractions({})) == 0.0


def test_bad_arguments_are_rejected():
    s = {"a": jnp.ones(3)}
    with pytest.raises(ValueError, match="quantile"):
        kif_jax.importance_masks(s, quantile=1.5)
    with pytest.raises(ValueError, match="method"):
        kif_jax.importance_masks(s, method="approx")
    with pytest.raises(ValueError, match="scope"):
        kif_jax.importance_masks(s, scope="local")
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda q: kif_jax.importance_masks(s, quantile=q))(0.5)
