"""Fusion: a hand-worked example, the weight tables, invariants, dtypes, jit, task vectors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kif_jax
from kif_jax.core.tree import tree_add, tree_scale, tree_sub

PARAMS = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "b": jnp.array([1.0, 1.0, 1.0, 1.0])}
TAU_IN = {"a": jnp.array([[10.0, 20.0], [30.0, 40.0]]), "b": jnp.array([1.0, 2.0, 3.0, 4.0])}
TAU_OUT = {"a": jnp.array([[100.0, 200.0], [300.0, 400.0]]), "b": jnp.array([10.0, 20.0, 30.0, 40.0])}
# Both score sets have threshold 0.45 at quantile 0.5 (8 values, v = 3.5).
S_IN = {"a": jnp.array([[0.1, 0.9], [0.5, 0.3]]), "b": jnp.array([0.7, 0.2, 0.8, 0.4])}
S_OUT = {"a": jnp.array([[0.6, 0.65], [0.05, 0.15]]), "b": jnp.array([0.25, 0.35, 0.95, 0.55])}
# m_in:  a [[F, T], [T, F]]  b [T, F, T, F]
# m_out: a [[T, T], [F, F]]  b [F, F, T, T]


@pytest.mark.parametrize("method", ["exact", "bisect"])
def test_hand_example_reference_scheme(method):
    out = kif_jax.fuse(PARAMS, TAU_IN, TAU_OUT, S_IN, S_OUT, quantile=0.5, method=method)
    # a: out only 1+100; both 2+.4*20+.6*200; in only 3+30; neither 4+.5*40+.5*400.
    np.testing.assert_allclose(out["a"], [[101.0, 130.0], [33.0, 224.0]], rtol=1e-6)
    # b: in only 1+1; neither 1+.5*2+.5*20; both 1+.4*3+.6*30; out only 1+40.
    np.testing.assert_allclose(out["b"], [2.0, 12.0, 20.2, 41.0], rtol=1e-6)


def test_weight_tables():
    mi = jnp.array([False, False, True, True])
    mo = jnp.array([False, True, False, True])
    expected = {
        "reference": ([0.5, 0.0, 1.0, 0.4], [0.5, 1.0, 0.0, 0.6]),
        "binary": ([0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]),
        "no_share": ([0.5, 0.0, 1.0, 0.0], [0.5, 1.0, 0.0, 0.0]),
    }
    for scheme, (w_in, w_out) in expected.items():
        wi, wo = kif_jax.fusion_weights({"m": mi}, {"m": mo}, scheme=scheme)
        assert wi["m"].dtype == wo["m"].dtype == jnp.float32
        np.testing.assert_array_equal(wi["m"], np.float32(w_in))
        np.testing.assert_array_equal(wo["m"], np.float32(w_out))
    with pytest.raises(ValueError, match="scheme"):
        kif_jax.fusion_weights(mi, mo, scheme="adaptive")


def test_binary_all_true_is_plain_addition_and_all_false_scores_give_neither():
    ones = jax.tree.map(lambda x: jnp.ones(x.shape, bool), PARAMS)
    out = kif_jax.fuse_with_masks(PARAMS, TAU_IN, TAU_OUT, ones, ones, scheme="binary")
    for k in PARAMS:
        np.testing.assert_array_equal(out[k], PARAMS[k] + TAU_IN[k] + TAU_OUT[k])
    # First cycle: all scores zero -> no mask set -> (0.5, 0.5) everywhere under "reference".
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    out = kif_jax.fuse(PARAMS, TAU_IN, TAU_OUT, zeros, zeros, method="bisect")
    for k in PARAMS:
        np.testing.assert_allclose(out[k], PARAMS[k] + 0.5 * TAU_IN[k] + 0.5 * TAU_OUT[k], rtol=1e-6)


def test_bf16_params_keep_dtype_and_task_vector_round_trips():
    old = {"w": jnp.array([1.0, -3.0, 0.0078125], jnp.bfloat16), "n": [jnp.array(2.5, jnp.bfloat16)]}
    new = jax.tree.map(lambda x: (x * 1.5 + 0.25).astype(jnp.bfloat16), old)
    tau = kif_jax.task_vector(new, old)
    assert {x.dtype for x in jax.tree.leaves(tau)} == {jnp.dtype(jnp.float32)}
    zeros = jax.tree.map(jnp.zeros_like, tau)
    ones = jax.tree.map(lambda x: jnp.ones(x.shape, bool), old)
    nones = jax.tree.map(lambda x: jnp.zeros(x.shape, bool), old)
    back = kif_jax.fuse_with_masks(old, tau, zeros, ones, nones)  # in only -> (1, 0): old + tau == new
    assert jax.tree.structure(back) == jax.tree.structure(old)
    for b, n in zip(jax.tree.leaves(back), jax.tree.leaves(new)):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(b, np.float32), np.asarray(n, np.float32))


def test_jit_equals_eager_on_mixed_dtypes():
    rng = np.random.default_rng(5)
    params = {"x": jnp.asarray(rng.standard_normal((6, 3)), jnp.bfloat16), "y": (jnp.asarray(rng.standard_normal(5)),)}
    tin = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    tout = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    s_in = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape), jnp.float32), params)
    s_out = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape), jnp.float32), params)
    kw = dict(quantile=0.7, scope="per_tensor", method="bisect")
    eager = kif_jax.fuse(params, tin, tout, s_in, s_out, **kw)
    jitted = jax.jit(lambda *a: kif_jax.fuse(*a, **kw))(params, tin, tout, s_in, s_out)
    for e, j, p in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), jax.tree.leaves(params)):
        assert e.dtype == j.dtype == p.dtype
        # Same masks; the compiled sum may contract w*tau + p into one FMA: equal to 1 ulp.
        np.testing.assert_allclose(np.asarray(e, np.float32), np.asarray(j, np.float32), rtol=2**-22)


def test_tree_helpers():
    a = {"p": jnp.array([1.0, 2.0], jnp.bfloat16), "q": jnp.array(3.0)}
    np.testing.assert_array_equal(tree_add(a, a)["q"], 6.0)
    np.testing.assert_array_equal(tree_sub(a, a)["q"], 0.0)
    scaled = tree_scale(a, jnp.float32(0.5))
    assert scaled["p"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(scaled["p"], np.float32), [0.5, 1.0])
