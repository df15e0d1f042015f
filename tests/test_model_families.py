"""A model family registered from outside kif_jax (tests/toy_family.py) runs through the shared code: a training
run with evaluation and its memory plan, checkpoint export and loading, PEFT adapters, and text generation."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

import tiny_config
import toy_family
from kif_jax import models
from kif_jax.errors import ConfigError
from kif_jax.models import architectures
from kif_jax.models.family import FAMILIES, family_class, family_of
from kif_jax.models.loading import abstract_model
from kif_jax.models.peft import load_adapter, save_adapter
from kif_jax.train import train_and_evaluate

LORA = models.LoRAConfig(rank=2, alpha=4.0, targets=("head",))


@pytest.fixture
def toy():
    """The toy family registered for one test, then taken out of both registries again."""
    FAMILIES.register(toy_family.BigramFamily)
    yield toy_family
    FAMILIES.classes.pop(toy_family.MODEL_TYPE)
    architectures._REGISTERED.pop(toy_family.MODEL_TYPE)  # noqa: SLF001 - no unregistering outside tests


def _model(lora=None, seed=0):
    return toy_family.BigramLM(toy_family.BigramConfig(), lora=lora, rngs=nnx.Rngs(params=seed))


def test_registering_adds_the_family_and_its_architecture(toy):
    assert architectures.ARCHITECTURES[toy.MODEL_TYPE].family == toy.MODEL_TYPE
    assert family_class(toy.MODEL_TYPE) is toy.BigramFamily
    assert isinstance(family_of(_model()), toy.BigramFamily)


def test_unknown_model_type_names_the_registered_ones(toy, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(Exception, match=f"supported: .*{toy.MODEL_TYPE}"):
        models.from_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match="is taken"):
        architectures.register_architecture(
            architectures.Architecture("llama", toy.MODEL_TYPE, "X", (), toy.NAMES))


def test_a_run_trains_evaluates_and_plans_the_toy_family(toy, tmp_path):
    config = tiny_config.get_config()
    config.methods = "seq_lora"
    config.model.name = toy.BigramFamily.tiny_name
    config.model.lora.targets = "head"
    result = train_and_evaluate(config, tmp_path)["seq_lora"]
    assert np.asarray(result["accuracy_matrix"]).shape == (2, 2)
    rows = [json.loads(line) for line in (tmp_path / "seq_lora" / "predictions.jsonl").read_text().splitlines()]
    assert rows and all("prediction" in r for r in rows)
    plan = json.loads((tmp_path / "seq_lora" / "memory.json").read_text())
    assert plan["per_device_bytes"]["trainable"] > 0 and plan["per_device_bytes"]["activations"] > 0
    model, arch, origin = abstract_model(config.model, seed=0)  # shapes only, as the memory plan builds it
    assert isinstance(model, toy.BigramLM) and arch == toy.BigramConfig(hidden_size=16)


def test_export_and_loading_go_through_the_family(toy, tmp_path):
    model = _model(seed=3)
    models.save_pretrained(model, str(tmp_path / "ckpt"))
    back = models.from_pretrained(str(tmp_path / "ckpt"))
    assert isinstance(back, toy.BigramLM) and back.name_or_path == str(tmp_path / "ckpt")
    want = models.to_hf_state_dict(model)
    assert sorted(want) == ["embed.weight", "head.weight"]
    for name, value in models.to_hf_state_dict(back).items():
        np.testing.assert_array_equal(value, want[name])


def test_peft_adapters_of_the_toy_family(toy, tmp_path):
    model = _model(LORA, seed=1)
    model.head.lora_b[...] = jax.random.normal(jax.random.key(0), model.head.lora_b[...].shape)
    save_adapter(model, str(tmp_path / "adapter"))
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["task_type"] == "CAUSAL_LM" and written["target_modules"] == ["head"]
    fresh = load_adapter(_model(LORA, seed=1), str(tmp_path / "adapter"))
    np.testing.assert_array_equal(np.asarray(fresh.head.lora_b[...]), np.asarray(model.head.lora_b[...]))


def test_generate_texts_decodes_with_the_family(toy):
    model = _model(seed=2)
    tokenizer = models.ByteTokenizer()
    texts = ["abc", "hello there", "x"]
    got = models.generate_texts(model, tokenizer, texts, batch_size=2, max_input_length=8, max_new_tokens=4)
    family = family_of(model)
    ids, mask = family.pad_prompts(family.encode_prompts(tokenizer, texts[:2]), 8, tokenizer=tokenizer, batch_size=2)
    tokens = family.greedy(model, ids, mask, max_new_tokens=4)
    assert got[:2] == tokenizer.decode_batch(np.asarray(tokens).tolist()) and len(got) == 3


def test_a_family_whose_architecture_names_another_is_refused():
    other = type("OtherFamily", (toy_family.BigramFamily,), {"name": "other_family"})
    with pytest.raises(ConfigError, match="names family"):
        FAMILIES.register(other)
    assert "other_family" not in FAMILIES.classes
    assert toy_family.MODEL_TYPE not in architectures.ARCHITECTURES
