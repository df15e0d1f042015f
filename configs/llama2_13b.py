"""LLaMA-2-13B-chat with LoRA: the paper's largest row (Long-sequence benchmark, order 1, Alpaca prompts).

Hyperparameters as configs/llama2_7b.py (the reference's LLaMA script). bf16 weights take 26 GB:
on one accelerator this needs a device with more memory than that (e.g. an 80 GB GPU).

    python main.py --config=configs/llama2_13b.py --workdir=runs/llama2_13b
"""

from kif_jax.config import base_config, default_data_dir


def get_config():
    c = base_config()
    c.methods = "recurrent_kif"
    c.data_dir = default_data_dir()  # $KIF_DATA_DIR, else ../shared/cl_benchmark beside the checkout
    c.benchmark = "long"
    c.order = 1
    c.model.name = "llama-2-13b-chat"  # preset: hub id meta-llama/Llama-2-13b-chat-hf
    c.model.prompt_template = "alpaca"
    c.model.dtype = "bfloat16"
    c.model.lora.targets = "q_proj,v_proj"
    c.train.batch_size = 64
    c.train.micro_batch_size = 8  # 8 accumulated micro-batches: 13B activations are twice 7B's
    c.train.max_input_length = 512
    c.train.max_target_length = 32
    c.kif.outer_batch_size = 64
    c.eval.batch_size = 32
    c.eval.max_new_tokens = 128
    c.checkpoint.every_steps = 100
    return c
