"""The T5 family (T5 v1.0, v1.1 / Flan-T5, mT5): its model, checkpoint names and loading, and decoding."""
from kif_jax.models.layers import LoRAConfig, LoRAParam, lora_modules, merge_lora
from kif_jax.models.t5.model import (
    PRESETS,
    T5,
    DecodeCache,
    T5Config,
    preset,
    relative_position_buckets,
    shift_right,
)

__all__ = ["PRESETS", "T5", "DecodeCache", "T5Config", "LoRAConfig", "LoRAParam", "lora_modules", "merge_lora",
           "preset", "relative_position_buckets", "shift_right"]
