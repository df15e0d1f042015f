"""Decoder-only causal LMs (LLaMA-2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2, Gemma 3) in Flax NNX, with LoRA.

Module paths mirror Hugging Face's `*ForCausalLM` names (`model.layers.0.self_attn.q_proj`, ...), so
checkpoint names and PEFT keys map one to one (see `decoder/hf.py`); kernels are stored [in, out].
Positions come from the attention mask (the first real token is position 0), so a left-padded row
gives the logits of the same row unpadded. What each `model_type` switches on (q/k norms, Gemma's
norms and embedding scale, per-layer sliding windows) comes from its entry in `decoder/architectures.py`; a
sliding layer's query at position i sees keys at positions i - window < j <= i, transformers' rule
(`masking_utils.sliding_window_overlay`) written over positions, which equals its index rule for
left-padded rows. Every random choice of a call (dropout) comes from the
call's `rngs`, so a model splits into (graphdef, LoRA state, frozen state) only.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kif_jax.errors import ConfigError
from kif_jax.models.decoder.architectures import ATTENTION_TYPES, decoder_architecture, decoder_features
from kif_jax.models.layers import (
    DECODER,
    Dense,
    Embed,
    KeyStream,
    LoRAConfig,
    RMSNorm,
    RngsLike,
    check_lora_targets,
    dropout,
    dropout_keys,
    mask_bias,
    merge_lora,  # noqa: F401 - the decoder family's merge (one implementation for every family)
    reading,
    remat_layer,
    softmax_parts,
)

ACTIVATIONS = ("silu", "swish", "gelu_pytorch_tanh")
_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _rope_items(value: Any, field: str) -> tuple[tuple[str, Any], ...] | None:
    """A rope-scaling dict (or its item tuple) -> sorted (key, value) items with `rope_type`; None if plain."""
    if value is None:
        return None
    if isinstance(value, tuple):
        value = dict(value)
    if not isinstance(value, Mapping):
        raise ConfigError(f"DecoderConfig.{field} must be a dict or None, got {value!r}")
    items = {k: v for k, v in value.items() if k not in ("rope_theta", "type")}
    items.setdefault("rope_type", value.get("type", "default"))
    for k, v in items.items():  # nested lists (e.g. longrope's factors) are not hashable
        if isinstance(v, list):
            items[k] = tuple(v)
    if items["rope_type"] == "default" and len(items) == 1:
        return None
    return tuple(sorted(items.items()))


def _rope_from_hf(hf: Mapping[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The generic RoPE reading of a config.json: `rope_theta` and `rope_scaling` (raw), from the hub's legacy
    keys or transformers 5's single `rope_parameters`, added to `kwargs`."""
    rope_theta, scaling = hf.get("rope_theta"), hf.get("rope_scaling")
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping):
        if any(isinstance(v, Mapping) for v in params.values()):
            raise ConfigError(f"DecoderConfig: per-layer rope_parameters are not supported for {hf.get('model_type')}")
        rope_theta, scaling = params.get("rope_theta", rope_theta), params
    kwargs["rope_theta"] = 10000.0 if rope_theta is None else rope_theta
    kwargs["rope_scaling"] = scaling
    return kwargs


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters under Hugging Face's field names; `None` fields are resolved at construction.

    `head_dim=None` -> hidden_size / heads; `num_key_value_heads=None` -> heads; `attention_bias=None`
    and `qk_norm=None` -> the architecture's default; `hidden_act=None` -> its activation;
    `layer_types=None` -> its pattern of "full_attention" / "sliding_attention" layers (sliding layers
    only when `sliding_window` is set); `query_pre_attn_scalar=None` -> head_dim (scores times its
    -1/2 power); `rope_local_base_freq` is the RoPE base of sliding layers (Gemma 3); `pad_token_id=None`
    -> eos; `eos_token_ids` holds every stop id (the first is `eos_token_id`). `rope_scaling` is stored
    as sorted (key, value) items so the config stays hashable; `rope_freq_factors` (GGUF's
    `rope_freqs`) divides the base inverse frequencies and takes precedence over `rope_scaling`.
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rope_freq_factors: tuple[float, ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None
    qk_norm: bool | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    rope_local_base_freq: float | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    bos_token_id: int | None = 1
    eos_token_id: int = 2
    eos_token_ids: tuple[int, ...] | None = None
    pad_token_id: int | None = None
    hidden_act: str | None = None
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"DecoderConfig.{name} must be a positive integer, got {value!r}")
            put(name, int(value))

        features = decoder_architecture(self.model_type, where="DecoderConfig.model_type").features
        if self.num_key_value_heads is None:
            put("num_key_value_heads", self.num_attention_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            positive_int(name)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"DecoderConfig.head_dim is needed: hidden_size={self.hidden_size} is not a "
                                  f"multiple of num_attention_heads={self.num_attention_heads}")
            put("head_dim", self.hidden_size // self.num_attention_heads)
        positive_int("head_dim")
        if self.head_dim % 2:
            raise ConfigError(f"DecoderConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"DecoderConfig.num_key_value_heads={self.num_key_value_heads} must divide "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.attention_bias is None:
            put("attention_bias", features.qkv_bias_default)
        if self.qk_norm is None:
            put("qk_norm", features.qk_norm)
        for name in ("tie_word_embeddings", "attention_bias", "qk_norm"):
            put(name, bool(getattr(self, name)))
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            try:
                value = float(getattr(self, name))
            except (TypeError, ValueError):
                raise ConfigError(f"DecoderConfig.{name} must be a number, got {getattr(self, name)!r}") from None
            if not value > 0.0:
                raise ConfigError(f"DecoderConfig.{name} must be > 0, got {value!r}")
            put(name, value)
        if not 0.0 <= float(self.attention_dropout) < 1.0:
            raise ConfigError(f"DecoderConfig.attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        put("attention_dropout", float(self.attention_dropout))
        if self.hidden_act is None:
            put("hidden_act", features.hidden_act)
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"DecoderConfig.hidden_act must be one of {', '.join(ACTIVATIONS)}, "
                              f"got {self.hidden_act!r}")
        if self.sliding_window is not None:
            positive_int("sliding_window")
        put("layer_types", self._resolve_layer_types(features.sliding_layers))
        if self.query_pre_attn_scalar is None:
            put("query_pre_attn_scalar", self.head_dim)
        if self.rope_local_base_freq is None:
            put("rope_local_base_freq", features.rope_local_base_freq)
        for name in ("query_pre_attn_scalar", "rope_local_base_freq", "final_logit_softcapping",
                     "attn_logit_softcapping"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"DecoderConfig.{name} must be a number or None, got {value!r}") from None
            if not value > 0.0:
                raise ConfigError(f"DecoderConfig.{name} must be > 0, got {value!r}")
            put(name, value)
        put("rope_scaling", _rope_items(self.rope_scaling, "rope_scaling"))
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            kind = scaling["rope_type"]
            if kind not in _ROPE_TYPES:
                raise ConfigError(f"DecoderConfig.rope_scaling: rope_type {kind!r} is not supported "
                                  f"(supported: {', '.join(_ROPE_TYPES)})")
            if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
                raise ConfigError("DecoderConfig.rope_scaling: partial_rotary_factor != 1 is not supported")
            needed = ("factor",) if kind == "linear" else _LLAMA3_KEYS[:3] if kind == "llama3" else ()
            missing = [k for k in needed if k not in scaling]
            if missing:
                raise ConfigError(f"DecoderConfig.rope_scaling ({kind}) lacks {', '.join(missing)}")
        if self.rope_freq_factors is not None:
            factors = tuple(float(f) for f in np.asarray(self.rope_freq_factors, np.float64).reshape(-1))
            if len(factors) != self.head_dim // 2 or not all(f > 0 for f in factors):
                raise ConfigError(f"DecoderConfig.rope_freq_factors must hold head_dim / 2 = {self.head_dim // 2} "
                                  f"positive numbers, got {len(factors)}")
            put("rope_freq_factors", factors)
        eos_ids = self.eos_token_ids
        if isinstance(self.eos_token_id, (list, tuple)):
            eos_ids = eos_ids or tuple(self.eos_token_id)
            put("eos_token_id", self.eos_token_id[0] if self.eos_token_id else None)
        if self.eos_token_id is None:
            raise ConfigError("DecoderConfig.eos_token_id is required (generation stops on it)")
        put("eos_token_id", int(self.eos_token_id))
        eos_ids = tuple(int(i) for i in (eos_ids or (self.eos_token_id,)))
        if self.eos_token_id not in eos_ids:
            eos_ids = (self.eos_token_id, *eos_ids)
        put("eos_token_ids", eos_ids)
        if self.pad_token_id is None:
            put("pad_token_id", self.eos_token_id)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= int(value) < self.vocab_size:
                raise ConfigError(f"DecoderConfig.{name}={value!r} is outside the vocabulary [0, {self.vocab_size})")
        for value in self.eos_token_ids:
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"DecoderConfig.eos_token_ids holds {value}, outside the vocabulary "
                                  f"[0, {self.vocab_size})")

    def _resolve_layer_types(self, sliding_layers: Any) -> tuple[str, ...]:
        """Each layer's attention type: the given list checked, or the architecture's pattern (`sliding_layers`
        of the number of layers) when a window is set."""
        n, window = self.num_hidden_layers, self.sliding_window
        if self.layer_types is None:
            if window is None or sliding_layers is None:
                return ("full_attention",) * n
            return tuple(sliding_layers(n))
        if isinstance(self.layer_types, str) or len(self.layer_types) != n:
            raise ConfigError(f"DecoderConfig.layer_types must list one type per layer ({n}), got {self.layer_types!r}")
        bad = sorted(set(self.layer_types) - set(ATTENTION_TYPES))
        if bad:
            raise ConfigError(f"DecoderConfig.layer_types holds {', '.join(map(repr, bad))}; "
                              f"known: {', '.join(ATTENTION_TYPES)}")
        if window is None and "sliding_attention" in self.layer_types:
            raise ConfigError("DecoderConfig.layer_types has sliding_attention layers but sliding_window is None")
        return tuple(self.layer_types)

    def attention_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (None: it attends to every earlier position)."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else dict(self.rope_scaling)["rope_type"]

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "DecoderConfig":
        """From a Hugging Face `config.json` dict (hub style and transformers-5 `rope_parameters` alike).

        Only the fields its architecture lists (`decoder/architectures.py`) are read; an architecture with a
        reading of its own (`Architecture.config_from_hf`) reads RoPE and its other fields itself.
        """
        model_type = hf.get("model_type")
        arch = decoder_architecture(model_type, where="config.json has model_type")
        if hf.get("mlp_bias"):
            raise ConfigError("DecoderConfig: mlp_bias=true is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        read = set(arch.config_fields)
        kwargs: dict[str, Any] = {k: v for k, v in hf.items() if k in names and k in read and v is not None}
        kwargs["model_type"] = model_type
        if "bos_token_id" in hf:  # an explicit null means no BOS (Qwen's configs)
            kwargs["bos_token_id"] = hf["bos_token_id"]
        if isinstance(kwargs.get("layer_types"), list):
            kwargs["layer_types"] = tuple(kwargs["layer_types"])
        if arch.config_from_hf is None:
            kwargs = _rope_from_hf(hf, kwargs)
        else:  # the architecture's own reading (Qwen: its window; Gemma 3: RoPE per layer type, ...)
            kwargs = arch.config_from_hf(hf, kwargs, _rope_from_hf)
        scaling = _rope_items(kwargs["rope_scaling"], "rope_scaling")
        if scaling is not None and dict(scaling)["rope_type"] == "llama3" and \
                "original_max_position_embeddings" not in dict(scaling):
            scaling = tuple(sorted({**dict(scaling), "original_max_position_embeddings":
                                    hf.get("max_position_embeddings", 2048)}.items()))
        kwargs["rope_scaling"] = scaling
        if isinstance(kwargs.get("layer_types"), list):
            kwargs["layer_types"] = tuple(kwargs["layer_types"])
        eos = hf.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            if not eos:
                raise ConfigError("DecoderConfig.eos_token_id is an empty list")
            kwargs["eos_token_id"], kwargs["eos_token_ids"] = eos[0], tuple(eos)
        if kwargs.get("rope_freq_factors") is not None:
            kwargs["rope_freq_factors"] = tuple(np.asarray(kwargs["rope_freq_factors"], np.float64).reshape(-1))
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"DecoderConfig: {e}") from None

    @classmethod
    def from_json(cls, path: str) -> "DecoderConfig":
        """From a `config.json` file."""
        with open(path, encoding="utf-8") as f:
            return cls.from_hf(json.load(f))

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that Hugging Face's `*ForCausalLM` reads back (legacy rope keys).

        It holds the fields the architecture reads, so `from_hf(to_hf())` gives this config back.
        """
        arch = decoder_architecture(self.model_type)
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["eos_token_id"] = list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_id
        out["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
        out["rope_freq_factors"] = None if self.rope_freq_factors is None else list(self.rope_freq_factors)
        out["layer_types"] = list(self.layer_types)
        out["hidden_activation"] = self.hidden_act
        if arch.config_to_hf is not None:
            out = arch.config_to_hf(self, out)
        nullable = ("sliding_window", "rope_scaling", "bos_token_id", "final_logit_softcapping",
                    "attn_logit_softcapping")
        if float(self.query_pre_attn_scalar).is_integer():  # transformers' strict config wants an int
            out["query_pre_attn_scalar"] = int(self.query_pre_attn_scalar)
        out = {k: v for k, v in out.items() if k in arch.config_fields and (v is not None or k in nullable)}
        out.update(model_type=self.model_type, architectures=[arch.hf_class], mlp_bias=False)
        return out


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

#: name -> Hugging Face hub id (None: a from-scratch config in `TINY_PRESETS`).
PRESETS: dict[str, str | None] = {
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-13b-chat": "meta-llama/Llama-2-13b-chat-hf",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama-3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "mistral-7b-v0.1": "mistralai/Mistral-7B-v0.1",
    "mistral-7b-instruct-v0.1": "mistralai/Mistral-7B-Instruct-v0.1",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    # Qwen3's plain names are the post-trained (instruct / thinking) models; "-base" the pretrained ones.
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-0.6b-base": "Qwen/Qwen3-0.6B-Base",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-1.7b-base": "Qwen/Qwen3-1.7B-Base",
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-4b-base": "Qwen/Qwen3-4B-Base",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "qwen3-8b-base": "Qwen/Qwen3-8B-Base",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
    "smollm2-360m-instruct": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B",
    "smollm2-1.7b-instruct": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "gemma-3-270m": "google/gemma-3-270m",
    "gemma-3-270m-it": "google/gemma-3-270m-it",
    "gemma-3-1b": "google/gemma-3-1b-pt",
    "gemma-3-1b-it": "google/gemma-3-1b-it",
    "tiny-llama-byte": None,
}

#: Offline from-scratch configs; `tiny-llama-byte` matches `ByteTokenizer` (259 ids, pad 0, eos 1).
TINY_PRESETS: dict[str, DecoderConfig] = {
    "tiny-llama-byte": DecoderConfig(model_type="llama", vocab_size=259, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=1024,
                                     tie_word_embeddings=False, bos_token_id=None, eos_token_id=1,
                                     pad_token_id=0),
}


#: The published `config.json` sizes of presets whose checkpoints are gated and large, so a run can be
#: sized without them (`python -m kif_jax.memory_plan`, used only when the checkpoint's own config.json
#: is neither a local directory nor in the hub cache). Loading weights always reads the checkpoint's.
_LLAMA2 = dict(model_type="llama", vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0,
               max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
PRESET_CONFIGS: dict[str, DecoderConfig] = {
    **{name: DecoderConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, **_LLAMA2) for name in ("llama-2-7b", "llama-2-7b-chat")},
    **{name: DecoderConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                           num_key_value_heads=40, **_LLAMA2) for name in ("llama-2-13b", "llama-2-13b-chat")},
}
# Gemma 3's checkpoints are gated too: 5 sliding layers (window 512, RoPE base 1e4) then 1 global
# (base 1e6), one KV head of 256, query_pre_attn_scalar 256, tied head, vocabulary 262144.
_GEMMA3 = dict(model_type="gemma3_text", vocab_size=262144, num_attention_heads=4, num_key_value_heads=1,
               head_dim=256, query_pre_attn_scalar=256, sliding_window=512, rope_theta=1e6, rope_local_base_freq=1e4,
               rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=2,
               eos_token_id=1, pad_token_id=0, hidden_act="gelu_pytorch_tanh")
PRESET_CONFIGS.update({
    "gemma-3-270m": DecoderConfig(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, **_GEMMA3),
    "gemma-3-1b": DecoderConfig(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, **_GEMMA3),
})
# The instruction-tuned models also stop at <end_of_turn> (id 106).
PRESET_CONFIGS.update({f"{name}-it": dataclasses.replace(PRESET_CONFIGS[name], eos_token_ids=(1, 106))
                       for name in ("gemma-3-270m", "gemma-3-1b")})


def hub_id(name: str) -> str | None:
    """The hub id of a named preset (None for a from-scratch `TINY_PRESETS` config)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown decoder preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


# --------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def rope_inv_freq(config: DecoderConfig, layer_type: str = "full_attention") -> np.ndarray:
    """float32 [head_dim / 2] inverse frequencies of a layer type, with llama3/linear scaling or GGUF's factors.

    Sliding layers of an architecture with a local base (Gemma 3) use `rope_local_base_freq`, unscaled.
    Computed on the host in float32 in the reference's order, so the tables match PyTorch's.
    """
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    if layer_type == "sliding_attention" and config.rope_local_base_freq is not None:
        return (np.float32(1.0) / (np.float32(config.rope_local_base_freq) ** exponent)).astype(np.float32)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    if config.rope_freq_factors is not None:
        return (inv_freq / np.asarray(config.rope_freq_factors, np.float32)).astype(np.float32)
    scaling = dict(config.rope_scaling or ())
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = np.float32(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling.get("original_max_position_embeddings", config.max_position_embeddings))
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = (np.float32(2 * np.pi) / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
        smooth = ((np.float32(old_len) / wavelen - np.float32(low)) / np.float32(high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(config: DecoderConfig, positions: jax.Array,
                layer_type: str = "full_attention") -> tuple[jax.Array, jax.Array]:
    """positions [B, T] int -> (cos, sin) float32 [B, T, head_dim] in the rotate_half layout."""
    inv_freq = jnp.asarray(rope_inv_freq(config, layer_type))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, hd] rotated by cos/sin [B, T, hd]: x cos + rotate_half(x) sin, in x's dtype."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, T] 0/1 mask -> int32 positions: the first real token is 0, left pads are 0 too."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE (and per-head q/k norms where the architecture has them).

    Scores are float32, scaled by query_pre_attn_scalar ** -0.5 (head_dim unless the config says
    otherwise) and soft-capped when `attn_logit_softcapping` is set.
    """

    def __init__(self, cfg: DecoderConfig, *, path: str, lora: LoRAConfig | None, dtype: Any, param_dtype: Any,
                 keys: KeyStream) -> None:
        features = decoder_features(cfg.model_type)
        d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        common = dict(std=cfg.initializer_range, lora=lora, dtype=dtype, param_dtype=param_dtype, keys=keys)
        bias = cfg.attention_bias
        # Logical axes (kif_jax/sharding.py): heads split over `tensor`, hidden size over `fsdp`.
        self.q_proj = Dense(d, h * hd, path=f"{path}.q_proj", use_bias=bias, axes=("embed", "q_heads"), **common)
        self.k_proj = Dense(d, kv * hd, path=f"{path}.k_proj", use_bias=bias, axes=("embed", "kv_heads"), **common)
        self.v_proj = Dense(d, kv * hd, path=f"{path}.v_proj", use_bias=bias, axes=("embed", "kv_heads"), **common)
        # Qwen2 puts biases on q/k/v only; LLaMA's and Qwen3's attention_bias covers o_proj too.
        self.o_proj = Dense(h * hd, d, path=f"{path}.o_proj", use_bias=bias and features.o_proj_bias,
                            axes=("q_heads", "embed"), **common)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, axis="head_dim",
                        unit_offset=features.gemma_norm)
            self.q_norm = RMSNorm(hd, **norm)
            self.k_norm = RMSNorm(hd, **norm)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
        self.softcap = cfg.attn_logit_softcapping
        self.dropout_rate = cfg.attention_dropout
        self.dtype = dtype

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array,
                 cache: tuple[jax.Array, jax.Array, jax.Array] | None = None, *, deterministic: bool = True,
                 rngs: RngsLike = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] -> (out [B, T, D], keys, values [B, S, KV, hd]).

        Without `cache` the keys are x's own (S = T); with `cache` = (k, v, index) x's keys/values
        are written at slot `index` of the cached [B, L, KV, hd] arrays and attention spans all L
        slots; with `cache` = (k, v, None) (a sliding layer's window of W slots) they are appended
        (S = W + T). `bias` [B, 1, 1, T, S] float32 holds the causal, window and padding mask.
        """
        kw = dict(deterministic=deterministic, rngs=rngs)
        b, t = x.shape[:2]
        g = self.num_heads // self.num_kv_heads
        q = self.q_proj(x, **kw).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x, **kw).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, **kw).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache_k, cache_v, index = cache
            if index is None:
                k = jnp.concatenate([cache_k, k.astype(cache_k.dtype)], axis=1)
                v = jnp.concatenate([cache_v, v.astype(cache_v.dtype)], axis=1)
            else:
                k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), index, axis=1)
                v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), index, axis=1)
        q = q.reshape(b, t, self.num_kv_heads, g, self.head_dim)  # head h uses kv head h // g
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)  # [B, KV, G, T, S]
        scores = scores * jnp.float32(self.scale)
        if self.softcap is not None:
            scores = soft_cap(scores, self.softcap)
        scores = scores + bias
        e, sums = softmax_parts(scores)  # normalised after the value matmul (see softmax_parts)
        e = dropout(e, self.dropout_rate, deterministic, rngs).astype(self.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", e, v.astype(self.dtype))
        out = out / jnp.transpose(sums, (0, 3, 1, 2))[..., None].astype(self.dtype)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim), **kw), k, v


