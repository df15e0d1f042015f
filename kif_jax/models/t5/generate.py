"""Jitted inference for T5: greedy decoding of short targets, option scoring.

Both jit over (graphdef, state), with the graphdef static: calling again with the same shapes and a
model of the same structure (e.g. after a training step changed only the weights) reuses the
compiled program.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kif_jax.models.decoding import greedy_loop, pad_rows
from kif_jax.models.t5.model import T5, shift_right


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, decoder_input_ids: jax.Array,
             attention_mask: jax.Array | None, decoder_attention_mask: jax.Array | None) -> jax.Array:
    return nnx.merge(graphdef, state)(input_ids, decoder_input_ids, attention_mask, decoder_attention_mask)


def forward(model: T5, input_ids: jax.Array, decoder_input_ids: jax.Array, attention_mask: jax.Array | None = None,
            decoder_attention_mask: jax.Array | None = None) -> jax.Array:
    """`model(...)` (deterministic) under jit: float32 logits [B, T, V], one compile per shape."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, input_ids, decoder_input_ids, attention_mask, decoder_attention_mask)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_new_tokens",))
def _greedy(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array, *,
            max_new_tokens: int) -> jax.Array:
    model: T5 = nnx.merge(graphdef, state)
    cfg = model.config
    b = input_ids.shape[0]
    cache = model.init_cache(model.encode(input_ids, attention_mask), attention_mask, max_new_tokens)
    start = jnp.full((b,), cfg.decoder_start_token_id, jnp.int32)
    return greedy_loop(lambda prev, i, cache: model.decode_step(prev, i, cache), cache, start,
                       max_new_tokens=max_new_tokens, eos_ids=(cfg.eos_token_id,), pad_id=cfg.pad_token_id)


def greedy_decode(model: T5, input_ids: jax.Array, attention_mask: jax.Array | None, *,
                  max_new_tokens: int) -> jax.Array:
    """Greedy continuation, int32 [B, max_new_tokens]: EOS kept, everything after it pad.

    The encoder runs once; the decoder runs one position per step with a key/value cache, inside
    `lax.while_loop`, which stops early once every row has produced EOS.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = input_ids != model.config.pad_token_id
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    graphdef, state = nnx.split(model)
    return _greedy(graphdef, state, input_ids, jnp.asarray(attention_mask), max_new_tokens=int(max_new_tokens))


def option_log_likelihoods(model: T5, input_ids: jax.Array, attention_mask: jax.Array, option_ids: jax.Array,
                           option_mask: jax.Array) -> jax.Array:
    """Summed log-likelihood float32 [B, C] of each option [B, C, T] at its real tokens (`option_mask`),
    teacher-forced through the decoder; traceable under jit."""
    cfg = model.config
    enc = model.encode(input_ids, attention_mask)  # [B, S, D], once for the row's C options
    logits = model.decode_options(shift_right(option_ids, cfg.decoder_start_token_id, cfg.pad_token_id), enc,
                                  attention_mask)  # [B, C, T, V]
    picked = jnp.take_along_axis(logits, option_ids[..., None], axis=-1)[..., 0]
    logp = picked - jax.nn.logsumexp(logits, axis=-1)  # [B, C, T]
    return jnp.sum(jnp.where(option_mask.astype(bool), logp, 0.0), axis=-1)


@functools.partial(jax.jit, static_argnums=(0,))
def _score(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array,
           option_ids: jax.Array) -> jax.Array:
    model: T5 = nnx.merge(graphdef, state)
    return option_log_likelihoods(model, input_ids, attention_mask, option_ids,
                                  option_ids != model.config.pad_token_id)


def score_options(model: T5, input_ids: jax.Array, attention_mask: jax.Array | None,
                  option_ids: jax.Array) -> jax.Array:
    """Summed log-likelihood [B, C] float32 of each candidate target `option_ids` [B, C, T] (pad-padded).

    The encoder runs once per input; every option is teacher-forced through the decoder. Use
    `argmax(-1)` to pick an option.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = input_ids != model.config.pad_token_id
    option_ids = jnp.asarray(option_ids, jnp.int32)
    if option_ids.ndim != 3 or option_ids.shape[0] != input_ids.shape[0]:
        raise ValueError(f"option_ids must be [B, C, T] with B={input_ids.shape[0]}, got {option_ids.shape}")
    graphdef, state = nnx.split(model)
    return _score(graphdef, state, input_ids, jnp.asarray(attention_mask), option_ids)


def pad_batch(rows: Sequence[Sequence[int]], length: int, *, pad_id: int, eos_id: int,
              batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token rows -> (ids, mask) int32 [batch_size, length]; long rows keep their head and end in EOS.

    Rows added to reach `batch_size` hold a lone EOS, so that no row is fully masked.
    """
    rows = [list(row) if len(row) <= length else list(row)[: length - 1] + [eos_id] for row in rows]
    return pad_rows(rows, length, pad_id=pad_id, filler=[eos_id], batch_size=batch_size)
