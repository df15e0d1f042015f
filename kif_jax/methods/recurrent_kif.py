"""Recurrent-KIF (ACL 2025) and its ablations: the method, as one module (docs/algorithm.md).

From the second task on, every cycle is one jitted program: Q inner steps on the current task, M outer
steps on random memory-buffer batches (one scan, one compiled backward pass), importance EMAs of both
learners, and the fusion theta_t + w_in tau_in + w_out tau_out through the learners' importance masks.
The first task, and a task's steps left after its last multiple of Q, are plain SeqLoRA programs.

Readings of the ablations (the paper's ablation table gives only their names; ours):
- `static_importance` (-DIE): the outer (old-task) importance is estimated once when a task starts
  (on `kif.static_batches` memory batches, at the parameters handed over from the previous task, with
  the gradient an outer step would see) and frozen; the outer learner still takes its replay steps.
- `no_identification` (-KI): no masks: theta_{t+1} = theta_t + tau_in + tau_out.
- `global_merge` (+GM): the same inner and outer steps, but no recurrent fusion: tau_in and tau_out
  are summed over the whole task and fused once at its end, from the task's starting parameters.
- `no_share` (-Share): reference weights, except (0, 0) where both masks are on.
- `adaptive` (+Adaptive): fusion weights w_in = S_in / (S_in + S_out), w_out = 1 - w_in per element
  instead of masks, each learner's scores min-max normalised over all of its elements (0/0 -> 0.5 / 0.5).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

import kif_jax
from kif_jax import sharding
from kif_jax.core.fusion_stats import fusion_record, fusion_stats, leaf_layout
from kif_jax.data.batching import sample_batch
from kif_jax.errors import ConfigError
from kif_jax.methods.base import (INNER_STREAM, OUTER_STREAM, STATIC_STREAM, Learner, Method, Program, all_finite,
                                  where_tree)

F32 = jnp.float32
STATIC_IMPORTANCE_STREAM = 2**31 - 1  # numpy seed word for the -DIE estimate's memory batches


def kif_config() -> ml_collections.ConfigDict:
    """The `kif` section: the reference code's defaults (the authors' T5 scripts; docs/algorithm.md)."""
    c = ml_collections.ConfigDict()
    # Q, the inner steps per fusion, is `cycle.steps`; the buffer the outer steps replay is `memory_buffer`'s.
    c.outer_steps = 4  # M: outer (memory replay) steps per cycle
    c.outer_batch_size = 8  # examples per outer step
    c.quantile = 0.8  # scores above this quantile are "important" (the top 20%)
    c.beta1 = 0.85  # sensitivity EMA (reference); the paper's text uses 0.55
    c.beta2 = 0.85  # uncertainty EMA (reference); the paper's text uses 0.55
    c.order = "first"  # importance: "first" |p*g|, "second" |p*g|^2, "mix"
    c.score = "sens_x_unc"  # "sens_x_unc" (reference: S*U) or "sens" (paper: S)
    c.scope = "global"  # threshold over "global" (reference), "per_tensor" or "per_factor"
    # Threshold of replicated scores: "exact" quantile (sort) or "bisect" (32 counting passes, same
    # value). Sharded scores (sharding.fsdp/tensor_parallelism > 1) always use "bisect": it never
    # gathers them, and both give the same masks (kif_jax/core/thresholds.py says why).
    c.method = "exact"
    c.scheme = "reference"  # fusion weights: "reference", "binary" (paper) or "no_share"
    c.importance_params = "updated"  # p in |p*g|: "updated" (reference: after the step) or "current"
    # g in |p*g|: "clipped" (after clipping at train.max_grad_norm: the reference Trainer clips p.grad in
    # place, steps, then its importance update reads p.grad) or "raw" (the step's gradient). Both learners.
    c.importance_grads = "clipped"
    # The outer learner's loss is multiplied by this before its gradient: the reference's outer loss goes
    # through the Trainer's division by gradient_accumulation_steps (4 in its T5 scripts) with a single
    # backward, so the memory gradient enters clipping, the shared AdamW and the importance scaled by 1/4.
    c.outer_loss_scale = 0.25
    c.reset_inner = True  # clear inner importance after every fusion (reference)
    c.reset_outer = False  # clear outer importance after every fusion (reference keeps it)
    c.outer_optimizer = "shared"  # "shared": inner AdamW state and lr (reference); "separate"
    c.outer_lr = 1e-3  # learning rate of the separate outer AdamW
    c.fuse_partial_cycle = False  # also fuse the steps left after the last multiple of Q
    c.static_batches = 16  # static_importance: memory batches used for the one-off estimate
    return c


_CHOICES = {
    "order": ("first", "second", "mix"),
    "score": ("sens_x_unc", "sens"),
    "scope": ("global", "per_tensor", "per_factor"),
    "method": ("exact", "bisect"),
    "scheme": ("reference", "binary", "no_share"),
    "importance_params": ("updated", "current"),
    "importance_grads": ("raw", "clipped"),
    "outer_optimizer": ("shared", "separate"),
}
_POSITIVE_INTS = ("outer_steps", "outer_batch_size", "static_batches")


def validate_kif_section(config: ml_collections.ConfigDict) -> None:
    """One line naming the first bad `kif` field."""
    k = config.kif
    for name, choices in _CHOICES.items():
        if k[name] not in choices:
            raise ConfigError(f"config field 'kif.{name}' is {k[name]!r}; expected one of {', '.join(choices)}")
    for name in _POSITIVE_INTS:
        if int(k[name]) < 1 or int(k[name]) != k[name]:
            raise ConfigError(f"config field 'kif.{name}' must be a positive integer, got {k[name]!r}")
    if not 0.0 < k.quantile < 1.0:
        raise ConfigError(f"config field 'kif.quantile' must lie in (0, 1), got {k.quantile}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= k[name] < 1.0:
            raise ConfigError(f"config field 'kif.{name}' must lie in [0, 1), got {k[name]}")
    for name in ("outer_lr", "outer_loss_scale"):
        if not (math.isfinite(k[name]) and k[name] > 0):
            raise ConfigError(f"config field 'kif.{name}' must be a positive number, got {k[name]}")
    if k.outer_batch_size % config.train.micro_batch_size:
        raise ConfigError(f"config field 'kif.outer_batch_size' ({k.outer_batch_size}) must be a multiple of "
                          f"train.micro_batch_size ({config.train.micro_batch_size})")


@struct.dataclass
class KifState:
    """Recurrent-KIF's part of the training state (unused parts are empty tuples; all () on task 1)."""

    outer_opt_state: Any = ()  # AdamW state of a separate outer optimizer (kif.outer_optimizer = "separate")
    imp_in: Any = ()  # kif_jax.ImportanceState of the inner learner
    imp_out: Any = ()  # kif_jax.ImportanceState of the outer learner
    anchor: Any = ()  # global merge: parameters at task start
    acc_in: Any = ()  # global merge: summed inner task vectors
    acc_out: Any = ()  # global merge: summed outer task vectors
    prev_masks: Any = ()  # (inner, outer) bool masks of the last fusion, for the mask-overlap statistics


