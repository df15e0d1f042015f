"""The decoder-only family (LLaMA, Mistral, Qwen2/3, SmolLM2, Gemma 3): its model, architectures, checkpoint
and GGUF loading, and decoding."""
from kif_jax.models.decoder.model import (
    PRESET_CONFIGS,
    PRESETS,
    TINY_PRESETS,
    DecoderConfig,
    DecoderLM,
    KVCache,
    OutputHead,
    head_logits,
    hub_id,
    merge_lora,
    rope_inv_freq,
    soft_cap,
)

__all__ = ["PRESET_CONFIGS", "PRESETS", "TINY_PRESETS", "DecoderConfig", "DecoderLM", "KVCache", "OutputHead",
           "head_logits", "hub_id", "merge_lora", "rope_inv_freq", "soft_cap"]
