"""TaSL (Feng et al., ACL 2024): skill units consolidated at task ends, as the authors' code runs it
(WoodScene/TaSL @ d7a0c4fee7eeca1fc97d12f3ba3fdff4cf41bd17; item by item in docs/baselines.md).

AdaLoRA importance per element, I = |theta * grad|, with I_bar, U_bar EMAs (tasl.beta1 = tasl.beta2 =
0.85), theta after the step and grad the step's gradient clipped to train.max_grad_norm, after every
optimizer step but a task's first (its patched Trainer clips p.grad in place, steps, then calls
update_score(global_step), which updates only for 0 < global_step < max_steps, global_step counting from
0). A skill unit is one trainable tensor (each LoRA A and B), scored by the mean of I_bar * U_bar. At
each task end (task 1 is kept as trained; its scores become the accumulated ones): min-max normalise
the current and the accumulated unit scores, threshold each at its own tasl.quantile (0.8; numpy's
linear percentile; important = strictly above), merge per unit with the consolidated weights the task
started from (both: 0.3 cur + 0.7 prev; only prev: prev; only cur: cur; neither: 0.5 / 0.5), and
accumulate minmax(0.3 cur + 0.7 prev). The importance restarts at every task (the reference runs each
task in a new process; with train.reset_at_task_boundary = False it carries over).

Readings that are ours: min-max of equal scores gives zeros (the reference divides 0 by 0); with
model.trainable = "all" every parameter tensor is a unit (as in the reference's T5 script, which
fine-tunes all of T5); a non-finite step leaves the importance as it was (the whole step is gated). The
journal extension's TasLoRA (rank-wise units, softmax-weighted merge) is not implemented.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct

import kif_jax
from kif_jax.errors import ConfigError
from kif_jax.methods.base import Learner, Method, Program, where_tree

F32 = jnp.float32
# Weight of the CURRENT task's tensor for the cases (neither, only previous, only current, both), indexed
# by 2 * important_current + important_previous; the previous (consolidated) tensor gets 1 - w.
TASL_CURRENT_WEIGHT = (0.5, 0.0, 1.0, 0.3)


def tasl_config() -> ml_collections.ConfigDict:
    """The `tasl` section (the authors' code defaults)."""
    c = ml_collections.ConfigDict()
    c.beta1 = 0.85  # importance EMA (AdaLoRA's I_bar)
    c.beta2 = 0.85  # uncertainty EMA (AdaLoRA's U_bar)
    c.quantile = 0.8  # units above this percentile of the normalised unit scores are important
    return c


def minmax(x: jax.Array) -> jax.Array:
    """(x - min) / (max - min) over the whole array; all zeros when max == min (the reference divides 0/0)."""
    x = jnp.asarray(x, F32)
    lo, hi = jnp.min(x), jnp.max(x)
    span = hi - lo
    return jnp.where(span > 0, (x - lo) / jnp.where(span > 0, span, 1.0), jnp.zeros_like(x))


def unit_scores(scores: Any) -> jax.Array:
    """One score per skill unit (one tensor): the mean of its elementwise scores, float32 [units]."""
    return jnp.stack([jnp.mean(jnp.asarray(s, F32)) for s in jax.tree.leaves(scores)])


def tasl_weights(current: jax.Array, previous: jax.Array, *, quantile: float = 0.8) -> tuple[jax.Array, jax.Array]:
    """Per-unit weight of the current tensors [units], and the next accumulated scores [units].

    Both score vectors are min-max normalised; each is thresholded at its own `quantile` (numpy's
    linear percentile) and a unit is important where its score lies strictly above it. The accumulated
    scores become minmax(0.3 current + 0.7 previous) of the normalised scores.
    """
    cur, prev = minmax(current), minmax(previous)
    imp_cur = cur > jnp.quantile(cur, quantile)
    imp_prev = prev > jnp.quantile(prev, quantile)
    table = jnp.asarray(TASL_CURRENT_WEIGHT, F32)
    w = table[2 * imp_cur.astype(jnp.int32) + imp_prev.astype(jnp.int32)]
    return w, minmax(0.3 * cur + 0.7 * prev)


def tasl_merge(previous_params: Any, current_params: Any, w_current: jax.Array) -> Any:
    """unit u <- w_u * current_u + (1 - w_u) * previous_u (in float32, back in each tensor's dtype)."""
    prev_leaves, treedef = jax.tree.flatten(previous_params)
    cur_leaves = treedef.flatten_up_to(current_params)
    merged = [(w_current[i] * c.astype(F32) + (1.0 - w_current[i]) * p.astype(F32)).astype(c.dtype)
              for i, (p, c) in enumerate(zip(prev_leaves, cur_leaves))]
    return treedef.unflatten(merged)


@struct.dataclass
class TaslState:
    """TaSL's part of the training state."""

    importance: Any  # kif_jax.ImportanceState of the current task (AdaLoRA's I_bar, U_bar)
    anchor: Any  # the consolidated parameters the task started from
    unit_scores: Any  # float32 [units]: the accumulated unit scores of the earlier tasks


@dataclasses.dataclass(frozen=True)
class TaslProgram(Program):
    """SeqLoRA steps that also update the AdaLoRA importance after every step but the task's first."""

    beta1: float = 0.85
    beta2: float = 0.85

    def after_update(self, trainer: Any, before: Any, after: Any, grads: Any, learner: Learner | None) -> Any:
        imp = before.method.importance
        updated = kif_jax.update_importance(imp, after.params, trainer.clip(grads), beta1=self.beta1,
                                            beta2=self.beta2, order="first")
        skip = before.step < 1  # the reference updates only for 0 < global_step
        return after.replace(method=after.method.replace(importance=where_tree(skip, imp, updated)))


@dataclasses.dataclass(frozen=True)
class ConsolidateSkills:
    """At a task end: the task's unit scores; from task 2 on, the unit-wise merge with the consolidated
    parameters the task started from (`anchor`) and the new accumulated scores."""

    first: bool
    quantile: float

    def run(self, trainer: Any, state: Any, frozen: Any, batches: Any, extra: Any) -> tuple[Any, dict]:
        tasl = state.method
        current = unit_scores(kif_jax.importance_scores(tasl.importance))
        if self.first:  # task 1 is kept as trained; its scores are the accumulated ones
            return state.replace(method=tasl.replace(unit_scores=current)), {"units": jnp.int32(current.size)}
        w, accumulated = tasl_weights(current, tasl.unit_scores, quantile=self.quantile)
        merged = tasl_merge(tasl.anchor, state.params, w)
        stats = {"units": jnp.int32(current.size), "units_current_only": jnp.sum(w == 1.0),
                 "units_previous_only": jnp.sum(w == 0.0), "units_both": jnp.sum(w == 0.3)}
        return state.replace(params=merged, method=tasl.replace(unit_scores=accumulated)), stats


class TaSL(Method):
    """Unit importance every step; the unit-wise merge at each task end."""

    name = "tasl"
    section = "tasl"
    default_config = staticmethod(tasl_config)

    @classmethod
    def validate_section(cls, config: ml_collections.ConfigDict) -> None:
        t = config.tasl
        if not 0.0 < t.quantile < 1.0:
            raise ConfigError(f"config field 'tasl.quantile' must lie in (0, 1), got {t.quantile}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= t[name] < 1.0:
                raise ConfigError(f"config field 'tasl.{name}' must lie in [0, 1), got {t[name]}")

    def init_state(self, phase: int, params: Any, *, tx: Any) -> TaslState:
        return TaslState(importance=kif_jax.init_importance(params), anchor=jax.tree.map(jnp.copy, params),
                         unit_scores=jnp.zeros((len(jax.tree.leaves(params)),), jnp.float32))

    def carry_state(self, prev: Any, fresh: TaslState, *, reset: bool) -> TaslState:
        fresh = fresh.replace(unit_scores=prev.method.unit_scores)
        if not reset and jax.tree.structure(prev.method.importance) == jax.tree.structure(fresh.importance):
            fresh = fresh.replace(importance=prev.method.importance)
        return fresh

    def memory_parts(self, tasl: TaslState) -> dict[str, Any]:
        return {"importance": tasl.importance, "method_state": (tasl.anchor, tasl.unit_scores)}

    def cycle(self, task: Any, step: int, steps: int) -> tuple[Program, list[dict]]:
        t = self.config.tasl
        return TaslProgram(inner_steps=steps, beta1=float(t.beta1), beta2=float(t.beta2)), []

    def on_task_end(self, task: Any, state: Any) -> Any:
        state, stats = task.run(ConsolidateSkills(first=task.phase == 0, quantile=float(self.config.tasl.quantile)),
                                state)
        task.write({"event": "tasl_consolidation", **task.head(), **{k: int(v) for k, v in stats.items()}})
        return state


METHODS = (TaSL,)
