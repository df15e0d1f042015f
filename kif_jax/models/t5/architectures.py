"""The T5 architectures (`t5`, `mt5`): their registry entries and T5's tensor name table."""
from __future__ import annotations

from typing import Callable

import numpy as np

from kif_jax.models.architectures import Architecture, architecture
from kif_jax.models.hf_files import NameTable, transpose

FAMILY = "t5"

_FIELDS = {
    "stack": r"encoder|decoder",
    "i": r"\d+",
    "proj": r"q|k|v|o",
    "ff": r"wi|wi_0|wi_1|wo",
}


_t = transpose  # [out, in] (torch) <-> [in, out] (kif_jax)


# (Hugging Face name, model path, transform applied on load; its inverse is the same transpose).
_TABLE: tuple[tuple[str, str, Callable[[np.ndarray], np.ndarray] | None], ...] = (
    ("shared.weight", "shared.embedding", None),
    ("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
     "{stack}.relative_attention_bias.embedding", None),
    ("{stack}.block.{i}.layer.0.SelfAttention.{proj}.weight", "{stack}.blocks.{i}.self_attention.{proj}.kernel", _t),
    ("{stack}.block.{i}.layer.0.layer_norm.weight", "{stack}.blocks.{i}.self_attention_norm.scale", None),
    ("decoder.block.{i}.layer.1.EncDecAttention.{proj}.weight", "decoder.blocks.{i}.cross_attention.{proj}.kernel", _t),
    ("decoder.block.{i}.layer.1.layer_norm.weight", "decoder.blocks.{i}.cross_attention_norm.scale", None),
    ("encoder.block.{i}.layer.1.DenseReluDense.{ff}.weight", "encoder.blocks.{i}.ff.{ff}.kernel", _t),
    ("encoder.block.{i}.layer.1.layer_norm.weight", "encoder.blocks.{i}.ff_norm.scale", None),
    ("decoder.block.{i}.layer.2.DenseReluDense.{ff}.weight", "decoder.blocks.{i}.ff.{ff}.kernel", _t),
    ("decoder.block.{i}.layer.2.layer_norm.weight", "decoder.blocks.{i}.ff_norm.scale", None),
    ("{stack}.final_layer_norm.weight", "{stack}.final_norm.scale", None),
    ("lm_head.weight", "lm_head.kernel", _t),
)

NAMES = NameTable(_TABLE, _FIELDS)

_T5_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
              "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate",
              "layer_norm_epsilon", "feed_forward_proj", "tie_word_embeddings", "scale_decoder_outputs",
              "pad_token_id", "eos_token_id", "decoder_start_token_id")

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("t5", FAMILY, "T5ForConditionalGeneration", _T5_FIELDS, NAMES, untyped=True),
    Architecture("mt5", FAMILY, "MT5ForConditionalGeneration", _T5_FIELDS, NAMES),
)

_BY_TYPE = {a.model_type: a for a in ARCHITECTURES}
T5_TYPES = tuple(_BY_TYPE)


def t5_architecture(model_type: object, *, where: str = "model_type") -> Architecture:
    """The entry of a T5 `model_type` (a built-in one, else one registered since); a one-line ConfigError
    naming the T5 types."""
    found = _BY_TYPE.get(model_type)  # type: ignore[arg-type]
    return found if found is not None else architecture(model_type, family=FAMILY, where=where)
