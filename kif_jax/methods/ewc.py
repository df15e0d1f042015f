"""EWC (Kirkpatrick et al. 2017, standard form; none of the three reference codebases implements it).

At each task end, F = the mean over ewc.fisher_batches (8) batches of train.batch_size examples of that
task's training set, drawn with a numpy rng seeded (config.seed, task, EWC stream), of the squared
gradient of the batch's mean token loss (no dropout; micro-batches averaged as in a training step; a
non-finite batch is left out). F is summed over tasks and theta* is the parameters at the latest task
end; every later task adds (ewc.lambda_ / 2) * sum F (theta - theta*)^2 to its loss (`lambda_`: `lambda`
is a Python keyword, which ml_collections cannot parse in a --config override).

ewc.lambda_ = 5000 is our choice, neither tuned nor measured on the benchmark: by our estimate,
batch-mean gradients make F of order 1e-8..1e-6 per LoRA element, so lambda in the thousands is what
lets the penalty reach the order of the cross-entropy for the drifts a task causes (1e-3..1e-2 per
element).
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
from kif_jax.methods.base import Method, Program, all_finite

F32 = jnp.float32
EWC_FISHER_STREAM = 2**31 - 2  # numpy seed word for the batches of EWC's Fisher estimate


def ewc_config() -> ml_collections.ConfigDict:
    """The `ewc` section."""
    c = ml_collections.ConfigDict()
    # Penalty weight: (lambda_ / 2) sum F (theta - theta*)^2; our choice (kif_jax/methods/ewc.py). The trailing
    # underscore: `lambda` is a Python keyword, which ml_collections cannot parse in --config.ewc.lambda=...
    c.lambda_ = 5000.0
    c.fisher_batches = 8  # training batches of a task whose squared gradients give its Fisher
    return c


def ewc_penalty(params: Any, star: Any, fisher: Any, *, lam: float) -> jax.Array:
    """(lam / 2) * sum F (theta - theta*)^2, in float32."""
    terms = jax.tree.map(lambda p, s, f: jnp.sum(f.astype(F32) * jnp.square(p.astype(F32) - s.astype(F32))),
                         params, star, fisher)
    return jnp.float32(lam / 2) * sum(jax.tree.leaves(terms), jnp.zeros((), F32))


@struct.dataclass
class EwcState:
    """EWC's part of the training state."""

    fisher: Any  # the summed diagonal Fisher of the earlier tasks (float32)
    star: Any  # the parameters at the latest task end


@dataclasses.dataclass(frozen=True)
class EwcProgram(Program):
    """SeqLoRA steps with the quadratic penalty."""

    lam: float = 0.0

    @property
    def penalised(self) -> bool:
        return bool(self.lam)

    def penalty(self, params: Any, ewc: EwcState) -> jax.Array:
        # The zero term keeps the arithmetic of the earlier one-penalty-for-all code: 0 + x.
        return jnp.zeros((), F32) + ewc_penalty(params, ewc.star, ewc.fisher, lam=self.lam)


@dataclasses.dataclass(frozen=True)
class FisherUpdate:
    """At a task end: F += the mean over K batches [K, A, mb, L] of the squared gradient of the batch's
    mean token loss (no dropout; non-finite batches left out); theta* = the parameters."""

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
        leaves = jax.tree.leaves(fisher)
        stats = {"fisher_batches": count, "fisher_mean": sum(jnp.sum(f) for f in leaves) / sum(f.size for f in leaves)}
        return state.replace(method=EwcState(fisher=fisher, star=jax.tree.map(jnp.copy, state.params))), stats


class EWC(Method):
    """A diagonal Fisher at each task end; a quadratic penalty on later tasks."""

    name = "ewc"
    section = "ewc"
    default_config = staticmethod(ewc_config)

    @classmethod
    def validate_section(cls, config: ml_collections.ConfigDict) -> None:
        e = config.ewc
        if not (math.isfinite(e.lambda_) and e.lambda_ >= 0):
            raise ConfigError(f"config field 'ewc.lambda_' must be a non-negative number, got {e.lambda_}")
        if int(e.fisher_batches) < 1 or int(e.fisher_batches) != e.fisher_batches:
            raise ConfigError(f"config field 'ewc.fisher_batches' must be a positive integer, got {e.fisher_batches!r}")

    def init_state(self, phase: int, params: Any, *, tx: Any) -> EwcState:
        return EwcState(fisher=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), F32), params),
                        star=jax.tree.map(jnp.copy, params))

    def carry_state(self, prev: Any, fresh: EwcState, *, reset: bool) -> EwcState:
        return prev.method  # the Fisher sum and theta* of the earlier tasks

    def cycle(self, task: Any, step: int, steps: int) -> tuple[Program, list[dict]]:
        if task.phase == 0:
            return Program(inner_steps=steps), []
        return EwcProgram(inner_steps=steps, lam=float(self.config.ewc.lambda_)), []

    def on_task_end(self, task: Any, state: Any) -> Any:
        c = self.config
        rng = np.random.default_rng([c.seed, task.phase, EWC_FISHER_STREAM])
        draws = [sample_batch(task.train_set, c.train.batch_size, rng) for _ in range(c.ewc.fisher_batches)]
        state, stats = task.run(FisherUpdate(), state, task.stack(draws))
        task.write({"event": "ewc_fisher", **task.head(), "fisher_batches": int(stats["fisher_batches"]),
                    "fisher_mean": float(stats["fisher_mean"])})
        return state


METHODS = (EWC,)
