"""Decoder-only LMs: parity with Hugging Face's PyTorch models (goldens from tools/make_decoder_fixtures.py),
configs, LoRA, loading errors, decoding and scoring, export round trip."""
import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kif_jax.errors import ConfigError, ModelLoadError
from kif_jax.models import LoRAConfig, LoRAParam, from_pretrained, lora_modules
from kif_jax.models.decoder import hf as decoder_hf
from kif_jax.models.decoder import (PRESET_CONFIGS, PRESETS, TINY_PRESETS, DecoderConfig, DecoderLM, hub_id, merge_lora,
                                    rope_inv_freq)
from kif_jax.models.decoder.generate import forward_lm, greedy_decode_lm, pad_left, score_options_lm

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
VARIANTS = ("llama", "llama3", "mistral", "qwen2", "qwen3")
# Rows longer than the sliding window: Mistral (window 4 on every layer) and Gemma 3 (sliding, full, sliding).
WINDOW_VARIANTS = ("mistral_window", "gemma3")
QV = LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj"))


pytestmark = pytest.mark.usefixtures("fp32_matmuls")  # exact float32 matmuls (tests/conftest.py)


@pytest.fixture(scope="module")
def models():
    """variant -> (model, golden); loaded once for the module."""
    return {v: (decoder_hf.load_decoder(str(FIXTURES / f"decoder_{v}")),
                dict(np.load(FIXTURES / f"decoder_{v}.npz"))) for v in VARIANTS + WINDOW_VARIANTS}


def real_diff(got: np.ndarray, g: dict) -> float:
    """Largest |logit difference| over the real (unpadded) positions."""
    return float(np.abs(got - g["logits"])[g["attention_mask"].astype(bool)].max())


# --------------------------------------------------------------------------------------------
# Configs and presets
# --------------------------------------------------------------------------------------------


def test_fixture_configs_are_read_as_intended(models):
    llama, llama3, mistral, qwen2, qwen3 = (models[v][0].config for v in VARIANTS)
    assert (llama.num_key_value_heads, llama.rope_theta, llama.tie_word_embeddings) == (2, 5e5, False)
    assert llama3.rope_type == "llama3" and llama3.tie_word_embeddings
    assert (llama3.eos_token_id, llama3.eos_token_ids, llama3.pad_token_id) == (2, (2, 3), 0)
    assert dict(llama3.rope_scaling)["original_max_position_embeddings"] == 256
    assert (mistral.sliding_window, mistral.num_key_value_heads, mistral.head_dim) == (32, 1, 8)
    assert qwen2.attention_bias and not qwen2.qk_norm and qwen2.sliding_window is None
    assert qwen3.qk_norm and not qwen3.attention_bias and qwen3.head_dim == 16 != qwen3.hidden_size // 4
    assert not hasattr(models["llama3"][0], "lm_head") and hasattr(models["llama"][0], "lm_head")
    assert models["qwen2"][0].model.layers[1].self_attn.k_proj.use_bias
    assert not models["qwen2"][0].model.layers[1].self_attn.o_proj.use_bias


def test_legacy_and_transformers5_rope_keys_agree():
    hf = json.loads((FIXTURES / "decoder_llama3" / "config.json").read_text())
    new = DecoderConfig.from_hf(hf)
    params = dict(hf.pop("rope_parameters"))
    hf["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")  # the oldest spelling
    hf["rope_scaling"] = params
    assert DecoderConfig.from_hf(hf) == new
    plain = DecoderConfig.from_hf({**hf, "rope_scaling": None, "rope_parameters": {"rope_theta": 1e6,
                                                                                  "rope_type": "default"}})
    assert plain.rope_scaling is None and plain.rope_theta == 1e6
    assert DecoderConfig.from_hf(new.to_hf()) == new
    tiny = TINY_PRESETS["tiny-llama-byte"]
    assert tiny.bos_token_id is None and DecoderConfig.from_hf(json.loads(json.dumps(tiny.to_hf()))) == tiny
    qwen = DecoderConfig.from_hf({"model_type": "qwen2", "eos_token_id": 5, "vocab_size": 10, "hidden_size": 8,
                                  "num_attention_heads": 2, "sliding_window": 4, "use_sliding_window": False})
    assert qwen.sliding_window is None and qwen.attention_bias and qwen.pad_token_id == 5


