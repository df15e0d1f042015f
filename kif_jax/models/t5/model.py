"""T5 encoder-decoder (v1.0 and v1.1 / Flan-T5) in Flax NNX, with LoRA on chosen projections.

Layout follows Hugging Face's `T5ForConditionalGeneration` so its checkpoints map one to one
(see `t5/hf.py`): kernels are stored [in, out], the relative position bias lives once per stack
(Hugging Face keeps it in block 0 and shares it), and every random choice of a call (dropout)
comes from the call's `rngs`, so a model splits into (graphdef, LoRA state, frozen state) only.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kif_jax.errors import ConfigError
from kif_jax.models.t5.architectures import t5_architecture
from kif_jax.models.layers import (  # noqa: F401 - LoRAConfig, LoRAParam, Dense, Embed, RMSNorm, merge_lora re-exported
    DECODER,
    ENCODER,
    MASKED as _MASKED,
    Dense,
    Embed,
    KeyStream as _Keys,
    LoRAConfig,
    LoRAParam,
    RMSNorm,
    RngsLike,
    dropout as _dropout,
    dropout_keys as _dropout_keys,
    check_lora_targets,
    lora_modules,
    mask_bias as _mask_bias,
    merge_lora,
    reading,
    remat_layer,
    softmax_parts,
)

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class T5Config:
    """T5 hyper-parameters under Hugging Face's field names; defaults are t5-small's.

    `num_decoder_layers=None` means `num_layers`; `scale_decoder_outputs=None` means
    `tie_word_embeddings` (v1.0: tied head and `d_model ** -0.5` scaling; v1.1: neither).
    Both are resolved at construction, so `dataclasses.replace` keeps the resolved values.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    initializer_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.scale_decoder_outputs is None:
            object.__setattr__(self, "scale_decoder_outputs", bool(self.tie_word_embeddings))
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                     "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"T5Config.{name} must be a positive integer, got {value!r}")
        if self.relative_attention_num_buckets < 4:
            raise ConfigError("T5Config.relative_attention_num_buckets must be at least 4, "
                              f"got {self.relative_attention_num_buckets}")
        if not 0.0 <= float(self.dropout_rate) < 1.0:
            raise ConfigError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        if not float(self.layer_norm_epsilon) > 0.0:
            raise ConfigError(f"T5Config.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        parts = str(self.feed_forward_proj).split("-")
        if (len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated")
                or parts[-1] not in _ACTIVATIONS):
            raise ConfigError(
                f"T5Config.feed_forward_proj must be 'relu', 'gated-gelu' or '[gated-]ACT' with ACT in "
                f"{sorted(_ACTIVATIONS)}, got {self.feed_forward_proj!r}")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if not 0 <= int(value) < self.vocab_size:
                raise ConfigError(f"T5Config.{name}={value!r} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def is_gated(self) -> bool:
        """v1.1 / Flan-T5: act(x W_0) * (x W_1) instead of act(x W)."""
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """The activation's Hugging Face name; `gated-gelu` means the tanh approximation."""
        act = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "T5Config":
        """From a Hugging Face `config.json` dict (hub style and transformers-5 style alike)."""
        t5_architecture(hf.get("model_type", "t5"), where="config.json has model_type")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in names and v is not None}
        if isinstance(kwargs.get("eos_token_id"), (list, tuple)):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        if "decoder_start_token_id" not in kwargs:
            kwargs["decoder_start_token_id"] = kwargs.get("pad_token_id", 0)
        # transformers 5 writes tie_word_embeddings=True for every T5 and keeps the v1.0/v1.1
        # switch in scale_decoder_outputs; older (hub) configs only have tie_word_embeddings.
        # A separate lm_head stored in the checkpoint unties the head at load time.
        kwargs.setdefault("tie_word_embeddings", True)
        kwargs.setdefault("scale_decoder_outputs", bool(kwargs["tie_word_embeddings"]))
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str) -> "T5Config":
        """From a `config.json` file."""
        import json

        with open(path, encoding="utf-8") as f:
            return cls.from_hf(json.load(f))

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that Hugging Face's `T5ForConditionalGeneration` reads back."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(model_type="t5", architectures=["T5ForConditionalGeneration"],
                   is_encoder_decoder=True, dense_act_fn=self.activation, is_gated_act=self.is_gated)
        return out


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

