"""The interface of a continual-learning method: what the task loop and the jitted programs ask of it.

A method has two halves:

- `Method` (host side, one instance per run and method): its config section and checks, how the tasks
  are grouped into training phases and which data a phase trains on, the state it adds to the training
  state (`TrainState.method`, a pytree that is checkpointed, sharded and counted by the memory plan with
  the rest), the program of each cycle, its task-start and task-end work, and the statistics it logs.
- `Program` (traced side, a frozen dataclass): one jitted training program. `inner_steps` optimizer
  steps on the current task's batches (a cycle: `cycle.steps` of them, fewer at a task's end), plus whatever the method changes in a step (the parameters the
  model sees, a loss term, the gradient, the update, state updated after the update) or adds to the
  cycle (Recurrent-KIF's outer learner and fusion). Programs are static under `jax.jit`: equal programs
  share one compiled XLA program, whichever method made them.

The defaults are SeqLoRA: one LoRA (or every parameter) trained on the tasks in order, no extra state.
A new method subclasses both and overrides what differs (docs/adding_a_method.md).

The training side (kif_jax/train/) hands a method two objects it never imports:
- `trainer` (`kif_jax.train.steps.Programs`) inside programs: `step`, `scan_steps`, `accumulated_grads`,
  `apply`, `clip`, `key`, `constrain`, `tx`, `max_grad_norm`, `mesh`;
- `task` (`kif_jax.train.task.TaskContext`) in host hooks: `phase`, `phases`, `config`, `data`, `frozen`,
  `init_params`, `train_set`, `steps`, `earlier_tasks`, `stack`, `run`, `write`, `head`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections

INNER_STREAM, OUTER_STREAM, STATIC_STREAM = 0, 1, 2  # dropout key streams, so no two steps share a key


class Learner(NamedTuple):
    """Which learner a step serves, for programs with more than one (traced or static values).

    `outer`: a replay (outer) step rather than a current-task (inner) step; `index`: the outer step's
    index within its cycle. One scan body serves both kinds, so the model's backward pass is compiled
    once per cycle.
    """

    outer: Any
    index: Any


def where_tree(cond: jax.Array, new: Any, old: Any) -> Any:
    """`new` where `cond` holds, else `old`, leaf by leaf."""
    return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every leaf is finite, bool []."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted training program: `inner_steps` optimizer steps on stacked current-task batches.

    Every hook is traced inside the program; `trainer` is `kif_jax.train.steps.Programs`.
    """

    inner_steps: int
    #: The step also returns, per trainable tensor, the summed |output| of the layer feature each of its
    #: last-axis slices produces (LoRA A: its r outputs; B and kernels: the layer's outputs); see
    #: `kif_jax.models.layers.capture_output_magnitudes`. Only programs that read them pay for them.
    capture_magnitudes: ClassVar[bool] = False
    #: Which positions those sums count: "authors" those a collator that pads each micro-batch to its longest
    #: row would give the model (the family's `position_weights`: no bucket padding beyond that row, no filler
    #: rows), "all" every position of kif_jax's padded batch. A program may make it a field of its own.
    magnitude_positions: ClassVar[str] = "authors"
    #: Appended to the "compiling a training cycle of N steps" progress line.
    label: ClassVar[str] = ""

    # --- one optimizer step -------------------------------------------------------------------
    def model_params(self, method_state: Any, params: Any) -> Any:
        """The trainable tree the model runs with (O-LoRA adds its frozen branch); only `params` is differentiated."""
        return params

    @property
    def penalised(self) -> bool:
        """Whether the loss has a term besides the cross-entropy (`penalty`)."""
        return False

    def penalty(self, params: Any, method_state: Any) -> jax.Array:
        """The loss term besides the cross-entropy, float32 [] (added once per step, not per micro-batch).

        Called only when `penalised` is True; a program that says so defines it."""
        raise NotImplementedError(f"{type(self).__name__} sets `penalised` but defines no `penalty`")

    def step_key(self, trainer: Any, state: Any, learner: Learner | None) -> jax.Array:
        """The dropout key of a step."""
        return trainer.key(state, INNER_STREAM, state.step)

    def transform_grads(self, trainer: Any, state: Any, grads: Any, learner: Learner | None,
                        magnitudes: Any) -> Any:
        """The gradient the optimizer sees (masks, scaling); `magnitudes` with `capture_magnitudes`, else None."""
        return grads

    def update(self, trainer: Any, state: Any, grads: Any, lr: jax.Array,
               learner: Learner | None) -> tuple[Any, jax.Array]:
        """The optimizer update: (the state with new params and optimizer state, the learning rate used)."""
        params, opt_state = trainer.apply(grads, state.opt_state, state.params, lr)
        return state.replace(params=params, opt_state=opt_state), lr

    def after_update(self, trainer: Any, before: Any, after: Any, grads: Any, learner: Learner | None) -> Any:
        """State the method updates from the step (importance EMAs); returns the new state."""
        return after

    def counts_as_step(self, learner: Learner | None) -> Any:
        """1 where the step advances the task's step count (and learning-rate schedule), else 0."""
        return 1

    # --- the program --------------------------------------------------------------------------
    def run(self, trainer: Any, state: Any, frozen: Any, inner: Any, extra: Any) -> tuple[Any, dict]:
        """The whole program; `extra` holds the method's own stacked batches (None without)."""
        state, metrics = trainer.scan_steps(self, state, frozen, inner)
        return state, {f"inner_{k}": v for k, v in metrics.items()}