def test_rope_inverse_frequencies_match_pytorch():
    for v in VARIANTS:
        cfg = DecoderConfig.from_json(str(FIXTURES / f"decoder_{v}" / "config.json"))
        np.testing.assert_allclose(rope_inv_freq(cfg), np.load(FIXTURES / f"decoder_{v}.npz")["inv_freq"],
                                   rtol=1e-6, err_msg=v)
    cfg = DecoderConfig.from_json(str(FIXTURES / "decoder_llama3" / "config.json"))
    base = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    scaled = rope_inv_freq(cfg)
    ratio = base / scaled
    assert ratio[0] == 1.0 and 1.0 < ratio[2] < 8.0 and np.allclose(ratio[3:], 8.0)  # all three bands
    factors = tuple(float(r) for r in ratio)  # GGUF's rope_freqs hold exactly these ratios
    gguf_style = dataclasses.replace(cfg, rope_scaling=None, rope_freq_factors=factors)
    np.testing.assert_allclose(rope_inv_freq(gguf_style), scaled, rtol=1e-6)


@pytest.mark.parametrize("fields, match", [
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(model_type="gpt2"), "model_type"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(head_dim=7), "head_dim"),
    (dict(eos_token_id=400), "eos_token_id"),
    (dict(pad_token_id=-1), "pad_token_id"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
    (dict(rope_freq_factors=(1.0, 2.0)), "rope_freq_factors"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_dropout=1.0), "attention_dropout"),
    (dict(sliding_window=0), "sliding_window"),
])
def test_config_validation_names_the_field(fields, match):
    base = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(ConfigError, match=match):
        DecoderConfig(**{**base, **fields})


