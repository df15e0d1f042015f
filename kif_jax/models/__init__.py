"""Model families in Flax NNX with LoRA (T5 / Flan-T5; decoder-only LLMs), loading, tokenizers, decoding."""
from kif_jax.models.family import CausalFamily, ModelFamily, Seq2SeqFamily, build_model, family_of
from kif_jax.models.generate import forward, generate_texts, greedy_decode, score_options
from kif_jax.models.t5 import (
    PRESETS,
    LoRAConfig,
    LoRAParam,
    T5,
    T5Config,
    lora_modules,
    merge_lora,
    preset,
    shift_right,
)
from kif_jax.models.decoder import PRESETS as DECODER_PRESETS
from kif_jax.models.decoder import DecoderConfig, DecoderLM
from kif_jax.models.decoder_generate import greedy_decode_lm, score_options_lm
from kif_jax.models.loading import from_pretrained, save_pretrained, to_hf_state_dict
from kif_jax.models.peft import load_adapter, save_adapter
from kif_jax.models.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "CausalFamily", "ModelFamily", "Seq2SeqFamily", "build_model", "family_of",
    "PRESETS", "LoRAConfig", "LoRAParam", "T5", "T5Config", "from_pretrained", "lora_modules", "merge_lora",
    "preset", "shift_right", "save_pretrained", "to_hf_state_dict", "forward", "generate_texts", "greedy_decode",
    "score_options", "ByteTokenizer", "Tokenizer", "load_tokenizer", "DECODER_PRESETS", "DecoderConfig",
    "DecoderLM", "greedy_decode_lm", "score_options_lm", "load_adapter", "save_adapter",
]
