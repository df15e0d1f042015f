"""Offline demo (the default config): a tiny T5 trained from scratch on synthetic tasks, on a laptop CPU.

Runs seq_lora, recurrent_kif and mtl on four interfering synthetic tasks and prints their OP/BWT.
"""
from kif_jax.config import base_config


def get_config():
    c = base_config()
    c.seed = 0
    c.methods = "seq_lora,recurrent_kif,mtl"
    c.data_dir = "synthetic"  # generated into <workdir>/synthetic_data; no download
    c.tasks = "topic,parity,sentiment,has_animal"  # shared nouns and yes/no labels: they interfere
    c.synthetic.n_train = 384  # training examples per task: 24 steps of 16 per epoch
    c.synthetic.n_dev = 32  # dev examples per task (used only with train.select_best)
    c.synthetic.n_test = 96  # test examples per task

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

    c.train.epochs = 4  # 96 steps per task: 12 whole fusion cycles of Q = 8, so no partial-cycle program
    c.train.batch_size = 16
    c.train.micro_batch_size = 16  # no accumulation: the model is tiny
    c.train.lr = 2e-3  # from-scratch training needs a larger step than LoRA's 3e-4
    c.train.warmup_steps = 10
    c.train.max_input_length = 64  # synthetic inputs are at most 63 bytes, plus EOS
    c.train.max_target_length = 16

    c.kif.outer_batch_size = 16
    c.memory_buffer.ratio = 0.1  # 38 examples of each earlier task (2% of 384 would be 7)

    c.eval.batch_size = 96
    c.eval.max_new_tokens = 8
    c.checkpoint.every_steps = 40  # also checkpoint within tasks, to show resuming
    return c
