"""Offline demo (the default config): a tiny T5 trained from scratch on synthetic tasks, on a laptop CPU.

Runs seq_lora, recurrent_kif and mtl on five interfering synthetic tasks and prints their OP/BWT.
"""
from kif_jax.config import base_config


def get_config():
    c = base_config()
    c.seed = 0
    c.methods = "seq_lora,recurrent_kif,mtl"
    c.data_dir = "synthetic"  # generated into <workdir>/synthetic_data; no download
    c.tasks = "topic,compare,first_topic,sentiment,parity"  # topic/first_topic and compare/parity conflict
    c.synthetic.n_train = 320  # examples per task and split
    c.synthetic.n_dev = 32
    c.synthetic.n_test = 96

    c.model.name = "tiny"  # random init, byte tokenizer: nothing to download
    c.model.tokenizer = "byte"
    # A randomly initialised backbone has no features for a low-rank adapter to steer, so the demo
    # trains every parameter ("all"); the KIF core works on any pytree, so importance, masks and
    # fusion then act on the whole model exactly as they act on LoRA factors for a pretrained one.
    c.model.trainable = "all"
    c.model.tiny.d_model = 64
    c.model.tiny.d_kv = 16
    c.model.tiny.d_ff = 128
    c.model.tiny.num_layers = 2
    c.model.tiny.num_heads = 4

    c.train.epochs = 4  # passes over each task's 320 examples
    c.train.batch_size = 16
    c.train.micro_batch_size = 16  # no accumulation: the model is tiny
    c.train.lr = 2e-3  # from-scratch training needs a larger step than LoRA's 3e-4
    c.train.warmup_steps = 10
    c.train.max_input_length = 128  # synthetic inputs are under 120 bytes
    c.train.max_target_length = 16

    c.kif.outer_batch_size = 16
    c.kif.memory_ratio = 0.1  # 32 examples of each earlier task (2% of 320 would be 6)

    c.eval.batch_size = 96
    c.eval.max_new_tokens = 8
    c.checkpoint.every_steps = 40  # also checkpoint within tasks, to show resuming
    return c
