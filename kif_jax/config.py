"""The config schema: every field with its default and meaning, and up-front validation.

Config files (`configs/*.py`) start from `base_config()` and override fields; `validate_config`
rejects unknown fields and out-of-range values with one line naming the field, before any data is
tokenized, any model is loaded or anything is compiled. The sections of the methods (`kif`, `o_lora`,
`tasl`, `ewc`, ...) come from the method registry (kif_jax/methods/): each method module owns its
section's defaults, docs and checks.
"""
from __future__ import annotations

import copy
import inspect
import math
import os
import pathlib
import re
import sys
from typing import Any

import ml_collections

from kif_jax.comma_lists import split_list
from kif_jax.errors import ConfigError
from kif_jax.methods import method_class, sections
from kif_jax.tasks import run_format

SYNTHETIC_DATA = "synthetic"
DATA_DIR_ENV = "KIF_DATA_DIR"
SUPERNI_DIR_ENV = "KIF_SUPERNI_DIR"
SUPERNI_BENCHMARKS = ("superni", "superni_gen5")


def default_data_dir(benchmark: str = "") -> str:
    """The benchmark directory every config defaults to: $KIF_DATA_DIR, else ../shared/cl_benchmark beside
    the checkout (the directory that holds this repository); for the SuperNI benchmarks ("superni",
    "superni_gen5") $KIF_SUPERNI_DIR, else ../shared/superni_benchmark."""
    shared = pathlib.Path(__file__).resolve().parents[2] / "shared"
    if benchmark in SUPERNI_BENCHMARKS:
        return os.environ.get(SUPERNI_DIR_ENV) or str(shared / "superni_benchmark")
    return os.environ.get(DATA_DIR_ENV) or str(shared / "cl_benchmark")