_V10 = dict(feed_forward_proj="relu", tie_word_embeddings=True)
_V11 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)

#: name -> (Hugging Face hub id or None, config): (name, hub id, d_model, d_kv, d_ff, layers, heads).
PRESETS: dict[str, tuple[str | None, T5Config]] = {
    name: (hub, T5Config(d_model=d, d_kv=kv, d_ff=ff, num_layers=n, num_heads=h, **version))
    for name, hub, d, kv, ff, n, h, version in (
        ("t5-small", "google-t5/t5-small", 512, 64, 2048, 6, 8, _V10),
        ("t5-base", "google-t5/t5-base", 768, 64, 3072, 12, 12, _V10),
        ("t5-large", "google-t5/t5-large", 1024, 64, 4096, 24, 16, _V10),
        ("t5-3b", "google-t5/t5-3b", 1024, 128, 16384, 24, 32, _V10),
        ("flan-t5-small", "google/flan-t5-small", 512, 64, 1024, 8, 6, _V11),
        ("flan-t5-base", "google/flan-t5-base", 768, 64, 2048, 12, 12, _V11),
        ("flan-t5-large", "google/flan-t5-large", 1024, 64, 2816, 24, 16, _V11),
        ("flan-t5-xl", "google/flan-t5-xl", 2048, 64, 5120, 24, 32, _V11),
    )
}
# A from-scratch model over the byte vocabulary (`ByteTokenizer`) for offline demos and tests.
PRESETS["tiny-byte"] = (None, T5Config(vocab_size=259, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                       dropout_rate=0.0, **_V11))


