"""Gemma 3 text (`gemma3_text`, transformers' `Gemma3ForCausalLM`): how its config.json and GGUF files differ.

Its blocks are `DecoderLM`'s with the switches of its registry entry (decoder/architectures.py): (1 + w)
RMSNorms in float32, norms after attention and around the MLP, q/k norms, embeddings times
sqrt(hidden_size), tanh-GELU. What is read here: a RoPE base per layer type (transformers 5's nested
`rope_parameters`, or the hub's `rope_theta` / `rope_local_base_freq` / `rope_scaling`, scaling on
full-attention layers only), the layer pattern, `query_pre_attn_scalar`, and GGUF's spelling of them.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from kif_jax.errors import ConfigError, ModelLoadError

SLIDING_PATTERN = 6  # transformers' default: every sixth layer attends globally
GLOBAL_THETA, LOCAL_THETA = 1e6, 1e4  # transformers' default RoPE bases (full, sliding layers)
QUERY_PRE_ATTN_SCALAR = 256  # transformers' default


def layer_pattern(num_layers: int, pattern: int = SLIDING_PATTERN) -> tuple[str, ...]:
    """Layer types of a sliding pattern: layers 1..pattern-1 slide, every pattern-th is global."""
    return tuple("sliding_attention" if (i + 1) % int(pattern) else "full_attention" for i in range(num_layers))


def config_from_hf(hf: Mapping[str, Any], kwargs: dict[str, Any], read_rope: Callable[..., Any]) -> dict[str, Any]:
    """`DecoderConfig` keyword arguments of a Gemma 3 config.json, added to the generic ones in `kwargs`.

    Sets rope_theta and rope_scaling (of the full-attention layers, raw) and rope_local_base_freq, by its
    own reading of RoPE per layer type instead of the generic `read_rope`.
    """
    if hf.get("use_bidirectional_attention"):
        raise ConfigError("DecoderConfig: use_bidirectional_attention=true (an embedding model) is not supported")
    kwargs = dict(kwargs)
    if hf.get("hidden_activation") is not None:
        kwargs["hidden_act"] = hf["hidden_activation"]
    params = hf.get("rope_parameters")
    theta, local, scaling = hf.get("rope_theta"), hf.get("rope_local_base_freq"), hf.get("rope_scaling")
    if isinstance(params, Mapping) and any(isinstance(v, Mapping) for v in params.values()):
        full = dict(params.get("full_attention") or {})
        sliding = dict(params.get("sliding_attention") or {})
        if sliding.get("rope_type", "default") != "default":
            raise ConfigError("DecoderConfig: rope_parameters.sliding_attention must be the default RoPE, "
                              f"got {sliding.get('rope_type')!r}")
        theta, local, scaling = full.get("rope_theta", theta), sliding.get("rope_theta", local), full
    elif isinstance(params, Mapping):
        raise ConfigError("DecoderConfig: Gemma 3's rope_parameters must hold one entry per layer type "
                          "(full_attention, sliding_attention)")
    kwargs["rope_theta"] = GLOBAL_THETA if theta is None else theta
    kwargs["rope_local_base_freq"] = LOCAL_THETA if local is None else local
    kwargs["rope_scaling"] = scaling
    if "layer_types" not in kwargs:
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", SLIDING_PATTERN))
        kwargs["layer_types"] = layer_pattern(int(hf.get("num_hidden_layers", 26)), pattern)
    kwargs.setdefault("query_pre_attn_scalar", QUERY_PRE_ATTN_SCALAR)
    return kwargs


def config_from_gguf(meta: Callable[..., Any], config: dict[str, Any], path: str) -> dict[str, Any]:
    """Gemma 3's config.json fields from GGUF metadata (`meta(key, default)` reads `gemma3.<key>`).

    Without `attention.scale` the scores are scaled by head_dim ** -0.5 (llama.cpp's rule for every
    Gemma 3 but the 27B); the sliding pattern is 6 unless the file gives one (a number or a flag a layer).
    """
    window = meta("attention.sliding_window")
    if window is None:
        raise ModelLoadError(f"{path}: GGUF metadata gemma3.attention.sliding_window is missing")
    n = config["num_hidden_layers"]
    pattern = meta("attention.sliding_window_pattern", SLIDING_PATTERN)
    if isinstance(pattern, list):  # one flag a layer: true where the layer slides
        if len(pattern) != n:
            raise ModelLoadError(f"{path}: gemma3.attention.sliding_window_pattern has {len(pattern)} entries "
                                 f"for {n} layers")
        layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        layer_types = list(layer_pattern(n, pattern))
    scale = meta("attention.scale")
    return {"sliding_window": int(window), "layer_types": layer_types,
            "query_pre_attn_scalar": config["head_dim"] if scale is None else float(scale) ** -2,
            "rope_local_base_freq": meta("rope.freq_base_swa", LOCAL_THETA),
            "final_logit_softcapping": meta("final_logit_softcapping"),
            "attn_logit_softcapping": meta("attn_logit_softcapping")}
