"""O-LoRA (Wang et al. 2023; the authors' code cmnfriend/O-LoRA @ 07117e1, audited item by item in docs/baselines.md).

Every adapted projection has a frozen "old" branch (all earlier tasks' factors side by side:
A [in, r_sum], B [r_sum, out]; peft's A rows are our A columns) and a trained "new" branch (rank r). The
layer is given their concatenation, so it computes W x + s B_old A_old x + s B_new A_new x with one
dropout mask and one scale s = alpha / r (also over r_sum). Loss = CE + o_lora.lambda1 * sum over
modules of sum |A_old A_new^T| + o_lora.lambda2 * sum of the Frobenius norms (not squared) of the new A
and B tensors (defaults 0.5 and 0, the authors' T5 scripts), added once per optimizer step (DeepSpeed
scales the whole loss by 1/accumulation) before clipping and AdamW. At each task end new joins old
([old | new]); the next task starts a fresh new branch and a fresh AdamW. Inference: base + old + new.
LoRA only.

`o_lora.lr_schedule`: "shared" (default) is kif_jax's one schedule for every method (linear warm-up and
decay); "authors" is what the authors' DeepSpeed config runs: WarmupLR from 0 to `train.lr` over
max(2, `train.warmup_steps`) log steps, after a first step at `train.lr` (so with their 0 warm-up steps:
lr, 0, lr, lr, ...). The authors' other settings are the shared fields `train.lr` 1e-3, `train.epochs`
1, `train.batch_size` 64, `train.warmup_steps` 0 and `model.lora.dropout` 0.1.

Readings that are ours: task 1's new branch is the model's own LoRA initialisation (as every method's
task 1); later branches draw A ~ U(-1/sqrt(in), 1/sqrt(in)) (peft's kaiming-uniform, a = sqrt(5)) from
(config.seed, task index, the projection's path), B = 0; the norm's gradient at 0 is 0 (B starts at 0;
PyTorch's convention); the logged `loss` is the cross-entropy, the penalty is logged as `penalty`.

Layouts are kif_jax's: a LoRA factor `lora_a` is [in, r] and `lora_b` is [r, out] (peft stores A as
[r, in]), so peft's A_old A_new^T ([r_old, r]) is A_old^T A_new here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from kif_jax.core.tree import path_names
from kif_jax.errors import ConfigError
from kif_jax.methods.base import Method, Program
from kif_jax.models.layers import init_lora_state

F32 = jnp.float32


def o_lora_config() -> ml_collections.ConfigDict:
    """The `o_lora` section (the authors' code defaults)."""
    c = ml_collections.ConfigDict()
    c.lambda1 = 0.5  # weight of the orthogonality loss sum |A_old A_new^T| (from task 2 on)
    c.lambda2 = 0.0  # weight of the new branch's summed Frobenius norms
    # "shared": every method's schedule (train.warmup_steps linear warm-up, linear decay to 0); "authors":
    # DeepSpeed's WarmupLR as the authors' scripts run it (first step at train.lr, then log warm-up from 0
    # over max(2, train.warmup_steps) steps, then constant train.lr)
    c.lr_schedule = "shared"
    return c


LR_SCHEDULES = ("shared", "authors")


def authors_lr(step: jax.Array, *, peak: float, warmup: int) -> jax.Array:
    """The learning rate of the authors' step `step` (0-based in the task): DeepSpeed 0.10's WarmupLR with
    warmup_min_lr 0, warmup_max_lr `peak`, warmup_num_steps `warmup` (their Hugging Face Trainer fills the
    "auto" fields so), log warm-up. Its steps count from 2 at least, and the scheduler first sets a rate
    after the first optimizer step, which runs at the optimizer's own rate `peak`: step s >= 1 runs at
    peak * min(1, log(s) / log(max(2, warmup))), so step 1 runs at 0 whatever the warm-up."""
    s = step.astype(F32)
    gamma = jnp.minimum(1.0, jnp.log(jnp.maximum(s, 1.0)) / math.log(max(2, int(warmup))))
    return jnp.where(step == 0, jnp.float32(peak), jnp.float32(peak) * gamma)


def _factor(path: Any) -> str:
    names = path_names(path)
    return names[-1] if names else ""


def lora_concat(old: Any, new: Any) -> Any:
    """The branches side by side: A = [A_old | A_new] ([in, r_old + r]), B = [B_old ; B_new] ([r_old + r, out]).

    x A B = x A_old B_old + x A_new B_new, so a LoRA layer given the concatenation computes both branches
    with one dropout mask and one scale (O-LoRA's forward). `old` may be () (no earlier task): `new`.
    """
    if not jax.tree.leaves(old):
        return new

    def cat(path: Any, a: jax.Array, b: jax.Array) -> jax.Array:
        kind = _factor(path)
        if kind not in ("lora_a", "lora_b"):
            raise ValueError(f"O-LoRA branches hold LoRA factors only, got a leaf {'.'.join(path_names(path))}")
        return jnp.concatenate([a, b.astype(a.dtype)], axis=1 if kind == "lora_a" else 0)

    return jax.tree_util.tree_map_with_path(cat, old, new)


def lora_zeros(new: Any, tasks: int) -> Any:
    """Zeros shaped like an old branch of `tasks` branches of `new`'s rank: A [in, tasks r], B [tasks r, out]."""

    def zeros(path: Any, x: jax.Array) -> jax.Array:
        shape = list(jnp.shape(x))
        shape[1 if _factor(path) == "lora_a" else 0] *= tasks
        return jnp.zeros(shape, x.dtype)

    return jax.tree_util.tree_map_with_path(zeros, new)


def orthogonality_loss(old: Any, new: Any) -> jax.Array:
    """O-LoRA's O: sum over adapted modules of sum_ij |(A_old^T A_new)_ij| (peft's |A_old A_new^T|); 0 without `old`."""
    if not jax.tree.leaves(old):
        return jnp.zeros((), F32)
    flat_old, treedef = jax.tree_util.tree_flatten_with_path(old)
    total = jnp.zeros((), F32)
    for (path, a_old), a_new in zip(flat_old, treedef.flatten_up_to(new)):
        if _factor(path) == "lora_a":
            prod = jnp.dot(a_old.astype(F32).T, a_new.astype(F32), precision=jax.lax.Precision.HIGHEST)
            total = total + jnp.sum(jnp.abs(prod))
    return total


def _safe_norm(x: jax.Array) -> jax.Array:
    """Frobenius norm whose gradient at 0 is 0 (PyTorch's), not 0/0 (B starts at zero)."""
    ss = jnp.sum(jnp.square(x.astype(F32)))
    positive = ss > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, ss, 1.0)), 0.0)