def test_from_hf_errors_are_one_line():
    with pytest.raises(ConfigError, match="model_type"):
        DecoderConfig.from_hf({"model_type": "t5"})
    with pytest.raises(ConfigError, match="mlp_bias"):
        DecoderConfig.from_hf({"model_type": "llama", "mlp_bias": True})
    with pytest.raises(ConfigError, match="rope_scaling"):
        DecoderConfig.from_hf({"model_type": "llama", "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        DecoderConfig.from_hf({"model_type": "llama", "num_hidden_layers": "two"})


def test_gemma3_and_window_fixtures_are_read_as_intended(models):
    gemma, g = models["gemma3"]
    cfg = gemma.config
    assert cfg.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert (cfg.sliding_window, cfg.head_dim, cfg.hidden_size // cfg.num_attention_heads) == (4, 16, 8)
    assert (cfg.query_pre_attn_scalar, cfg.final_logit_softcapping, cfg.attn_logit_softcapping) == (12.0, 10.0, None)
    assert (cfg.rope_theta, cfg.rope_local_base_freq, dict(cfg.rope_scaling)) == (
        1e6, 1e4, {"rope_type": "linear", "factor": 2.0})
    assert cfg.hidden_act == "gelu_pytorch_tanh" and cfg.qk_norm and cfg.tie_word_embeddings
    assert cfg.eos_token_ids == (2, 3)
    layer = gemma.model.layers[0]
    assert layer.pre_feedforward_layernorm.unit_offset and layer.self_attn.q_norm.unit_offset
    assert g["attention_mask"].sum(1).max() > cfg.sliding_window  # the window binds in the fixture
    mistral = models["mistral_window"][0].config
    assert mistral.layer_types == ("sliding_attention",) * 2 and mistral.sliding_window == 4
    for kind in ("full_attention", "sliding_attention"):
        np.testing.assert_allclose(rope_inv_freq(cfg, kind), g[f"inv_freq_{kind}"], rtol=1e-6, err_msg=kind)
    assert DecoderConfig.from_hf(cfg.to_hf()) == cfg
    # The hub's legacy spelling of the same config reads the same.
    legacy = {k: v for k, v in json.loads((FIXTURES / "decoder_gemma3" / "config.json").read_text()).items()
              if k not in ("rope_parameters", "layer_types")}
    legacy.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 2.0},
                  num_hidden_layers=3, sliding_window_pattern=2)
    assert DecoderConfig.from_hf(legacy) == cfg


@pytest.mark.parametrize("fields, match", [
    (dict(layer_types=("full_attention",)), "one type per layer"),
    (dict(layer_types=("full_attention", "local")), "local"),
    (dict(layer_types=("full_attention", "sliding_attention")), "sliding_window is None"),
    (dict(query_pre_attn_scalar=0), "query_pre_attn_scalar"),
    (dict(final_logit_softcapping="x"), "final_logit_softcapping"),
])
def test_layer_type_and_gemma_fields_are_validated(fields, match):
    base = dict(model_type="gemma3_text", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4)
    with pytest.raises(ConfigError, match=match):
        DecoderConfig(**{**base, **fields})
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        DecoderConfig.from_hf({"model_type": "gemma3_text", "use_bidirectional_attention": True})
    with pytest.raises(ConfigError, match="supported: llama, mistral, qwen2, qwen3, gemma3_text"):
        DecoderConfig.from_hf({"model_type": "gemma2"})


def test_presets():
    assert PRESETS["llama-2-7b"] == "meta-llama/Llama-2-7b-hf"
    assert PRESETS["llama-2-13b-chat"] == "meta-llama/Llama-2-13b-chat-hf"
    assert PRESETS["qwen3-0.6b"] == "Qwen/Qwen3-0.6B"
    assert PRESETS["smollm2-135m-instruct"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"llama-3.2-1b", "llama-3.1-8b", "mistral-7b-v0.1", "qwen2.5-0.5b", "qwen2.5-7b-instruct",
            "qwen3-8b", "smollm2-1.7b"} <= set(PRESETS)
    tiny = TINY_PRESETS["tiny-llama-byte"]
    assert (tiny.vocab_size, tiny.pad_token_id, tiny.eos_token_id, tiny.hidden_size, tiny.num_hidden_layers,
            tiny.num_attention_heads, tiny.num_key_value_heads, tiny.intermediate_size) == (259, 0, 1, 64, 2, 4, 2, 128)
    assert hub_id("tiny-llama-byte") is None
    assert PRESETS["gemma-3-270m-it"] == "google/gemma-3-270m-it" and PRESETS["gemma-3-1b"] == "google/gemma-3-1b-pt"
    for name, (hidden, ff, layers) in {"gemma-3-270m": (640, 2048, 18), "gemma-3-1b": (1152, 6912, 26)}.items():
        for cfg in (PRESET_CONFIGS[name], PRESET_CONFIGS[f"{name}-it"]):
            assert (cfg.model_type, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (
                "gemma3_text", hidden, ff, layers)
            assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.query_pre_attn_scalar,
                    cfg.sliding_window, cfg.vocab_size) == (4, 1, 256, 256, 512, 262144)
            assert cfg.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
            assert (cfg.rope_theta, cfg.rope_local_base_freq, cfg.final_logit_softcapping) == (1e6, 1e4, None)
        assert PRESET_CONFIGS[f"{name}-it"].eos_token_ids == (1, 106)
    with pytest.raises(ConfigError, match="unknown decoder preset"):
        hub_id("llama-9")


# --------------------------------------------------------------------------------------------
# Parity with PyTorch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS + WINDOW_VARIANTS)
def test_logits_and_greedy_match_pytorch(models, variant):
    model, g = models[variant]
    got = np.asarray(forward_lm(model, g["input_ids"], g["attention_mask"]))
    assert got.dtype == np.float32 and got.shape == g["logits"].shape
    diff = real_diff(got, g)
    assert diff <= 1e-4, f"{variant}: max |logit diff| {diff}"
    assert g["greedy_min_margin"] > 10 * 1e-4  # no near-tie that float noise could flip
    out = greedy_decode_lm(model, g["input_ids"], g["attention_mask"], max_new_tokens=g["greedy"].shape[1])
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), g["greedy"], err_msg=variant)


