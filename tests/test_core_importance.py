"""Importance EMAs: hand-worked updates, the three sensitivity orders, dtypes, pytree kinds, jit."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kif_jax


def test_two_updates_by_hand():
    p = {"w": jnp.array([2.0, -1.0])}
    g = {"w": jnp.array([0.5, 3.0])}  # p*g = [1, -3], s = [1, 3]
    st = kif_jax.init_importance(p)
    st = kif_jax.update_importance(st, p, g, beta1=0.5, beta2=0.5)
    np.testing.assert_allclose(st.sens["w"], [0.5, 1.5])  # 0.5*0 + 0.5*s
    np.testing.assert_allclose(st.unc["w"], [0.25, 0.75])  # 0.5*|s - S_new|
    st = kif_jax.update_importance(st, p, g, beta1=0.5, beta2=0.5)
    np.testing.assert_allclose(st.sens["w"], [0.75, 2.25])
    np.testing.assert_allclose(st.unc["w"], [0.25, 0.75])  # 0.5*0.25 + 0.5*|1 - 0.75|
    assert int(st.count) == 2
    np.testing.assert_allclose(kif_jax.importance_scores(st)["w"], [0.1875, 1.6875])
    np.testing.assert_allclose(kif_jax.importance_scores(st, kind="sens")["w"], [0.75, 2.25])


def test_default_betas_and_orders():
    p, g = jnp.array([2.0, -1.0]), jnp.array([0.5, 3.0])
    st = kif_jax.update_importance(kif_jax.init_importance([p]), [p], [g])
    np.testing.assert_allclose(st.sens[0], [0.15, 0.45], rtol=1e-6)  # 0.15 * s
    np.testing.assert_allclose(st.unc[0], [0.1275, 0.3825], rtol=1e-6)  # 0.15 * 0.85 * s
    # Bit for bit the float32 arithmetic of the PyTorch reference (Python-float betas cast to float32).
    st = kif_jax.update_importance(st, [p], [2 * g])
    b, c = np.float32(0.85), np.float32(1 - 0.85)
    s1, s2 = np.abs(np.float32([1.0, -3.0])), np.abs(np.float32([2.0, -6.0]))
    sens1 = c * s1
    sens2 = b * sens1 + c * s2
    np.testing.assert_array_equal(st.sens[0], sens2)
    np.testing.assert_array_equal(st.unc[0], b * (c * np.abs(s1 - sens1)) + c * np.abs(s2 - sens2))
    for order, s in (("second", [1.0, 9.0]), ("mix", [0.5, 7.5])):
        st = kif_jax.update_importance(kif_jax.init_importance([p]), [p], [g], beta1=0.0, order=order)
        np.testing.assert_allclose(st.sens[0], s)
    with pytest.raises(ValueError, match="order"):
        kif_jax.update_importance(kif_jax.init_importance([p]), [p], [g], order="third")
    with pytest.raises(ValueError, match="kind"):
        kif_jax.importance_scores(st, kind="unc")


def test_bf16_params_give_f32_state_and_jit_equals_eager():
    p = {"a": jnp.array([[1.5, -2.0]], jnp.bfloat16), "b": (jnp.array([0.25], jnp.bfloat16),)}
    g = jax.tree.map(lambda x: (x * 3).astype(jnp.bfloat16), p)
    st = kif_jax.init_importance(p)
    eager = kif_jax.update_importance(st, p, g)
    jitted = jax.jit(kif_jax.update_importance)(st, p, g)
    assert {x.dtype for x in jax.tree.leaves((eager.sens, eager.unc))} == {jnp.dtype(jnp.float32)}
    assert eager.count.dtype == jnp.int32
    for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(e, j)
    np.testing.assert_allclose(eager.sens["a"], [[0.15 * 6.75, 0.15 * 12.0]], rtol=1e-6)


@dataclasses.dataclass
class _Lin:  # an Equinox-style dataclass pytree
    w: jax.Array
    b: jax.Array


jax.tree_util.register_dataclass(_Lin, data_fields=["w", "b"], meta_fields=[])


def test_nnx_state_and_dataclass_trees_keep_structure():
    lora = nnx.LoRA(3, 2, 4, rngs=nnx.Rngs(0), b_initializer=nnx.initializers.ones)
    _, params = nnx.split(lora, nnx.LoRAParam)
    grads = jax.tree.map(jnp.ones_like, params)
    st = kif_jax.update_importance(kif_jax.init_importance(params), params, grads, beta1=0.0)
    assert jax.tree.structure(st.sens) == jax.tree.structure(params)
    np.testing.assert_allclose(st.sens["lora_b"][...], np.ones((2, 4)))  # |1 * 1|
    tree = _Lin(jnp.array([1.0, -2.0]), jnp.array(4.0))
    st2 = kif_jax.update_importance(kif_jax.init_importance(tree), tree, tree, beta1=0.0)
    assert isinstance(st2.sens, _Lin)
    np.testing.assert_allclose(st2.sens.w, [1.0, 4.0])
    np.testing.assert_allclose(st2.sens.b, 16.0)
