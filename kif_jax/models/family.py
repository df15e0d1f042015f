"""The model-family seam: everything the training loop, `Programs` and the `Evaluator` need of a model.

A family builds its model and tokenizer from the config's `model` section, tokenizes benchmark
records into its batch layout, computes the per-token loss of a batch, and decodes. The loop only
ever holds a `ModelFamily`; T5 (encoder-decoder) and the decoder-only LLMs sit behind it.
"""
from __future__ import annotations

import os
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kif_jax.data.batching import IGNORE_INDEX, TokenizedDataset, tokenize_causal_records, tokenize_records
from kif_jax.errors import ConfigError
from kif_jax.models.layers import LoRAConfig

Batch = dict[str, jax.Array]


class ModelFamily(Protocol):
    """What a model family provides to the training loop."""

    name: str

    def tokenize(self, records: Sequence[dict], tokenizer: Any, *, max_input_length: int,
                 max_target_length: int) -> TokenizedDataset:
        """Benchmark records -> a dataset in this family's batch layout."""

    def token_loss(self, model: nnx.Module, batch: Batch, *, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Mean cross-entropy over the batch's target tokens and their count (dropout iff `key`)."""

    def greedy(self, model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, *,
               max_new_tokens: int) -> jax.Array:
        """Greedy continuation int32 [B, max_new_tokens] of a decoding batch (traceable under jit)."""

    def score(self, model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, option_ids: jax.Array,
              option_mask: jax.Array) -> jax.Array:
        """Summed log-likelihood float32 [B, C] of each option [B, C, T] (mask: real option tokens)."""


def _masked_mean_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    mask = labels != IGNORE_INDEX
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, labels, 0))
    count = jnp.sum(mask)
    return jnp.sum(nll * mask) / jnp.maximum(count, 1), count


class Seq2SeqFamily:
    """T5: the encoder reads the input, the decoder is teacher-forced on the target."""

    name = "seq2seq"

    def tokenize(self, records: Sequence[dict], tokenizer: Any, *, max_input_length: int,
                 max_target_length: int) -> TokenizedDataset:
        return tokenize_records(records, tokenizer, max_input_length=max_input_length,
                                max_target_length=max_target_length)

    def token_loss(self, model: nnx.Module, batch: Batch, *, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        train = key is not None
        logits = model(batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"],
                       deterministic=not train, rngs=nnx.Rngs(dropout=key) if train else None)  # [mb, T, V]
        return _masked_mean_nll(logits, batch["labels"])

    def greedy(self, model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, *,
               max_new_tokens: int) -> jax.Array:
        from kif_jax.models.generate import greedy_decode

        return greedy_decode(model, input_ids, attention_mask, max_new_tokens=max_new_tokens)

    def score(self, model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, option_ids: jax.Array,
              option_mask: jax.Array) -> jax.Array:
        from kif_jax.models.t5 import shift_right

        b, c, t = option_ids.shape
        cfg = model.config
        enc = jnp.repeat(model.encode(input_ids, attention_mask), c, axis=0)  # [B*C, S, D], encoder once
        labels = option_ids.reshape(b * c, t)
        logits = model.decode(shift_right(labels, cfg.decoder_start_token_id, cfg.pad_token_id), enc,
                              jnp.repeat(attention_mask, c, axis=0))  # [B*C, T, V]
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(option_mask.reshape(b * c, t), picked, 0.0), axis=-1).reshape(b, c)