def l2_loss(new: Any) -> jax.Array:
    """O-LoRA's L2: sum over the new branch's tensors (every A and B) of their Frobenius norm (not squared)."""
    return sum((_safe_norm(x) for x in jax.tree.leaves(new)), jnp.zeros((), F32))


def o_lora_loss(old: Any, new: Any, *, lambda1: float, lambda2: float) -> jax.Array:
    """lambda1 * O + lambda2 * L2, the term O-LoRA adds to the cross-entropy (static zeros skip their term)."""
    total = jnp.zeros((), F32)
    if lambda1:
        total = total + jnp.float32(lambda1) * orthogonality_loss(old, new)
    if lambda2:
        total = total + jnp.float32(lambda2) * l2_loss(new)
    return total


@dataclasses.dataclass(frozen=True)
class OLoRAProgram(Program):
    """Steps on the new branch beside the frozen old one, with O-LoRA's loss terms."""

    lambda1: float = 0.0
    lambda2: float = 0.0
    authors_schedule: bool = False  # o_lora.lr_schedule == "authors"

    def model_params(self, old: Any, params: Any) -> Any:
        return lora_concat(old, params)

    @property
    def penalised(self) -> bool:
        return bool(self.lambda1 or self.lambda2)

    def penalty(self, params: Any, old: Any) -> jax.Array:
        return o_lora_loss(old, params, lambda1=self.lambda1 if jax.tree.leaves(old) else 0.0, lambda2=self.lambda2)

    def update(self, trainer: Any, state: Any, grads: Any, lr: jax.Array, learner: Any) -> tuple[Any, jax.Array]:
        if self.authors_schedule:
            lr = authors_lr(state.step, peak=trainer.lr, warmup=trainer.warmup_steps)
        return super().update(trainer, state, grads, lr, learner)


class OLoRA(Method):
    """A frozen old branch (`TrainState.method`) and a trained new branch per task."""

    name = "o_lora"
    section = "o_lora"
    default_config = staticmethod(o_lora_config)

    @classmethod
    def validate_section(cls, config: ml_collections.ConfigDict) -> None:
        for name in ("lambda1", "lambda2"):
            value = config.o_lora[name]
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"config field 'o_lora.{name}' must be a non-negative number, got {value}")
        if config.o_lora.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"config field 'o_lora.lr_schedule' must be one of {', '.join(LR_SCHEDULES)}, "
                              f"got {config.o_lora.lr_schedule!r}")

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        if config.model.trainable != "lora":
            raise ConfigError(f"method 'o_lora' trains per-task LoRA branches: it needs config field "
                              f"'model.trainable' = 'lora', got {config.model.trainable!r}")

    def task_params(self, phase: int, params: Any, init_params: Any) -> Any:
        # Every task after the first trains a fresh branch.
        return init_lora_state(init_params, self.config.seed, stream=(phase,)) if phase >= 1 else params

    def init_state(self, phase: int, params: Any, *, tx: Any) -> Any:
        return lora_zeros(params, phase) if phase >= 1 else ()  # shaped as task `phase`'s old branch

    def carry_state(self, prev: Any, fresh: Any, *, reset: bool) -> Any:
        return lora_concat(prev.method, prev.params)  # the finished task's branch joins the old one

    def largest_state_phase(self, num_phases: int) -> int:
        return num_phases - 1  # the old branch grows with every task

    def eval_params(self, state: Any) -> Any:
        return lora_concat(state.method, state.params)  # base + old + new

    def cycle(self, task: Any, step: int, steps: int) -> tuple[Program, list[dict]]:
        o = self.config.o_lora
        lambda1 = float(o.lambda1) if task.phase >= 1 else 0.0
        authors_schedule = o.lr_schedule == "authors"
        if task.phase == 0 and not o.lambda2 and not authors_schedule:
            return Program(inner_steps=steps), []  # no old branch, no loss term: SeqLoRA
        return OLoRAProgram(inner_steps=steps, lambda1=lambda1, lambda2=float(o.lambda2),
                            authors_schedule=authors_schedule), []


METHODS = (OLoRA,)
