"""Greedy decoding (cache vs full recompute, no recompiles), option scoring, text generation.

Shapes match the parity tests ([3, 24] inputs, 7 decoder positions, 8 new tokens) so that the
compiled programs are shared within a test session.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kif_jax.models import ByteTokenizer, forward, from_pretrained, generate_texts, greedy_decode, score_options
from kif_jax.models.t5 import generate

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


pytestmark = pytest.mark.usefixtures("fp32_matmuls")  # exact float32 matmuls (tests/conftest.py)


@pytest.fixture(scope="module")
def model():
    return from_pretrained(str(FIXTURES / "t5_v1_1"))


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(FIXTURES / "t5_v1_1.npz"))


def test_cached_decoding_equals_full_recompute(model, golden):
    """Greedy without a cache: the whole prefix re-run every step in a fixed causal buffer."""
    cfg = model.config
    ids, mask = golden["input_ids"], golden["attention_mask"]
    steps = golden["decoder_input_ids"].shape[1]
    dec = np.full((ids.shape[0], steps), cfg.pad_token_id, np.int32)
    dec[:, 0] = cfg.decoder_start_token_id
    want = np.zeros_like(dec)
    for i in range(steps):
        logits = forward(model, ids, dec, mask, np.ones_like(dec))
        want[:, i] = np.asarray(jnp.argmax(logits[:, i], -1))
        if i + 1 < steps:
            dec[:, i + 1] = want[:, i]
    for row in want:  # pad after the first EOS
        hits = np.flatnonzero(row == cfg.eos_token_id)
        if hits.size:
            row[hits[0] + 1:] = cfg.pad_token_id
    assert (want == cfg.eos_token_id).any()  # the fixture's head makes EOS reachable
    got = np.asarray(greedy_decode(model, ids, mask, max_new_tokens=8))
    np.testing.assert_array_equal(got[:, :steps], want)


def test_repeated_calls_do_not_recompile(model, golden):
    ids, mask = golden["input_ids"], golden["attention_mask"]
    greedy_decode(model, ids, mask, max_new_tokens=8)
    compiled = generate._greedy._cache_size()
    # Same structure, new weights (as after a training step): the compiled program is reused.
    other = from_pretrained(str(FIXTURES / "t5_v1_1"))
    nnx.update(other, jax.tree.map(lambda x: jnp.asarray(np.asarray(x) * 1.01), nnx.state(other)))
    greedy_decode(model, ids, mask, max_new_tokens=8)
    greedy_decode(other, ids + 1, mask, max_new_tokens=8)
    assert generate._greedy._cache_size() == compiled


def test_score_options_is_the_summed_log_likelihood(model, golden):
    ids, mask = golden["input_ids"], golden["attention_mask"]
    options = np.zeros((3, 3, 7), np.int32)  # [B, C, T], pad-padded
    options[:, 0, :3] = [5, 6, 1]
    options[:, 1, :2] = [7, 1]
    options[:, 2, :1] = [9]
    options[1, 2, :3] = golden["greedy"][1, :3]
    scores = np.asarray(score_options(model, ids, mask, options))
    assert scores.shape == (3, 3) and scores.dtype == np.float32
    for c in range(3):
        labels = options[:, c]
        dec = np.concatenate([np.zeros((3, 1), np.int32), labels[:, :-1]], axis=1)
        logp = np.asarray(jax.nn.log_softmax(forward(model, ids, dec, mask, np.ones_like(dec))))
        picked = np.take_along_axis(logp, labels[..., None], -1)[..., 0]
        np.testing.assert_allclose(scores[:, c], np.where(labels != 0, picked, 0).sum(-1), atol=1e-4)
    assert scores[1, 2] > scores[1, 1]  # the model's own greedy answer beats an arbitrary one


def test_generate_texts_pads_batches_to_one_shape(model, golden):
    tok = ByteTokenizer()
    texts = ["hello", "a much longer input that gets truncated to the fixed input length", "x", "yes", "no"]
    before = generate._greedy._cache_size()
    out = generate_texts(model, tok, texts, batch_size=3, max_input_length=24, max_new_tokens=8)
    assert len(out) == 5 and all(isinstance(s, str) for s in out)
    assert generate._greedy._cache_size() <= before + 1  # both batches, one program
    ids, mask = generate.pad_batch(tok.encode_batch(texts[:3]), 24, pad_id=0, eos_id=1, batch_size=3)
    assert ids[1, -1] == 1 and mask[1].sum() == 24 and mask[2].sum() == 2
    tokens = np.asarray(greedy_decode(model, ids, mask, max_new_tokens=8))
    assert out[:3] == tok.decode_batch(tokens.tolist())