def test_greedy_stops_at_eos_and_pads_after_it(models):
    _, g = models["llama"]
    eos, pad = 2, 0
    rows = g["greedy"]
    assert rows[0, 0] == eos and (rows[0, 1:] == pad).all()  # EOS kept, pad after it
    assert rows[1, 4] == eos and rows[1, 5] == pad  # every row done before the end: early exit


def test_left_padded_row_equals_unpadded(models):
    model, g = models["qwen3"]
    n = int(g["attention_mask"][2].sum())
    alone = np.asarray(forward_lm(model, g["input_ids"][2:, -n:], None))[0]
    padded = np.asarray(forward_lm(model, g["input_ids"], g["attention_mask"]))[2, -n:]
    assert np.abs(alone - padded).max() <= 1e-5
    assert np.abs(alone - g["logits"][2, -n:]).max() <= 1e-4


def test_kv_cache_prefill_and_steps_equal_the_full_forward(models):
    model, g = models["mistral"]
    ids, mask = jnp.asarray(g["input_ids"]), jnp.asarray(g["attention_mask"])
    nxt = jnp.asarray([[5, 7], [9, 0], [0, 3]])  # pad id 0 used as a real token

    @nnx.jit
    def run(model):
        cache = model.init_cache(3, ids.shape[1] + 2)
        _, cache = model.extend(ids, mask, cache)
        h1, cache = model.extend(nxt[:, :1], None, cache)
        h2, _ = model.extend(nxt[:, 1:], None, cache)
        full = model(jnp.concatenate([ids, nxt], 1), jnp.concatenate([mask, jnp.ones_like(nxt)], 1))
        return model.logits(h1)[:, 0], model.logits(h2)[:, 0], full

    step1, step2, full = run(model)
    assert np.abs(step1 - full[:, -2]).max() <= 1e-5
    assert np.abs(step2 - full[:, -1]).max() <= 1e-5


@pytest.mark.parametrize("variant", WINDOW_VARIANTS)
def test_sliding_window_binds_and_the_cache_honours_it(models, variant):
    model, g = models[variant]
    ids, mask = g["input_ids"], g["attention_mask"]
    real = mask.astype(bool)
    # Without the window the same weights give other logits: the parity above depends on the window.
    unwindowed = dataclasses.replace(model.config, sliding_window=None, layer_types=None)
    wide = nnx.merge(nnx.graphdef(DecoderLM(unwindowed, rngs=nnx.Rngs(0))), nnx.state(model))
    assert np.abs(np.asarray(forward_lm(wide, ids, mask)) - g["logits"])[real].max() > 1e-2
    # Prefill, then steps far past the window, equal the full forward pass; a row alone equals it padded.
    nxt = jnp.asarray([[5, 7, 9, 11, 13, 15]] * 3)

    @nnx.jit
    def run(model):
        cache = model.init_cache(3, ids.shape[1] + nxt.shape[1])
        _, cache = model.extend(ids, mask, cache)
        steps = []
        for j in range(nxt.shape[1]):
            h, cache = model.extend(nxt[:, j:j + 1], None, cache)
            steps.append(model.logits(h)[:, 0])
        full = model(jnp.concatenate([ids, nxt], 1), jnp.concatenate([mask, jnp.ones_like(nxt)], 1))
        return jnp.stack(steps, 1), full[:, ids.shape[1]:]

    steps, full = run(model)
    assert np.abs(np.asarray(steps) - np.asarray(full)).max() <= 1e-5
    # Sliding layers keep only their window's slots; full layers every slot.
    cfg = model.config
    cache = model.init_cache(3, ids.shape[1] + nxt.shape[1])
    assert [k.shape[1] for k in cache.k] == [cfg.sliding_window if kind == "sliding_attention" else 18
                                             for kind in cfg.layer_types]
    assert cache.window_mask.shape == (3, cfg.sliding_window)
    n = int(mask[2].sum())
    alone = np.asarray(forward_lm(model, ids[2:, -n:], None))[0]
    assert np.abs(alone - g["logits"][2, -n:]).max() <= 1e-4