def soft_cap(x: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(x / cap) (Gemma's logit soft-capping), in x's dtype."""
    cap = jnp.asarray(cap, x.dtype)
    return jnp.tanh(x / cap) * cap


def _activation(name: str):
    if name == "gelu_pytorch_tanh":
        return functools.partial(jax.nn.gelu, approximate=True)
    return jax.nn.silu


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), act SiLU (SwiGLU) or tanh-GELU (Gemma)."""

    def __init__(self, cfg: DecoderConfig, *, path: str, lora: LoRAConfig | None, dtype: Any, param_dtype: Any,
                 keys: KeyStream) -> None:
        d, f = cfg.hidden_size, cfg.intermediate_size
        common = dict(std=cfg.initializer_range, lora=lora, dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.gate_proj = Dense(d, f, path=f"{path}.gate_proj", axes=("embed", "mlp"), **common)
        self.up_proj = Dense(d, f, path=f"{path}.up_proj", axes=("embed", "mlp"), **common)
        self.down_proj = Dense(f, d, path=f"{path}.down_proj", axes=("mlp", "embed"), **common)
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array, *, deterministic: bool = True, rngs: RngsLike = None) -> jax.Array:
        kw = dict(deterministic=deterministic, rngs=rngs)
        return self.down_proj(_activation(self.act)(self.gate_proj(x, **kw)) * self.up_proj(x, **kw), **kw)


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

    With sandwich norms (Gemma) each sub-block's output is normed too before the residual:
    x + post_attention_norm(attn(input_norm(x))), then x + post_ff_norm(mlp(pre_ff_norm(x))).
    """

    def __init__(self, cfg: DecoderConfig, *, path: str, lora: LoRAConfig | None, dtype: Any, param_dtype: Any,
                 keys: KeyStream) -> None:
        features = decoder_features(cfg.model_type)
        common = dict(lora=lora, dtype=dtype, param_dtype=param_dtype, keys=keys)
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, unit_offset=features.gemma_norm)
        self.self_attn = Attention(cfg, path=f"{path}.self_attn", **common)
        self.mlp = MLP(cfg, path=f"{path}.mlp", **common)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.sandwich = features.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, **norm)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, **norm)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array,
                 cache: tuple[jax.Array, jax.Array, jax.Array] | None = None, *, deterministic: bool = True,
                 rngs: RngsLike = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        kw = dict(deterministic=deterministic, rngs=rngs)
        h, k, v = self.self_attn(self.input_layernorm(x), cos, sin, bias, cache, **kw)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), **kw)), k, v
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x), **kw), k, v


class DecoderStack(nnx.Module):
    """Hugging Face's `*Model`: token embedding, the layers, the final norm."""

    def __init__(self, cfg: DecoderConfig, *, lora: LoRAConfig | None, dtype: Any, param_dtype: Any,
                 keys: KeyStream) -> None:
        features = decoder_features(cfg.model_type)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, std=cfg.initializer_range, dtype=dtype,
                                  param_dtype=param_dtype, keys=keys)
        self.layers = nnx.List([
            DecoderLayer(cfg, path=f"model.layers.{i}", lora=lora, dtype=dtype, param_dtype=param_dtype, keys=keys)
            for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype,
                            unit_offset=features.gemma_norm)
        # Gemma: embeddings times sqrt(hidden), the factor first rounded to the embedding's dtype.
        self.embed_scale = float(np.asarray(np.sqrt(cfg.hidden_size), np.float32)) if features.embed_scale else None
        self.remat = "none"  # train.remat: each layer's activations recomputed in the backward pass

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids [B, T] -> embeddings [B, T, D] in the compute dtype (scaled where the architecture does)."""
        if self.embed_scale is None:
            return self.embed_tokens(input_ids)
        table = self.embed_tokens.embedding[...]
        scaled = jnp.take(table, input_ids, axis=0) * jnp.asarray(self.embed_scale, table.dtype)
        return scaled.astype(self.embed_tokens.dtype)


class KVCache(NamedTuple):
    """Per-layer keys/values for incremental decoding (a plain pytree; batch first).

    Full-attention layers keep L slots, written at `index`. When the sliding window W is shorter
    than L, sliding layers keep only the last W slots (`window_mask` / `window_positions` describe
    them; None otherwise): transformers' sliding-window cache. A row's pads must come before its
    first real token or after its last (left-padded prompts, right-padded options), as there.
    """

    k: tuple[jax.Array, ...]  # each [B, L or W, KV, hd] in the model dtype
    v: tuple[jax.Array, ...]
    mask: jax.Array  # [B, L] bool: slots written so far that hold real tokens
    positions: jax.Array  # [B, L] int32: the RoPE position of each slot's token
    index: jax.Array  # [] int32: the next slot to write
    next_position: jax.Array  # [B] int32: the RoPE position of each row's next real token
    window_mask: jax.Array | None = None  # [B, W] bool: the last W slots that hold real tokens
    window_positions: jax.Array | None = None  # [B, W] int32

    def repeat(self, n: int) -> "KVCache":
        """Each row repeated `n` times (row r -> rows r*n .. r*n+n-1), e.g. once per candidate option."""
        rep = functools.partial(jnp.repeat, repeats=n, axis=0)
        maybe = lambda x: None if x is None else rep(x)  # noqa: E731
        return KVCache(tuple(map(rep, self.k)), tuple(map(rep, self.v)), rep(self.mask), rep(self.positions),
                       self.index, rep(self.next_position), maybe(self.window_mask), maybe(self.window_positions))


class OutputHead(NamedTuple):
    """A plain linear output head as data, for code that runs it chunk by chunk (the training loss)."""

    weight: jax.Array  # [V, D] if vocab_major (a tied embedding) else [D, V], in the compute dtype
    vocab_major: bool
    softcap: float | None  # final_logit_softcapping


def head_logits(head: OutputHead, h: jax.Array) -> jax.Array:
    """h [..., D] -> float32 logits [..., V] of a plain head (soft-capped when the config says so)."""
    logits = jnp.einsum("...d,vd->...v" if head.vocab_major else "...d,dv->...v", h, head.weight,
                        preferred_element_type=jnp.float32)
    return logits if head.softcap is None else soft_cap(logits, head.softcap)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class DecoderLM(nnx.Module):
    """A causal LM: `model(input_ids, attention_mask)` -> float32 logits [B, T, V]."""

    family = "decoder"  # the `ModelFamily` that serves it (kif_jax/models/family.py)
    #: What `from_pretrained` loaded it from (hub id, directory, `.gguf` file or preset); None if built here.
    name_or_path: str | None = None

    def __init__(self, config: DecoderConfig, *, lora: LoRAConfig | None = None, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs) -> None:
        self.config = config
        self.lora = lora
        self.dtype = dtype
        keys = KeyStream(rngs.params())
        self.model = DecoderStack(config, lora=lora, dtype=dtype, param_dtype=param_dtype, keys=keys)
        if not config.tie_word_embeddings:
            self.lm_head = Dense(config.hidden_size, config.vocab_size, std=config.initializer_range, path="lm_head",
                                 lora=lora, dtype=dtype, param_dtype=param_dtype, keys=keys, axes=("embed", "vocab"))
        check_lora_targets(self, lora, "decoder LM")

    def _bias(self, kind: str, allowed: jax.Array, query_positions: jax.Array,
              key_positions: jax.Array) -> jax.Array:
        """[B, 1, 1, T, S] float32 bias of a layer type: `allowed` [B, T, S], narrowed to the window if sliding."""
        if kind == "sliding_attention":  # transformers: key j visible from query i iff i - window < j
            distance = query_positions[:, :, None] - key_positions[:, None, :]  # [B, T, S]
            allowed = allowed & (distance < self.config.sliding_window)
        return mask_bias(allowed)[:, None, None]

    def _layers(self, x: jax.Array, positions: jax.Array, biases: dict[str, jax.Array], cache: KVCache | None, *,
                deterministic: bool, rngs: RngsLike) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
        """The layers over x with each layer type's bias; a windowed cache's sliding layers append to it."""
        cfg = self.config
        tables = {kind: rope_tables(cfg, positions, kind) for kind in dict.fromkeys(cfg.layer_types)}
        windowed = cache is not None and cache.window_mask is not None
        ks, vs = [], []
        for i, layer in enumerate(self.model.layers):
            kind = cfg.layer_types[i]
            cos, sin = tables[kind]
            layer_cache = None
            if cache is not None:
                appends = windowed and kind == "sliding_attention"
                layer_cache = (cache.k[i], cache.v[i], None if appends else cache.index)
            call = remat_layer(lambda x, layer=layer, layer_cache=layer_cache, cos=cos, sin=sin, bias=biases[kind]:
                               layer(x, cos, sin, bias, layer_cache, deterministic=deterministic, rngs=rngs),
                               self.model.remat)
            x, k, v = call(x)
            ks.append(k)
            vs.append(v)
        return self.model.norm(x), ks, vs

    def hidden(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, deterministic: bool = True,
               rngs: nnx.Rngs | KeyStream | None = None) -> jax.Array:
        """input_ids [B, T] -> final-normed hidden states [B, T, D] (the input of `logits`)."""
        rngs = dropout_keys(deterministic, rngs)
        b, t = input_ids.shape
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        allowed = jnp.tril(jnp.ones((t, t), bool))[None] & mask[:, None, :]  # [B, T, T]
        positions = positions_from_mask(mask)
        biases = {kind: self._bias(kind, allowed, positions, positions) for kind in dict.fromkeys(self.config.layer_types)}
        with reading(DECODER):  # one sequence: every projection reads its positions (layers.capture_output_magnitudes)
            h, _, _ = self._layers(self.model.embed(input_ids), positions, biases, None, deterministic=deterministic,
                                   rngs=rngs)
        return h

    @property
    def plain_head(self) -> bool:
        """The head is a plain matmul (tied, or lm_head without LoRA or bias): the loss needs logits only
        at labelled positions (`kif_jax.models.family`); otherwise it builds them at every position."""
        return self.config.tie_word_embeddings or not (self.lm_head.has_lora or self.lm_head.use_bias)

    def output_head(self) -> OutputHead | None:
        """The head as data when it is a plain matmul (`plain_head`); else None."""
        softcap = self.config.final_logit_softcapping
        if self.config.tie_word_embeddings:
            return OutputHead(self.model.embed_tokens.embedding[...].astype(self.dtype), True, softcap)
        if not self.plain_head:
            return None
        return OutputHead(self.lm_head.kernel[...].astype(self.dtype), False, softcap)

    def logits(self, h: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | KeyStream | None = None) -> jax.Array:
        """Hidden states [..., D] -> float32 logits [..., V] (tied: the embedding's transpose; soft-capped if set)."""
        if self.config.tie_word_embeddings:
            return head_logits(self.output_head(), h)
        rngs = dropout_keys(deterministic, rngs)
        with reading(DECODER):
            logits = self.lm_head(h, deterministic=deterministic, rngs=rngs).astype(jnp.float32)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else soft_cap(logits, cap)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Causal logits [B, T, V] float32; dropout (deterministic=False) draws from `rngs`."""
        rngs = dropout_keys(deterministic, rngs)
        return self.logits(self.hidden(input_ids, attention_mask, deterministic=deterministic, rngs=rngs),
                           deterministic=deterministic, rngs=rngs)

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty cache of `max_length` slots (prompt plus new tokens); sliding layers keep only their window."""
        cfg = self.config
        window = cfg.sliding_window
        windowed = "sliding_attention" in cfg.layer_types and window < max_length
        zeros = lambda n: jnp.zeros((batch_size, n, cfg.num_key_value_heads, cfg.head_dim), self.dtype)  # noqa: E731
        full, slide = zeros(max_length), zeros(window) if windowed else None
        kv = tuple(slide if windowed and kind == "sliding_attention" else full for kind in cfg.layer_types)
        return KVCache(k=kv, v=kv, mask=jnp.zeros((batch_size, max_length), bool),
                       positions=jnp.zeros((batch_size, max_length), jnp.int32), index=jnp.zeros((), jnp.int32),
                       next_position=jnp.zeros((batch_size,), jnp.int32),
                       window_mask=jnp.zeros((batch_size, window), bool) if windowed else None,
                       window_positions=jnp.zeros((batch_size, window), jnp.int32) if windowed else None)

    def extend(self, input_ids: jax.Array, attention_mask: jax.Array | None,
               cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Run T new tokens [B, T] after the cached ones -> (normed hidden [B, T, D], cache); deterministic.

        The same call serves the prompt (a left-padded prefill into an empty cache) and each decoding
        step (T = 1). Padded tokens (mask 0) take no position and are never attended to.
        """
        b, t = input_ids.shape
        length = cache.mask.shape[1]
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        positions = cache.next_position[:, None] + positions_from_mask(mask)
        key_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, mask, cache.index, axis=1)  # [B, L]
        key_positions = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, cache.index, axis=1)
        slots = jnp.arange(length)[None, :] <= cache.index + jnp.arange(t)[:, None]  # [T, L]
        allowed = slots[None] & key_mask[:, None, :]
        kinds = dict.fromkeys(self.config.layer_types)
        biases = {kind: self._bias(kind, allowed, positions, key_positions) for kind in kinds}
        window_mask = window_positions = None
        if cache.window_mask is not None:  # sliding layers: the window's W slots, then the T new ones
            w = cache.window_mask.shape[1]
            seen_mask = jnp.concatenate([cache.window_mask, mask], axis=1)  # [B, W + T]
            seen_positions = jnp.concatenate([cache.window_positions, positions], axis=1)
            causal = jnp.arange(w + t)[None, :] <= w + jnp.arange(t)[:, None]  # [T, W + T]
            biases["sliding_attention"] = self._bias("sliding_attention", causal[None] & seen_mask[:, None, :],
                                                     positions, seen_positions)
            window_mask, window_positions = seen_mask[:, -w:], seen_positions[:, -w:]
        h, ks, vs = self._layers(self.model.embed(input_ids), positions, biases, cache, deterministic=True, rngs=None)
        if window_mask is not None:  # keep the last W slots of each sliding layer
            sliding = [kind == "sliding_attention" for kind in self.config.layer_types]
            ks = [k[:, -w:] if slides else k for k, slides in zip(ks, sliding)]
            vs = [v[:, -w:] if slides else v for v, slides in zip(vs, sliding)]
        return h, KVCache(k=tuple(ks), v=tuple(vs), mask=key_mask, positions=key_positions, index=cache.index + t,
                          next_position=cache.next_position + jnp.sum(mask, axis=1, dtype=jnp.int32),
                          window_mask=window_mask, window_positions=window_positions)
