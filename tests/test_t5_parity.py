"""Parity of kif_jax's T5 with Hugging Face's PyTorch T5 (goldens from tools/make_t5_fixtures.py)."""
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from kif_jax.models import T5Config, forward, from_pretrained, greedy_decode
from kif_jax.models.t5 import relative_position_buckets

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
KINDS = ("t5_v1_0", "t5_v1_1", "t5_v1_1_bf16_sharded")


pytestmark = pytest.mark.usefixtures("fp32_matmuls")  # exact float32 matmuls (tests/conftest.py)


@pytest.fixture(scope="module", params=KINDS)
def loaded(request):
    kind = request.param
    return kind, from_pretrained(str(FIXTURES / kind)), dict(np.load(FIXTURES / f"{kind}.npz"))


def logits(model, g, decoder_mask=None):
    """Teacher-forced logits; always with a decoder mask, so every call shares one compiled program."""
    if decoder_mask is None:
        decoder_mask = np.ones_like(g["decoder_input_ids"])
    return np.asarray(forward(model, g["input_ids"], g["decoder_input_ids"], g["attention_mask"], decoder_mask))


def test_relative_position_buckets_match_reference_bit_for_bit():
    tables = np.load(FIXTURES / "t5_buckets.npz")
    assert tables["relative_position"][0] == -600
    for key in (k for k in tables.files if k.startswith("b")):
        buckets, distance, direction = key[1:].split("_")
        mine = relative_position_buckets(1, 1201, bidirectional=direction == "bi", num_buckets=int(buckets),
                                         max_distance=int(distance[1:]), offset=600)[0]
        np.testing.assert_array_equal(mine, tables[key], err_msg=key)


def test_configs_are_read_as_intended(loaded):
    kind, model, _ = loaded
    cfg = model.config
    if kind == "t5_v1_0":
        assert (cfg.feed_forward_proj, cfg.tie_word_embeddings, cfg.scale_decoder_outputs) == ("relu", True, True)
    else:  # hub style (tie false) and transformers-5 style (tie true, a distinct lm_head) both untie
        assert (cfg.feed_forward_proj, cfg.tie_word_embeddings, cfg.scale_decoder_outputs) == (
            "gated-gelu", False, False)
        assert (cfg.num_layers, cfg.num_decoder_layers, cfg.relative_attention_num_buckets) == (2, 3, 16)


def test_logits_match_pytorch(loaded):
    kind, model, g = loaded
    got = logits(model, g)
    assert got.dtype == np.float32 and got.shape == g["logits"].shape
    diff = np.abs(got - g["logits"]).max()
    assert diff <= 1e-4, f"{kind}: max |logit diff| {diff}"
    masked = logits(model, g, g["decoder_attention_mask"])
    assert np.abs(masked - g["logits_dec_mask"]).max() <= 1e-4
    assert np.abs(g["logits_dec_mask"] - g["logits"]).max() > 1e-3  # the decoder mask mattered


def test_greedy_matches_pytorch_generate(loaded):
    kind, model, g = loaded
    assert g["greedy_min_margin"] > 10 * 1e-4  # no near-tie that float noise could flip
    out = greedy_decode(model, g["input_ids"], g["attention_mask"], max_new_tokens=g["greedy"].shape[1])
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), g["greedy"], err_msg=kind)


def test_bf16_load():
    g = dict(np.load(FIXTURES / "t5_v1_1_bf16_sharded.npz"))
    model = from_pretrained(str(FIXTURES / "t5_v1_1_bf16_sharded"), dtype=jnp.bfloat16)
    assert model.shared.embedding[...].dtype == jnp.bfloat16
    assert model.decoder.blocks[2].ff.wo.kernel[...].dtype == jnp.bfloat16
    got = logits(model, g)
    assert got.dtype == np.float32
    diff = np.abs(got - g["logits"])  # bf16 compute against the float32 reference of the same weights
    assert diff.max() < 0.2 and diff.mean() < 0.03, (diff.max(), diff.mean())
    assert (got.argmax(-1) == g["logits"].argmax(-1)).mean() > 0.8


def test_config_from_hub_and_transformers5_styles():
    base = dict(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, model_type="t5")
    old_v10 = T5Config.from_hf(base)  # e.g. t5-large's config.json: no tie key at all
    assert old_v10.tie_word_embeddings and old_v10.scale_decoder_outputs and old_v10.num_decoder_layers == 2
    flan = T5Config.from_hf({**base, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
                             "eos_token_id": [1], "num_decoder_layers": 3})
    assert not flan.tie_word_embeddings and not flan.scale_decoder_outputs
    assert flan.is_gated and flan.activation == "gelu_new" and flan.eos_token_id == 1
    v5 = T5Config.from_hf({**base, "tie_word_embeddings": True, "scale_decoder_outputs": False})
    assert v5.tie_word_embeddings and not v5.scale_decoder_outputs
    assert T5Config.from_hf(old_v10.to_hf()) == old_v10
    assert T5Config.from_hf(flan.to_hf()) == flan
