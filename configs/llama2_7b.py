"""LLaMA-2-7B-chat with LoRA, the paper's LLaMA rows: Long-sequence benchmark, order 1, Alpaca prompts.

The reference's LLaMA hyperparameters (the authors' finetune_KIF_llama.py): LoRA r 8, alpha 32, dropout
0.05 on q_proj and v_proj; lr 3e-4, warm-up 50; batch 64 (micro 16), outer batch 64; inputs cut at
512 tokens; greedy decoding of up to 128 new tokens. The reference ran 8-bit weights with fp16;
kif_jax runs bf16. Its 10 epochs are kept. Needs hub access (meta-llama is gated: log in first).

    python main.py --config=configs/llama2_7b.py --workdir=runs/llama2_7b
"""

from kif_jax.config import base_config, default_data_dir


def get_config():
    c = base_config()
    c.methods = "recurrent_kif"
    c.data_dir = default_data_dir()  # $KIF_DATA_DIR, else ../shared/cl_benchmark beside the checkout
    c.benchmark = "long"
    c.order = 1
    c.model.name = "llama-2-7b-chat"  # preset: hub id meta-llama/Llama-2-7b-chat-hf
    c.model.prompt_template = "alpaca"
    c.model.dtype = "bfloat16"  # LoRA factors stay float32; fusion math runs in float32
    c.model.lora.targets = "q_proj,v_proj"
    c.train.batch_size = 64
    c.train.micro_batch_size = 16  # 4 accumulated micro-batches per step
    c.train.max_input_length = 512  # the reference's cutoff (prompt; the label adds at most 32 tokens)
    c.train.max_target_length = 32
    c.kif.outer_batch_size = 64
    c.eval.batch_size = 64
    c.eval.max_new_tokens = 128  # the reference's; generation stops at EOS, labels are a few tokens
    c.checkpoint.every_steps = 100
    return c
