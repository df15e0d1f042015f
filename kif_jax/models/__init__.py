"""Model families in Flax NNX with LoRA (T5 / Flan-T5; decoder-only LLMs), loading, tokenizers, decoding."""
from kif_jax.models.architectures import ARCHITECTURES
from kif_jax.models.decoder import PRESETS as DECODER_PRESETS
from kif_jax.models.decoder import DecoderConfig, DecoderLM
from kif_jax.models.decoder.family import CausalFamily
from kif_jax.models.decoder.generate import greedy_decode_lm, score_options_lm
from kif_jax.models.decoding import generate_texts
from kif_jax.models.family import FAMILIES, ModelFamily, family_of
from kif_jax.models.layers import merge_lora
from kif_jax.models.loading import build_model, from_pretrained, save_pretrained, to_hf_state_dict
from kif_jax.models.peft import load_adapter, save_adapter
from kif_jax.models.t5 import PRESETS as T5_PRESETS
from kif_jax.models.t5 import (
    LoRAConfig,
    LoRAParam,
    T5,
    T5Config,
    lora_modules,
    preset,
    shift_right,
)
from kif_jax.models.t5.family import Seq2SeqFamily
from kif_jax.models.t5.generate import forward, greedy_decode, score_options
from kif_jax.models.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer

#: Every family's presets: name -> Hugging Face hub id (None: a from-scratch config). `T5_PRESETS`
#: also holds each T5 preset's config; `DECODER_PRESETS` is the decoder-only part.
PRESETS: dict[str, str | None] = {**{name: hub for name, (hub, _) in T5_PRESETS.items()}, **DECODER_PRESETS}

__all__ = [
    "CausalFamily", "FAMILIES", "ModelFamily", "Seq2SeqFamily", "build_model", "family_of", "ARCHITECTURES",
    "PRESETS", "T5_PRESETS", "LoRAConfig", "LoRAParam", "T5", "T5Config", "from_pretrained", "lora_modules",
    "merge_lora", "preset", "shift_right", "save_pretrained", "to_hf_state_dict", "forward", "generate_texts",
    "greedy_decode", "score_options", "ByteTokenizer", "Tokenizer", "load_tokenizer", "DECODER_PRESETS",
    "DecoderConfig", "DecoderLM", "greedy_decode_lm", "score_options_lm", "load_adapter", "save_adapter",
]
