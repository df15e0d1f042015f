"""PEFT LoRA adapters both ways: PEFT-saved adapters give PEFT's logits; save_adapter writes PEFT's layout.

Goldens and adapters come from tools/make_peft_fixtures.py (PEFT 0.21, torch); that tool also checks
that `PeftModel.from_pretrained` reads what `save_adapter` writes and reproduces kif_jax's logits.
"""
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from kif_jax.errors import ModelLoadError
from kif_jax.models import LoRAConfig, LoRAParam, forward, from_pretrained
from kif_jax.models.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_state_dict, load_adapter, save_adapter

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
# kind -> (base checkpoint, LoRA targets); the adapters are r 4, alpha 16.
KINDS = {"t5": ("t5_v1_1", ("q", "v")), "llama": ("decoder_llama", ("q_proj", "v_proj")),
         # Gemma 3 (sliding and full layers, soft-capped tied head): every projection of its blocks.
         "gemma3": ("decoder_gemma3", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))}
T5_ADAPTER = FIXTURES / "peft_t5_adapter"


pytestmark = pytest.mark.usefixtures("fp32_matmuls")  # exact float32 matmuls (tests/conftest.py)


def _need(kind: str) -> None:
    if not (FIXTURES / f"peft_{kind}_adapter" / ADAPTER_CONFIG).exists():
        pytest.fail(f"no {kind} PEFT fixture: run tools/make_peft_fixtures.py")  # committed: missing is a bug


def _model(kind: str, *, rank: int = 4, alpha: float = 16.0, targets: tuple[str, ...] | None = None,
           seed: int = 0):
    base, default_targets = KINDS[kind]
    lora = LoRAConfig(rank=rank, alpha=alpha, dropout=0.0, targets=targets or default_targets)
    return from_pretrained(str(FIXTURES / base), lora=lora, seed=seed)


def _logits(model, kind: str, g: dict) -> np.ndarray:
    if kind == "t5":
        return np.asarray(forward(model, g["input_ids"], g["decoder_input_ids"], g["attention_mask"],
                                  np.ones_like(g["decoder_input_ids"])))
    return np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, g["input_ids"], g["attention_mask"]))


def _lora_values(model) -> dict:
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, LoRAParam))}


