"""T5-large with LoRA on SAPT's SuperNI benchmark (15 tasks, order 1), at SAPT's published T5 budget, for accelerators.

SeqLoRA, Replay and Recurrent-KIF, the comparison the SmolLM2 runs make, each over all 15 tasks:

    python main.py --config=configs/t5_large_superni.py --workdir=runs/t5_large_superni_o1
    python main.py --config=configs/t5_large_superni.py --workdir=runs/t5_large_superni_o2 --config.order=2

Needs the hub (google-t5/t5-large, safetensors) and the SuperNI task files (`default_data_dir("superni")`:
$KIF_SUPERNI_DIR, else ../shared/superni_benchmark beside the checkout); the prompt, decoding and ROUGE-L
scoring are the generation format's (docs/tasks.md).

Every value below comes from SAPT's T5 SuperNI script, gen_script_superni_t5.py at circle-hit/SAPT @ 52a52b9
(52a52b920324c656bdb6dac08e43dc600ba22f21; "gen:N" = its line N), the script the benchmark was copied from,
and from what that script runs, src/run_t5.py and src/t5_prompt.py at the same commit:
  - tasks: order 1 gen:28-43, order 2 gen:44-59 (kif_jax.data SUPERNI_ORDERS, MANIFEST.json).
  - model.name "t5-large": gen:122 leaves the path as `your_t5_model_path`; the paper's T5 runs are
    T5-large (770M). model.dtype bfloat16: `--bf16`, gen:132 (SAPT: torch autocast over float32 weights;
    here a bfloat16 backbone, LoRA factors float32, as configs/t5_large.py).
  - model.lora.rank 4 (gen:75), alpha 32 (gen:76; scale alpha / r = 8, t5_prompt.py:88), dropout 0.0
    (gen:77), passed at gen:149-151; targets "q,v": `lora_q` and `lora_v` of every T5Attention
    (t5_prompt.py:400, 404), in self-attention (:690) and cross-attention (:724) of encoder and decoder,
    the cross-attention `lora_v` on the encoder states (:562-567): the 144 modules of kif_jax's preset.
    A is Kaiming-uniform, B zero (t5_prompt.py:98-101).
  - train.lr 3e-4: `learning_rate`, gen:80, passed at gen:130.
  - train.batch_size 32 = `--per_device_train_batch_size 8` (gen:127) x `--gradient_accumulation_steps 4`
    (gen:129) x 1 GPU (`CUDA_VISIBLE_DEVICES=0`, gen:118; one A100 80GB, gen:112); train.micro_batch_size 8
    is the per-device 8 (a memory setting only: the step averages the 32 examples' gradients either way).
  - train.epochs 100: `--num_train_epochs 100`, gen:131.
  - train.warmup_steps 0: `--warmup_steps 0`, gen:142.
  - train.max_input_length 512: `--max_source_length 512`, gen:134 (T5 inputs lose their end, as SAPT's
    collator cuts them, src/cl_collator.py:104-109).
  - train.max_target_length 50: `--max_target_length 50`, gen:135; it also caps the decoding length
    (SAPT: `--generation_max_length 50`, gen:136, run_t5.py:714-716). kif_jax decodes each task to its
    longest training reference, at most 50 tokens (docs/tasks.md, Generation length), so
    eval.max_new_tokens (classification only) stays at its default.
  - greedy decoding: `num_beams` 1, run_t5.py:232-233 (not overridden by the script).
  - all training instances (`"sampling strategy": "full"`, gen:88; `load_SuperNI_dataset` reads no cap,
    src/cl_dataset.py:237-290): train.max_examples_per_task 0; the whole test file of every task seen so
    far after every task (`test_tasks.json` = all tasks so far, gen:101-103; no cap on test,
    src/cl_dataset.py:170): eval.max_examples_per_task 0, eval.schedule "full".
  - eval.batch_size 128: `--per_device_eval_batch_size 128`, gen:128 (speed only).
  - seed 42, train.weight_decay 0, train.max_grad_norm 1.0: the script passes none of them, so they are
    Transformers' TrainingArguments defaults (42, 0.0, 1.0); kif_jax's defaults are the same.
  - no task or dataset name in the prompt (`--add_task_name False --add_dataset_name False`, gen:137-138):
    the generation format's zero-shot SuperNI prompt has none.
  - checkpoint.every_steps 500: not SAPT's; a preemptible machine loses at most 500 steps (configs/t5_large.py).

Steps: ceil(n / 32) a epoch x 100 epochs a task: 3,200 for the ten 1000-example tasks, 3,100 for task073
(975), 1,100 task181 (338), 500 task1572 (160), 500 task639 (142), 400 task1590 (126): 37,600 optimizer
steps a method (Replay's steps grow by its memory buffer). SAPT's Trainer (Transformers 4.30.2, its README)
takes floor(ceil(n / 8) / 4) steps an epoch: 31 instead of 32 for the 1000-example tasks. Memory: 15.3 GiB a
device for recurrent_kif on one device (python -m kif_jax.memory_plan --config=configs/t5_large_superni.py
--devices=1), most of it the activations of a micro-batch of 8 x 512 tokens.

What has no counterpart here:
  - the schedule: `--lr_scheduler_type constant` (gen:141); kif_jax's is a linear warm-up, then a linear
    decay to 0 at each task's last step (train.warmup_steps = 0: the decay from the first step).
  - model selection: `--load_best_model_at_end` with `--metric_for_best_model eval_rougeL` (gen:145, 152;
    eval_rougeL_for_<task> from the second task, gen:197), evaluated every 10 steps (`--evaluation_strategy
    steps`, gen:146, with no eval_steps: Transformers falls back to `--logging_steps 10`, gen:144) on the
    dev files, which are the test files (docs/tasks.md): test-set selection. kif_jax's train.select_best
    selects by dev loss on a held-out tenth of the training file and trains on the other nine tenths; it
    stays off (every method hands on its last step), so all 37,600 steps train on the whole files.
  - the training target: SAPT draws one reference per instance with `random.randint` each time it builds
    the dataset (src/cl_dataset.py:277-280); kif_jax's draw is fixed by the instance id (docs/tasks.md).
  - SAPT's own method: its attentive learning and selection module (`trans_input`, prompt keys,
    run_t5.py:494), the per-task LoRA kept and mixed (`--previous_lora_path`, gen:172), `kl_ratio` 0.5 and
    `attn_temperature` 1 (gen:78-79, 155-156, 208-209), and the replay of generated pseudo-samples
    (`--gen_data_dir generated_data/lora_gen_superni_t5`, `--add_instruction_replay`, `--data_replay_freq 1`,
    gen:176, 205-206). None of the three methods here uses them. SAPT @ 52a52b9 ships no SeqLoRA (or other
    baseline) script: its one T5 SuperNI budget is this script's, and SeqLoRA, Replay and Recurrent-KIF
    all run at it here. Replay and Recurrent-KIF replay real examples: the memory buffer, memory_buffer.ratio
    2% of each earlier task's training file; the KIF settings are kif_jax's (the reference's) defaults.
  - `--bf16` autocast (see model.dtype), `--per_device_eval_batch_size` per GPU (eval.batch_size is a
    decoding batch over all devices), `--max_num_instances_per_eval_task 200` (run_t5.py:242-243; SuperNI's
    reader ignores it).
"""

