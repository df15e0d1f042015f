"""The decoder-only family behind the `ModelFamily` seam: prompt + label + EOS in one sequence, the loss on the
label and EOS only; left-padded prompts for decoding."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kif_jax.data.batching import IGNORE_INDEX, TokenizedDataset
from kif_jax.models.decoder import hf as decoder_hf
from kif_jax.models.decoder.architectures import ARCHITECTURES, FAMILY
from kif_jax.models.decoder.generate import greedy_decode_lm, pad_left, score_options_lm
from kif_jax.models.decoder.loss import LOSS_CHUNK, labelled_mean_nll
from kif_jax.models.decoder.model import PRESET_CONFIGS, PRESETS, DecoderConfig, DecoderLM
from kif_jax.models.decoder.tokenize import leading_special_ids, tokenize_causal_records
from kif_jax.models.family import Batch, ModelFamily, ModelSizes, longest_row_weights, masked_mean_nll
from kif_jax.models.hf_weights import TensorReader
from kif_jax.models.layers import DECODER, LoRAConfig, dropout_keys


class CausalFamily(ModelFamily):
    """Decoder-only LLMs: prompt + label + EOS in one sequence, loss on the label and EOS only."""

    name = FAMILY
    architectures = ARCHITECTURES
    tiny_name = "tiny-decoder"  # a randomly initialised LLaMA-style decoder of the sizes in `model.tiny`
    peft_task_type = "CAUSAL_LM"

    # --- the training loop and the evaluator ---

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
            return masked_mean_nll(logits[:, :-1], labels)  # [mb, L - 1, V]
        hidden = model.hidden(batch["input_ids"], batch["attention_mask"], deterministic=not train, rngs=rngs)
        return labelled_mean_nll(hidden[:, :-1], head, labels)

    def position_weights(self, batch: Batch) -> dict[str, jax.Array]:
        # One sequence, prompt + target, padded to the longest (the authors' decoder collator pads on the
        # left, src/uie_collator.py:133; kif_jax's training rows are right-padded: the same number of
        # positions per row); a filler row is the one without labels.
        examples = jnp.any(batch["labels"] != IGNORE_INDEX, axis=-1)
        return {DECODER: longest_row_weights(batch["attention_mask"], examples)}

    def greedy(self, model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, *,
               max_new_tokens: int) -> jax.Array:
        return greedy_decode_lm(model, input_ids, attention_mask, max_new_tokens=max_new_tokens)

    def score(self, model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, option_ids: jax.Array,
              option_mask: jax.Array) -> jax.Array:
        return score_options_lm(model, input_ids, attention_mask, option_ids, option_mask)

    # --- decoding texts ---

    def encode_prompts(self, tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
        # Led by the tokenizer's BOS if it adds one, as training rows are.
        prefix = leading_special_ids(tokenizer)
        return [prefix + list(r) for r in tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def pad_prompts(self, rows: Sequence[Sequence[int]], length: int, *, tokenizer: Any,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        return pad_left(rows, length, pad_id=tokenizer.pad_token_id, batch_size=batch_size)

    # --- models and checkpoints ---

    def build(self, config: DecoderConfig, *, lora: LoRAConfig | None, dtype: Any, rngs: nnx.Rngs) -> DecoderLM:
        return DecoderLM(config, lora=lora, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def tiny_config(self, t: Any) -> DecoderConfig:
        return DecoderConfig(
            model_type="llama", vocab_size=t.vocab_size, hidden_size=t.d_model, intermediate_size=t.d_ff,
            num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
            head_dim=t.d_kv, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=1, pad_token_id=0,
            attention_dropout=t.dropout_rate)

    def preset_source(self, name: str) -> str | None:
        return PRESETS.get(name)

    def preset_config(self, name: str) -> tuple[DecoderConfig, str] | None:
        if name not in PRESET_CONFIGS:
            return None
        return PRESET_CONFIGS[name], "kif_jax.models.decoder.PRESET_CONFIGS (published config.json)"

    def load(self, source: str, *, dtype: Any, lora: LoRAConfig | None, seed: int, mesh: Any) -> DecoderLM:
        return decoder_hf.load_decoder(source, dtype=dtype, lora=lora, seed=seed, mesh=mesh)

    def config_from_hf(self, hf: dict, reader: TensorReader | None = None) -> DecoderConfig:
        config = DecoderConfig.from_hf(hf)
        return config if reader is None else decoder_hf.untie_if_separate_head(config, reader)

    def save_pretrained(self, model: DecoderLM, directory: str) -> None:
        decoder_hf.save_pretrained(model, directory)

    def to_hf_state_dict(self, model: DecoderLM) -> dict[str, np.ndarray]:
        return decoder_hf.to_hf_state_dict(model)

    def peft_module(self, path: str) -> str:
        return path  # modules are named as Hugging Face names them

    # --- the memory plan ---

    def sizes(self, config: DecoderConfig) -> ModelSizes:
        return ModelSizes(config.hidden_size, config.intermediate_size, config.num_attention_heads,
                          config.vocab_size, config.num_hidden_layers)

    def loss_logit_positions(self, model: DecoderLM, *, input_length: int, target_length: int) -> int:
        # One chunk of labelled positions, or every position when the head is not a plain matmul.
        length = input_length + target_length
        return min(LOSS_CHUNK, length) if model.plain_head else length


FAMILIES = (CausalFamily,)