def _randomise(model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    flat = [(p, v.replace(jnp.asarray(rng.standard_normal(v[...].shape), jnp.float32)))
            for p, v in nnx.to_flat_state(nnx.state(model, LoRAParam))]
    nnx.update(model, nnx.from_flat_state(flat))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_peft_saved_adapter_gives_peft_logits(kind):
    _need(kind)
    g = dict(np.load(FIXTURES / f"peft_{kind}_adapter.npz"))
    model = _model(kind)
    assert load_adapter(model, str(FIXTURES / f"peft_{kind}_adapter")) is model  # in place
    got = _logits(model, kind, g)
    valid = np.ones(got.shape[:2], bool) if kind == "t5" else g["attention_mask"].astype(bool)
    diff = np.abs(got - g["logits"])[valid].max()
    assert diff <= 1e-4, f"{kind}: max |logit diff| {diff}"
    assert np.abs(g["logits"] - g["base_logits"])[valid].max() > 0.1  # the adapter mattered


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_save_adapter_writes_peft_layout(kind, tmp_path):
    _need(kind)
    source = FIXTURES / f"peft_{kind}_adapter"
    model = load_adapter(_model(kind), str(source))
    save_adapter(model, str(tmp_path), base_model_name_or_path="some/base")

    theirs, mine = load_file(str(source / ADAPTER_WEIGHTS)), load_file(str(tmp_path / ADAPTER_WEIGHTS))
    assert sorted(mine) == sorted(theirs)
    for key, value in theirs.items():
        assert mine[key].dtype == np.float32 and mine[key].shape == value.shape, key
        np.testing.assert_array_equal(mine[key], value, err_msg=key)  # PEFT's values survive load + save

    peft_config = json.loads((source / ADAPTER_CONFIG).read_text())
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == "some/base"
    for field, value in config.items():  # every field written is one PEFT writes, with PEFT's value
        if field == "target_modules":
            assert sorted(value) == sorted(peft_config[field])
        elif field != "base_model_name_or_path":
            assert value == peft_config[field], field
    assert {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "task_type", "bias",
            "fan_in_fan_out", "use_rslora", "use_dora"} <= set(config)


@pytest.mark.parametrize("kind", ["t5", "llama", "gemma3"])
def test_round_trip_is_exact(kind, tmp_path):
    _need(kind)
    model = _model(kind, seed=1)
    _randomise(model, 5)
    save_adapter(model, str(tmp_path))
    other = _model(kind, seed=2)
    assert any(not np.array_equal(a, b) for a, b in zip(_lora_values(other).values(), _lora_values(model).values()))
    load_adapter(other, str(tmp_path))
    mine, theirs = _lora_values(model), _lora_values(other)
    assert mine.keys() == theirs.keys()
    for path in mine:
        np.testing.assert_array_equal(theirs[path], mine[path], err_msg=str(path))


def test_target_modules_bare_names_or_full_module_names(tmp_path):
    save_adapter(_model("t5", targets=("q", "wo", "lm_head")), str(tmp_path / "bare"))
    bare = json.loads((tmp_path / "bare" / ADAPTER_CONFIG).read_text())
    assert bare["target_modules"] == ["lm_head", "q", "wo"] and bare["task_type"] == "SEQ_2_SEQ_LM"

    only_encoder = r"encoder\.blocks\.\d+\.self_attention\.q"
    save_adapter(_model("t5", targets=(only_encoder,)), str(tmp_path / "full"))
    full = json.loads((tmp_path / "full" / ADAPTER_CONFIG).read_text())
    assert full["target_modules"] == ["encoder.block.0.layer.0.SelfAttention.q",
                                      "encoder.block.1.layer.0.SelfAttention.q"]
    assert sorted(load_file(str(tmp_path / "full" / ADAPTER_WEIGHTS))) == [
        f"base_model.model.encoder.block.{i}.layer.0.SelfAttention.q.lora_{f}.weight" for i in (0, 1) for f in "AB"]


def test_half_precision_adapter_is_read_as_float32(tmp_path):
    model = _model("t5", seed=1)
    _randomise(model, 6)
    save_adapter(model, str(tmp_path))
    tensors = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    save_file({k: v.astype(np.float16) for k, v in tensors.items()}, str(tmp_path / ADAPTER_WEIGHTS))
    loaded = load_adapter(_model("t5", seed=2), str(tmp_path))
    for path, value in _lora_values(model).items():
        got = _lora_values(loaded)[path]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, value.astype(np.float16).astype(np.float32))


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _copy_adapter(tmp_path, config_changes=None, tensors=None) -> str:
    """The T5 PEFT fixture, with config fields changed and tensors replaced (None deletes)."""
    config = json.loads((T5_ADAPTER / ADAPTER_CONFIG).read_text())
    config.update(config_changes or {})
    weights = load_file(str(T5_ADAPTER / ADAPTER_WEIGHTS))
    for key, value in (tensors or {}).items():
        if value is None:
            weights.pop(key)
        else:
            weights[key] = value
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(config))
    save_file(weights, str(tmp_path / ADAPTER_WEIGHTS))
    return str(tmp_path)


def _error(model, directory) -> str:
    before = _lora_values(model)
    with pytest.raises(ModelLoadError) as e:
        load_adapter(model, directory)
    after = _lora_values(model)
    assert all(np.array_equal(before[p], after[p]) for p in before)  # untouched on failure
    return str(e.value)


def test_every_mismatch_is_reported_at_once(tmp_path):
    q0 = "base_model.model.encoder.block.0.layer.0.SelfAttention"
    directory = _copy_adapter(tmp_path, {"use_rslora": True, "use_dora": True, "bias": "all"}, {
        f"{q0}.q.lora_A.weight": None, f"{q0}.q.lora_B.weight": None,  # a missing module
        f"{q0}.k.lora_A.weight": np.zeros((4, 32), np.float32),  # a module this model does not adapt
        f"{q0}.k.lora_B.weight": np.zeros((48, 4), np.float32),
        f"{q0}.v.lora_B.weight": np.zeros((48, 5), np.float32),  # a wrong shape
        "base_model.model.lm_head.modules_to_save.weight": np.zeros((288, 32), np.float32),  # not LoRA
    })
    message = _error(_model("t5"), directory)
    for needle in ("use_rslora", "use_dora", "bias 'all'", "missing modules (1)",
                   "encoder.block.0.layer.0.SelfAttention.q", "unexpected modules (1)",
                   "encoder.block.0.layer.0.SelfAttention.k (not adapted by this model)",
                   "shape mismatches (1)", f"{q0}.v.lora_B.weight: adapter (48, 5), model (48, 4)",
                   "unexpected tensors (1)", "lm_head.modules_to_save.weight"):
        assert needle in message, needle