def adaptive_weights(scores_in: Any, scores_out: Any) -> tuple[Any, Any]:
    """+Adaptive (our reading): w_in = S_in / (S_in + S_out), w_out = 1 - w_in, elementwise.

    S_in and S_out are each min-max normalised over all of their learner's elements first; where both
    are 0 (0/0) the weights are 0.5 / 0.5.
    """
    n_in, n_out = _tree_minmax(scores_in), _tree_minmax(scores_out)

    def w(a: jax.Array, b: jax.Array) -> jax.Array:
        total = a + b
        return jnp.where(total > 0, a / jnp.where(total > 0, total, 1.0), 0.5).astype(F32)

    w_in = jax.tree.map(w, n_in, n_out)
    return w_in, jax.tree.map(lambda x: 1.0 - x, w_in)


def _tree_minmax(scores: Any) -> Any:
    """Scores min-max normalised over ALL elements of the tree (one learner); zeros when they are all equal."""
    leaves = [jnp.asarray(s, F32) for s in jax.tree.leaves(scores)]
    lo = jnp.min(jnp.stack([jnp.min(s) for s in leaves]))
    hi = jnp.max(jnp.stack([jnp.max(s) for s in leaves]))
    span = hi - lo
    return jax.tree.map(lambda s: jnp.where(span > 0, (s.astype(F32) - lo) / jnp.where(span > 0, span, 1.0), 0.0),
                        scores)


