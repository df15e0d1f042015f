"""The same model in transformers (PyTorch), for the benchmarks that run kif_jax and PyTorch side by side.

kif_jax writes its weights with its own `save_pretrained` (and LoRA adapters with `save_adapter`);
transformers (and peft) read them back, so both sides hold the very same float32 numbers. PyTorch,
transformers and peft are imported here only when called: they are benchmark tools, never kif_jax's
runtime dependencies.
"""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kif_jax import models  # noqa: E402


def transformers_peer(model: Any, *, adapter: bool = False, trainable: bool = False) -> Any:
    """`model`'s weights in transformers, float32: `LlamaForCausalLM` (or the decoder's own
    `*ForCausalLM`) for a decoder-only LM, `T5ForConditionalGeneration` for a T5.

    `save_pretrained` writes the base weights with any LoRA merged in; with `adapter` the LoRA weights
    are also written by `save_adapter` and put on top by peft's `PeftModel` (trainable if `trainable`),
    which counts them twice unless LoRA's B is still zero (a freshly built adapter, as the training bench
    uses).
    """
    import torch

    causal = isinstance(models.family_of(model), models.CausalFamily)
    with tempfile.TemporaryDirectory() as tmp:
        base_dir, adapter_dir = os.path.join(tmp, "base"), os.path.join(tmp, "adapter")
        models.save_pretrained(model, base_dir)
        if causal:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        else:
            from transformers import T5ForConditionalGeneration

            hf = T5ForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
        if not adapter:
            return hf
        from peft import PeftModel

        from kif_jax.models import peft as kif_peft

        kif_peft.save_adapter(model, adapter_dir)
        return PeftModel.from_pretrained(hf, adapter_dir, is_trainable=trainable)
