"""A seconds-long run for tests: 2 synthetic tasks, a 1-layer T5 with LoRA, 2 cycles per task."""
from kif_jax.config import base_config


def get_config():
    c = base_config()
    c.seed = 7
    c.methods = "recurrent_kif"
    c.data_dir = "synthetic"
    c.tasks = "topic,compare"
    c.synthetic.n_train = 32
    c.synthetic.n_dev = 8
    c.synthetic.n_test = 16
    c.model.name = "tiny"
    c.model.tokenizer = "byte"
    c.model.trainable = "lora"
    c.model.lora.dropout = 0.1  # exercise the dropout keys
    c.model.tiny.d_model = 16
    c.model.tiny.d_kv = 8
    c.model.tiny.d_ff = 32
    c.model.tiny.num_layers = 1
    c.model.tiny.num_heads = 2
    c.train.epochs = 1
    c.train.batch_size = 8
    c.train.micro_batch_size = 4  # two accumulated micro-batches per step
    c.train.lr = 1e-2
    c.train.warmup_steps = 1
    c.train.max_input_length = 64
    c.train.max_target_length = 8
    c.cycle.steps = 2
    c.kif.outer_steps = 1
    c.kif.outer_batch_size = 8
    c.memory_buffer.ratio = 0.25
    c.kif.static_batches = 2
    c.eval.batch_size = 16
    c.eval.max_new_tokens = 3
    c.sharding.num_devices = 1
    return c
