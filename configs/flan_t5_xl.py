"""Flan-T5-XL (3B) with LoRA on the Long-sequence benchmark, order 1: the largest preset, for TPU v4/v5.

Batches are split over all local devices on the `data` axis; parameters are replicated (bf16: ~6 GB).
"""

from kif_jax.config import base_config, default_data_dir


def get_config():
    c = base_config()
    c.methods = "recurrent_kif"
    c.data_dir = default_data_dir()  # $KIF_DATA_DIR, else ../shared/cl_benchmark beside the checkout
    c.benchmark = "long"
    c.order = 1
    c.model.name = "flan-t5-xl"  # preset: hub id google/flan-t5-xl (gated-GELU, separate lm_head)
    c.model.dtype = "bfloat16"
    c.train.batch_size = 8  # the reference batch, one micro-batch of 8 per step on a multi-chip host
    c.train.micro_batch_size = 8
    c.eval.batch_size = 64
    c.checkpoint.every_steps = 500
    return c
