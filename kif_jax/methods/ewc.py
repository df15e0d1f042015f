"""EWC (Kirkpatrick et al. 2017, PNAS 114(13)), as the TRACE benchmark's LLM code runs it
(BeyonderXX/TRACE @ 462e39f, model/Regular/EWC.py); the audit table in docs/baselines.md is the item-by-item audit.

Default, `ewc.fisher = "trace"` (TRACE's form): the Fisher is accumulated DURING training. After every
optimizer step of every task (the first included), F += g^2 / S, where g is the step's gradient of the
cross-entropy as the optimizer receives it (before clipping; with the step's dropout; averaged over its
micro-batches) and S = the optimizer steps of one epoch (TRACE divides by len(dataloader) and never by the
epochs: F = epochs x mean g^2). F is never reset: it sums over tasks, and the penalty of task k already uses
the part of task k's own F accumulated so far (TRACE keeps one Fisher dict, updated after each step and read
by the next). theta* = the parameters at the latest task end. From the second task on, every step adds
(ewc.lambda_ / 2) * sum F (theta - theta*)^2 to its loss (once a step, before clipping). A step the trainer
gates off as non-finite adds nothing to F.

`ewc.fisher = "task_end"` (the classic form; kif_jax's earlier default, kept as a switch for comparison):
at each task end, F += the mean over ewc.fisher_batches (8) batches of train.batch_size examples of the
task's training set (numpy rng seeded (config.seed, task, EWC stream)) of the squared gradient of the
batch's mean token loss, without dropout; a non-finite batch is left out. The same penalty, theta*.

Where we differ from TRACE (reasons in the audit table in docs/baselines.md):
- g leaves out the penalty's gradient by default. TRACE's gradient hook sees cross-entropy + penalty, so its
  F feeds on itself (F += s (g_ce + lambda F (theta - theta*))^2): negligible at TRACE's lambda x lr
  (400 x 1e-5), a runaway at this benchmark's (on the tiny test config at lambda 5000, mean F reached 3e10
  within 4 steps). `ewc.fisher_penalty_grad = True` is TRACE's literal form.
- g is the gradient of the whole step: TRACE squares each micro-batch's gradient, which DeepSpeed has divided
  by the accumulation steps, so its F shrinks with accumulation; with one micro-batch a step, as in
  configs/smollm2_standard.py, the two agree.
- F is float32, and kif_jax regularises the trainable tree (LoRA factors) where TRACE fine-tunes every weight.

`ewc.lambda_` (`lambda` is a Python keyword, which ml_collections cannot parse in a --config override):
TRACE's default is 400 for its own F scale (full fine-tuning of LLaMA-2-7B, micro-batches of 2, 8
accumulation steps: F = epochs / 64 x mean micro-batch g^2), which does not carry over; kif_jax's value is
to be chosen on dev data by a rule fixed before the choice (docs/experiments.md).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from kif_jax.data.batching import sample_batch
from kif_jax.errors import ConfigError
from kif_jax.methods.base import Learner, Method, Program, all_finite

F32 = jnp.float32
EWC_FISHER_STREAM = 2**31 - 2  # numpy seed word for the batches of EWC's Fisher estimate ("task_end")
FISHER_FORMS = ("trace", "task_end")


def ewc_config() -> ml_collections.ConfigDict:
    """The `ewc` section."""
    c = ml_collections.ConfigDict()
    # Penalty weight: (lambda_ / 2) sum F (theta - theta*)^2 (TRACE's 0.5 * lambda). To be chosen on dev data
    # (TRACE's 400 belongs to its F scale). The trailing underscore: `lambda` is a Python keyword, which
    # ml_collections cannot parse in --config.ewc.lambda=...
    c.lambda_ = 5000.0
    # "trace": F += g^2 / (steps per epoch) after every training step (TRACE's EWC.py); "task_end": F from
    # ewc.fisher_batches fresh batches at each task end, without dropout (the classic form).
    c.fisher = "trace"
    c.fisher_batches = 8  # "task_end" only: training batches of a task whose squared gradients give its Fisher
    # "trace" only: F squares the gradient of the cross-entropy alone (False, ours) or of cross-entropy + penalty
    # as TRACE's hook sees it (True). With the penalty's gradient lambda F (theta - theta*) in it, F feeds on
    # itself and runs away at this benchmark's lambda x lr; TRACE's 400 x 1e-5 keeps that term negligible.
    c.fisher_penalty_grad = False
    return c


def ewc_penalty(params: Any, star: Any, fisher: Any, *, lam: float) -> jax.Array:
    """(lam / 2) * sum F (theta - theta*)^2, in float32."""
    terms = jax.tree.map(lambda p, s, f: jnp.sum(f.astype(F32) * jnp.square(p.astype(F32) - s.astype(F32))),
                         params, star, fisher)
    return jnp.float32(lam / 2) * sum(jax.tree.leaves(terms), jnp.zeros((), F32))


def fisher_mean(fisher: Any) -> jax.Array:
    """The mean of F over every element, float32 []."""
    leaves = jax.tree.leaves(fisher)
    return sum(jnp.sum(f) for f in leaves) / sum(f.size for f in leaves)


@struct.dataclass
class EwcState:
    """EWC's part of the training state."""

    fisher: Any  # the diagonal Fisher summed over the tasks so far (float32)
    star: Any  # the parameters at the latest task end


