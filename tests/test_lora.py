"""LoRA on T5: zero-init identity, equivalence with merged kernels, the three-way split, gradients."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kif_jax.errors import ConfigError
from kif_jax.models import (
    LoRAConfig,
    LoRAParam,
    T5,
    forward,
    from_pretrained,
    lora_modules,
    merge_lora,
    preset,
    shift_right,
)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.1)


pytestmark = pytest.mark.usefixtures("fp32_matmuls")  # exact float32 matmuls (tests/conftest.py)


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(FIXTURES / "t5_v1_0.npz"))


@pytest.fixture(scope="module")
def base():
    return from_pretrained(str(FIXTURES / "t5_v1_0"))


def _logits(model, g):
    """Teacher-forced logits, called exactly as the parity tests do, so compiled programs are shared."""
    return np.asarray(forward(model, g["input_ids"], g["decoder_input_ids"], g["attention_mask"],
                              np.ones_like(g["decoder_input_ids"])))


def test_split_gives_graphdef_lora_and_frozen_state_only():
    model = from_pretrained(str(FIXTURES / "t5_v1_0"), lora=LORA, seed=1)
    graphdef, lora, frozen = nnx.split(model, LoRAParam, nnx.Param)  # raises if anything were left over
    flat = dict(nnx.to_flat_state(lora))
    assert len(flat) == 2 * 12  # q and v: 2 encoder blocks x 1 attention + 2 decoder blocks x 2 attentions
    assert {path[-1] for path in flat} == {"lora_a", "lora_b"}
    a = flat[("decoder", "blocks", 1, "cross_attention", "v", "lora_a")][...]
    b = flat[("decoder", "blocks", 1, "cross_attention", "v", "lora_b")][...]
    assert a.shape == (32, 4) and b.shape == (4, 32) and a.dtype == b.dtype == jnp.float32
    assert not np.any(np.asarray(b)) and 0 < np.abs(np.asarray(a)).max() <= 32 ** -0.5  # peft's init
    assert not any(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(frozen))
    again = from_pretrained(str(FIXTURES / "t5_v1_0"), lora=LORA, seed=1)
    jax.tree.map(np.testing.assert_array_equal, lora, nnx.state(again, LoRAParam))


def test_zero_b_gives_the_base_model(base, golden):
    model = from_pretrained(str(FIXTURES / "t5_v1_0"), lora=LORA)
    np.testing.assert_array_equal(_logits(model, golden), _logits(base, golden))


def test_random_adapters_equal_base_with_replaced_kernels(base, golden):
    model = from_pretrained(str(FIXTURES / "t5_v1_0"), lora=LORA)
    rng = np.random.default_rng(0)
    lora = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32),
                        nnx.state(model, LoRAParam))
    nnx.update(model, lora)
    # Build the reference by hand: W <- W + (alpha / r) A B in every targeted kernel of the base model.
    graphdef, state = nnx.split(base)
    flat = dict(nnx.to_flat_state(state))
    lora_flat = dict(nnx.to_flat_state(lora))
    replaced = 0
    for path, var in list(flat.items()):
        if path[-1] == "kernel" and path[:-1] + ("lora_a",) in lora_flat:
            a, b = lora_flat[path[:-1] + ("lora_a",)][...], lora_flat[path[:-1] + ("lora_b",)][...]
            flat[path] = var.replace(var[...] + (LORA.alpha / LORA.rank) * a @ b)
            replaced += 1
    assert replaced == 12
    reference = nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))
    got = _logits(model, golden)
    want = _logits(reference, golden)
    assert np.abs(got - _logits(base, golden)).max() > 0.1  # the adapters changed the model
    assert np.abs(got - want).max() <= 1e-4
    merged = merge_lora(model)
    assert not lora_modules(merged) and np.abs(_logits(merged, golden) - want).max() <= 1e-4


def test_training_step_differentiates_only_lora_and_is_deterministic_given_key():
    """The lead's pattern: a pure jitted loss of (lora_state, frozen_state, batch, key)."""
    # A from-scratch tiny model (dropout only in LoRA, 0.05), its weights filled on the host: eager
    # construction would compile every random initialiser separately, which is slow on a small CPU.
    abstract = nnx.eval_shape(lambda: T5(preset("tiny-byte"), lora=LoRAConfig(), rngs=nnx.Rngs(0)))
    graphdef, lora, frozen = nnx.split(abstract, LoRAParam, nnx.Param)
    rng = np.random.default_rng(0)

    def fill(state, zero_b=False):
        flat = []
        for path, v in nnx.to_flat_state(state):
            shape = v.get_value().shape
            value = np.zeros(shape) if zero_b and path[-1] == "lora_b" else 0.1 * rng.standard_normal(shape)
            flat.append((path, v.replace(jnp.asarray(value, jnp.float32))))
        return nnx.from_flat_state(flat)

    lora, frozen = fill(lora, zero_b=True), fill(frozen)
    model = nnx.merge(graphdef, lora, frozen)
    ids = jnp.asarray(rng.integers(3, 259, (2, 12)), jnp.int32)
    labels = jnp.asarray(rng.integers(3, 259, (2, 4)), jnp.int32)

    def loss_fn(lora, frozen, key):
        m = nnx.merge(graphdef, lora, frozen)
        logits = m(ids, shift_right(labels), deterministic=False, rngs=nnx.Rngs(dropout=key))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    key = jax.random.key(0, impl="rbg")  # as the training loop draws them (cheaper to compile on CPU)
    _, g0 = grad_fn(lora, frozen, key)
    flat = {path: v[...] for path, v in nnx.to_flat_state(g0)}
    assert len(flat) == 24 and {p[-1] for p in flat} == {"lora_a", "lora_b"}
    assert all(not np.any(np.asarray(v)) for p, v in flat.items() if p[-1] == "lora_a")  # B = 0 blocks dA
    assert all(np.any(np.asarray(v)) for p, v in flat.items() if p[-1] == "lora_b")
    lora = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), jnp.float32), lora)
    l1, g1 = grad_fn(lora, frozen, key)
    l2, g2 = grad_fn(lora, frozen, key)
    l3, _ = grad_fn(lora, frozen, jax.random.key(1, impl="rbg"))
    assert l1 == l2 and l1 != l3  # dropout randomness comes from the key alone
    jax.tree.map(np.testing.assert_array_equal, g1, g2)
    with pytest.raises(ValueError, match="rngs"):
        model(ids, shift_right(labels), deterministic=False)


