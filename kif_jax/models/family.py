"""The model-family seam: everything the training loop, `Programs` and the `Evaluator` need of a model.

A family builds its model and tokenizer from the config's `model` section, tokenizes benchmark
records into its batch layout, computes the per-token loss of a batch, and decodes. The loop only
ever holds a `ModelFamily`; T5 (encoder-decoder) and the decoder-only LLMs sit behind it.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kif_jax.data.batching import IGNORE_INDEX, TokenizedDataset, tokenize_causal_records, tokenize_records
from kif_jax.errors import ConfigError
from kif_jax.models.layers import DECODER, ENCODER, LoRAConfig, dropout_keys

Batch = dict[str, jax.Array]


class ModelFamily(Protocol):
    """What a model family provides to the training loop."""

    name: str

    def tokenize(self, records: Sequence[dict], tokenizer: Any, *, max_input_length: int,
                 max_target_length: int) -> TokenizedDataset:
        """Benchmark records -> a dataset in this family's batch layout."""

    def token_loss(self, model: nnx.Module, batch: Batch, *, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Mean cross-entropy over the batch's target tokens and their count (dropout iff `key`)."""

    def position_weights(self, batch: Batch) -> dict[str, jax.Array]:
        """Float32 [mb, length] weights of each sequence a training micro-batch's projections read
        (`layers.ENCODER`, `layers.DECODER`), for `layers.capture_output_magnitudes`: 1 below the
        micro-batch's longest real row, 0 beyond it and in filler rows (see `longest_row_weights`)."""

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


def longest_row_weights(real: jax.Array, examples: jax.Array) -> jax.Array:
    """float32 [mb, L]: 1 at the positions below the longest of the `examples` rows [mb] (bool), in those
    rows; 0 beyond that length and in every other row. `real` [mb, L] marks each row's real positions.

    What a collator that pads each micro-batch to its longest row (Hugging Face's padding="longest")
    would put in front of the model, as positions of kif_jax's longer padded batch: the rows' real
    positions and the padding up to the longest; nothing of the bucket's extra padding nor of the
    filler rows that complete an epoch's last batch (kif_jax/data/batching.py)."""
    length = real.shape[-1]
    ends = jnp.max(jnp.where(real.astype(bool), jnp.arange(1, length + 1), 0), axis=-1)  # last real position + 1
    longest = jnp.max(jnp.where(examples, ends, 0))
    return ((jnp.arange(length) < longest)[None, :] & examples[:, None]).astype(jnp.float32)


LOSS_CHUNK = 16  # label positions per row whose logits the decoder loss computes together


def _head_logits(h: jax.Array, weight: jax.Array, vocab_major: bool) -> jax.Array:
    """h [..., D] -> float32 logits [..., V] of the model's linear head before any soft-cap."""
    from kif_jax.models.decoder import OutputHead, head_logits

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
    from kif_jax.models.decoder import soft_cap

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


def _labelled_mean_nll(hidden: jax.Array, head: Any, labels: jax.Array, *,
                       chunk: int = LOSS_CHUNK) -> tuple[jax.Array, jax.Array]:
    """`_masked_mean_nll(head(hidden), labels)` for a plain head (`decoder.OutputHead`), logits only where labels are.

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

    def position_weights(self, batch: Batch) -> dict[str, jax.Array]:
        # The authors' T5 collator pads the inputs to the longest input and the labels (and the decoder
        # inputs shifted from them) to the longest target (wenyudu/MIGU src/uie_collator.py:103-126); a
        # filler row is the one without labels (every real row has at least its EOS).
        labelled = batch["labels"] != IGNORE_INDEX
        examples = jnp.any(labelled, axis=-1)
        return {ENCODER: longest_row_weights(batch["attention_mask"], examples),
                DECODER: longest_row_weights(labelled, examples)}

    def greedy(self, model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, *,
               max_new_tokens: int) -> jax.Array:
        from kif_jax.models.t5.generate import greedy_decode

        return greedy_decode(model, input_ids, attention_mask, max_new_tokens=max_new_tokens)

    def score(self, model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, option_ids: jax.Array,
              option_mask: jax.Array) -> jax.Array:
        from kif_jax.models.t5 import shift_right

        cfg = model.config
        enc = model.encode(input_ids, attention_mask)  # [B, S, D], once for the row's C options
        logits = model.decode_options(shift_right(option_ids, cfg.decoder_start_token_id, cfg.pad_token_id), enc,
                                      attention_mask)  # [B, C, T, V]
        picked = jnp.take_along_axis(logits, option_ids[..., None], axis=-1)[..., 0]
        logp = picked - jax.nn.logsumexp(logits, axis=-1)  # [B, C, T]
        return jnp.sum(jnp.where(option_mask.astype(bool), logp, 0.0), axis=-1)


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
        rngs = dropout_keys(not train, nnx.Rngs(dropout=key) if train else None)  # one stream, as model(...)
        labels = batch["labels"][:, 1:]  # position t predicts t + 1
        head = model.output_head()
        if head is None:  # not a plain matmul (LoRA or a bias on lm_head): logits at every position
            logits = model(batch["input_ids"], batch["attention_mask"], deterministic=not train, rngs=rngs)
            return _masked_mean_nll(logits[:, :-1], labels)  # [mb, L - 1, V]
        hidden = model.hidden(batch["input_ids"], batch["attention_mask"], deterministic=not train, rngs=rngs)
        return _labelled_mean_nll(hidden[:, :-1], head, labels)

    def position_weights(self, batch: Batch) -> dict[str, jax.Array]:
        # One sequence, prompt + target, padded to the longest (the authors' decoder collator pads on the
        # left, src/uie_collator.py:133; kif_jax's training rows are right-padded: the same number of
        # positions per row); a filler row is the one without labels.
        examples = jnp.any(batch["labels"] != IGNORE_INDEX, axis=-1)
        return {DECODER: longest_row_weights(batch["attention_mask"], examples)}

    def greedy(self, model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, *,
               max_new_tokens: int) -> jax.Array:
        from kif_jax.models.decoder.generate import greedy_decode_lm

        return greedy_decode_lm(model, input_ids, attention_mask, max_new_tokens=max_new_tokens)

    def score(self, model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, option_ids: jax.Array,
              option_mask: jax.Array) -> jax.Array:
        from kif_jax.models.decoder.generate import score_options_lm

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


def build_model(model_config: Any, *, seed: int, mesh: Any = None) -> tuple[nnx.Module, Any, ModelFamily]:
    """(model with LoRA when only LoRA trains, tokenizer, family) from the config's `model` section.

    With a `mesh`, pretrained tensors are placed in their final shardings as they are read.
    """
    from kif_jax.models.loading import from_pretrained
    from kif_jax.models.tokenizers import load_tokenizer

    m = model_config
    dtype, lora = _dtype_and_lora(m)
    if m.name in (TINY_T5, TINY_DECODER):
        model = _tiny_model(m.name, m.tiny, lora=lora, dtype=dtype, seed=seed)
        source = m.tokenizer or "byte"
    else:
        source = resolve_model_source(m.name)
        model = from_pretrained(source, dtype=dtype, lora=lora, seed=seed, mesh=mesh)
        source = m.tokenizer or source
    tokenizer = load_tokenizer(source)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer '{source}' has {tokenizer.vocab_size} ids but the model only "
                          f"{model.config.vocab_size} embeddings")
    return model, tokenizer, family_of(model, m.prompt_template)


def _dtype_and_lora(m: Any) -> tuple[Any, LoRAConfig | None]:
    """The compute dtype and the LoRA config (None unless only LoRA trains) of a `model` config section."""
    dtype = jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32
    lora = None
    if m.trainable == "lora":
        lora = LoRAConfig(rank=m.lora.rank, alpha=float(m.lora.alpha), dropout=float(m.lora.dropout),
                          targets=tuple(t.strip() for t in str(m.lora.targets).split(",") if t.strip()))
    return dtype, lora


# --------------------------------------------------------------------------------------------
# A model's architecture and abstract shapes, without its weights (the memory plan of a run not at hand)
# --------------------------------------------------------------------------------------------


def model_architecture(name: str) -> tuple[Any, str]:
    """(DecoderConfig or T5Config of model `name`, where it came from), without reading any weights.

    In order: a local checkpoint directory's (or `.gguf` file's) config; the hub cache's config.json;
    the built-in sizes of a preset (`decoder.PRESET_CONFIGS`, `t5.PRESETS`); config.json fetched from
    the hub. Errors are `ConfigError`s.
    """
    import json
    import pathlib

    from kif_jax.errors import KifError
    from kif_jax.models import decoder, t5
    from kif_jax.models.decoder import hf as decoder_hf
    from kif_jax.models.hf_files import SafetensorsReader, read_config, weight_files
    from kif_jax.models.architectures import architecture

    source = resolve_model_source(name)
    try:
        if source.endswith(".gguf"):
            from kif_jax.models.gguf import GGUFCheckpoint

            if not os.path.isfile(source):
                raise ConfigError(f"config field 'model.name': GGUF file {source} does not exist")
            checkpoint = GGUFCheckpoint(source)
            return decoder_hf._untie_if_separate_head(decoder_hf._config(checkpoint.config, source), checkpoint), source
        reader = None
        if os.path.isdir(source):
            hf, origin = read_config(source), os.path.join(source, "config.json")
            try:
                reader = SafetensorsReader(weight_files(source))  # headers only: a tied head stored apart
            except KifError:
                pass
        else:
            hf, origin = None, source
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(source, "config.json")
            except Exception:  # noqa: BLE001 - not a valid hub id: no cache entry
                cached = None
            if isinstance(cached, str):
                hf, origin = json.loads(pathlib.Path(cached).read_text()), cached
            elif name in decoder.PRESET_CONFIGS:
                return decoder.PRESET_CONFIGS[name], "kif_jax.models.decoder.PRESET_CONFIGS (published config.json)"
            elif name in t5.PRESETS:
                return t5.PRESETS[name][1], "kif_jax.models.t5.PRESETS"
            else:
                import logging as std_logging

                hub_log = std_logging.getLogger("huggingface_hub")
                level = hub_log.level
                hub_log.setLevel(std_logging.ERROR)  # its retries' warnings: the failure is one line below
                try:
                    from huggingface_hub import hf_hub_download

                    path = hf_hub_download(source, "config.json")
                except Exception as e:  # noqa: BLE001 - every hub failure is one message
                    raise ConfigError(f"config field 'model.name': no architecture for {name!r}: not a local "
                                      f"checkpoint, not in the hub cache, no built-in sizes, and its config.json "
                                      f"cannot be fetched ({type(e).__name__})") from None
                finally:
                    hub_log.setLevel(level)
                hf, origin = json.loads(pathlib.Path(path).read_text()), path
        model_type = hf.get("model_type", "t5")
        if architecture(model_type, where=f"{origin}: model_type").family == "t5":
            return t5.T5Config.from_hf(hf), origin
        config = decoder.DecoderConfig.from_hf(hf)
        return (config if reader is None else decoder_hf._untie_if_separate_head(config, reader)), origin
    except KifError as e:
        raise ConfigError(str(e)) from None


def abstract_model(model_config: Any, *, seed: int) -> tuple[Any, Any, str]:
    """(abstract model as `build_model` would build it, its architecture config, its source): shapes only."""
    from kif_jax.models.decoder import DecoderConfig, DecoderLM
    from kif_jax.models.t5 import T5

    m = model_config
    dtype, lora = _dtype_and_lora(m)
    if m.name in (TINY_T5, TINY_DECODER):
        model = nnx.eval_shape(lambda: _tiny_model(m.name, m.tiny, lora=lora, dtype=dtype, seed=seed))
        return model, model.config, f"model.tiny ({m.name})"
    arch, origin = model_architecture(m.name)
    cls = DecoderLM if isinstance(arch, DecoderConfig) else T5
    model = nnx.eval_shape(lambda: cls(arch, lora=lora, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed)))
    return model, arch, origin


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
