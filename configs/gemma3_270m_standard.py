"""Gemma 3 270M (instruction-tuned) with LoRA on the Standard benchmark (order 4).

LoRA r 8, alpha 32, dropout 0.05 on q_proj and v_proj, the reference KIF settings, bf16. Prompts go
through Gemma's own chat template (one user turn, then "<start_of_turn>model"), the format the -it
model was tuned on; the label and <eos> follow. Gemma 3 attends to a 512-token sliding window in 5 of
every 6 layers; prompts here stay within it.

The checkpoint is gated on the hub: accept its licence and log in (`huggingface-cli login`), or set
model.name to a local copy.

    python main.py --config=configs/gemma3_270m_standard.py --workdir=runs/gemma3_270m
"""

from kif_jax.config import base_config, default_data_dir


def get_config():
    c = base_config()
    c.methods = "seq_lora,recurrent_kif"
    c.data_dir = default_data_dir()  # $KIF_DATA_DIR, else ../shared/cl_benchmark beside the checkout
    c.benchmark = "standard"
    c.order = 4  # dbpedia, amazon, yahoo, agnews
    c.model.name = "gemma-3-270m-it"  # preset: hub id google/gemma-3-270m-it
    c.model.prompt_template = "chat"  # Gemma's turn format from its tokenizer
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