@pytest.mark.parametrize("variant", ["qwen2", "gemma3"])  # gemma3: windows over right-padded options
def test_score_options_equals_the_concatenated_forward(models, variant):
    model, g = models[variant]
    ids, mask = g["input_ids"], g["attention_mask"]
    options = [[[0, 5, 9], [7, 0, 0]], [[11], [12, 13, 14]], [[2, 3], [0]]]  # 0 is pad and a real token
    t = 3
    option_ids = np.zeros((3, 2, t), np.int32)
    option_mask = np.zeros((3, 2, t), np.int32)
    for b, row in enumerate(options):
        for c, opt in enumerate(row):
            option_ids[b, c, :len(opt)] = opt
            option_mask[b, c, :len(opt)] = 1
    got = np.asarray(score_options_lm(model, ids, mask, option_ids, option_mask))
    assert got.shape == (3, 2) and got.dtype == np.float32
    # The reference: every prompt + option as one left-padded sequence, through the plain forward.
    pairs = [(b, c) for b in range(3) for c in range(2)]
    rows = [list(ids[b][mask[b].astype(bool)]) + options[b][c] for b, c in pairs]
    seqs, seq_mask = pad_left(rows, max(map(len, rows)), pad_id=0)
    logp = np.asarray(jax.nn.log_softmax(forward_lm(model, seqs, seq_mask), axis=-1))
    for r, (b, c) in enumerate(pairs):
        opt, end = options[b][c], seqs.shape[1]
        want = sum(logp[r, end - len(opt) - 1 + j, tok] for j, tok in enumerate(opt))
        assert abs(got[b, c] - want) <= 1e-4, (b, c, got[b, c], want)


def test_pad_left():
    ids, mask = pad_left([[5, 6, 7], [8], [], [1, 2, 3, 4, 5]], 4, pad_id=0, batch_size=5)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0], [2, 3, 4, 5], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 1]])


# --------------------------------------------------------------------------------------------
# bfloat16, sharded checkpoints, loading errors
# --------------------------------------------------------------------------------------------


def test_bf16_sharded_load():
    directory = FIXTURES / "decoder_llama_bf16"
    assert len(list(directory.glob("*.safetensors"))) == 2 and (directory / "model.safetensors.index.json").exists()
    g = dict(np.load(FIXTURES / "decoder_llama_bf16.npz"))
    exact = decoder_hf.load_decoder(str(directory))  # bf16 weights read into float32: the golden exactly
    assert real_diff(np.asarray(forward_lm(exact, g["input_ids"], g["attention_mask"])), g) <= 1e-4
    model = decoder_hf.load_decoder(str(directory), dtype=jnp.bfloat16)
    assert model.model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    assert model.model.layers[1].mlp.down_proj.kernel[...].dtype == jnp.bfloat16
    assert model.lm_head.kernel[...].dtype == jnp.bfloat16
    got = np.asarray(forward_lm(model, g["input_ids"], g["attention_mask"]))
    assert got.dtype == np.float32
    spread = np.abs(g["logits"][g["attention_mask"].astype(bool)]).max()
    assert real_diff(got, g) <= 0.05 * spread


def test_from_pretrained_dispatches_decoder_checkpoints():
    model = from_pretrained(str(FIXTURES / "decoder_qwen3"))
    assert isinstance(model, DecoderLM) and model.config.model_type == "qwen3"


def test_loader_collects_every_problem(tmp_path):
    from safetensors.numpy import load_file, save_file

    directory = tmp_path / "broken"
    shutil.copytree(FIXTURES / "decoder_llama", directory)
    tensors = load_file(str(directory / "model.safetensors"))
    tensors["model.layers.0.mlp.upp_proj.weight"] = tensors.pop("model.layers.0.mlp.up_proj.weight")
    tensors["model.layers.1.self_attn.q_proj.weight"] = tensors["model.layers.1.self_attn.q_proj.weight"][:-1]
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(ModelLoadError) as err:
        decoder_hf.load_decoder(str(directory))
    msg = str(err.value)
    assert "model.layers.0.mlp.upp_proj.weight" in msg and "model.layers.1.self_attn.q_proj.weight" in msg
    assert "model.layers.0.mlp.up_proj.kernel" in msg  # and the parameter left without a tensor
    with pytest.raises(ModelLoadError, match="does not exist"):
        decoder_hf.load_decoder(str(tmp_path / "missing.gguf"))


