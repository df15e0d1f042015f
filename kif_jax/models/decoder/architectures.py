"""The decoder-only architectures: each `model_type`'s registry entry, with the feature switches its blocks
turn on and its own config reading (Qwen: kif_jax/models/decoder/qwen.py; Gemma 3: gemma3.py).

A new decoder variant is one entry here, plus its own module when the generic config reading is not
enough (docs/models.md).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from kif_jax.models.architectures import Architecture, architecture
from kif_jax.models.decoder import gemma3, qwen
from kif_jax.models.hf_files import NameTable, transpose

FAMILY = "decoder"
ATTENTION_TYPES = ("full_attention", "sliding_attention")


def all_sliding(num_layers: int) -> tuple[str, ...]:
    """Every layer slides (Mistral's `sliding_window`)."""
    return ("sliding_attention",) * num_layers


@dataclasses.dataclass(frozen=True)
class DecoderFeatures:
    """What a decoder-only architecture's blocks do beyond LLaMA's."""

    qkv_bias_default: bool = False  # attention_bias when config.json omits it (Qwen2: q/k/v biases)
    o_proj_bias: bool = True  # whether attention_bias also puts a bias on o_proj (not Qwen2's)
    qk_norm: bool = False  # an RMSNorm over each head of q and k before RoPE
    gemma_norm: bool = False  # RMSNorm scale is (1 + w), multiplied in float32 before the cast
    sandwich_norms: bool = False  # attention and MLP outputs normed before the residual, pre-MLP norm
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), rounded to the embedding dtype
    hidden_act: str = "silu"  # the gate's activation when config.json names none
    # Each layer's attention type when a window is set and config.json lists none (None: every layer full).
    sliding_layers: Callable[[int], tuple[str, ...]] | None = None
    rope_local_base_freq: float | None = None  # sliding layers' unscaled RoPE base when the config gives none


# --------------------------------------------------------------------------------------------
# Name tables
# --------------------------------------------------------------------------------------------

_DECODER_FIELDS = {
    "i": r"\d+",
    "proj": r"q_proj|k_proj|v_proj|o_proj",
    "qk": r"q_norm|k_norm",
    "mlp": r"gate_proj|up_proj|down_proj",
    "norm": r"input_layernorm|post_attention_layernorm",
}
_GEMMA_FIELDS = {**_DECODER_FIELDS,
                 "norm": r"input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|"
                         r"post_feedforward_layernorm"}

#: (Hugging Face name, model path, transform on load; its inverse is the same transpose).
DECODER_ROWS: tuple[tuple[str, str, Callable[[np.ndarray], np.ndarray] | None], ...] = (
    ("model.embed_tokens.weight", "model.embed_tokens.embedding", None),
    ("model.layers.{i}.self_attn.{proj}.weight", "model.layers.{i}.self_attn.{proj}.kernel", transpose),
    ("model.layers.{i}.self_attn.{proj}.bias", "model.layers.{i}.self_attn.{proj}.bias", None),
    ("model.layers.{i}.self_attn.{qk}.weight", "model.layers.{i}.self_attn.{qk}.scale", None),
    ("model.layers.{i}.mlp.{mlp}.weight", "model.layers.{i}.mlp.{mlp}.kernel", transpose),
    ("model.layers.{i}.{norm}.weight", "model.layers.{i}.{norm}.scale", None),
    ("model.norm.weight", "model.norm.scale", None),
    ("lm_head.weight", "lm_head.kernel", transpose),
)

_DECODER_NAMES = NameTable(DECODER_ROWS, _DECODER_FIELDS)
_GEMMA_NAMES = NameTable(DECODER_ROWS, _GEMMA_FIELDS)

_LLAMA_GGUF = (
    ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"), ("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
)
# Gemma's block has four norms: llama.cpp's ffn_norm is the pre-feedforward one there.
_GEMMA3_GGUF = tuple((g, h) for g, h in _LLAMA_GGUF if g != "ffn_norm") + (
    ("post_attention_norm", "post_attention_layernorm"), ("ffn_norm", "pre_feedforward_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
)

_COMMON = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
           "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "attention_dropout",
           "initializer_range", "attention_bias")

_NO_BIAS_FIELD = tuple(f for f in _COMMON if f != "attention_bias")  # Mistral, Qwen2: biases fixed by type
_QWEN_WINDOW = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")

# --------------------------------------------------------------------------------------------
# The entries
# --------------------------------------------------------------------------------------------

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", FAMILY, "LlamaForCausalLM", _COMMON + ("rope_freq_factors",), _DECODER_NAMES,
                 DecoderFeatures(), gguf_arch="llama", gguf_block_names=_LLAMA_GGUF, gguf_unpermute_qk=True),
    Architecture("mistral", FAMILY, "MistralForCausalLM", _NO_BIAS_FIELD + ("sliding_window",), _DECODER_NAMES,
                 DecoderFeatures(o_proj_bias=True, sliding_layers=all_sliding)),
    Architecture("qwen2", FAMILY, "Qwen2ForCausalLM", _NO_BIAS_FIELD + _QWEN_WINDOW, _DECODER_NAMES,
                 DecoderFeatures(qkv_bias_default=True, o_proj_bias=False, sliding_layers=qwen.layer_pattern),
                 config_from_hf=qwen.config_from_hf, config_to_hf=qwen.config_to_hf,
                 gguf_arch="qwen2", gguf_block_names=_LLAMA_GGUF),
    Architecture("qwen3", FAMILY, "Qwen3ForCausalLM", _COMMON + _QWEN_WINDOW, _DECODER_NAMES,
                 DecoderFeatures(qk_norm=True, sliding_layers=qwen.layer_pattern),
                 config_from_hf=qwen.config_from_hf, config_to_hf=qwen.config_to_hf,
                 gguf_arch="qwen3", gguf_block_names=_LLAMA_GGUF),
    Architecture("gemma3_text", FAMILY, "Gemma3ForCausalLM",
                 tuple(f for f in _COMMON if f != "hidden_act") + (
                     "hidden_activation", "sliding_window", "layer_types", "rope_local_base_freq",
                     "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping",
                     "use_bidirectional_attention"),
                 _GEMMA_NAMES,
                 DecoderFeatures(qk_norm=True, gemma_norm=True, sandwich_norms=True, embed_scale=True,
                                 hidden_act="gelu_pytorch_tanh", sliding_layers=gemma3.layer_pattern,
                                 rope_local_base_freq=gemma3.LOCAL_THETA),
                 config_from_hf=gemma3.config_from_hf, config_from_gguf=gemma3.config_from_gguf,
                 gguf_arch="gemma3", gguf_block_names=_GEMMA3_GGUF, gguf_norm_offset=1.0),
)

_BY_TYPE = {a.model_type: a for a in ARCHITECTURES}
DECODER_TYPES = tuple(_BY_TYPE)


def decoder_architecture(model_type: object, *, where: str = "model_type") -> Architecture:
    """The entry of a decoder-only `model_type`: a built-in one, else one registered since (a variant added
    from outside); a one-line ConfigError naming the decoder types."""
    found = _BY_TYPE.get(model_type)  # type: ignore[arg-type]
    return found if found is not None else architecture(model_type, family=FAMILY, where=where)


def decoder_features(model_type: str) -> DecoderFeatures:
    """The feature switches of a decoder-only `model_type`."""
    return decoder_architecture(model_type).features