@dataclasses.dataclass(frozen=True)
class KifCycle(Program):
    """One fusion cycle: Q inner steps, M outer steps on memory batches, then the fusion (or, for global
    merge, the accumulation) of the two task vectors. Fields are the `kif` section's switches."""

    outer_steps: int = 4
    fuse: bool = True  # fuse at the end of the cycle (else accumulate for the global merge)
    update_outer_importance: bool = True  # False: -DIE's frozen outer importance
    identify: bool = True  # masks from importance; False fuses with all-true binary masks (-KI)
    quantile: float = 0.8
    scope: str = "global"
    threshold_method: str = "exact"
    scheme: str = "reference"
    order: str = "first"
    score: str = "sens_x_unc"
    beta1: float = 0.85
    beta2: float = 0.85
    importance_at_updated_params: bool = True
    importance_clipped_grads: bool = True
    outer_loss_scale: float = 0.25
    reset_inner: bool = True
    reset_outer: bool = False
    separate_outer_optimizer: bool = False
    outer_lr: float = 1e-3
    accumulate: bool = False  # global merge: add tau_in / tau_out to the task's accumulators
    adaptive: bool = False  # +Adaptive: fuse with weights from min-max normalised scores (no masks)

    label: ClassVar[str] = " with fusion"

    # --- the step: inner or outer, by a traced flag -----------------------------------------------
    def step_key(self, trainer: Any, state: Any, learner: Learner) -> jax.Array:
        stream = jnp.where(learner.outer, OUTER_STREAM, INNER_STREAM)
        counter = jnp.where(learner.outer, state.step * self.outer_steps + learner.index, state.step)
        return trainer.key(state, stream, counter)

    def transform_grads(self, trainer: Any, state: Any, grads: Any, learner: Learner, magnitudes: Any) -> Any:
        if self.outer_loss_scale != 1.0:  # the reference's outer loss / accumulation steps
            scale = jnp.where(learner.outer, jnp.float32(self.outer_loss_scale), jnp.float32(1.0))
            grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
        return grads

    def update(self, trainer: Any, state: Any, grads: Any, lr: jax.Array, learner: Learner) -> tuple[Any, jax.Array]:
        # With the shared optimizer (reference quirk) outer steps use the inner AdamW state and the
        # current learning rate without advancing the schedule, which counts inner steps only.
        if not self.separate_outer_optimizer:
            return super().update(trainer, state, grads, lr, learner)
        kif = state.method

        def inner_update():
            params, opt = trainer.apply(grads, state.opt_state, state.params, lr)
            return params, opt, kif.outer_opt_state

        def outer_update():
            params, opt = trainer.apply(grads, kif.outer_opt_state, state.params, jnp.float32(self.outer_lr))
            return params, state.opt_state, opt

        params, opt_state, outer_opt_state = jax.lax.cond(learner.outer, outer_update, inner_update)
        lr = jnp.where(learner.outer, jnp.float32(self.outer_lr), lr)
        return state.replace(params=params, opt_state=opt_state,
                             method=kif.replace(outer_opt_state=outer_opt_state)), lr

    def importance_grads(self, trainer: Any, grads: Any) -> Any:
        """g of |p * g|: the step's gradient, or the reference's p.grad after its in-place clip_grad_norm_."""
        return trainer.clip(grads) if self.importance_clipped_grads else grads

    def update_importance(self, imp: Any, params: Any, grads: Any) -> Any:
        return kif_jax.update_importance(imp, params, grads, beta1=self.beta1, beta2=self.beta2, order=self.order)

    def after_update(self, trainer: Any, before: Any, after: Any, grads: Any, learner: Learner) -> Any:
        at = after.params if self.importance_at_updated_params else before.params
        imp_grads = self.importance_grads(trainer, grads)
        old = before.method
        kif = after.method.replace(imp_in=where_tree(learner.outer, old.imp_in,
                                                     self.update_importance(old.imp_in, at, imp_grads)))
        if self.update_outer_importance:
            kif = kif.replace(imp_out=where_tree(learner.outer, self.update_importance(old.imp_out, at, imp_grads),
                                                 old.imp_out))
        return after.replace(method=kif)

    def counts_as_step(self, learner: Learner) -> Any:
        return jnp.where(learner.outer, 0, 1).astype(jnp.int32)

    # --- the cycle ---------------------------------------------------------------------------------
    def run(self, trainer: Any, state: Any, frozen: Any, inner: Any, outer: Any) -> tuple[Any, dict]:
        theta_t = state.params
        q = self.inner_steps
        if all(a.shape[1:] == b.shape[1:] for a, b in zip(jax.tree.leaves(inner), jax.tree.leaves(outer))):
            def body(carry, xs):
                s, theta_k = carry
                batch, i = xs
                theta_k = where_tree(i == q, s.params, theta_k)  # the parameters after the last inner step
                s, m = trainer.step(self, s, batch, frozen, Learner(i >= q, i - q))
                return (s, theta_k), m

            batches = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), inner, outer)
            (state, theta_k), steps = jax.lax.scan(body, (state, state.params),
                                                   (batches, jnp.arange(q + self.outer_steps)))
            inner_m = jax.tree.map(lambda x: x[:q], steps)
            outer_m = jax.tree.map(lambda x: x[q:], steps)
        else:  # inner and outer batches of different shapes: two scans
            state, inner_m = jax.lax.scan(lambda s, b: trainer.step(self, s, b, frozen, Learner(False, 0)),
                                          state, inner)
            theta_k = state.params
            state, outer_m = jax.lax.scan(lambda s, xs: trainer.step(self, s, xs[0], frozen, Learner(True, xs[1])),
                                          state, (outer, jnp.arange(self.outer_steps)))
        metrics: dict[str, jax.Array] = {f"inner_{k}": v for k, v in inner_m.items()}
        metrics.update({f"outer_{k}": outer_m[k] for k in ("loss", "finite")})
        tau_in = kif_jax.task_vector(theta_k, theta_t)
        tau_out = kif_jax.task_vector(state.params, theta_k)
        kif = state.method
        if self.accumulate:
            return state.replace(method=kif.replace(acc_in=jax.tree.map(jnp.add, kif.acc_in, tau_in),
                                                    acc_out=jax.tree.map(jnp.add, kif.acc_out, tau_out))), metrics
        if self.fuse:
            fused, stats, kif = self.fuse_vectors(trainer, theta_t, tau_in, tau_out, kif)
            metrics.update(stats)
            if self.reset_inner:
                kif = kif.replace(imp_in=kif_jax.init_importance(fused))
            if self.reset_outer:
                kif = kif.replace(imp_out=kif_jax.init_importance(fused))
            state = state.replace(params=fused, method=kif)
        return state, metrics

    def masks(self, trainer: Any, imp: Any) -> Any:
        scores = kif_jax.importance_scores(imp, kind=self.score)
        # Sharded scores: the counting threshold (no gather); replicated ones: the configured method.
        # Both give the same masks (kif_jax/core/thresholds.py).
        mesh = trainer.mesh
        method = "bisect" if mesh is not None and sharding.is_sharded(scores, mesh) else self.threshold_method
        return kif_jax.importance_masks(scores, quantile=self.quantile, scope=self.scope, method=method)

    def fuse_vectors(self, trainer: Any, base: Any, tau_in: Any, tau_out: Any,
                     kif: KifState) -> tuple[Any, dict, KifState]:
        """theta = base + w_in*tau_in + w_out*tau_out, with mask statistics for the logs, and the state
        with this fusion's masks remembered (`prev_masks`) for the next one's overlap statistics."""
        if self.adaptive:  # +Adaptive: no masks
            w_in, w_out = adaptive_weights(kif_jax.importance_scores(kif.imp_in, kind=self.score),
                                           kif_jax.importance_scores(kif.imp_out, kind=self.score))
            fused = kif_jax.fuse_with_weights(base, tau_in, tau_out, w_in, w_out)
            leaves = jax.tree.leaves(w_in)
            return fused, {"w_in_mean": sum(jnp.sum(w) for w in leaves) / sum(w.size for w in leaves)}, kif
        if not self.identify:
            ones = jax.tree.map(lambda x: jnp.ones(x.shape, bool), base)
            return kif_jax.fuse_with_masks(base, tau_in, tau_out, ones, ones, scheme="binary"), {}, kif
        mask_in, mask_out = self.masks(trainer, kif.imp_in), self.masks(trainer, kif.imp_out)
        fused = kif_jax.fuse_with_masks(base, tau_in, tau_out, mask_in, mask_out, scheme=self.scheme)
        both = jax.tree.map(jnp.logical_and, mask_in, mask_out)
        stats = {
            "mask_in_frac": kif_jax.mask_fractions(mask_in),
            "mask_out_frac": kif_jax.mask_fractions(mask_out),
            "mask_both_frac": kif_jax.mask_fractions(both),
            # Per-leaf shares, magnitudes inside / outside the masks, overlap with the last fusion.
            "fusion": fusion_stats(tau_in, tau_out, mask_in, mask_out, kif.prev_masks or None,
                                   join_leaves=trainer.mesh is None or not sharding.is_sharded(tau_in, trainer.mesh)),
        }
        if kif.prev_masks:
            kif = kif.replace(prev_masks=(mask_in, mask_out))
        return fused, stats, kif


