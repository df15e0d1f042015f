"""T5-large with LoRA, the paper's reference setting: Long-sequence benchmark, order 1 (15 tasks).

For a TPU VM with hub access:  python main.py --config=configs/t5_large.py --workdir=runs/t5_large
Point `data_dir` at the benchmark (or set $KIF_DATA_DIR); other orders: --config.order=2.
"""

from kif_jax.config import base_config, default_data_dir


def get_config():
    c = base_config()  # the reference hyperparameters of the authors' T5 scripts
    c.methods = "recurrent_kif"
    c.data_dir = default_data_dir()  # $KIF_DATA_DIR, else ../shared/cl_benchmark beside the checkout
    c.benchmark = "long"
    c.order = 1  # mnli, cb, wic, copa, qqp, boolqa, rte, imdb, yelp, amazon, sst-2, dbpedia, agnews, multirc, yahoo
    c.model.name = "t5-large"  # preset: hub id google-t5/t5-large, 144 LoRA modules on q and v
    c.model.dtype = "bfloat16"  # TPU-native compute; LoRA factors stay float32
    c.eval.batch_size = 64
    c.checkpoint.every_steps = 500  # a preemptible TPU VM loses at most ~500 steps
    return c