class Method:
    """A continual-learning method over a task sequence (host side); the defaults are SeqLoRA."""

    #: The name in `config.methods` and of the run directory.
    name: ClassVar[str] = ""
    #: The config section this method reads its settings from (variants of one method share it), or None.
    section: ClassVar[str | None] = None
    #: Other methods' sections this one reads too. Its checkpoints ignore all other methods' sections; the sections
    #: of no method (`cycle`, `memory_buffer`, `train`, ...) are every method's.
    shared_sections: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        self.config = config

    # --- config -------------------------------------------------------------------------------
    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict | None:
        """The defaults of `section` (each field with a comment: `--print_config` shows it)."""
        return None

    @classmethod
    def validate_section(cls, config: ml_collections.ConfigDict) -> None:
        """Raise `ConfigError` naming the field for a bad value of `section` (run whenever it is present)."""

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        """Raise `ConfigError` for a config this method cannot run with (run when it is in `methods`)."""

    # --- the task sequence and its data -------------------------------------------------------
    def phases(self, tasks: Sequence[str]) -> list[list[str]]:
        """The training phases: the tasks trained together, in order (one per task by default)."""
        return [[t] for t in tasks]

    def train_data(self, data: Any, phase: int, phases: list[list[str]]) -> Any:
        """The tokenized training set of a phase (`data`: `kif_jax.train.data.RunData`)."""
        return data.train_set(phases[phase])

    def steps_per_program(self) -> int:
        """Optimizer steps per jitted program, which is also how often metrics are logged and a
        checkpoint can be taken: `cycle.steps` for every method, so all log at the same granularity."""
        return int(self.config.cycle.steps)

    # --- state --------------------------------------------------------------------------------
    def task_params(self, phase: int, params: Any, init_params: Any) -> Any:
        """The trainable parameters task `phase` starts from (`params`: where the last task ended)."""
        return params

    def init_state(self, phase: int, params: Any, *, tx: Any) -> Any:
        """The method's part of a fresh training state of task `phase` (a pytree; () for none).

        It is also the template a checkpoint of that task is restored into, so its structure may
        depend on the phase but not on values.
        """
        return ()

    def carry_state(self, prev: Any, fresh: Any, *, reset: bool) -> Any:
        """The method's state at a task boundary from the finished task's whole state `prev`.

        `reset` is `train.reset_at_task_boundary`: True restarts what the reference restarts per task.
        """
        return fresh

    def memory_parts(self, method_state: Any) -> dict[str, Any]:
        """The method state split into the memory plan's parts: "optimizer", "importance", "method_state"."""
        return {"method_state": method_state}

    def largest_state_phase(self, num_phases: int) -> int:
        """The phase whose state is largest, which the memory plan sizes."""
        return 0

    def eval_params(self, state: Any) -> Any:
        """The trainable tree evaluation runs with."""
        return state.params

    # --- programs and hooks -------------------------------------------------------------------
    def cycle(self, task: Any, step: int, steps: int) -> tuple[Program, list[dict]]:
        """The program of the cycle of `steps` optimizer steps that starts at `step` of the task, and
        the host batches of the method's own (its `extra`; [] for none)."""
        return Program(inner_steps=steps), []

    def on_task_start(self, task: Any, state: Any) -> Any:
        """Work when a task starts fresh (not on resuming it); returns the state."""
        return state

    def on_task_end(self, task: Any, state: Any) -> Any:
        """Work when a task's training ends, before it is evaluated and checkpointed; returns the state."""
        return state

    def log_cycle(self, task: Any, out: dict, step: int, steps: int) -> tuple[dict, list[dict]]:
        """From a cycle's fetched metrics: fields for its metrics.jsonl record, and further records."""
        return {}, []