@dataclasses.dataclass(frozen=True)
class StaticOuterImportance:
    """-DIE at a task start: the outer importance from K memory batches [K, A, mb, L] at fixed parameters."""

    cycle: KifCycle

    def run(self, trainer: Any, state: Any, frozen: Any, batches: Any, extra: Any) -> tuple[Any, dict]:
        c = self.cycle

        def body(imp, xs):
            batch, index = xs
            key = trainer.key(state, STATIC_STREAM, index)
            loss, grads, _ = trainer.accumulated_grads(c, state.params, state.method, frozen, batch, key)
            ok = jnp.isfinite(loss) & all_finite(grads)
            # The gradient an outer step would see: its loss scaled, then clipped if importance reads that.
            grads = c.importance_grads(trainer, jax.tree.map(lambda g: g * c.outer_loss_scale, grads))
            return where_tree(ok, c.update_importance(imp, state.params, grads), imp), None

        n = batches["input_ids"].shape[0]
        imp_out, _ = jax.lax.scan(body, state.method.imp_out, (batches, jnp.arange(n)))
        return state.replace(method=state.method.replace(imp_out=imp_out)), {}


@dataclasses.dataclass(frozen=True)
class GlobalMergeFusion:
    """+GM at a task end: one fusion of the task's summed task vectors from its starting parameters."""

    cycle: KifCycle

    def run(self, trainer: Any, state: Any, frozen: Any, batches: Any, extra: Any) -> tuple[Any, dict]:
        kif = state.method
        fused, stats, kif = self.cycle.fuse_vectors(trainer, kif.anchor, kif.acc_in, kif.acc_out, kif)
        return state.replace(params=fused, method=kif), stats