def test_tied_head_copies_are_ignored_and_distinct_heads_untie(tmp_path):
    from safetensors.numpy import load_file, save_file

    for name, head in (("same", None), ("distinct", 0.5)):
        directory = tmp_path / name
        shutil.copytree(FIXTURES / "decoder_qwen2", directory)
        tensors = load_file(str(directory / "model.safetensors"))
        emb = tensors["model.embed_tokens.weight"]
        tensors["lm_head.weight"] = emb.copy() if head is None else emb * head
        tensors["model.rotary_emb.inv_freq"] = np.ones(4, np.float32)  # a stored RoPE buffer is ignored
        save_file(tensors, str(directory / "model.safetensors"))
        model = decoder_hf.load_decoder(str(directory))
        assert model.config.tie_word_embeddings == (head is None)
        if head is not None:
            np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]), (emb * head).T)


class _DictReader:
    """The reader interface (as a GGUF checkpoint offers it) over an in-memory dict."""

    def __init__(self, tensors):
        self.tensors = tensors

    def names(self):
        return sorted(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def dtype(self, name):
        return "F32"

    def get(self, name):
        return self.tensors[name]


def test_any_reader_with_the_interface_loads(models):
    from safetensors.numpy import load_file

    model, _ = models["llama3"]
    tensors = load_file(str(FIXTURES / "decoder_llama3" / "model.safetensors"))
    other = decoder_hf.load_from_reader(model.config, _DictReader(tensors), dtype=jnp.bfloat16)
    want = nnx.to_flat_state(nnx.state(model))
    got = dict(nnx.to_flat_state(nnx.state(other)))
    for path, var in want:
        assert got[path][...].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got[path][...]), np.asarray(var[...].astype(jnp.bfloat16)))


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------


def test_lora_split_holds_only_targeted_adapters():
    model = decoder_hf.load_decoder(str(FIXTURES / "decoder_qwen3"), lora=QV, seed=3)
    graphdef, lora, frozen = nnx.split(model, LoRAParam, ...)
    lora_paths = {tuple(p) for p, _ in nnx.to_flat_state(lora)}
    want = {("model", "layers", i, "self_attn", proj, ab) for i in range(2) for proj in ("q_proj", "v_proj")
            for ab in ("lora_a", "lora_b")}
    assert lora_paths == want
    assert not any(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(frozen))
    assert lora_modules(model) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    for p, v in nnx.to_flat_state(lora):
        assert v[...].dtype == jnp.float32
        if p[-1] == "lora_b":
            assert not np.asarray(v[...]).any()
    with pytest.raises(ConfigError, match="matches no projection"):
        DecoderLM(TINY_PRESETS["tiny-llama-byte"], lora=LoRAConfig(targets=("query",)), rngs=nnx.Rngs(0))


def test_lora_zero_b_is_bit_identical_and_random_ab_equals_merged(models):
    base, g = models["llama"]
    model = decoder_hf.load_decoder(str(FIXTURES / "decoder_llama"), lora=QV, seed=1)
    ids, mask = g["input_ids"], g["attention_mask"]
    np.testing.assert_array_equal(np.asarray(forward_lm(model, ids, mask)), np.asarray(forward_lm(base, ids, mask)))
    rng = np.random.default_rng(0)
    for _, m in nnx.iter_graph(model):
        if getattr(m, "has_lora", False):
            m.lora_b[...] = jnp.asarray(rng.normal(0.0, 0.2, m.lora_b[...].shape), jnp.float32)
    adapted = np.asarray(forward_lm(model, ids, mask))
    merged = np.asarray(forward_lm(merge_lora(model), ids, mask))
    real = mask.astype(bool)
    assert np.abs(adapted - merged)[real].max() <= 1e-4
    assert np.abs(adapted - g["logits"])[real].max() > 1e-2  # the adapters changed the model


