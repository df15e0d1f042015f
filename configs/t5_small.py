"""t5-small with LoRA on the Standard benchmark (order 4): a quick, cheap run of the full pipeline."""

from kif_jax.config import base_config, default_data_dir


def get_config():
    c = base_config()
    c.methods = "seq_lora,recurrent_kif"
    c.data_dir = default_data_dir()  # $KIF_DATA_DIR, else ../shared/cl_benchmark beside the checkout
    c.benchmark = "standard"
    c.order = 4  # dbpedia, amazon, yahoo, agnews
    c.model.name = "t5-small"  # preset: hub id google-t5/t5-small
    c.train.epochs = 2  # fewer passes than the reference's 10, to keep the run short
    c.train.max_input_length = 512  # the standard tasks' inputs are short (p95 under 2100 characters)
    c.eval.max_examples_per_task = 500  # cap decoding time; the full test sets hold 500-7600 examples
    c.checkpoint.every_steps = 200
    return c