def preset(name: str) -> T5Config:
    """The config of a named preset (see `PRESETS`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown T5 preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name][1]


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def relative_position_buckets(query_length: int, key_length: int, *, bidirectional: bool,
                              num_buckets: int, max_distance: int, offset: int = 0) -> np.ndarray:
    """T5's bucket of every (query, key) pair, [query_length, key_length] int32.

    Computed on the host in float32 with the reference's exact operation order, so bucket
    boundaries agree with PyTorch bit for bit; shapes are static under jit, so this is free.
    """
    context = np.arange(query_length, dtype=np.int64)[:, None] + offset
    memory = np.arange(key_length, dtype=np.int64)[None, :]
    rel = memory - context
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):
        scaled = (np.log(rel.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact))
    large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(is_small, rel, large)).astype(np.int32)


class Attention(nnx.Module):
    """Multi-head attention without score scaling (T5 folds it into the init), float32 softmax."""

    def __init__(self, cfg: T5Config, *, path: str, lora: LoRAConfig | None, dtype: Any, param_dtype: Any,
                 keys: _Keys) -> None:
        d, inner, f = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.initializer_factor
        common = dict(lora=lora, dtype=dtype, param_dtype=param_dtype, keys=keys)
        into, outof = ("embed", "heads"), ("heads", "embed")  # logical axes (kif_jax/sharding.py)
        self.q = Dense(d, inner, std=f * (d * cfg.d_kv) ** -0.5, path=f"{path}.q", axes=into, **common)
        self.k = Dense(d, inner, std=f * d ** -0.5, path=f"{path}.k", axes=into, **common)
        self.v = Dense(d, inner, std=f * d ** -0.5, path=f"{path}.v", axes=into, **common)
        self.o = Dense(inner, d, std=f * inner ** -0.5, path=f"{path}.o", axes=outof, **common)
        self.num_heads = cfg.num_heads
        self.d_kv = cfg.d_kv
        self.dropout_rate = float(cfg.dropout_rate)
        self.dtype = dtype

    def project_kv(self, x: jax.Array, *, deterministic: bool = True,
                   rngs: RngsLike = None) -> tuple[jax.Array, jax.Array]:
        """Keys and values of `x` [B, S, D] -> two [B, S, H, d_kv]."""
        shape = (*x.shape[:-1], self.num_heads, self.d_kv)
        k = self.k(x, deterministic=deterministic, rngs=rngs).reshape(shape)
        v = self.v(x, deterministic=deterministic, rngs=rngs).reshape(shape)
        return k, v

    def attend(self, x: jax.Array, k: jax.Array, v: jax.Array, position_bias: jax.Array | None,
               mask_bias: jax.Array | None, *, deterministic: bool = True,
               rngs: RngsLike = None) -> jax.Array:
        """Queries from `x` [B, T, D] over `k`, `v` [B, S, H, d_kv]; biases broadcast to [B, H, T, S]."""
        b, t = x.shape[:2]
        q = self.q(x, deterministic=deterministic, rngs=rngs).reshape(b, t, self.num_heads, self.d_kv)
        scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)  # [B, H, T, S]
        if position_bias is not None:
            scores = scores + position_bias
        if mask_bias is not None:
            scores = scores + mask_bias
        e, sums = softmax_parts(scores)  # normalised after the value matmul (see softmax_parts)
        e = _dropout(e, self.dropout_rate, deterministic, rngs).astype(self.dtype)
        out = jnp.einsum("bhts,bshd->bthd", e, v) / jnp.transpose(sums, (0, 2, 1))[..., None].astype(self.dtype)
        out = out.reshape(b, t, self.num_heads * self.d_kv)
        return self.o(out, deterministic=deterministic, rngs=rngs)


class FeedForward(nnx.Module):
    """ReLU (v1.0) or gated-GELU (v1.1) MLP with dropout after the activation."""

    def __init__(self, cfg: T5Config, *, path: str, lora: LoRAConfig | None, dtype: Any, param_dtype: Any,
                 keys: _Keys) -> None:
        d, ff, f = cfg.d_model, cfg.d_ff, cfg.initializer_factor
        common = dict(lora=lora, dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.is_gated = cfg.is_gated
        if self.is_gated:
            self.wi_0 = Dense(d, ff, std=f * d ** -0.5, path=f"{path}.wi_0", axes=("embed", "mlp"), **common)
            self.wi_1 = Dense(d, ff, std=f * d ** -0.5, path=f"{path}.wi_1", axes=("embed", "mlp"), **common)
        else:
            self.wi = Dense(d, ff, std=f * d ** -0.5, path=f"{path}.wi", axes=("embed", "mlp"), **common)
        self.wo = Dense(ff, d, std=f * ff ** -0.5, path=f"{path}.wo", axes=("mlp", "embed"), **common)
        self.activation = cfg.activation
        self.dropout_rate = float(cfg.dropout_rate)

    def __call__(self, x: jax.Array, *, deterministic: bool = True, rngs: RngsLike = None) -> jax.Array:
        act = _ACTIVATIONS[self.activation]
        kw = dict(deterministic=deterministic, rngs=rngs)
        if self.is_gated:
            h = act(self.wi_0(x, **kw)) * self.wi_1(x, **kw)
        else:
            h = act(self.wi(x, **kw))
        return self.wo(_dropout(h, self.dropout_rate, deterministic, rngs), **kw)


class Block(nnx.Module):
    """Pre-norm residual block: self-attention, (decoder) cross-attention, feed-forward."""

    def __init__(self, cfg: T5Config, *, is_decoder: bool, path: str, lora: LoRAConfig | None, dtype: Any,
                 param_dtype: Any, keys: _Keys) -> None:
        common = dict(lora=lora, dtype=dtype, param_dtype=param_dtype, keys=keys)
        norm = dict(eps=cfg.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype)
        self.is_decoder = is_decoder
        self.dropout_rate = float(cfg.dropout_rate)
        self.self_attention_norm = RMSNorm(cfg.d_model, **norm)
        self.self_attention = Attention(cfg, path=f"{path}.self_attention", **common)
        if is_decoder:
            self.cross_attention_norm = RMSNorm(cfg.d_model, **norm)
            self.cross_attention = Attention(cfg, path=f"{path}.cross_attention", **common)
        self.ff_norm = RMSNorm(cfg.d_model, **norm)
        self.ff = FeedForward(cfg, path=f"{path}.ff", **common)

    def _residual(self, x: jax.Array, y: jax.Array, deterministic: bool, rngs: RngsLike) -> jax.Array:
        return x + _dropout(y, self.dropout_rate, deterministic, rngs)

    def __call__(self, x: jax.Array, position_bias: jax.Array, mask_bias: jax.Array | None,
                 encoder_hidden: jax.Array | None, encoder_mask_bias: jax.Array | None, *,
                 deterministic: bool = True, rngs: RngsLike = None) -> jax.Array:
        kw = dict(deterministic=deterministic, rngs=rngs)
        h = self.self_attention_norm(x)
        k, v = self.self_attention.project_kv(h, **kw)
        x = self._residual(x, self.self_attention.attend(h, k, v, position_bias, mask_bias, **kw), deterministic, rngs)
        if self.is_decoder:
            h = self.cross_attention_norm(x)
            with reading(ENCODER):  # the keys and values read the encoder's positions, the queries the decoder's
                k, v = self.cross_attention.project_kv(encoder_hidden, **kw)
            x = self._residual(x, self.cross_attention.attend(h, k, v, None, encoder_mask_bias, **kw),
                               deterministic, rngs)
        return self._residual(x, self.ff(self.ff_norm(x), **kw), deterministic, rngs)

    def step(self, x: jax.Array, index: jax.Array, position_bias: jax.Array, mask_bias: jax.Array,
             cache_k: jax.Array, cache_v: jax.Array, cross_k: jax.Array, cross_v: jax.Array,
             cross_mask_bias: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One decoder position `x` [B, 1, D] at `index`, writing its keys/values into the cache."""
        h = self.self_attention_norm(x)
        k, v = self.self_attention.project_kv(h)
        cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), index, axis=1)
        cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), index, axis=1)
        x = x + self.self_attention.attend(h, cache_k, cache_v, position_bias, mask_bias)
        h = self.cross_attention_norm(x)
        x = x + self.cross_attention.attend(h, cross_k, cross_v, None, cross_mask_bias)
        return x + self.ff(self.ff_norm(x)), cache_k, cache_v