def test_dropout_comes_from_the_call_rngs():
    cfg = dataclasses.replace(TINY_PRESETS["tiny-llama-byte"], attention_dropout=0.2)
    model = DecoderLM(cfg, lora=LoRAConfig(dropout=0.3, targets=("q_proj", "v_proj", "lm_head")), rngs=nnx.Rngs(0))
    ids = jnp.asarray([[5, 6, 7, 8]])
    a = model(ids, deterministic=False, rngs=nnx.Rngs(dropout=1))
    b = model(ids, deterministic=False, rngs=nnx.Rngs(dropout=1))
    c = model(ids, deterministic=False, rngs=nnx.Rngs(dropout=2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 0
    assert np.abs(np.asarray(a) - np.asarray(model(ids))).max() > 0
    with pytest.raises(ValueError, match="rngs"):
        model(ids, deterministic=False)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip(models, tmp_path):
    _, g = models["llama"]
    model = decoder_hf.load_decoder(str(FIXTURES / "decoder_llama"), lora=QV, seed=2)
    rng = np.random.default_rng(1)
    for _, m in nnx.iter_graph(model):
        if getattr(m, "has_lora", False):
            m.lora_b[...] = jnp.asarray(rng.normal(0.0, 0.2, m.lora_b[...].shape), jnp.float32)
    decoder_hf.save_pretrained(model, str(tmp_path / "out"))
    back = decoder_hf.load_decoder(str(tmp_path / "out"))
    assert back.config == model.config
    ids, mask = g["input_ids"], g["attention_mask"]
    want = np.asarray(forward_lm(merge_lora(model), ids, mask))
    np.testing.assert_allclose(np.asarray(forward_lm(back, ids, mask)), want, atol=1e-6)
    # Tied head, llama3 rope scaling and two stop ids survive the round trip too (no lm_head written).
    tied, _ = models["llama3"]
    decoder_hf.save_pretrained(tied, str(tmp_path / "tied"))
    assert "lm_head.weight" not in decoder_hf.to_hf_state_dict(tied)
    assert decoder_hf.load_decoder(str(tmp_path / "tied")).config == tied.config


def test_gemma3_save_pretrained_round_trip_with_lora_by_hf_names(models, tmp_path):
    _, g = models["gemma3"]
    every = LoRAConfig(rank=2, alpha=4.0, dropout=0.0,
                       targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    model = decoder_hf.load_decoder(str(FIXTURES / "decoder_gemma3"), lora=every, seed=2)
    assert len(lora_modules(model)) == 3 * 7
    rng = np.random.default_rng(4)
    for _, m in nnx.iter_graph(model):
        if getattr(m, "has_lora", False):
            m.lora_b[...] = jnp.asarray(rng.normal(0.0, 0.2, m.lora_b[...].shape), jnp.float32)
    decoder_hf.save_pretrained(model, str(tmp_path / "out"))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["Gemma3ForCausalLM"] and written["query_pre_attn_scalar"] == 12
    assert "model.layers.0.pre_feedforward_layernorm.weight" in decoder_hf.to_hf_state_dict(model)
    back = decoder_hf.load_decoder(str(tmp_path / "out"))
    assert back.config == model.config
    ids, mask = g["input_ids"], g["attention_mask"]
    got, want = np.asarray(forward_lm(back, ids, mask)), np.asarray(forward_lm(model, ids, mask))
    assert np.abs(got - want)[mask.astype(bool)].max() <= 1e-4
    assert np.abs(got - g["logits"])[mask.astype(bool)].max() > 1e-2  # the adapters changed the model


def test_gemma3_chunked_loss_and_its_gradient_equal_the_full_logits(models):
    """The loss's fast path runs the model's soft-capped tied head chunk by chunk: same value, same gradient."""
    from kif_jax.data import IGNORE_INDEX
    from kif_jax.models.decoder.family import CausalFamily
    from kif_jax.models.family import masked_mean_nll

    model, g = models["gemma3"]
    labels = np.where(g["attention_mask"].astype(bool), g["input_ids"], IGNORE_INDEX)
    labels[:, :6] = IGNORE_INDEX  # a prompt outside the loss
    batch = {"input_ids": jnp.asarray(g["input_ids"]), "attention_mask": jnp.asarray(g["attention_mask"]),
             "labels": jnp.asarray(labels)}
    graphdef, state = nnx.split(model)

    def fast(state):
        return CausalFamily().token_loss(nnx.merge(graphdef, state), batch, key=None)[0]

    def full(state):
        m = nnx.merge(graphdef, state)
        return masked_mean_nll(m(batch["input_ids"], batch["attention_mask"])[:, :-1], batch["labels"][:, 1:])[0]

    (a, ga), (b, gb) = jax.value_and_grad(fast)(state), jax.value_and_grad(full)(state)
    assert abs(float(a) - float(b)) <= 1e-5
    for (path, x), (_, y) in zip(nnx.to_flat_state(ga), nnx.to_flat_state(gb)):
        np.testing.assert_allclose(np.asarray(x[...]), np.asarray(y[...]), atol=2e-6, err_msg=str(path))
    emb = dict(nnx.to_flat_state(ga))[("model", "embed_tokens", "embedding")][...]
    assert np.abs(np.asarray(emb)).max() > 1e-3  # the tied head's gradient flows through the soft-cap


# --------------------------------------------------------------------------------------------
# The architecture registry
# --------------------------------------------------------------------------------------------


def test_registry_is_the_list_errors_name(tmp_path):
    from kif_jax.models.architectures import ARCHITECTURES, GGUF_ARCHITECTURES
    from kif_jax.models.decoder.architectures import DECODER_TYPES

    assert DECODER_TYPES == ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
    assert sorted(GGUF_ARCHITECTURES) == ["gemma3", "llama", "qwen2", "qwen3"]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="supported: " + ", ".join(ARCHITECTURES)):
        from_pretrained(str(tmp_path))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_every_parameter_has_a_hugging_face_name_both_ways(model_type):
    from kif_jax.models.architectures import hf_to_model_path, model_to_hf_name

    cfg = DecoderConfig(model_type=model_type, vocab_size=50, hidden_size=16, intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=2, attention_bias=model_type != "mistral",
                        tie_word_embeddings=False)
    model = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))]
    names = set()
    for path in paths:
        name, _ = model_to_hf_name(path, model_type)
        assert hf_to_model_path(name, model_type)[0] == path
        names.add(name)
    assert len(names) == len(paths)
    gemma = model_type == "gemma3_text"
    assert ("model.layers.1.post_feedforward_layernorm.weight" in names) == gemma
    assert ("model.layers.0.self_attn.q_norm.weight" in names) == (model_type in ("qwen3", "gemma3_text"))


