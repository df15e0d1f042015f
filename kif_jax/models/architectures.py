"""The one list of supported architectures, keyed by Hugging Face `model_type`.

Each entry says which family builds it, the `config.json` fields it reads and writes, its tensor
name tables (safetensors and GGUF) with their transforms, and the feature switches its model
turns on. Loading, export, PEFT, GGUF reading and the error messages all look types up here, so a
new architecture is one entry plus what its features need (see docs/models.md).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import numpy as np

from kif_jax.errors import ConfigError
from kif_jax.models.hf_files import NameTable, transpose

ATTENTION_TYPES = ("full_attention", "sliding_attention")


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
    layer_types: str = "none"  # how per-layer attention types default: none / all / qwen / gemma3
    rope_local_base: bool = False  # sliding layers use `rope_local_base_freq` without scaling


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One supported `model_type`."""

    model_type: str
    family: str  # "decoder" (DecoderLM) or "t5" (T5)
    hf_class: str  # the transformers class named in an exported config.json
    config_fields: tuple[str, ...]  # config.json fields read (and written back on export)
    names_source: Callable[[], NameTable]  # the name table (a function: T5's lives in t5_hf)
    features: DecoderFeatures | None = None
    gguf_arch: str | None = None  # general.architecture of a GGUF file of this type
    gguf_block_names: tuple[tuple[str, str], ...] = ()  # GGUF name after blk.N. -> HF name after layers.N.
    gguf_norm_offset: float = 0.0  # llama.cpp stores Gemma's norms as 1 + w: subtract this on load
    gguf_unpermute_qk: bool = False  # llama.cpp permuted q/k rows for its adjacent-pair RoPE
    config_module: str | None = None  # its own module: config_from_hf(hf, kwargs), config_from_gguf(...)

    def module(self) -> Any:
        """The architecture's own module (None when the generic decoder reading covers it)."""
        return None if self.config_module is None else importlib.import_module(self.config_module)

    @property
    def names(self) -> NameTable:
        """Hugging Face tensor names <-> model paths, with each row's transform."""
        return self.names_source()


# --------------------------------------------------------------------------------------------
# Decoder name tables
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

#: GGUF names outside the blocks -> Hugging Face module names (every GGUF architecture here).
GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

_COMMON = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
           "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "attention_dropout",
           "initializer_range", "attention_bias")

_NO_BIAS_FIELD = tuple(f for f in _COMMON if f != "attention_bias")  # Mistral, Qwen2: biases fixed by type

# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

def _t5_names() -> NameTable:
    return importlib.import_module("kif_jax.models.t5.hf").NAMES


_T5_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
              "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate",
              "layer_norm_epsilon", "feed_forward_proj", "tie_word_embeddings", "scale_decoder_outputs",
              "pad_token_id", "eos_token_id", "decoder_start_token_id")

ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("llama", "decoder", "LlamaForCausalLM", _COMMON + ("rope_freq_factors",), lambda: _DECODER_NAMES,
                 DecoderFeatures(), gguf_arch="llama", gguf_block_names=_LLAMA_GGUF, gguf_unpermute_qk=True),
    Architecture("mistral", "decoder", "MistralForCausalLM", _NO_BIAS_FIELD + ("sliding_window",),
                 lambda: _DECODER_NAMES,
                 DecoderFeatures(o_proj_bias=True, layer_types="all")),
    Architecture("qwen2", "decoder", "Qwen2ForCausalLM",
                 _NO_BIAS_FIELD + ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types"),
                 lambda: _DECODER_NAMES, DecoderFeatures(qkv_bias_default=True, o_proj_bias=False, layer_types="qwen"),
                 gguf_arch="qwen2", gguf_block_names=_LLAMA_GGUF),
    Architecture("qwen3", "decoder", "Qwen3ForCausalLM",
                 _COMMON + ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types"),
                 lambda: _DECODER_NAMES, DecoderFeatures(qk_norm=True, layer_types="qwen"),
                 gguf_arch="qwen3", gguf_block_names=_LLAMA_GGUF),
    Architecture("gemma3_text", "decoder", "Gemma3ForCausalLM",
                 tuple(f for f in _COMMON if f != "hidden_act") + (
                     "hidden_activation", "sliding_window", "layer_types", "rope_local_base_freq",
                     "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping",
                     "use_bidirectional_attention"),
                 lambda: _GEMMA_NAMES,
                 DecoderFeatures(qk_norm=True, gemma_norm=True, sandwich_norms=True, embed_scale=True,
                                 hidden_act="gelu_pytorch_tanh", layer_types="gemma3", rope_local_base=True),
                 gguf_arch="gemma3", gguf_block_names=_GEMMA3_GGUF, gguf_norm_offset=1.0,
                 config_module="kif_jax.models.decoder.gemma3"),
    Architecture("t5", "t5", "T5ForConditionalGeneration", _T5_FIELDS, lambda: _t5_names()),
    Architecture("mt5", "t5", "MT5ForConditionalGeneration", _T5_FIELDS, lambda: _t5_names()),
)}

DECODER_TYPES = tuple(k for k, a in ARCHITECTURES.items() if a.family == "decoder")
T5_TYPES = tuple(k for k, a in ARCHITECTURES.items() if a.family == "t5")
#: general.architecture of a GGUF file -> its Architecture.
GGUF_ARCHITECTURES: dict[str, Architecture] = {a.gguf_arch: a for a in ARCHITECTURES.values() if a.gguf_arch}


def architecture(model_type: Any, *, family: str | None = None, where: str = "model_type") -> Architecture:
    """The registry entry of `model_type` (of `family` if given); a one-line ConfigError naming the known types."""
    known = [k for k, a in ARCHITECTURES.items() if family is None or a.family == family]
    if model_type not in known:
        raise ConfigError(f"{where} {model_type!r} is not supported; supported: {', '.join(known)}")
    return ARCHITECTURES[model_type]


def hf_to_model_path(name: str, model_type: str) -> tuple[str, Callable | None] | None:
    """The model path of a Hugging Face tensor name of `model_type` and its transform; None if unknown."""
    return architecture(model_type).names.to_model(name)


def model_to_hf_name(path: str, model_type: str) -> tuple[str, Callable | None] | None:
    """The Hugging Face name of a dotted model path of `model_type` and its (inverse) transform."""
    return architecture(model_type).names.to_hf(path)


def decoder_features(model_type: str) -> DecoderFeatures:
    """The feature switches of a decoder-only `model_type`."""
    features = architecture(model_type, family="decoder").features
    assert features is not None
    return features
