"""T5 configs, presets, loading errors, export round trip."""
import dataclasses
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kif_jax.errors import ConfigError, ModelLoadError
from kif_jax.models import (
    PRESETS,
    T5_PRESETS,
    forward,
    LoRAConfig,
    LoRAParam,
    T5,
    T5Config,
    from_pretrained,
    lora_modules,
    preset,
    save_pretrained,
)
from kif_jax.models.architectures import hf_to_model_path, model_to_hf_name

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


pytestmark = pytest.mark.usefixtures("fp32_matmuls")  # exact float32 matmuls (tests/conftest.py)


def test_tiny_config_defaults_and_replace():
    cfg = T5Config(vocab_size=259, d_model=64)
    assert (cfg.num_decoder_layers, cfg.scale_decoder_outputs, cfg.pad_token_id, cfg.eos_token_id,
            cfg.decoder_start_token_id) == (6, True, 0, 1, 0)
    small = dataclasses.replace(cfg, num_layers=2, num_decoder_layers=2, feed_forward_proj="gated-gelu")
    assert small.num_layers == 2 and small.is_gated and hash(small) != hash(cfg)
    with pytest.raises(ConfigError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="gated-tanhh")
    with pytest.raises(ConfigError, match="d_model"):
        T5Config(d_model=0)
    with pytest.raises(ConfigError, match="rank"):
        LoRAConfig(rank=0)


def test_presets():
    assert {"t5-small", "t5-base", "t5-large", "flan-t5-large", "flan-t5-xl"} <= set(T5_PRESETS)
    hub, large = T5_PRESETS["t5-large"]
    # kif_jax.models.PRESETS: every family's names -> hub ids.
    assert PRESETS["t5-large"] == hub and PRESETS["gemma-3-270m-it"] == "google/gemma-3-270m-it"
    assert hub == "google-t5/t5-large" and (large.d_model, large.num_layers, large.num_heads) == (1024, 24, 16)
    assert preset("flan-t5-xl").d_model == 2048 and not preset("flan-t5-xl").tie_word_embeddings
    assert preset("flan-t5-large").is_gated and preset("flan-t5-large").d_ff == 2816
    with pytest.raises(ConfigError, match="unknown T5 preset"):
        preset("t5-huge")
    # The paper's adapter placement: q and v of every attention block, 144 modules in T5-large.
    abstract = nnx.eval_shape(lambda: T5(large, lora=LoRAConfig(), rngs=nnx.Rngs(0)))
    assert len(lora_modules(abstract)) == 144
    n_params = sum(np.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Not(LoRAParam))))
    assert 737e6 < n_params < 738e6  # t5-large: 737.67M parameters


def test_name_table_round_trips():
    for name in ("encoder.block.3.layer.0.SelfAttention.q.weight", "decoder.block.1.layer.1.EncDecAttention.o.weight",
                 "decoder.block.0.layer.2.DenseReluDense.wi_1.weight", "lm_head.weight",
                 "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                 "decoder.final_layer_norm.weight", "shared.weight"):
        path, _ = hf_to_model_path(name, "t5")
        assert model_to_hf_name(path, "t5")[0] == name
    assert hf_to_model_path("encoder.block.0.layer.1.EncDecAttention.q.weight", "t5") is None


def _copy(tmp_path, kind="t5_v1_0"):
    dst = tmp_path / kind
    shutil.copytree(FIXTURES / kind, dst)
    return dst


def test_load_errors_are_collected_in_one_message(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy(tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["encoder.final_layer_norm.weight"]
    tensors["encoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((5, 5), np.float32)
    tensors["encoder.adapter.weight"] = np.zeros((2,), np.float32)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ModelLoadError) as e:
        from_pretrained(str(d))
    msg = str(e.value)
    assert "missing parameters (1)" in msg and "encoder.final_norm.scale" in msg
    assert "shape mismatches (1)" in msg and "SelfAttention.q.weight" in msg
    assert "unexpected tensors (1)" in msg and "encoder.adapter.weight" in msg


def test_load_errors_for_missing_files(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        from_pretrained(str(tmp_path / "nope"))
    d = _copy(tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pytorch_model.bin.*save_pretrained"):
        from_pretrained(str(d))
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        from_pretrained(str(d))
    bad = _copy(tmp_path, "t5_v1_1")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "feed_forward_proj": "gated-nope"}))
    with pytest.raises(ModelLoadError, match="feed_forward_proj"):
        from_pretrained(str(bad))


def test_hub_ids_go_through_snapshot_download(monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(FIXTURES / "t5_v1_0")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    model = from_pretrained("someone/tiny-t5")
    assert model.config.d_model == 32
    (repo, patterns), = calls
    assert repo == "someone/tiny-t5" and "*.safetensors" in patterns and not any("bin" in p for p in patterns)

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelLoadError, match="cannot fetch 'someone/tiny-t5'.*no network"):
        from_pretrained("someone/tiny-t5")


def test_export_round_trip_merges_lora(tmp_path):
    g = np.load(FIXTURES / "t5_v1_1.npz")
    lora_config = LoRAConfig(rank=2, alpha=4.0, targets=("q", "v", "wo", "lm_head"))
    model = from_pretrained(str(FIXTURES / "t5_v1_1"), lora=lora_config)
    lora = nnx.state(model, LoRAParam)
    rng = np.random.default_rng(3)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), jnp.float32), lora))
    args = (g["input_ids"], g["decoder_input_ids"], g["attention_mask"], np.ones_like(g["decoder_input_ids"]))
    want = forward(model, *args)
    save_pretrained(model, str(tmp_path / "export"))
    umask = os.umask(0)
    os.umask(umask)
    for written in ("config.json", "model.safetensors"):  # readable by others, as open() writes under the umask
        assert (tmp_path / "export" / written).stat().st_mode & 0o777 == 0o666 & ~umask
    again = from_pretrained(str(tmp_path / "export"))
    assert not again.config.tie_word_embeddings and not lora_modules(again)
    got = forward(again, *args)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-4


def test_tied_copies_and_embedding_aliases_are_accepted(tmp_path):
    """Older hub files store the embedding under several names (and a tied lm_head copy)."""
    from safetensors.numpy import load_file, save_file

    d = _copy(tmp_path)
    tensors = load_file(d / "model.safetensors")
    shared = tensors.pop("shared.weight")
    tensors.update({"encoder.embed_tokens.weight": shared, "decoder.embed_tokens.weight": shared.copy(),
                    "lm_head.weight": shared.copy()})
    save_file(tensors, d / "model.safetensors")
    model = from_pretrained(str(d))
    assert model.config.tie_word_embeddings and not hasattr(model, "lm_head")
    np.testing.assert_array_equal(np.asarray(model.shared.embedding[...]), shared)