def base_config() -> ml_collections.ConfigDict:
    """All fields with the reference defaults (the authors' T5 scripts; docs/algorithm.md)."""
    c = ml_collections.ConfigDict()
    c.seed = 42  # every random choice (init, LoRA A, shuffling, buffer, dropout) derives from it
    c.methods = "recurrent_kif"  # comma-separated registry names (kif_jax/methods/) or module:Class; run in turn
    c.data_dir = ""  # benchmark directory (<split>/<task>.json), or "synthetic" for generated tasks
    # "standard" (orders 4-6), "long" (orders 1-3), "superni" or "superni_gen5" (orders 1-2); alone, its first order
    c.benchmark = ""
    c.order = 0  # task order of the benchmark (1-6 without one); 0 = take it from `benchmark` or `tasks`
    c.tasks = ""  # comma-separated task list; overrides benchmark/order when set
    # How the tasks' files are read, prompted and scored (kif_jax/tasks/): "classification", "generation" or
    # module:Class; "" = the benchmark's (generation for superni and superni_gen5, else classification)
    c.task_format = ""

    c.synthetic = ml_collections.ConfigDict()  # used only when data_dir == "synthetic"
    c.synthetic.n_train = 400  # training examples per synthetic task
    c.synthetic.n_dev = 50  # dev examples per synthetic task
    c.synthetic.n_test = 100  # test examples per synthetic task

    c.model = ml_collections.ConfigDict()
    # A preset (kif_jax.models.PRESETS, every family's hub names; or the offline GGUF preset
    # "smollm2-135m-instruct-q4"), a hub id, a local Hugging Face directory, a .gguf file,
    # or a randomly initialised "tiny" (T5) / "tiny-decoder" (LLaMA-style) model sized by model.tiny.
    c.model.name = "t5-large"
    # Decoder-only models: how a benchmark input becomes the prompt: "none" (the text as is), "alpaca"
    # (the reference's LLaMA template) or "chat" (the tokenizer's chat template). T5 ignores it.
    c.model.prompt_template = "none"
    c.model.tokenizer = ""  # "" = the model's own; "byte" = the file-free ByT5 byte scheme
    c.model.dtype = "float32"  # compute and parameter dtype of the backbone: float32 or bfloat16
    c.model.trainable = "lora"  # "lora": only LoRA factors train; "all": every parameter trains
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.rank = 8  # LoRA rank r
    c.model.lora.alpha = 32.0  # LoRA scale is alpha / r
    c.model.lora.dropout = 0.05  # dropout on the LoRA input, training only
    c.model.lora.targets = "q,v"  # projection names that get LoRA, in every attention block
    c.model.tiny = ml_collections.ConfigDict()  # sizes of the randomly initialised "tiny" model
    c.model.tiny.vocab_size = 259  # the byte tokenizer's id range
    c.model.tiny.d_model = 64  # hidden size
    c.model.tiny.d_kv = 16  # size of one attention head
    c.model.tiny.d_ff = 128  # feed-forward size
    c.model.tiny.num_layers = 2  # encoder and decoder layers each
    c.model.tiny.num_heads = 4  # attention heads
    c.model.tiny.dropout_rate = 0.0  # backbone dropout
    c.model.tiny.feed_forward_proj = "gated-gelu"  # "relu" (T5 v1.0) or "gated-gelu" (v1.1)

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 10  # passes over each task's training data
    c.train.batch_size = 8  # examples per optimizer step
    c.train.micro_batch_size = 2  # examples per forward pass; batch_size / micro_batch_size are accumulated
    c.train.lr = 3e-4  # AdamW peak learning rate
    c.train.weight_decay = 0.0  # AdamW decoupled weight decay (Hugging Face Trainer's default)
    c.train.warmup_steps = 50  # linear warm-up, then linear decay to 0 at the task's last step
    c.train.max_grad_norm = 1.0  # global-norm gradient clipping (inner and outer steps)
    c.train.max_input_length = 1024  # tokens; longer inputs are truncated
    c.train.max_target_length = 128  # tokens; longer targets are truncated
    # Budget for CPU-sized runs: train on a seeded random subset of this many examples of each task's
    # training file (0 = all). The memory buffer is still drawn from each earlier task's FULL training
    # file (memory_buffer.ratio of it, as in the paper), so the replay data does not shrink with the budget.
    c.train.max_examples_per_task = 0
    c.train.reset_at_task_boundary = True  # recreate optimizer and importance states per task (reference)
    c.train.select_best = False  # keep the step with the lowest dev loss (reference: hands on the last)
    c.train.select_every_steps = 40  # how often dev loss is measured when select_best
    c.train.select_dev_examples = 25  # dev examples of every task seen so far used for selection
    c.train.on_nonfinite = "stop"  # "stop": fail naming task and step; "skip": drop that step
    c.train.prng_impl = "rbg"  # dropout bits: "rbg" (XLA RngBitGenerator, fast to compile) or "threefry"
    # Recompute each layer's activations in the backward pass (long inputs): "none", "full" (keep only
    # the layer inputs), "dots" or "dots_with_no_batch_dims" (keep matmul outputs; jax.checkpoint_policies)
    c.train.remat = "none"

    # Every method trains in cycles: one jitted program of `cycle.steps` optimizer steps, after which metrics are
    # logged and a checkpoint may be taken. Recurrent-KIF fuses at the end of each cycle: its Q.
    c.cycle = ml_collections.ConfigDict()
    c.cycle.steps = 8  # Q: optimizer steps per cycle (Recurrent-KIF: inner steps per fusion)

    # The memory buffer: examples of the earlier tasks kept for replay, drawn class-balanced from each earlier
    # task's full training file with `seed` (kif_jax/data/buffer.py). Recurrent-KIF's outer learner and Replay
    # replay the same examples.
    c.memory_buffer = ml_collections.ConfigDict()
    c.memory_buffer.ratio = 0.02  # share of every earlier task's training set kept for replay

    _add_method_sections(c)  # kif, o_lora, tasl, ewc, ...: kif_jax/methods/<method>.py

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 32  # test examples per decoding batch
    c.eval.max_examples_per_task = 0  # 0 = the whole test set
    c.eval.max_new_tokens = 8  # greedy decoding length (labels are a few tokens)
    # "generate": greedy decoding + exact match (the paper's metric, may produce no valid label);
    # "score": the label option with the highest log-likelihood (always a valid label; not faster: README, Speed)
    c.eval.mode = "generate"
    c.eval.all_tasks = False  # also evaluate unseen tasks (fills R above the diagonal; enables FWT)
    # Which split the accuracy matrix is measured on: "test" (the reported numbers) or "dev" (to choose
    # settings). "dev" leaves out every dev example whose input is among the evaluated test examples
    # (the benchmark's dev and test files overlap for several tasks), so a choice never reads them.
    c.eval.split = "test"
    # After which tasks each task is evaluated: "full" (after every task, each task seen so far: the whole
    # lower triangle) or "diagonal" (after each task only that task, after the last every task: OP, BWT and
    # learned exact for 2B - 1 evaluations instead of B(B+1)/2; Avg missing)
    c.eval.schedule = "full"

    c.logging = ml_collections.ConfigDict()
    # Progress lines (when stderr is not a terminal): one every this many steps; 0 = about 10 a task.
    c.logging.progress_every_steps = 0
    # TensorBoard event files in <workdir>/<method>/tensorboard/ (needs pip install -e ".[tracking]")
    c.logging.tensorboard = False
    c.logging.wandb_project = ""  # Weights & Biases project to log to ("" = off; needs the tracking extra)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 0  # also save within a task every this many steps (0 = task ends only)
    c.checkpoint.keep = 2  # checkpoints kept per method
    c.checkpoint.keep_task_ends = True  # also keep every task-end checkpoint (another order may start from one)
    # A workdir of the same config in a task order that begins as this one's: a method with no checkpoint of
    # its own starts from that run's checkpoint after the longest shared prefix of tasks (kif_jax/train/prefix.py)
    c.checkpoint.prefix_from = ""

    c.sharding = ml_collections.ConfigDict()
    # The device mesh (data, fsdp, tensor); kif_jax/sharding.py maps parameter axes onto it.
    c.sharding.num_devices = 0  # devices used; 0 = all devices
    c.sharding.data_parallelism = -1  # batch rows split, parameters replicated; -1 = the remaining devices
    c.sharding.fsdp_parallelism = 1  # batch rows split AND every state split on its hidden-size axis (FSDP)
    c.sharding.tensor_parallelism = 1  # Megatron-style: heads, MLP and vocabulary axes split
    return c


