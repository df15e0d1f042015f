"""Qwen2 / Qwen2.5 / Qwen3 (`qwen2`, `qwen3`): what their config.json says beyond LLaMA's.

Sliding windows are off unless `use_sliding_window` is set; then the layers from `max_window_layers`
on slide (transformers' rule, also the default pattern of a `DecoderConfig` with a window).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

#: transformers' default `max_window_layers` of Qwen2/Qwen3 (layers from it on slide when a window is used).
QWEN_MAX_WINDOW_LAYERS = 28


def layer_pattern(num_layers: int, first: int = QWEN_MAX_WINDOW_LAYERS) -> tuple[str, ...]:
    """Layer types when a window is used: full attention below layer `first`, sliding from it on."""
    return tuple("sliding_attention" if i >= first else "full_attention" for i in range(num_layers))


def config_from_hf(hf: Mapping[str, Any], kwargs: dict[str, Any],
                   read_rope: Callable[[Mapping[str, Any], dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """`DecoderConfig` keyword arguments of a Qwen config.json: the generic reading, then the window."""
    kwargs = read_rope(hf, kwargs)
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    kwargs["sliding_window"] = window
    if window is None:
        kwargs.pop("layer_types", None)
    elif "layer_types" not in kwargs:
        kwargs["layer_types"] = layer_pattern(int(hf.get("num_hidden_layers", 32)),
                                              int(hf.get("max_window_layers", QWEN_MAX_WINDOW_LAYERS)))
    return kwargs


def config_to_hf(config: Any, out: dict[str, Any]) -> dict[str, Any]:
    """config.json fields of a Qwen `DecoderConfig` beyond the generic ones: whether the window is used."""
    out["use_sliding_window"] = config.sliding_window is not None
    return out