def test_rank_and_scale_must_match(tmp_path):
    message = _error(_model("t5", rank=8, alpha=32.0), str(T5_ADAPTER))
    assert "r 4 != the model's LoRA rank 8" in message and "shape mismatches" in message
    message = _error(_model("t5", rank=4, alpha=8.0), str(T5_ADAPTER))
    assert "scale lora_alpha / r = 16/4 = 4 != the model's alpha / rank = 8.0/4 = 2" in message
    assert "rank" not in message.split("scale")[0]


def test_different_targets_are_missing_or_unexpected_modules():
    message = _error(_model("t5", targets=("q", "k")), str(T5_ADAPTER))
    assert "missing modules (8)" in message and "SelfAttention.k" in message
    assert "unexpected modules (8)" in message and "SelfAttention.v (not adapted by this model)" in message


def test_other_peft_types_and_models_without_lora(tmp_path):
    message = _error(_model("t5"), _copy_adapter(tmp_path, {"peft_type": "IA3"}))
    assert "peft_type 'IA3': only 'LORA' is supported" in message
    plain = from_pretrained(str(FIXTURES / "t5_v1_1"))
    with pytest.raises(ModelLoadError, match=r"no LoRA adapters: build it with lora=LoRAConfig\(rank=4, alpha=16.0"):
        load_adapter(plain, str(T5_ADAPTER))
    with pytest.raises(ModelLoadError, match="no LoRA adapters to save"):
        save_adapter(plain, str(tmp_path / "out"))


def test_missing_files(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_adapter(_model("t5"), str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="no adapter_config.json"):
        load_adapter(_model("t5"), str(tmp_path))
    (tmp_path / ADAPTER_CONFIG).write_text((T5_ADAPTER / ADAPTER_CONFIG).read_text())
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        load_adapter(_model("t5"), str(tmp_path))


def test_saved_weights_get_the_umask_mode(tmp_path):
    import os
    model = _model("llama")
    old = os.umask(0o022)
    try:
        save_adapter(model, str(tmp_path / "a"))
        os.umask(0o027)
        save_adapter(model, str(tmp_path / "b"))
    finally:
        os.umask(old)
    assert (tmp_path / "a" / ADAPTER_WEIGHTS).stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b" / ADAPTER_WEIGHTS).stat().st_mode & 0o777 == 0o640
    assert load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS)).keys() == adapter_state_dict(model).keys()


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_base_model_name_or_path_is_what_from_pretrained_loaded(kind, tmp_path):
    model = _model(kind)
    base = str(FIXTURES / KINDS[kind][0])
    assert model.name_or_path == base
    save_adapter(model, str(tmp_path / "known"))
    assert json.loads((tmp_path / "known" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == base
    save_adapter(model, str(tmp_path / "given"), base_model_name_or_path="org/other-base")
    assert json.loads((tmp_path / "given" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == \
        "org/other-base"
    built = nnx.merge(*nnx.split(model))  # a split + merge keeps it
    assert built.name_or_path == base


def test_base_model_name_or_path_keeps_a_gguf_preset_name_and_is_null_when_unknown(tmp_path, monkeypatch):
    from test_gguf import hf_tensors, write_gguf
    from tiny_models import tiny_t5_lora

    from kif_jax.models import gguf

    write_gguf(tmp_path / "tiny.gguf", "llama", hf_tensors("llama", tied=False))
    monkeypatch.setattr(gguf, "resolve_gguf_name",
                        lambda name: str(tmp_path / "tiny.gguf") if name == "tiny-preset-q4" else None)
    model = from_pretrained("tiny-preset-q4", lora=LoRAConfig(rank=2, alpha=4.0, targets=("q_proj",)))
    save_adapter(model, str(tmp_path / "preset"))
    assert json.loads((tmp_path / "preset" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == \
        "tiny-preset-q4"
    save_adapter(tiny_t5_lora(), str(tmp_path / "built"))  # built from a config, not loaded
    assert json.loads((tmp_path / "built" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] is None