@dataclasses.dataclass(frozen=True)
class EwcProgram(Program):
    """SeqLoRA steps with the quadratic penalty (`lam` > 0) and/or the Fisher accumulated after every step
    (`fisher_scale` > 0: F += fisher_scale * g^2, g the step's gradient before clipping, less the penalty's
    unless `fisher_penalty_grad`)."""

    lam: float = 0.0
    fisher_scale: float = 0.0
    fisher_penalty_grad: bool = False  # F from the gradient with the penalty's (TRACE's hook) or without

    @property
    def penalised(self) -> bool:
        return bool(self.lam)

    def penalty(self, params: Any, ewc: EwcState) -> jax.Array:
        # The zero term keeps the arithmetic of the earlier one-penalty-for-all code: 0 + x.
        return jnp.zeros((), F32) + ewc_penalty(params, ewc.star, ewc.fisher, lam=self.lam)

    def after_update(self, trainer: Any, before: Any, after: Any, grads: Any, learner: Learner | None) -> Any:
        if not self.fisher_scale:
            return after
        if self.penalised and not self.fisher_penalty_grad:  # the step's gradient less the penalty's, as added
            grads = jax.tree.map(jnp.subtract, grads, jax.grad(self.penalty)(before.params, before.method))
        scale = jnp.float32(self.fisher_scale)
        fisher = jax.tree.map(lambda f, g: f + scale * jnp.square(g.astype(F32)), before.method.fisher, grads)
        return after.replace(method=after.method.replace(fisher=trainer.constrain(fisher)))


@dataclasses.dataclass(frozen=True)
class FisherUpdate:
    """"task_end": F += the mean over K batches [K, A, mb, L] of the squared gradient of the batch's mean
    token loss (no dropout; non-finite batches left out); theta* = the parameters."""

    def run(self, trainer: Any, state: Any, frozen: Any, batches: Any, extra: Any) -> tuple[Any, dict]:
        plain = Program(inner_steps=0)

        def body(carry, batch):
            total, count = carry
            loss, grads, _ = trainer.accumulated_grads(plain, state.params, state.method, frozen, batch, None)
            ok = jnp.isfinite(loss) & all_finite(grads)
            total = jax.tree.map(lambda t, g: t + jnp.where(ok, jnp.square(g.astype(F32)), 0.0), total, grads)
            return (trainer.constrain(total), count + ok.astype(jnp.int32)), None

        zeros = trainer.constrain(jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), F32), state.params))
        (total, count), _ = jax.lax.scan(body, (zeros, jnp.int32(0)), batches)
        fisher = jax.tree.map(lambda f, t: f + t / jnp.maximum(count, 1), state.method.fisher, total)
        stats = {"fisher_batches": count, "fisher_mean": fisher_mean(fisher)}
        return state.replace(method=EwcState(fisher=fisher, star=jax.tree.map(jnp.copy, state.params))), stats