class Stack(nnx.Module):
    """The encoder or the decoder: blocks sharing one relative position bias, then a final norm."""

    def __init__(self, cfg: T5Config, *, is_decoder: bool, lora: LoRAConfig | None, dtype: Any,
                 param_dtype: Any, keys: _Keys) -> None:
        name = "decoder" if is_decoder else "encoder"
        n = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        self.is_decoder = is_decoder
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.dropout_rate = float(cfg.dropout_rate)
        self.relative_attention_bias = Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                                             std=cfg.initializer_factor * cfg.d_model ** -0.5, dtype=jnp.float32,
                                             param_dtype=param_dtype, keys=keys, axes=("rel_buckets", None))
        self.blocks = nnx.List([
            Block(cfg, is_decoder=is_decoder, path=f"{name}.blocks.{i}", lora=lora, dtype=dtype,
                  param_dtype=param_dtype, keys=keys)
            for i in range(n)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype)
        self.remat = "none"  # train.remat: each block's activations recomputed in the backward pass

    def position_bias(self, query_length: int, key_length: int) -> jax.Array:
        """[1, H, Q, K] float32 bias (bidirectional buckets in the encoder, causal in the decoder)."""
        buckets = relative_position_buckets(query_length, key_length, bidirectional=not self.is_decoder,
                                            num_buckets=self.num_buckets, max_distance=self.max_distance)
        values = self.relative_attention_bias(jnp.asarray(buckets))  # [Q, K, H]
        return jnp.transpose(values, (2, 0, 1))[None]

    def __call__(self, x: jax.Array, mask_bias: jax.Array | None, *, encoder_hidden: jax.Array | None = None,
                 encoder_mask_bias: jax.Array | None = None, deterministic: bool = True,
                 rngs: RngsLike = None) -> jax.Array:
        position_bias = self.position_bias(x.shape[1], x.shape[1])
        x = _dropout(x, self.dropout_rate, deterministic, rngs)
        for block in self.blocks:
            call = remat_layer(lambda x, block=block: block(x, position_bias, mask_bias, encoder_hidden,
                                                            encoder_mask_bias, deterministic=deterministic,
                                                            rngs=rngs), self.remat)
            x = call(x)
        return _dropout(self.final_norm(x), self.dropout_rate, deterministic, rngs)


class DecodeCache(NamedTuple):
    """Per-layer decoder keys/values for incremental decoding (a plain pytree)."""

    self_k: tuple[jax.Array, ...]  # each [B, L, H, d_kv]
    self_v: tuple[jax.Array, ...]
    cross_k: tuple[jax.Array, ...]  # each [B, S, H, d_kv], computed once from the encoder output
    cross_v: tuple[jax.Array, ...]
    cross_mask_bias: jax.Array  # [B, 1, 1, S] float32
    position_bias: jax.Array  # [1, H, L, L] float32, row i is position i's bias


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class T5(nnx.Module):
    """T5 for conditional generation: `model(input_ids, decoder_input_ids)` -> float32 logits [B, T, V]."""

    family = "t5"  # the `ModelFamily` that serves it (kif_jax/models/family.py)
    #: What `from_pretrained` loaded it from (hub id, directory, `.gguf` file or preset); None if built here.
    name_or_path: str | None = None

    def __init__(self, config: T5Config, *, lora: LoRAConfig | None = None, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs) -> None:
        self.config = config
        self.lora = lora
        self.dtype = dtype
        keys = _Keys(rngs.params())
        common = dict(lora=lora, dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.shared = Embed(config.vocab_size, config.d_model, std=config.initializer_factor, dtype=dtype,
                            param_dtype=param_dtype, keys=keys)
        self.encoder = Stack(config, is_decoder=False, **common)
        self.decoder = Stack(config, is_decoder=True, **common)
        if not config.tie_word_embeddings:
            self.lm_head = Dense(config.d_model, config.vocab_size, std=config.initializer_factor, path="lm_head",
                                 axes=("embed", "vocab"), **common)
        check_lora_targets(self, lora, "T5")

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
        """input_ids [B, S] -> encoder output [B, S, D] (reusable across decoding steps)."""
        rngs = _dropout_keys(deterministic, rngs)
        mask_bias = None if attention_mask is None else _mask_bias(attention_mask)[:, None, None, :]
        with reading(ENCODER):  # which positions a projection's output has (layers.capture_output_magnitudes)
            return self.encoder(self.shared(input_ids), mask_bias, deterministic=deterministic, rngs=rngs)

    def decode(self, decoder_input_ids: jax.Array, encoder_hidden: jax.Array,
               encoder_attention_mask: jax.Array | None = None, decoder_attention_mask: jax.Array | None = None,
               *, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
        """decoder_input_ids [B, T] over encoder_hidden [B, S, D] -> float32 logits [B, T, V]."""
        rngs = _dropout_keys(deterministic, rngs)
        t = decoder_input_ids.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))[None, None]  # [1, 1, T, T]
        if decoder_attention_mask is not None:
            causal = causal & decoder_attention_mask.astype(bool)[:, None, None, :]
        cross = None if encoder_attention_mask is None else _mask_bias(encoder_attention_mask)[:, None, None, :]
        with reading(DECODER):  # but the cross-attention's keys and values read the ENCODER (Block)
            h = self.decoder(self.shared(decoder_input_ids), _mask_bias(causal), encoder_hidden=encoder_hidden,
                             encoder_mask_bias=cross, deterministic=deterministic, rngs=rngs)
            return self.logits(h, deterministic=deterministic, rngs=rngs)

    def logits(self, h: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Decoder output [..., D] -> float32 logits [..., V] (v1.0: scaled, tied to the embedding)."""
        rngs = _dropout_keys(deterministic, rngs)
        if self.config.scale_decoder_outputs:
            h = h * jnp.asarray(self.config.d_model ** -0.5, h.dtype)
        if self.config.tie_word_embeddings:
            emb = self.shared.embedding[...].astype(self.dtype)
            return jnp.einsum("...d,vd->...v", h, emb, preferred_element_type=jnp.float32)
        return self.lm_head(h, deterministic=deterministic, rngs=rngs).astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, decoder_input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 decoder_attention_mask: jax.Array | None = None, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """Teacher-forced logits [B, T, V] float32; dropout (deterministic=False) draws from `rngs`."""
        rngs = _dropout_keys(deterministic, rngs)
        enc = self.encode(input_ids, attention_mask, deterministic=deterministic, rngs=rngs)
        return self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask,
                           deterministic=deterministic, rngs=rngs)

    def decode_options(self, decoder_input_ids: jax.Array, encoder_hidden: jax.Array,
                       encoder_attention_mask: jax.Array | None = None) -> jax.Array:
        """C teacher-forced decoder inputs per row [B, C, T] over encoder_hidden [B, S, D] -> logits [B, C, T, V].

        `decode` (deterministic) of each row's C inputs, but the cross-attention keys and values are
        projected once per row, and the row's C x T queries attend to them together.
        """
        b, c, t = decoder_input_ids.shape
        cross = _mask_bias(jnp.ones(encoder_hidden.shape[:2], bool) if encoder_attention_mask is None
                           else encoder_attention_mask)[:, None, None, :]  # [B, 1, 1, S]
        causal = _mask_bias(jnp.tril(jnp.ones((t, t), bool)))[None, None]  # [1, 1, T, T]
        position_bias = self.decoder.position_bias(t, t)
        x = self.shared(decoder_input_ids.reshape(b * c, t))  # [B*C, T, D]
        for blk in self.decoder.blocks:
            h = blk.self_attention_norm(x)
            k, v = blk.self_attention.project_kv(h)
            x = x + blk.self_attention.attend(h, k, v, position_bias, causal)
            h = blk.cross_attention_norm(x).reshape(b, c * t, -1)  # [B, C*T, D]
            k, v = blk.cross_attention.project_kv(encoder_hidden)
            x = x + blk.cross_attention.attend(h, k, v, None, cross).reshape(b * c, t, -1)
            x = x + blk.ff(blk.ff_norm(x))
        return self.logits(self.decoder.final_norm(x)).reshape(b, c, t, -1)

    def init_cache(self, encoder_hidden: jax.Array, encoder_attention_mask: jax.Array | None,
                   max_length: int) -> DecodeCache:
        """An empty decoder cache for `max_length` steps, with the cross-attention keys/values."""
        b, s = encoder_hidden.shape[:2]
        cfg = self.config
        blocks = self.decoder.blocks
        cross = [blk.cross_attention.project_kv(encoder_hidden) for blk in blocks]
        zeros = jnp.zeros((b, max_length, cfg.num_heads, cfg.d_kv), self.dtype)
        mask = jnp.ones((b, s), bool) if encoder_attention_mask is None else encoder_attention_mask
        return DecodeCache(
            self_k=tuple(zeros for _ in blocks), self_v=tuple(zeros for _ in blocks),
            cross_k=tuple(k for k, _ in cross), cross_v=tuple(v for _, v in cross),
            cross_mask_bias=_mask_bias(mask)[:, None, None, :],
            position_bias=self.decoder.position_bias(max_length, max_length))

    def decode_step(self, token: jax.Array, index: jax.Array, cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
        """token [B] at position `index` -> (float32 logits [B, V], updated cache); deterministic."""
        length = cache.position_bias.shape[-1]
        x = self.shared(token[:, None])  # [B, 1, D]
        bias = jax.lax.dynamic_slice_in_dim(cache.position_bias, index, 1, axis=2)  # [1, H, 1, L]
        mask = _mask_bias(jnp.arange(length) <= index)[None, None, None, :]
        self_k, self_v = list(cache.self_k), list(cache.self_v)
        for i, blk in enumerate(self.decoder.blocks):
            x, self_k[i], self_v[i] = blk.step(x, index, bias, mask, self_k[i], self_v[i], cache.cross_k[i],
                                               cache.cross_v[i], cache.cross_mask_bias)
        logits = self.logits(self.decoder.final_norm(x))[:, 0]
        return logits, cache._replace(self_k=tuple(self_k), self_v=tuple(self_v))


def shift_right(labels: jax.Array, decoder_start_token_id: int = 0, pad_token_id: int = 0) -> jax.Array:
    """Teacher-forcing decoder inputs: [start, labels[:-1]], with -100 (ignored labels) as pad."""
    labels = jnp.where(labels < 0, pad_token_id, labels)
    start = jnp.full((*labels.shape[:-1], 1), decoder_start_token_id, labels.dtype)
    return jnp.concatenate([start, labels[..., :-1]], axis=-1)
