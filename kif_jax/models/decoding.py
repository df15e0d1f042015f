"""Decoding shared by every family: the greedy loop (traceable under jit), host-side padding of token rows,
and `generate_texts`."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kif_jax.models.family import family_of
from kif_jax.models.tokenizers import Tokenizer


def greedy_loop(step: Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]], state: Any, start: jax.Array, *,
                max_new_tokens: int, eos_ids: Sequence[int], pad_id: int) -> jax.Array:
    """Greedy tokens int32 [B, max_new_tokens]: each row's stop id kept, pad after it.

    `step(prev_tokens [B], i, state) -> (logits [B, V], state)` gives the logits of new token i
    after `prev_tokens` (token i - 1, or `start` for i = 0). Runs in `lax.while_loop`, which stops
    early once every row has produced one of `eos_ids`.
    """
    b = start.shape[0]
    eos = tuple(int(e) for e in eos_ids)

    def stopped(token: jax.Array) -> jax.Array:
        if len(eos) == 1:
            return token == eos[0]
        return jnp.isin(token, jnp.asarray(eos, jnp.int32))

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, prev, state, done, out = carry
        logits, state = step(prev, i, state)
        token = jnp.where(done, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
        return i + 1, token, state, done | stopped(token), out

    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    carry = (jnp.zeros((), jnp.int32), start.astype(jnp.int32), state, jnp.zeros((b,), bool), out)
    return jax.lax.while_loop(cond, body, carry)[-1]


def pad_rows(rows: Sequence[Sequence[int]], length: int, *, pad_id: int, left: bool = False,
             filler: Sequence[int], batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token rows of at most `length` ids -> (ids, mask) int32 [batch_size, length], padded with `pad_id` on
    the right (or the `left`); rows added to reach `batch_size` hold `filler`, marked real."""
    n = len(rows) if batch_size is None else batch_size
    if len(rows) > n:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {n}")
    ids = np.full((n, length), pad_id, np.int32)
    mask = np.zeros((n, length), np.int32)
    for r, row in enumerate(list(rows) + [filler] * (n - len(rows))):
        row = list(row)
        if len(row) > length:
            raise ValueError(f"a row of {len(row)} ids does not fit length {length}")
        span = slice(length - len(row), length) if left else slice(0, len(row))
        ids[r, span] = row
        mask[r, span] = 1
    return ids, mask


def generate_texts(model: nnx.Module, tokenizer: Tokenizer, texts: Sequence[str], *, batch_size: int,
                   max_input_length: int, max_new_tokens: int) -> list[str]:
    """Greedy answers to `texts`, every batch padded to [batch_size, max_input_length] (one compile).

    The model's family encodes and pads the prompts as its decoding reads them: T5 right-padded inputs
    ending in EOS; a decoder-only model left-padded prompts (led by the tokenizer's BOS if it adds one)
    whose long rows keep their end.
    """
    family = family_of(model)
    rows = family.encode_prompts(tokenizer, texts)
    pending = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        ids, mask = family.pad_prompts(chunk, max_input_length, tokenizer=tokenizer, batch_size=batch_size)
        pending.append((len(chunk), family.greedy(model, ids, mask, max_new_tokens=max_new_tokens)))
    out: list[str] = []
    for n, tokens in pending:  # dispatch everything first, then wait: the device never idles
        out.extend(tokenizer.decode_batch(np.asarray(tokens)[:n].tolist()))
    return out