# Fields that moved, old name -> new name. A config file or a --config override may still use the old name: it
# sets the new field, with a one-line notice on stderr. The checkpoint fingerprint hashes the new fields under
# the old names (kif_jax/checkpointing.py), so runs made before the move still resume.
RENAMED_FIELDS: dict[str, str] = {
    "kif.inner_steps": "cycle.steps",
    "kif.memory_ratio": "memory_buffer.ratio",
}


def renamed_field_notice(old: str) -> str:
    """The one-line notice for a use of the renamed field `old`."""
    return f"warning: config field '{old}' is deprecated; it sets '{RENAMED_FIELDS[old]}' (use that name)"


def with_renamed_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config`, or a copy with each renamed field it sets moved to its new name (a notice on stderr for each)."""
    present = [old for old in RENAMED_FIELDS if _get(config, old) is not _ABSENT]
    if not present:
        return config
    config = copy.deepcopy(config)
    with config.unlocked():
        for old in present:
            print(renamed_field_notice(old), file=sys.stderr)
            section, _, leaf = old.rpartition(".")
            value = config[section][leaf]
            del config[section][leaf]
            new_section, _, new_leaf = RENAMED_FIELDS[old].rpartition(".")
            if new_section not in config:
                config[new_section] = ml_collections.ConfigDict()
            config[new_section][new_leaf] = value
    return config


_ABSENT = object()


def _get(config: ml_collections.ConfigDict, name: str) -> Any:
    node: Any = config
    for part in name.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _add_method_sections(c: ml_collections.ConfigDict) -> None:
    """Every built-in method's config section, in registry order."""
    for section, cls in sections().items():
        c[section] = cls.default_config()


def with_method_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config`, or a copy with the default section of every method of one's own named in `methods` that
    brings a section the config lacks (built-in sections are always in `base_config`)."""
    missing = {}
    for name in split_list(config.methods):
        cls = method_class(name)
        if cls.section and cls.section not in config and cls.default_config() is not None:
            missing[cls.section] = cls.default_config()
    if not missing:
        return config
    config = copy.deepcopy(config)
    with config.unlocked():
        for section, defaults in missing.items():
            config[section] = defaults
    return config


_CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16"),
    "model.trainable": ("lora", "all"),
    "model.prompt_template": ("none", "alpaca", "chat"),
    "eval.mode": ("generate", "score"),
    "eval.split": ("test", "dev"),
    "eval.schedule": ("full", "diagonal"),
    "model.tiny.feed_forward_proj": ("relu", "gated-gelu"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.prng_impl": ("rbg", "threefry"),
    "train.remat": ("none", "full", "dots", "dots_with_no_batch_dims"),
}
_POSITIVE_INTS = (
    "train.epochs", "train.batch_size", "train.micro_batch_size", "train.max_input_length",
    "train.max_target_length", "train.select_every_steps", "train.select_dev_examples",
    "eval.batch_size", "eval.max_new_tokens", "checkpoint.keep", "model.lora.rank", "cycle.steps",
)


def _flatten(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _schema(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The fields a config may have: `base_config()` and the sections of its methods of one's own."""
    schema = base_config()
    for name in split_list(config.methods) if isinstance(config.get("methods"), str) else ():
        try:
                    cls = method_class(name)
        except ConfigError:
            continue  # reported with the other method checks below
        if cls.section and cls.section not in schema and cls.default_config() is not None:
            schema[cls.section] = cls.default_config()
    return schema


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Check fields, types and ranges; raise ConfigError naming the first bad field."""
    known = _flatten(_schema(config))
    given = _flatten(config)
    for name in given:
        if name not in known:
            raise ConfigError(f"unknown config field '{name}'")
    for name in known:
        if name not in given:
            raise ConfigError(f"config field '{name}' is missing (start configs from kif_jax.config.base_config())")
    for name, default in known.items():
        value = given[name]
        if isinstance(default, bool) != isinstance(value, bool) or (
            isinstance(default, (int, float)) and not isinstance(value, (int, float))
        ) or (isinstance(default, str) and not isinstance(value, str)):
            raise ConfigError(f"config field '{name}' must be of type {type(default).__name__}, got {value!r}")
    for name, choices in _CHOICES.items():
        if given[name] not in choices:
            raise ConfigError(f"config field '{name}' is {given[name]!r}; expected one of {', '.join(choices)}")
    for name in _POSITIVE_INTS:
        if int(given[name]) < 1 or int(given[name]) != given[name]:
            raise ConfigError(f"config field '{name}' must be a positive integer, got {given[name]!r}")

    methods = split_list(config.methods)
    if not methods:
        raise ConfigError("config field 'methods' is empty")
    classes = [method_class(name) for name in methods]  # an unknown name is one line
    if len({cls.name for cls in classes}) != len(classes):
        raise ConfigError("config field 'methods' names a method twice")
    if not 0.0 < config.memory_buffer.ratio <= 1.0:
        raise ConfigError(f"config field 'memory_buffer.ratio' must lie in (0, 1], got {config.memory_buffer.ratio}")
    for name in ("train.lr", "model.lora.alpha"):
        if not (math.isfinite(given[name]) and given[name] > 0):
            raise ConfigError(f"config field '{name}' must be a positive number, got {given[name]}")
    if config.model.lora.dropout < 0 or config.model.lora.dropout >= 1:
        raise ConfigError(f"config field 'model.lora.dropout' must lie in [0, 1), got {config.model.lora.dropout}")
    if config.train.batch_size % config.train.micro_batch_size:
        raise ConfigError(f"config field 'train.batch_size' ({config.train.batch_size}) must be a multiple of "
                          f"train.micro_batch_size ({config.train.micro_batch_size})")
    for name in ("train.warmup_steps", "logging.progress_every_steps", "eval.max_examples_per_task", "train.max_examples_per_task", "checkpoint.every_steps",
                 "sharding.num_devices", "order"):
        if given[name] < 0:
            raise ConfigError(f"config field '{name}' must not be negative, got {given[name]}")
    axes = ("sharding.data_parallelism", "sharding.fsdp_parallelism", "sharding.tensor_parallelism")
    for name in axes:
        if given[name] == 0 or given[name] < -1:
            raise ConfigError(f"config field '{name}' must be a positive integer or -1, got {given[name]}")
    if sum(given[name] == -1 for name in axes) > 1:
        raise ConfigError(f"config fields {', '.join(n for n in axes if given[n] == -1)}: at most one may be -1")
    # Each method section's own checks (whether or not its method runs), then each selected method's.
    owners = dict(sections())
    for cls in classes:
        owners.setdefault(cls.section, cls)
    for section, cls in owners.items():
        if section in config:
            cls.validate_section(config)
    for cls in classes:
        cls.check_config(config)
    if not config.data_dir:
        raise ConfigError("config field 'data_dir' is empty: give a benchmark directory or 'synthetic'")
    if config.data_dir != SYNTHETIC_DATA and not pathlib.Path(config.data_dir).is_dir():
        raise ConfigError(f"config field 'data_dir': directory {config.data_dir} does not exist (set "
                          f"--config.data_dir or ${DATA_DIR_ENV}; without either, configs read ../shared/cl_benchmark "
                          f"beside the checkout)")
    if not (config.tasks or config.order or config.benchmark):
        raise ConfigError("no tasks: set config field 'tasks', 'order' or 'benchmark'")
    if config.model.trainable == "lora" and not split_list(config.model.lora.targets):
        raise ConfigError("config field 'model.lora.targets' is empty")
    if config.eval.schedule == "diagonal" and config.eval.all_tasks:
        raise ConfigError("config field 'eval.schedule' is 'diagonal' (after each task only that task) but "
                          "eval.all_tasks asks for every task after every task; set one of them")
    fmt = run_format(config)  # an unknown format is one line
    if config.eval.mode == "score" and not fmt.has_options:
        raise ConfigError(f"config field 'eval.mode' is 'score' (rank the label options), but task format "
                          f"'{fmt.name}' has no label options; use eval.mode=generate")


def field_docs() -> dict[str, str]:
    """Each config field's one-line doc: the comment on its line in `base_config` (or in its method
    section's `default_config`), else the comment above it."""
    docs = _source_docs(base_config, "")
    for section, cls in sections().items():
        docs.update(_source_docs(cls.default_config, section + "."))
    return docs


