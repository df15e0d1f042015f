"""Jitted inference for decoder-only LMs: forward, greedy decoding of left-padded prompts, option scoring.

Each jits over (graphdef, state) with the graphdef static: calling again with the same shapes and a
model of the same structure (e.g. after a training step changed only the weights) reuses the
compiled program. Masks are always passed in, never derived from ids (a pad id may be a real token).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kif_jax.models.decoder.model import DecoderLM
from kif_jax.models.decoding import greedy_loop, pad_rows


def _mask(input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    if attention_mask is None:
        return jnp.ones(input_ids.shape, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {attention_mask.shape} does not match input_ids {input_ids.shape}")
    return attention_mask


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(input_ids, attention_mask)


def forward_lm(model: DecoderLM, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """`model(input_ids, attention_mask)` (deterministic) under jit: float32 logits [B, T, V]."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = _mask(input_ids, attention_mask)
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, input_ids, mask)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_new_tokens",))
def _greedy(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array, *,
            max_new_tokens: int) -> jax.Array:
    model: DecoderLM = nnx.merge(graphdef, state)
    cfg = model.config
    b, s = input_ids.shape
    cache = model.init_cache(b, s + max_new_tokens)
    if s > 1:  # the prompt but its last token; the loop's first step runs that token
        _, cache = model.extend(input_ids[:, :-1], attention_mask[:, :-1], cache)

    def step(prev: jax.Array, i: jax.Array, cache):
        h, cache = model.extend(prev[:, None], None, cache)
        return model.logits(h[:, 0]), cache

    # A left-padded prompt ends with a real token: the loop starts from it.
    return greedy_loop(step, cache, input_ids[:, -1], max_new_tokens=max_new_tokens, eos_ids=cfg.eos_token_ids,
                       pad_id=cfg.pad_token_id)


def greedy_decode_lm(model: DecoderLM, input_ids: jax.Array, attention_mask: jax.Array | None, *,
                     max_new_tokens: int) -> jax.Array:
    """Greedy continuation of LEFT-padded prompts, int32 [B, max_new_tokens]: EOS kept, pad after it.

    The prompt but its last token runs once into a key/value cache; then `decoding.greedy_loop` runs
    one token per step (the prompt's last first), stopping early once every row has produced one of
    `config.eos_token_ids`.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = _mask(input_ids, attention_mask)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    concrete = not isinstance(mask, jax.core.Tracer)  # under an outer jit the caller vouches for the layout
    if concrete and input_ids.shape[1] and not bool(np.all(np.asarray(mask)[:, -1])):
        raise ValueError("greedy_decode_lm needs LEFT-padded prompts: the last column of attention_mask must be 1")
    graphdef, state = nnx.split(model)
    return _greedy(graphdef, state, input_ids, mask, max_new_tokens=int(max_new_tokens))


@functools.partial(jax.jit, static_argnums=(0,))
def _score(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array,
           option_ids: jax.Array, option_mask: jax.Array) -> jax.Array:
    model: DecoderLM = nnx.merge(graphdef, state)
    b, s = input_ids.shape
    _, c, t = option_ids.shape
    cache = model.init_cache(b, s + t)
    h, cache = model.extend(input_ids, attention_mask, cache)
    ids = option_ids.reshape(b * c, t)
    mask = option_mask.reshape(b * c, t).astype(bool)
    ho, _ = model.extend(ids, mask, cache.repeat(c))  # [B*C, T, D]
    # Option token j is predicted from the last real token before it: an earlier option token, or
    # the prompt's last token (slot 0 of `states`).
    states = jnp.concatenate([jnp.repeat(h[:, -1:], c, axis=0), ho], axis=1)  # [B*C, T+1, D]
    real = jnp.where(mask, jnp.arange(t)[None, :], -1)
    prev = jnp.concatenate([jnp.full((b * c, 1), -1), jax.lax.cummax(real, axis=1)[:, :-1]], axis=1)
    pred = jnp.take_along_axis(states, (prev + 1)[..., None], axis=1)  # [B*C, T, D]
    logp = jax.nn.log_softmax(model.logits(pred), axis=-1)
    picked = jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, picked, 0.0), axis=-1).reshape(b, c)


def score_options_lm(model: DecoderLM, input_ids: jax.Array, attention_mask: jax.Array | None,
                     option_ids: jax.Array, option_mask: jax.Array) -> jax.Array:
    """Summed log-likelihood [B, C] float32 of each continuation `option_ids` [B, C, T] after the prompt.

    The LEFT-padded prompt runs once into a cache shared by its C options; `option_mask` [B, C, T]
    marks the real option tokens (usually right-padded). Use `argmax(-1)` to pick an option.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = _mask(input_ids, attention_mask)
    option_ids = jnp.asarray(option_ids, jnp.int32)
    option_mask = jnp.asarray(option_mask, jnp.int32)
    if option_ids.ndim != 3 or option_ids.shape[0] != input_ids.shape[0]:
        raise ValueError(f"option_ids must be [B, C, T] with B={input_ids.shape[0]}, got {option_ids.shape}")
    if option_mask.shape != option_ids.shape:
        raise ValueError(f"option_mask {option_mask.shape} does not match option_ids {option_ids.shape}")
    if not isinstance(mask, jax.core.Tracer) and not bool(np.all(np.asarray(mask)[:, -1])):
        raise ValueError("score_options_lm needs LEFT-padded prompts: the last column of attention_mask must be 1")
    graphdef, state = nnx.split(model)
    return _score(graphdef, state, input_ids, mask, option_ids, option_mask)


def pad_left(rows: Sequence[Sequence[int]], length: int, *, pad_id: int,
             batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token rows -> LEFT-padded (ids, mask) int32 [batch_size, length]; long rows keep their tail.

    Empty rows, and rows added to reach `batch_size`, hold a lone `pad_id` marked real (no row is fully masked).
    """
    rows = [list(row)[-length:] or [pad_id] for row in rows]  # an empty prompt gets a lone pad, marked real
    return pad_rows(rows, length, pad_id=pad_id, left=True, filler=[pad_id], batch_size=batch_size)