def test_generation_config_stop_ids_are_added(tmp_path):
    directory = tmp_path / "it"
    shutil.copytree(FIXTURES / "decoder_gemma3", directory)
    generation = json.loads((directory / "generation_config.json").read_text())
    assert decoder_hf.load_decoder(str(directory)).config.eos_token_ids == (2, 3)
    (directory / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [2, 6]}))
    model = decoder_hf.load_decoder(str(directory))
    assert (model.config.eos_token_id, model.config.eos_token_ids) == (2, (2, 3, 6))
    (directory / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": 999}))
    with pytest.raises(ModelLoadError, match="generation_config.json: eos_token_id 999"):
        decoder_hf.load_decoder(str(directory))


def test_gemma3_embedding_scale_is_rounded_to_the_embedding_dtype():
    """As transformers: embeddings times sqrt(hidden_size) cast to the table's dtype first (bf16: 5.65625 for 32)."""
    model = decoder_hf.load_decoder(str(FIXTURES / "decoder_gemma3"), dtype=jnp.bfloat16)
    table = model.model.embed_tokens.embedding[...]  # [180, 32] bfloat16
    scale = jnp.asarray(np.float32(np.sqrt(32.0)), jnp.bfloat16)
    assert float(scale) == 5.65625
    got = model.model.embed(jnp.arange(180)[None])[0]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(table * scale, np.float32))
    unrounded = (table.astype(jnp.float32) * np.float32(np.sqrt(32.0))).astype(jnp.bfloat16)
    assert int(jnp.sum(unrounded != got)) > 10  # the other order of rounding gives other embeddings