def fusion_records(task: Any, stats: dict, step: int, *, first: bool) -> list[dict]:
    """A "fusion_stats" record (kif_jax/core/fusion_stats.py); a task's first follows a "fusion_leaves" one."""
    head = task.head()
    records = [{"event": "fusion_leaves", **head, **leaf_layout(task.init_params)}] if first else []
    records.append({"event": "fusion_stats", **head, "task": ",".join(task.phases[task.phase]), "step": step,
                    **fusion_record(stats)})
    return records


class RecurrentKIF(Method):
    """Recurrent-KIF with the reference code's defaults; the ablations below change one switch each."""

    name = "recurrent_kif"
    section = "kif"
    dynamic_outer_importance: ClassVar[bool] = True  # False: -DIE
    identify: ClassVar[bool] = True  # False: -KI
    merge_at_task_end: ClassVar[bool] = False  # True: +GM
    scheme: ClassVar[str | None] = None  # overrides kif.scheme when set (-Share)
    adaptive: ClassVar[bool] = False  # True: +Adaptive

    default_config = staticmethod(kif_config)
    validate_section = staticmethod(validate_kif_section)

    def cycle_program(self, steps: int) -> KifCycle:
        k = self.config.kif
        return KifCycle(
            inner_steps=steps, outer_steps=k.outer_steps, fuse=not self.merge_at_task_end,
            update_outer_importance=self.dynamic_outer_importance, identify=self.identify,
            quantile=float(k.quantile), scope=k.scope, threshold_method=k.method, scheme=self.scheme or k.scheme,
            order=k.order, score=k.score, beta1=float(k.beta1), beta2=float(k.beta2),
            importance_at_updated_params=k.importance_params == "updated",
            importance_clipped_grads=k.importance_grads == "clipped", outer_loss_scale=float(k.outer_loss_scale),
            reset_inner=k.reset_inner and not self.merge_at_task_end, reset_outer=k.reset_outer,
            separate_outer_optimizer=k.outer_optimizer == "separate", outer_lr=float(k.outer_lr),
            accumulate=self.merge_at_task_end, adaptive=self.adaptive)

    def memory(self, task: Any) -> Any:
        """The tokenized memory buffer of the tasks before this one."""
        return task.data.memory(task.earlier_tasks, ratio=self.config.memory_buffer.ratio)

    # --- state --------------------------------------------------------------------------------
    def init_state(self, phase: int, params: Any, *, tx: Any) -> KifState:
        if phase == 0:  # task 1 is SeqLoRA
            return KifState()
        no_mask = lambda tree: jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), bool), tree)  # noqa: E731
        merge = self.merge_at_task_end
        return KifState(
            outer_opt_state=tx.init(params) if self.config.kif.outer_optimizer == "separate" else (),
            imp_in=kif_jax.init_importance(params), imp_out=kif_jax.init_importance(params),
            anchor=jax.tree.map(jnp.copy, params) if merge else (),
            acc_in=jax.tree.map(jnp.zeros_like, params) if merge else (),
            acc_out=jax.tree.map(jnp.zeros_like, params) if merge else (),
            prev_masks=(no_mask(params), no_mask(params)))

    def carry_state(self, prev: Any, fresh: KifState, *, reset: bool) -> KifState:
        old = prev.method
        same = lambda name: jax.tree.structure(getattr(old, name)) == jax.tree.structure(getattr(fresh, name))  # noqa: E731
        if same("prev_masks"):  # logged only: the mask overlap across the task boundary
            fresh = fresh.replace(prev_masks=old.prev_masks)
        if not reset:
            fresh = fresh.replace(**{n: getattr(old, n) for n in ("imp_in", "imp_out", "outer_opt_state") if same(n)})
        return fresh

    def memory_parts(self, kif: KifState) -> dict[str, Any]:
        return {"optimizer": kif.outer_opt_state, "importance": (kif.imp_in, kif.imp_out),
                "method_state": (kif.anchor, kif.acc_in, kif.acc_out, kif.prev_masks)}

    def largest_state_phase(self, num_phases: int) -> int:
        return 1 if num_phases > 1 else 0

    # --- programs and hooks -------------------------------------------------------------------
    def cycle(self, task: Any, step: int, steps: int) -> tuple[Program, list[dict]]:
        c = self.config
        if task.phase == 0 or (steps < c.cycle.steps and not c.kif.fuse_partial_cycle):
            return Program(inner_steps=steps), []  # SeqLoRA steps, no importance, no fusion
        rng = np.random.default_rng([c.seed, task.phase, step])
        memory = self.memory(task)
        return self.cycle_program(steps), [sample_batch(memory, c.kif.outer_batch_size, rng)
                                           for _ in range(c.kif.outer_steps)]

    def on_task_start(self, task: Any, state: Any) -> Any:
        if self.dynamic_outer_importance or task.phase == 0:
            return state
        c = self.config
        rng = np.random.default_rng([c.seed, task.phase, STATIC_IMPORTANCE_STREAM])
        memory = self.memory(task)
        draws = [sample_batch(memory, c.kif.outer_batch_size, rng) for _ in range(c.kif.static_batches)]
        state, _ = task.run(StaticOuterImportance(self.cycle_program(0)), state, task.stack(draws))
        return state

    def on_task_end(self, task: Any, state: Any) -> Any:
        if not self.merge_at_task_end or task.phase == 0:
            return state
        state, stats = task.run(GlobalMergeFusion(self.cycle_program(self.config.cycle.steps)), state)
        fusion = stats.pop("fusion", None)
        task.write({"event": "global_merge", **task.head(), **stats})
        if fusion is not None:
            for record in fusion_records(task, fusion, task.steps, first=True):
                task.write(record)
        return state

    def log_cycle(self, task: Any, out: dict, step: int, steps: int) -> tuple[dict, list[dict]]:
        fields = {}
        if "outer_loss" in out:
            fields["outer_loss"] = float(np.mean(out["outer_loss"]))
        for key in ("mask_in_frac", "mask_out_frac", "mask_both_frac", "w_in_mean"):
            if key in out:
                fields[key] = float(out[key])
        records = fusion_records(task, out["fusion"], step, first=step == steps) if "fusion" in out else []
        return fields, records


class StaticImportance(RecurrentKIF):
    """-DIE: outer importance estimated once per task, then frozen."""

    name = "static_importance"
    dynamic_outer_importance = False


class NoIdentification(RecurrentKIF):
    """-KI: no masks, theta + tau_in + tau_out."""

    name = "no_identification"
    identify = False


class GlobalMerge(RecurrentKIF):
    """+GM: the same steps, one fusion at each task's end."""

    name = "global_merge"
    merge_at_task_end = True


class NoShare(RecurrentKIF):
    """-Share: no update where both masks are on."""

    name = "no_share"
    scheme = "no_share"


class Adaptive(RecurrentKIF):
    """+Adaptive: fusion weights from min-max normalised scores, no masks."""

    name = "adaptive"
    adaptive = True


METHODS = (RecurrentKIF, StaticImportance, NoIdentification, GlobalMerge, NoShare, Adaptive)
