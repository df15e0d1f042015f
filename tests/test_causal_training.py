"""The decoder-only training path: the loss mask, prompt truncation, decoding batches, and every method
end to end on a tiny random decoder checkpoint in Hugging Face format (one fusion cycle == kif_jax.fuse)."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kif_jax
import tiny_config
from helpers import CORE_METHODS as METHODS
from helpers import kif_state, read_metrics
from kif_jax import models
from kif_jax.data import IGNORE_INDEX, collate, eval_batches
from kif_jax.models.decoder.tokenize import tokenize_causal_records
from kif_jax.data.prompts import render_prompt
from kif_jax.models.decoder import hf as decoder_hf
from kif_jax.models.decoder import DecoderConfig, DecoderLM
from kif_jax.models.decoder.generate import greedy_decode_lm
from kif_jax.methods import Learner
from kif_jax.methods.recurrent_kif import KifCycle
from kif_jax.metrics import results_matrix as matrix
from kif_jax.train import Programs, train_and_evaluate

BYTES = models.ByteTokenizer()
TINY = DecoderConfig(model_type="llama", vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=8, rope_theta=10000.0,
                     max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=None, eos_token_id=1,
                     pad_token_id=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    """A tiny random LLaMA-style checkpoint written in Hugging Face's format (config.json + safetensors)."""
    directory = tmp_path_factory.mktemp("tiny_decoder")
    decoder_hf.save_pretrained(DecoderLM(TINY, rngs=nnx.Rngs(11)), str(directory))
    return directory


def decoder_config(checkpoint: pathlib.Path):
    config = tiny_config.get_config()
    config.model.name = str(checkpoint)
    config.model.lora.targets = "q_proj,v_proj"
    return config


def test_loss_mask_covers_exactly_the_label_and_eos():
    records = [{"input": "Is it? Option: yes, no.\nfoo\nAnswer:", "output": "yes"},
               {"input": "Q\nbar baz\nAnswer:", "output": "no"}]
    data = tokenize_causal_records(records, BYTES, max_input_length=64, max_target_length=8)
    prompt0 = list(records[0]["input"].encode())
    assert [int(i) - 3 for i in data.input_ids[0]] == prompt0  # no EOS after the prompt
    assert data.target_ids[0].tolist() == [b + 3 for b in b"yes"] + [BYTES.eos_token_id]
    batch = collate(data, [0, 1], batch_size=3)
    labels, ids = batch["labels"], batch["input_ids"]
    assert ids.shape == labels.shape == (3, 64)
    n0 = len(prompt0)
    # Row 0: only positions n0 .. n0+3 (y, e, s, EOS) carry labels, equal to the ids there.
    want = np.full(64, IGNORE_INDEX)
    want[n0:n0 + 4] = [ord("y") + 3, ord("e") + 3, ord("s") + 3, 1]
    np.testing.assert_array_equal(labels[0], want)
    np.testing.assert_array_equal(ids[0, n0:n0 + 4], want[n0:n0 + 4])
    assert batch["attention_mask"][0].sum() == n0 + 4 and (labels[2] == IGNORE_INDEX).all()  # filler row

    # The family's loss is the mean NLL of exactly those tokens, each predicted from the previous position.
    model = DecoderLM(TINY, rngs=nnx.Rngs(0))
    loss, count = models.CausalFamily().token_loss(model, {k: jnp.asarray(v) for k, v in batch.items()}, key=None)
    logp = jax.nn.log_softmax(model(jnp.asarray(ids), jnp.asarray(batch["attention_mask"])), axis=-1)
    picked = [float(logp[r, t - 1, ids[r, t]]) for r in range(2) for t in range(64) if labels[r, t] != IGNORE_INDEX]
    assert int(count) == len(picked) == 4 + 3
    np.testing.assert_allclose(float(loss), -np.mean(picked), rtol=1e-5)


def test_over_long_prompt_keeps_instruction_options_and_answer():
    text = "Pick one. Option: red, blue.\n" + "word " * 60 + "\nAnswer:"
    data = tokenize_causal_records([{"input": text, "output": "red"}], BYTES, max_input_length=48,
                                   max_target_length=8)
    kept = bytes(int(i) - 3 for i in data.input_ids[0]).decode()
    assert len(data.input_ids[0]) == 48
    assert kept.startswith("Pick one. Option: red, blue.\nword ") and kept.endswith("\nAnswer:")


def test_prompt_templates():
    text = "Classify. Option: a, b.\nsome text\nAnswer:"
    alpaca = render_prompt(text, "alpaca")
    assert alpaca.startswith("Below is an instruction") and "### Instruction:\nClassify. Option: a, b." in alpaca
    assert "### Input:\nsome text\nAnswer:" in alpaca and alpaca.endswith("### Response:\n")
    assert render_prompt(text, "none") == text


def test_left_padded_batched_decoding_equals_one_by_one():
    model = DecoderLM(TINY, rngs=nnx.Rngs(5))
    records = [{"input": f"x{'y' * (3 * i)}\nAnswer:", "output": "z"} for i in range(5)]
    data = tokenize_causal_records(records, BYTES, max_input_length=64, max_target_length=8)
    (batch, n), = list(eval_batches(data, 8))
    assert n == 5 and (batch["attention_mask"][:, -1] == 1).all()  # left padding: every row ends at the right
    batched = np.asarray(greedy_decode_lm(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=6))
    for r in range(5):
        alone = np.asarray(greedy_decode_lm(model, data.input_ids[r][None], np.ones((1, len(data.input_ids[r]))),
                                            max_new_tokens=6))
        np.testing.assert_array_equal(batched[r], alone[0])