from kif_jax.config import base_config, default_data_dir


def get_config():
    c = base_config()
    c.seed = 42  # Transformers' default; the script passes no --seed
    c.methods = "seq_lora,replay,recurrent_kif"
    c.data_dir = default_data_dir("superni")  # $KIF_SUPERNI_DIR, else ../shared/superni_benchmark beside the checkout
    c.benchmark = "superni"
    # task1572, task363, task1290, task181, task002, task1510, task639, task1729, task073, task1590, task748,
    # task511, task591, task1687, task875 (order 2: --config.order=2)
    c.order = 1
    c.model.name = "t5-large"  # preset: hub id google-t5/t5-large, 144 LoRA modules on q and v
    c.model.dtype = "bfloat16"  # --bf16 (gen:132); LoRA factors stay float32
    c.model.lora.rank = 4  # gen:75
    c.model.lora.alpha = 32.0  # gen:76
    c.model.lora.dropout = 0.0  # gen:77
    c.model.lora.targets = "q,v"  # lora_q, lora_v: t5_prompt.py:400, 404
    c.train.epochs = 100  # gen:131
    c.train.batch_size = 32  # 8 a device (gen:127) x 4 accumulated (gen:129) x 1 GPU (gen:118)
    c.train.micro_batch_size = 8  # gen:127
    c.train.lr = 3e-4  # gen:80
    c.train.warmup_steps = 0  # gen:142 (SAPT's rate then stays constant, gen:141; kif_jax's decays linearly)
    c.train.max_input_length = 512  # gen:134
    c.train.max_target_length = 50  # gen:135; also the decoding cap (gen:136)
    c.train.max_examples_per_task = 0  # every training instance (gen:88)
    c.eval.batch_size = 128  # gen:128
    c.eval.max_examples_per_task = 0  # every test instance (src/cl_dataset.py:170)
    c.eval.schedule = "full"  # every task seen so far after every task (gen:101-103)
    c.checkpoint.every_steps = 500  # a preemptible machine loses at most ~500 steps
    return c
