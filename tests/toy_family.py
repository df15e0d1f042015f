"""A model family from outside kif_jax: a bigram LM (each token's logits from the token before it alone).

It is built only from kif_jax's shared pieces (layers, the weight loader and exporter, the decoding loop, the
causal layout's tokenization) and registered with `kif_jax.models.FAMILIES`: no kif_jax file names it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kif_jax.data.batching import IGNORE_INDEX, TokenizedDataset
from kif_jax.models import hf_weights
from kif_jax.models.architectures import Architecture
from kif_jax.models.decoder.generate import pad_left
from kif_jax.models.decoder.tokenize import tokenize_causal_records
from kif_jax.models.decoding import greedy_loop
from kif_jax.models.family import ModelFamily, ModelSizes, longest_row_weights, masked_mean_nll
from kif_jax.models.hf_files import NameTable, SafetensorsReader, read_config, transpose, weight_files
from kif_jax.models.layers import DECODER, Dense, Embed, KeyStream, LoRAConfig, dropout_keys, reading

MODEL_TYPE = "toy_bigram"


@dataclasses.dataclass(frozen=True)
class BigramConfig:
    vocab_size: int = 259
    hidden_size: int = 16
    pad_token_id: int = 0
    eos_token_id: int = 1

    def to_hf(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model_type": MODEL_TYPE}


class BigramLM(nnx.Module):
    """logits[t] = head(embed(ids[t])): float32 [B, T, V]."""

    family = MODEL_TYPE

    def __init__(self, config: BigramConfig, *, lora: LoRAConfig | None = None, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs) -> None:
        self.config, self.lora, self.dtype = config, lora, dtype
        keys = KeyStream(rngs.params())
        self.embed = Embed(config.vocab_size, config.hidden_size, std=1.0, dtype=dtype, param_dtype=dtype, keys=keys)
        self.head = Dense(config.hidden_size, config.vocab_size, std=0.1, path="head", lora=lora, dtype=dtype,
                          param_dtype=dtype, keys=keys, axes=("embed", "vocab"))

    def __call__(self, ids: jax.Array, *, deterministic: bool = True, rngs: Any = None) -> jax.Array:
        with reading(DECODER):
            return self.head(self.embed(ids), deterministic=deterministic, rngs=rngs).astype(jnp.float32)


NAMES = NameTable((("embed.weight", "embed.embedding", None), ("head.weight", "head.kernel", transpose)), {})
ARCHITECTURE = Architecture(MODEL_TYPE, MODEL_TYPE, "ToyBigramLM", ("vocab_size", "hidden_size", "pad_token_id",
                                                                   "eos_token_id"), NAMES)


class BigramFamily(ModelFamily):
    """The causal batch layout; greedy decoding from the prompt's last token, option scoring likewise."""

    name = MODEL_TYPE
    architectures = (ARCHITECTURE,)
    tiny_name = "toy-bigram"
    peft_task_type = "CAUSAL_LM"

    def tokenize(self, records: Sequence[dict], tokenizer: Any, *, max_input_length: int,
                 max_target_length: int) -> TokenizedDataset:
        return tokenize_causal_records(records, tokenizer, max_input_length=max_input_length,
                                       max_target_length=max_target_length, template=self.template)

    def token_loss(self, model: BigramLM, batch: dict, *, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        train = key is not None
        rngs = dropout_keys(not train, nnx.Rngs(dropout=key) if train else None)
        logits = model(batch["input_ids"], deterministic=not train, rngs=rngs)
        return masked_mean_nll(logits[:, :-1], batch["labels"][:, 1:])

    def position_weights(self, batch: dict) -> dict[str, jax.Array]:
        examples = jnp.any(batch["labels"] != IGNORE_INDEX, axis=-1)
        return {DECODER: longest_row_weights(batch["attention_mask"], examples)}

    def greedy(self, model: BigramLM, input_ids: jax.Array, attention_mask: jax.Array, *,
               max_new_tokens: int) -> jax.Array:
        cfg = model.config
        return greedy_loop(lambda prev, i, state: (model(prev[:, None])[:, 0], state), (), input_ids[:, -1],
                           max_new_tokens=max_new_tokens, eos_ids=(cfg.eos_token_id,), pad_id=cfg.pad_token_id)

    def score(self, model: BigramLM, input_ids: jax.Array, attention_mask: jax.Array, option_ids: jax.Array,
              option_mask: jax.Array) -> jax.Array:
        b, c, _ = option_ids.shape
        previous = jnp.concatenate([jnp.broadcast_to(input_ids[:, -1, None, None], (b, c, 1)), option_ids[..., :-1]],
                                   axis=-1)  # [B, C, T]: each option token's predecessor
        logp = jax.nn.log_softmax(model(previous), axis=-1)
        picked = jnp.take_along_axis(logp, option_ids[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(option_mask.astype(bool), picked, 0.0), axis=-1)

    def encode_prompts(self, tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
        return [list(r) for r in tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def pad_prompts(self, rows: Sequence[Sequence[int]], length: int, *, tokenizer: Any,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        return pad_left(rows, length, pad_id=tokenizer.pad_token_id, batch_size=batch_size)

    def build(self, config: BigramConfig, *, lora: LoRAConfig | None, dtype: Any, rngs: nnx.Rngs) -> BigramLM:
        return BigramLM(config, lora=lora, dtype=dtype, rngs=rngs)

    def tiny_config(self, tiny: Any) -> BigramConfig:
        return BigramConfig(vocab_size=tiny.vocab_size, hidden_size=tiny.d_model)

    def load(self, source: str, *, dtype: Any, lora: LoRAConfig | None, seed: int, mesh: Any) -> BigramLM:
        config = self.config_from_hf(read_config(source))
        return hf_weights.load_weights(lambda: BigramLM(config, lora=lora, dtype=dtype, rngs=nnx.Rngs(seed)), NAMES,
                                       SafetensorsReader(weight_files(source)), lora=lora, seed=seed,
                                       source=f"checkpoint {source}", what="bigram LM", mesh=mesh)

    def config_from_hf(self, hf: dict, reader: Any = None) -> BigramConfig:
        return BigramConfig(**{k: hf[k] for k in ARCHITECTURE.config_fields if k in hf})

    def save_pretrained(self, model: BigramLM, directory: str) -> None:
        hf_weights.save_pretrained(model, directory, NAMES)

    def to_hf_state_dict(self, model: BigramLM) -> dict[str, np.ndarray]:
        return hf_weights.to_hf_state_dict(model, NAMES)

    def peft_module(self, path: str) -> str:
        return path

    def sizes(self, config: BigramConfig) -> ModelSizes:
        return ModelSizes(config.hidden_size, 0, 1, config.vocab_size, 1)

    def loss_logit_positions(self, model: BigramLM, *, input_length: int, target_length: int) -> int:
        return input_length + target_length
