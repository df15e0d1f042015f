"""SmolLM2-135M-Instruct on the Standard benchmark, order 4, at the reference's own budget (an accelerator run).

`configs/smollm2_standard.py` with the authors' T5 training budget instead of the CPU-sized one:
every task's full 1000-example training file, 10 epochs (1250 steps of 8 a task: 156 whole fusion
cycles and 2 leftover steps, which the reference does not fuse), AdamW lr 3e-4 with 50 warm-up steps,
and the first 500 test examples of each task. SeqLoRA, Replay and Recurrent-KIF; everything else,
the KIF settings included, as in smollm2_standard.py. About 17,000 optimizer steps in all: hours on a
GPU-less machine, minutes on one GPU (`bench/gpu_smollm2.sh`).

    python main.py --config=configs/smollm2_reference.py --workdir=runs/smollm2_reference_o4
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("smollm2_standard", os.path.join(os.path.dirname(__file__),
                                                                                "smollm2_standard.py"))
_standard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_standard)


def get_config():
    c = _standard.get_config()
    c.train.max_examples_per_task = 0  # the whole training file
    c.train.epochs = 10
    c.train.lr = 3e-4
    c.train.warmup_steps = 50
    c.eval.max_examples_per_task = 500
    c.eval.batch_size = 100  # 5 batches a task
    c.checkpoint.every_steps = 0  # task ends only
    return c
