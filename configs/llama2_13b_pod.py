"""LLaMA-2-13B-chat with LoRA on a TPU pod slice (v4-32: 16 chips on 4 hosts; v5e-32: 32 chips on 8 hosts).

The hyperparameters of configs/llama2_13b.py (the reference's LLaMA script: LoRA r 8 on q_proj and
v_proj, lr 3e-4, batch 64, outer batch 64, inputs cut at 512 tokens), with FSDP over every chip of
the slice: each chip holds 1/16 (v4-32) or 1/32 (v5e-32) of the bf16 weights (26 GB in all), of the
LoRA factors, AdamW moments and importance EMAs. A micro-batch of 32 rows puts 2 (v4) or 1 (v5e)
rows on each chip; 2 accumulated micro-batches keep the batch of 64. Run the same command on every
worker (README: "Launching on a TPU pod"); the workdir and the data must be at the same path on
every worker (a shared filesystem), and each worker reads the pretrained weights (hub cache or a
local copy).

    python main.py --config=configs/llama2_13b_pod.py --workdir=/mnt/shared/runs/llama2_13b_pod
"""
import importlib.util
import pathlib


def _single_host_config():
    """configs/llama2_13b.py's config (config files are loaded by path, not as a package)."""
    spec = importlib.util.spec_from_file_location("llama2_13b", pathlib.Path(__file__).with_name("llama2_13b.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _single_host_config()
    # The pod: FSDP over all chips of the slice (16 or 32), rows of each micro-batch split over them.
    c.sharding.num_devices = 0
    c.sharding.data_parallelism = 1
    c.sharding.fsdp_parallelism = -1
    c.sharding.tensor_parallelism = 1
    c.train.micro_batch_size = 32  # a multiple of 16 and 32: every chip gets its own rows
    return c