class CausalFamily:
    """Decoder-only LLMs: prompt + label + EOS in one sequence, loss on the label and EOS only."""

    name = "causal"

    def __init__(self, template: str = "none") -> None:
        self.template = template

    def tokenize(self, records: Sequence[dict], tokenizer: Any, *, max_input_length: int,
                 max_target_length: int) -> TokenizedDataset:
        return tokenize_causal_records(records, tokenizer, max_input_length=max_input_length,
                                       max_target_length=max_target_length, template=self.template)

    def token_loss(self, model: nnx.Module, batch: Batch, *, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        train = key is not None
        logits = model(batch["input_ids"], batch["attention_mask"], deterministic=not train,
                       rngs=nnx.Rngs(dropout=key) if train else None)  # [mb, L, V]
        return _masked_mean_nll(logits[:, :-1], batch["labels"][:, 1:])  # position t predicts t + 1

    def greedy(self, model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, *,
               max_new_tokens: int) -> jax.Array:
        from kif_jax.models.decoder_generate import greedy_decode_lm

        return greedy_decode_lm(model, input_ids, attention_mask, max_new_tokens=max_new_tokens)

    def score(self, model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, option_ids: jax.Array,
              option_mask: jax.Array) -> jax.Array:
        from kif_jax.models.decoder_generate import score_options_lm

        return score_options_lm(model, input_ids, attention_mask, option_ids, option_mask)


# --------------------------------------------------------------------------------------------
# Building a model from the config's `model` section
# --------------------------------------------------------------------------------------------

TINY_T5 = "tiny"  # a randomly initialised T5 of the sizes in `model.tiny`
TINY_DECODER = "tiny-decoder"  # a randomly initialised LLaMA-style decoder of the same sizes


def family_of(model: nnx.Module, template: str = "none") -> ModelFamily:
    """The family of a built model."""
    from kif_jax.models.t5 import T5

    return Seq2SeqFamily() if isinstance(model, T5) else CausalFamily(template)


def resolve_model_source(name: str) -> str:
    """A preset name -> its hub id or file; a local directory, hub id or `.gguf` path unchanged."""
    from kif_jax.models.t5 import PRESETS as T5_PRESETS

    path = os.path.expanduser(name)
    if os.path.exists(path) or path.endswith(".gguf"):
        return path
    if name in T5_PRESETS and T5_PRESETS[name][0]:
        return T5_PRESETS[name][0]
    from kif_jax.models import decoder, gguf

    gguf_file = gguf.resolve_gguf_name(name)
    if gguf_file is not None:
        return gguf_file
    return decoder.PRESETS.get(name, name)


def build_model(model_config: Any, *, seed: int) -> tuple[nnx.Module, Any, ModelFamily]:
    """(model with LoRA when only LoRA trains, tokenizer, family) from the config's `model` section."""
    from kif_jax.models.loading import from_pretrained
    from kif_jax.models.tokenizers import load_tokenizer

    m = model_config
    dtype = jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32
    lora = None
    if m.trainable == "lora":
        lora = LoRAConfig(rank=m.lora.rank, alpha=float(m.lora.alpha), dropout=float(m.lora.dropout),
                          targets=tuple(t.strip() for t in str(m.lora.targets).split(",") if t.strip()))
    if m.name in (TINY_T5, TINY_DECODER):
        model = _tiny_model(m.name, m.tiny, lora=lora, dtype=dtype, seed=seed)
        source = m.tokenizer or "byte"
    else:
        source = resolve_model_source(m.name)
        model = from_pretrained(source, dtype=dtype, lora=lora, seed=seed)
        source = m.tokenizer or source
    tokenizer = load_tokenizer(source)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer '{source}' has {tokenizer.vocab_size} ids but the model only "
                          f"{model.config.vocab_size} embeddings")
    return model, tokenizer, family_of(model, m.prompt_template)


def _tiny_model(name: str, t: Any, *, lora: LoRAConfig | None, dtype: Any, seed: int) -> nnx.Module:
    rngs = nnx.Rngs(params=seed)
    if name == TINY_T5:
        from kif_jax.models.t5 import T5, T5Config

        config = T5Config(
            vocab_size=t.vocab_size, d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff, num_layers=t.num_layers,
            num_decoder_layers=t.num_layers, num_heads=t.num_heads, dropout_rate=t.dropout_rate,
            feed_forward_proj=t.feed_forward_proj, tie_word_embeddings=t.feed_forward_proj == "relu",
            scale_decoder_outputs=t.feed_forward_proj == "relu")
        return T5(config, lora=lora, dtype=dtype, param_dtype=dtype, rngs=rngs)
    from kif_jax.models.decoder import DecoderConfig, DecoderLM

    config = DecoderConfig(
        model_type="llama", vocab_size=t.vocab_size, hidden_size=t.d_model, intermediate_size=t.d_ff,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
        head_dim=t.d_kv, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=1, pad_token_id=0,
        attention_dropout=t.dropout_rate)
    return DecoderLM(config, lora=lora, dtype=dtype, param_dtype=dtype, rngs=rngs)