@dataclasses.dataclass(frozen=True)
class SetAnchor:
    """"trace": at a task end, theta* = the parameters (F was accumulated during the task)."""

    def run(self, trainer: Any, state: Any, frozen: Any, batches: Any, extra: Any) -> tuple[Any, dict]:
        star = jax.tree.map(jnp.copy, state.params)
        return state.replace(method=state.method.replace(star=star)), {"fisher_mean": fisher_mean(state.method.fisher)}


class EWC(Method):
    """A diagonal Fisher (accumulated over training steps, or at task ends); a quadratic penalty on later tasks."""

    name = "ewc"
    section = "ewc"
    default_config = staticmethod(ewc_config)

    @classmethod
    def validate_section(cls, config: ml_collections.ConfigDict) -> None:
        e = config.ewc
        if not (math.isfinite(e.lambda_) and e.lambda_ >= 0):
            raise ConfigError(f"config field 'ewc.lambda_' must be a non-negative number, got {e.lambda_}")
        if e.fisher not in FISHER_FORMS:
            raise ConfigError(f"config field 'ewc.fisher' must be one of {FISHER_FORMS}, got {e.fisher!r}")
        if not isinstance(e.fisher_penalty_grad, bool):
            raise ConfigError("config field 'ewc.fisher_penalty_grad' must be true or false, "
                              f"got {e.fisher_penalty_grad!r}")
        if int(e.fisher_batches) < 1 or int(e.fisher_batches) != e.fisher_batches:
            raise ConfigError(f"config field 'ewc.fisher_batches' must be a positive integer, got {e.fisher_batches!r}")

    def init_state(self, phase: int, params: Any, *, tx: Any) -> EwcState:
        return EwcState(fisher=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), F32), params),
                        star=jax.tree.map(jnp.copy, params))

    def carry_state(self, prev: Any, fresh: EwcState, *, reset: bool) -> EwcState:
        return prev.method  # the Fisher sum and theta* of the earlier tasks

    def fisher_scale(self, task: Any) -> float:
        """"trace": 1 / (optimizer steps of one epoch), TRACE's 1 / len(dataloader); "task_end": 0."""
        if self.config.ewc.fisher != "trace":
            return 0.0
        return float(self.config.train.epochs) / max(int(task.steps), 1)

    def cycle(self, task: Any, step: int, steps: int) -> tuple[Program, list[dict]]:
        lam = 0.0 if task.phase == 0 else float(self.config.ewc.lambda_)  # TRACE: no penalty on the first task
        scale = self.fisher_scale(task)
        if not (lam or scale):
            return Program(inner_steps=steps), []
        return EwcProgram(inner_steps=steps, lam=lam, fisher_scale=scale,
                          fisher_penalty_grad=bool(scale) and bool(self.config.ewc.fisher_penalty_grad)), []

    def on_task_end(self, task: Any, state: Any) -> Any:
        c = self.config
        if c.ewc.fisher == "trace":
            state, stats = task.run(SetAnchor(), state)
            task.write({"event": "ewc_fisher", **task.head(), "fisher": "trace", "fisher_steps": int(task.steps),
                        "fisher_mean": float(stats["fisher_mean"])})
            return state
        rng = np.random.default_rng([c.seed, task.phase, EWC_FISHER_STREAM])
        draws = [sample_batch(task.train_set, c.train.batch_size, rng) for _ in range(c.ewc.fisher_batches)]
        state, stats = task.run(FisherUpdate(), state, task.stack(draws))
        task.write({"event": "ewc_fisher", **task.head(), "fisher": "task_end",
                    "fisher_batches": int(stats["fisher_batches"]), "fisher_mean": float(stats["fisher_mean"])})
        return state


METHODS = (EWC,)
