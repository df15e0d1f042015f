"""The T5 family behind the `ModelFamily` seam: the encoder reads the input, the decoder is teacher-forced on
the target; right-padded inputs ending in EOS for decoding."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kif_jax.data.batching import IGNORE_INDEX, TokenizedDataset
from kif_jax.errors import ModelLoadError
from kif_jax.models.family import Batch, ModelFamily, ModelSizes, longest_row_weights, masked_mean_nll
from kif_jax.models.hf_weights import TensorReader
from kif_jax.models.layers import DECODER, ENCODER, LoRAConfig
from kif_jax.models.t5 import hf as t5_hf
from kif_jax.models.t5.architectures import ARCHITECTURES, FAMILY, NAMES
from kif_jax.models.t5.generate import greedy_decode, option_log_likelihoods, pad_batch
from kif_jax.models.t5.model import PRESETS, T5, T5Config
from kif_jax.models.t5.tokenize import tokenize_records


class Seq2SeqFamily(ModelFamily):
    """T5: the encoder reads the input, the decoder is teacher-forced on the target."""

    name = FAMILY
    architectures = ARCHITECTURES
    tiny_name = "tiny"  # a randomly initialised T5 of the sizes in `model.tiny`
    peft_task_type = "SEQ_2_SEQ_LM"

    # --- the training loop and the evaluator ---

    def tokenize(self, records: Sequence[dict], tokenizer: Any, *, max_input_length: int,
                 max_target_length: int) -> TokenizedDataset:
        return tokenize_records(records, tokenizer, max_input_length=max_input_length,
                                max_target_length=max_target_length)

    def token_loss(self, model: nnx.Module, batch: Batch, *, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        train = key is not None
        logits = model(batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"],
                       deterministic=not train, rngs=nnx.Rngs(dropout=key) if train else None)  # [mb, T, V]
        return masked_mean_nll(logits, batch["labels"])

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
        return greedy_decode(model, input_ids, attention_mask, max_new_tokens=max_new_tokens)

    def score(self, model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, option_ids: jax.Array,
              option_mask: jax.Array) -> jax.Array:
        return option_log_likelihoods(model, input_ids, attention_mask, option_ids, option_mask)

    # --- decoding texts ---

    def encode_prompts(self, tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
        return tokenizer.encode_batch(list(texts))

    def pad_prompts(self, rows: Sequence[Sequence[int]], length: int, *, tokenizer: Any,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        return pad_batch(rows, length, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                         batch_size=batch_size)

    # --- models and checkpoints ---

    def build(self, config: T5Config, *, lora: LoRAConfig | None, dtype: Any, rngs: nnx.Rngs) -> T5:
        return T5(config, lora=lora, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def tiny_config(self, t: Any) -> T5Config:
        return T5Config(
            vocab_size=t.vocab_size, d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff, num_layers=t.num_layers,
            num_decoder_layers=t.num_layers, num_heads=t.num_heads, dropout_rate=t.dropout_rate,
            feed_forward_proj=t.feed_forward_proj, tie_word_embeddings=t.feed_forward_proj == "relu",
            scale_decoder_outputs=t.feed_forward_proj == "relu")

    def preset_source(self, name: str) -> str | None:
        return PRESETS[name][0] if name in PRESETS else None

    def preset_config(self, name: str) -> tuple[T5Config, str] | None:
        return (PRESETS[name][1], "kif_jax.models.t5.PRESETS") if name in PRESETS else None

    def load(self, source: str, *, dtype: Any, lora: LoRAConfig | None, seed: int, mesh: Any) -> T5:
        return t5_hf.load_t5(source, dtype=dtype, lora=lora, seed=seed, mesh=mesh)

    def config_from_hf(self, hf: dict, reader: TensorReader | None = None) -> T5Config:
        # The memory plan's reading: the config as written (the loader's untying of a stored lm_head aside).
        return T5Config.from_hf(hf)

    def save_pretrained(self, model: T5, directory: str) -> None:
        t5_hf.save_pretrained(model, directory)

    def to_hf_state_dict(self, model: T5) -> dict[str, np.ndarray]:
        return t5_hf.to_hf_state_dict(model)

    def peft_module(self, path: str) -> str:
        """'encoder.blocks.0.self_attention.q' -> 'encoder.block.0.layer.0.SelfAttention.q'."""
        found = NAMES.to_hf(path + ".kernel")
        if found is None:
            raise ModelLoadError(f"no Hugging Face name for T5 projection {path}")
        return found[0].removesuffix(".weight")

    # --- the memory plan ---

    def sizes(self, config: T5Config) -> ModelSizes:
        return ModelSizes(config.d_model, config.d_ff, config.num_heads, config.vocab_size,
                          config.num_layers + config.num_decoder_layers)

    def loss_logit_positions(self, model: T5, *, input_length: int, target_length: int) -> int:
        return target_length  # logits over the decoder's target positions


FAMILIES = (Seq2SeqFamily,)
