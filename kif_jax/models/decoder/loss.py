"""The decoder-only family's training loss with a plain output head: logits only at labelled positions, a
chunk at a time, never [mb, L, V] at once (`CausalFamily.token_loss`)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kif_jax.data.batching import IGNORE_INDEX
from kif_jax.models.decoder.model import OutputHead, head_logits, soft_cap

LOSS_CHUNK = 16  # label positions per row whose logits the decoder loss computes together


def _head_logits(h: jax.Array, weight: jax.Array, vocab_major: bool) -> jax.Array:
    """h [..., D] -> float32 logits [..., V] of the model's linear head before any soft-cap."""
    return head_logits(OutputHead(weight, vocab_major, None), h)


def _chunk_count(valid: jax.Array, chunk: int) -> jax.Array:
    return (jnp.max(jnp.sum(valid, axis=1)) + chunk - 1) // chunk


def _chunk(x: jax.Array, j: jax.Array, chunk: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, j * chunk, chunk, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_nll_sum(hidden: jax.Array, weight: jax.Array, labels: jax.Array, valid: jax.Array,
                     vocab_major: bool, softcap: float | None, chunk: int) -> jax.Array:
    """Summed NLL of `labels` [mb, K] under head(hidden [mb, K, D]) where `valid`; valid positions first.

    head = the model's `OutputHead` (weight, vocab_major, softcap). Logits exist `chunk` positions at
    a time and only while some row has valid positions left; the backward pass recomputes them the
    same way, so nothing of size [mb, K, V] is ever held.
    """
    def body(j: jax.Array, total: jax.Array) -> jax.Array:
        logits = _head_logits(_chunk(hidden, j, chunk), weight, vocab_major)  # [mb, chunk, V]
        if softcap is not None:
            logits = soft_cap(logits, softcap)
        target = _chunk(labels, j, chunk)
        picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - picked
        return total + jnp.sum(jnp.where(_chunk(valid, j, chunk), nll, 0.0))

    return jax.lax.fori_loop(0, _chunk_count(valid, chunk), body, jnp.zeros((), jnp.float32))


def _chunked_nll_fwd(hidden: jax.Array, weight: jax.Array, labels: jax.Array, valid: jax.Array, vocab_major: bool,
                     softcap: float | None, chunk: int) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    return (_chunked_nll_sum(hidden, weight, labels, valid, vocab_major, softcap, chunk),
            (hidden, weight, labels, valid))


def _chunked_nll_bwd(vocab_major: bool, softcap: float | None, chunk: int, res: tuple[jax.Array, ...],
                     g: jax.Array) -> tuple[jax.Array, ...]:
    hidden, weight, labels, valid = res

    def body(j: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        d_hidden, d_weight = carry
        h = _chunk(hidden, j, chunk)
        logits = _head_logits(h, weight, vocab_major)
        onehot = jax.nn.one_hot(_chunk(labels, j, chunk), logits.shape[-1], dtype=jnp.float32)
        scale = jnp.where(_chunk(valid, j, chunk), g, 0.0)[..., None]
        if softcap is None:
            d_logits = ((jax.nn.softmax(logits, axis=-1) - onehot) * scale).astype(weight.dtype)  # [mb, chunk, V]
        else:  # through cap * tanh(z / cap): dz = d(capped) * (1 - tanh^2)
            t = jnp.tanh(logits / jnp.float32(softcap))
            d_capped = (jax.nn.softmax(t * jnp.float32(softcap), axis=-1) - onehot) * scale
            d_logits = (d_capped * (1.0 - t * t)).astype(weight.dtype)
        d_h = jnp.einsum("...v,vd->...d" if vocab_major else "...v,dv->...d", d_logits, weight,
                         preferred_element_type=jnp.float32).astype(hidden.dtype)
        d_hidden = jax.lax.dynamic_update_slice_in_dim(d_hidden, d_h, j * chunk, axis=1)
        d_w = (jnp.einsum("bcv,bcd->vd", d_logits, h, preferred_element_type=jnp.float32) if vocab_major
               else jnp.einsum("bcd,bcv->dv", h, d_logits, preferred_element_type=jnp.float32))
        return d_hidden, d_weight + d_w

    init = (jnp.zeros_like(hidden), jnp.zeros(weight.shape, jnp.float32))
    d_hidden, d_weight = jax.lax.fori_loop(0, _chunk_count(valid, chunk), body, init)
    float0 = lambda x: np.zeros(x.shape, jax.dtypes.float0)
    return d_hidden, d_weight.astype(weight.dtype), float0(labels), float0(valid)


_chunked_nll_sum.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


def labelled_mean_nll(hidden: jax.Array, head: OutputHead, labels: jax.Array, *,
                      chunk: int = LOSS_CHUNK) -> tuple[jax.Array, jax.Array]:
    """`masked_mean_nll(head(hidden), labels)` for a plain head (`OutputHead`), logits only where labels are.

    hidden [mb, L, D], labels [mb, L]. Each row's labelled positions are gathered to its front and
    `_chunked_nll_sum` runs the head over as many `chunk`s as the fullest row needs: a decoder's
    training row labels only its answer, so this skips most of the full-vocabulary head's matmuls
    (a fifth of SmolLM2-135M's training step) and never holds [mb, L, V] logits.
    """
    length = hidden.shape[1]
    mask = labels != IGNORE_INDEX
    order = jnp.argsort(~mask, axis=1, stable=True)  # [mb, L]: labelled positions first, in order
    pad = ((0, 0), (0, -length % chunk))
    gathered = jnp.take_along_axis(hidden, order[..., None], axis=1)
    target = jnp.pad(jnp.where(mask, labels, 0), pad)
    total = _chunked_nll_sum(jnp.pad(gathered, (*pad, (0, 0))), head.weight,
                             jnp.pad(jnp.take_along_axis(target[:, :length], order, axis=1), pad),
                             jnp.pad(jnp.take_along_axis(mask, order, axis=1), pad), head.vocab_major, head.softcap,
                             chunk)
    count = jnp.sum(mask)
    return total / jnp.maximum(count, 1), count
