"""Qwen3-0.6B with LoRA on the Standard benchmark (order 4), as the follow-up paper's Qwen3-0.6B row.

LoRA r 8, alpha 32, dropout 0.05 on q_proj and v_proj, the reference KIF settings, the benchmark's
prompts as they are (they end in "Answer:"; Qwen3's chat template would add its thinking tags), bf16.

    python main.py --config=configs/qwen3_0_6b.py --workdir=runs/qwen3_0_6b
"""

from kif_jax.config import base_config, default_data_dir


def get_config():
    c = base_config()
    c.methods = "seq_lora,recurrent_kif"
    c.data_dir = default_data_dir()  # $KIF_DATA_DIR, else ../shared/cl_benchmark beside the checkout
    c.benchmark = "standard"
    c.order = 4  # dbpedia, amazon, yahoo, agnews
    c.model.name = "qwen3-0.6b"  # preset: hub id Qwen/Qwen3-0.6B
    c.model.prompt_template = "none"  # the benchmark text as is, ending in "Answer:"
    c.model.dtype = "bfloat16"
    c.model.lora.targets = "q_proj,v_proj"
    c.train.batch_size = 32
    c.train.micro_batch_size = 16
    c.train.max_input_length = 512
    c.train.max_target_length = 16
    c.kif.outer_batch_size = 32
    c.eval.batch_size = 64
    c.eval.max_new_tokens = 16
    c.checkpoint.every_steps = 200
    return c