@pytest.fixture(scope="module")
def all_methods(checkpoint, tmp_path_factory):
    config = decoder_config(checkpoint)
    config.methods = ",".join(METHODS)
    workdir = tmp_path_factory.mktemp("decoder_all_methods")
    return workdir, train_and_evaluate(config, workdir)


def test_every_method_runs_on_a_decoder_checkpoint(all_methods):
    workdir, results = all_methods
    assert list(results) == list(METHODS)
    for method, result in results.items():
        R = matrix(result)
        assert np.isfinite(R[1]).all() and np.all((R[1] >= 0) & (R[1] <= 1)), method
        records = [r for r in read_metrics(workdir / method / "metrics.jsonl") if "loss" in r]
        assert records and all(np.isfinite(r["loss"]) for r in records), method
        if method in ("recurrent_kif", "static_importance", "no_share"):
            fused = [r for r in records if r["phase"] == 1]
            assert fused and all(0.0 < r["mask_in_frac"] <= 0.201 for r in fused), method
    # Training lowered the loss of the first task (the model learns from the causal batches).
    first = [r["loss"] for r in read_metrics(workdir / "seq_lora" / "metrics.jsonl")
             if r.get("phase") == 0 and "loss" in r]
    assert first[-1] < first[0]


def _causal_batches(rng, n, micro=2, rows=4, length=16):
    ids = rng.integers(3, 259, size=(n, micro, rows, length)).astype(np.int32)
    labels = np.where(np.arange(length) >= length - 4, ids, IGNORE_INDEX).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def test_one_fusion_cycle_equals_fuse_by_hand():
    lora = models.LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj"))
    graphdef, params, frozen = nnx.split(DecoderLM(TINY, lora=lora, rngs=nnx.Rngs(3)), models.LoRAParam, ...)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)
    programs = Programs(graphdef, family=models.CausalFamily(), lr=5e-3, warmup_steps=0, max_grad_norm=1.0,
                        weight_decay=0.0, donate=False)
    state = kif_state(programs, params)
    rng = np.random.default_rng(0)
    inner, outer = _causal_batches(rng, 3), _causal_batches(rng, 2)
    program = KifCycle(inner_steps=3, outer_steps=2, importance_clipped_grads=False, outer_loss_scale=1.0)
    fused_state, _ = programs.run_cycle(state, frozen, inner, outer, program=program)

    after_inner, _ = jax.jit(lambda s: programs.scan_steps(program, s, frozen, inner, Learner(False, jnp.int32(0))))(
        state)
    s = after_inner
    for m in range(2):
        s, _ = programs.step(program, s, jax.tree.map(lambda x: x[m], outer), frozen, Learner(True, jnp.int32(m)))
    tau_in = kif_jax.task_vector(after_inner.params, state.params)
    tau_out = kif_jax.task_vector(s.params, after_inner.params)
    expected = kif_jax.fuse(state.params, tau_in, tau_out, kif_jax.importance_scores(s.method.imp_in),
                            kif_jax.importance_scores(s.method.imp_out), quantile=0.8, scope="global",
                            scheme="reference")
    for got, want, end in zip(jax.tree.leaves(fused_state.params), jax.tree.leaves(expected),
                              jax.tree.leaves(s.params)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
        assert not np.allclose(got, end)


def test_causal_loss_is_optax_cross_entropy_on_shifted_labels():
    model = DecoderLM(TINY, rngs=nnx.Rngs(1))
    batch = {k: jnp.asarray(v[0, 0]) for k, v in _causal_batches(np.random.default_rng(1), 1).items()}
    loss, count = models.CausalFamily().token_loss(model, batch, key=None)
    logits = model(batch["input_ids"], batch["attention_mask"])[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, labels, 0))
    assert int(count) == 4 * 4
    np.testing.assert_allclose(float(loss), float(jnp.sum(nll * mask) / jnp.sum(mask)), rtol=1e-6)


def test_sigkilled_decoder_run_resumes_to_the_identical_result(checkpoint, tmp_path):
    from test_main import kill_mid_method_and_resume

    kill_mid_method_and_resume(tmp_path, f"--config.model.name={checkpoint}",
                               "--config.model.lora.targets=q_proj,v_proj")


def test_generate_texts_serves_the_decoder_family():
    model = DecoderLM(TINY, rngs=nnx.Rngs(5))
    texts = ["ab\nAnswer:", "a much longer prompt\nAnswer:"]
    got = models.generate_texts(model, BYTES, texts, batch_size=4, max_input_length=32, max_new_tokens=5)
    for text, answer in zip(texts, got):
        ids = np.asarray([[b + 3 for b in text.encode()]], np.int32)
        alone = np.asarray(greedy_decode_lm(model, ids, np.ones_like(ids), max_new_tokens=5))
        assert answer == BYTES.decode(alone[0].tolist())