def _source_docs(fn: Any, prefix: str) -> dict[str, str]:
    docs: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(fn).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        match = re.match(r"c\.([\w.]+) = (.*?)(?:\s+#\s*(.*))?$", stripped)
        if match and not match.group(2).startswith("ml_collections.ConfigDict"):
            docs[prefix + match.group(1)] = _first_sentence(match.group(3) or " ".join(above))
        elif match and match.group(3):
            docs[prefix + match.group(1)] = match.group(3)
        above = []
    return docs


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[a-z)\]])\. ", text, maxsplit=1)[0].rstrip(".")


def describe_config(config: ml_collections.ConfigDict) -> str:
    """The resolved config, one `field = value  # doc` line per field, in schema order."""
    docs = field_docs()
    values = _flatten(config)
    width = max(len(f"{k} = {v!r}") for k, v in values.items())
    return "\n".join(f"{f'{k} = {v!r}'.ljust(width)}  # {docs.get(k, '')}".rstrip(" #") for k, v in values.items())


def closest_field(name: str) -> str | None:
    """The known field nearest to a mistyped one (difflib), for 'did you mean'."""
    import difflib

    match = difflib.get_close_matches(name, list(_flatten(base_config())), n=1, cutoff=0.6)
    return match[0] if match else None


def known_field(name: str) -> bool:
    """Whether `name` (dotted) is a field or a section of the schema."""
    fields = _flatten(base_config())
    return name in fields or any(f.startswith(name + ".") for f in fields)