def test_targets_by_name_and_regex():
    cfg = preset("tiny-byte")

    def adapted(targets):
        return lora_modules(nnx.eval_shape(lambda: T5(cfg, lora=LoRAConfig(targets=targets), rngs=nnx.Rngs(0))))

    assert adapted((r"decoder\.blocks\.\d+\.cross_attention\.(q|v)",)) == [
        f"decoder.blocks.{i}.cross_attention.{p}" for i in range(2) for p in "qv"]
    assert len(adapted(("wi_0", "lm_head"))) == 5
    with pytest.raises(ConfigError, match="matches no projection"):
        adapted(("query",))


def _tiny_decoder_lora():
    from kif_jax.models.decoder import DecoderConfig, DecoderLM
    config = DecoderConfig(model_type="llama", vocab_size=259, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                           tie_word_embeddings=False, eos_token_id=1, pad_token_id=0)
    return DecoderLM(config, lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj", "down_proj")),
                     rngs=nnx.Rngs(3))


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_flax_lora_param_filter_finds_exactly_the_lora_factors(family):
    """Tunix/Qwix filter on `flax.nnx.LoRAParam`: it must give kif_jax's adapters and nothing else."""
    from tiny_models import tiny_t5_lora
    model = tiny_t5_lora() if family == "t5" else _tiny_decoder_lora()
    assert issubclass(LoRAParam, nnx.LoRAParam) and issubclass(LoRAParam, nnx.Param)
    ours = dict(nnx.to_flat_state(nnx.state(model, LoRAParam)))
    flax_filtered = dict(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
    assert ours and flax_filtered.keys() == ours.keys()
    assert {path[-1] for path in ours} == {"lora_a", "lora_b"}
    for path, var in ours.items():
        assert type(var) is LoRAParam and type(flax_filtered[path]) is LoRAParam
        np.testing.assert_array_equal(np.asarray(flax_filtered[path][...]), np.asarray(var[...]))
    # The three-way split is unchanged: every lora_a/lora_b leaf and nothing else is trainable.
    _, lora, frozen = nnx.split(model, LoRAParam, ...)
    every = dict(nnx.to_flat_state(nnx.state(model)))
    assert dict(nnx.to_flat_state(lora)).keys() == {p for p in every if p[-1] in ("lora_a", "lora_b")}
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(frozen))
