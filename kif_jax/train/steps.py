"""Pure training programs on explicit state: inner steps, outer steps, fusion, as one jitted cycle.

A batch here is a dict of int32 arrays shaped [A, mb, L] (A accumulated micro-batches of mb rows);
a cycle takes Q of them stacked to [Q, A, mb, L] and, for KIF, M outer batches [M, Ao, mb, L], and
runs everything in one XLA program (`lax.scan`), so an accelerator never waits on the host between
steps. Non-finite steps are gated off (state unchanged) and flagged; the host stops or skips.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

import kif_jax
from kif_jax import sharding
from kif_jax.models.family import ModelFamily
from kif_jax.report import fusion_stats
from kif_jax.core import baselines
from kif_jax.train.methods import CycleSpec

Batch = dict[str, jax.Array]
INNER_STREAM, OUTER_STREAM, STATIC_STREAM = 0, 1, 2  # dropout key streams, so no two steps share a key


@struct.dataclass
class TrainState:
    """Everything a step changes; checkpointed whole. Unused parts are empty tuples."""

    step: jax.Array  # int32 [], inner optimizer steps taken in the current task
    total_steps: jax.Array  # int32 [], inner steps of the current task (learning-rate schedule)
    params: Any  # the trainable pytree (LoRA factors, or every parameter)
    opt_state: Any  # AdamW state of the inner (and, when shared, outer) steps
    outer_opt_state: Any  # AdamW state of a separate outer optimizer, else ()
    imp_in: Any  # kif_jax.ImportanceState of the inner learner, else ()
    imp_out: Any  # kif_jax.ImportanceState of the outer learner, else ()
    anchor: Any  # global merge: parameters at task start, else ()
    acc_in: Any  # global merge: summed inner task vectors, else ()
    acc_out: Any  # global merge: summed outer task vectors, else ()
    best_params: Any  # select_best: parameters with the lowest dev loss so far, else ()
    best_loss: jax.Array  # float32 [], that dev loss (inf before the first measurement)
    prev_masks: Any  # KIF: (inner, outer) bool masks of the last fusion, for the mask-overlap statistics, else ()
    rng: jax.Array  # uint32 key data of the task's dropout key (see `dropout_key`); steps fold in counters
    # The prior methods' state between tasks (kif_jax/train/methods.py), checkpointed with the rest:
    old_lora: Any = ()  # O-LoRA: the frozen old branch (earlier tasks' factors side by side), else ()
    unit_scores: Any = ()  # TaSL: float32 [units] accumulated unit scores of the earlier tasks, else ()
    fisher: Any = ()  # EWC: the summed diagonal Fisher of the earlier tasks (float32), else ()
    star: Any = ()  # EWC: the parameters at the latest task end, else ()


def make_task_key(seed: int, phase: int, impl: str) -> jax.Array:
    """The raw key data of task `phase`'s dropout key, for the PRNG implementation `impl`.

    "rbg" draws bits with XLA's RngBitGenerator, which compiles in a fraction of threefry's time
    (threefry dominated compile time on CPU); its bits are reproducible on a fixed device count
    but may differ between meshes. "threefry" is sharding-invariant.
    """
    return jax.random.key_data(jax.random.fold_in(jax.random.key(seed, impl=impl), phase))


def adam_transform(max_grad_norm: float, weight_decay: float) -> optax.GradientTransformation:
    """Clipping + Adam + decoupled decay, without the learning rate (applied per step, see apply_updates)."""
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        optax.add_decayed_weights(weight_decay),
    )


def linear_warmup_decay(step: jax.Array, total: jax.Array, *, peak: float, warmup: int) -> jax.Array:
    """Hugging Face's linear schedule: step s uses peak*s/warmup, then decays linearly to 0 at `total`."""
    step = step.astype(jnp.float32)
    total = total.astype(jnp.float32)
    warm = step / max(1, warmup)
    decay = jnp.maximum(0.0, (total - step) / jnp.maximum(1.0, total - warmup))
    return peak * jnp.where(step < warmup, warm, decay)


def _where_tree(cond: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class Programs:
    """The jitted programs of one model (graphdef, family) and optimizer setting, cached per CycleSpec."""

    def __init__(self, graphdef: nnx.GraphDef, *, family: ModelFamily, lr: float, warmup_steps: int, max_grad_norm: float,
                 weight_decay: float, outer_lr: float, prng_impl: str = "rbg", donate: bool = True,
                 mesh: jax.sharding.Mesh | None = None) -> None:
        # mesh: states and frozen weights arrive in their `kif_jax.sharding` layouts (jit takes its input
        # shardings from them); every program pins its outputs and the steps' carries to the same
        # layouts, so a state never changes layout, donation reuses its buffers, and no state is gathered.
        self.mesh = mesh
        self.graphdef = graphdef
        self.family = family
        self.prng_impl = prng_impl
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.outer_lr = outer_lr
        self.tx = adam_transform(max_grad_norm, weight_decay)
        self.max_grad_norm = max_grad_norm
        donate_args = ("state",) if donate else ()
        self.run_cycle = jax.jit(self._pinned(self._run_cycle), static_argnames=("spec",),
                                 donate_argnames=donate_args)
        self.estimate_outer_importance = jax.jit(self._pinned(self._estimate_outer_importance),
                                                 static_argnames=("spec",))
        self.merge_task = jax.jit(self._pinned(self._merge_task), static_argnames=("spec",))
        self.dev_loss = jax.jit(self._dev_loss)
        self.consolidate_skills = jax.jit(self._pinned(self._consolidate_skills), static_argnames=("first", "quantile"))
        self.update_fisher = jax.jit(self._pinned(self._update_fisher))

    def _constrain(self, tree: Any) -> Any:
        """`tree` pinned to its `kif_jax.sharding` layout on the mesh (no-op without a mesh)."""
        return tree if self.mesh is None else sharding.constrain(tree, self.mesh)

    def _pinned(self, fn: Any) -> Any:
        @functools.wraps(fn)
        def pinned(*args: Any, **kwargs: Any) -> Any:
            return self._constrain(fn(*args, **kwargs))

        return pinned

    # --- losses -------------------------------------------------------------------------------
    def token_loss(self, params: Any, frozen: Any, batch: Batch, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Mean target cross-entropy of one micro-batch [mb, L] (padding ignored), and its token count."""
        return self.family.token_loss(nnx.merge(self.graphdef, params, frozen), batch, key=key)

    def accumulated_grads(self, params: Any, frozen: Any, batch: Batch, key: jax.Array | None,
                          old: Any = ()) -> tuple[jax.Array, Any]:
        """Loss and gradient averaged over the A micro-batches of a [A, mb, L] batch (HF Trainer's accumulation).

        `key` None: no dropout. `old`: O-LoRA's frozen old branch, which the model adds (not differentiated).
        """
        grad_fn = jax.value_and_grad(
            lambda p, micro, k: self.token_loss(baselines.lora_concat(old, p), frozen, micro, k)[0])

        def body(carry, xs):
            loss_sum, grad_sum = carry
            micro, index = xs
            loss, grads = grad_fn(params, micro, None if key is None else jax.random.fold_in(key, index))
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        n_micro = batch["input_ids"].shape[0]
        init = (jnp.zeros((), jnp.float32), self._constrain(jax.tree.map(jnp.zeros_like, params)))
        (loss_sum, grad_sum), _ = jax.lax.scan(body, init, (batch, jnp.arange(n_micro)))
        return loss_sum / n_micro, jax.tree.map(lambda g: g / n_micro, grad_sum)

    # --- steps --------------------------------------------------------------------------------
    def _key(self, state: TrainState, stream: int, counter: jax.Array) -> jax.Array:
        key = jax.random.wrap_key_data(state.rng, impl=self.prng_impl)
        return jax.random.fold_in(jax.random.fold_in(key, stream), counter)

    def _apply(self, grads: Any, opt_state: Any, params: Any, lr: jax.Array) -> tuple[Any, Any]:
        updates, opt_state = self.tx.update(grads, opt_state, params)
        new_params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), params, updates)
        return new_params, opt_state

    def _importance_grads(self, grads: Any, spec: CycleSpec) -> Any:
        """g of |p * g|: the step's gradient, or the reference's p.grad after its in-place clip_grad_norm_."""
        if spec.importance_clipped_grads:
            return optax.clip_by_global_norm(self.max_grad_norm).update(grads, optax.EmptyState())[0]
        return grads

    def _importance(self, imp: Any, params: Any, grads: Any, spec: CycleSpec) -> Any:
        return kif_jax.update_importance(imp, params, grads, beta1=spec.beta1, beta2=spec.beta2, order=spec.order)

    def _penalty(self, params: Any, state: TrainState, spec: CycleSpec) -> jax.Array:
        """The prior methods' loss terms besides the cross-entropy (O-LoRA's, EWC's), float32 []."""
        total = baselines.o_lora_loss(state.old_lora, params, lambda1=spec.orth_lambda if jax.tree.leaves(
            state.old_lora) else 0.0, lambda2=spec.l2_lambda)
        if spec.ewc_lambda:
            total = total + baselines.ewc_penalty(params, state.star, state.fisher, lam=spec.ewc_lambda)
        return total

    def _step(self, state: TrainState, batch: Batch, outer: bool | jax.Array, outer_index: jax.Array | int,
              frozen: Any, spec: CycleSpec) -> tuple[TrainState, dict]:
        """One optimizer step on a [A, mb, L] batch: inner (current task) or, if `outer`, outer (memory).

        `outer` may be a traced flag, so one scan body serves both kinds and the model's forward and
        backward pass is compiled once per cycle (it dominates compile time).
        """
        stream = jnp.where(outer, OUTER_STREAM, INNER_STREAM)
        counter = jnp.where(outer, state.step * spec.outer_steps + outer_index, state.step)
        loss, grads = self.accumulated_grads(state.params, frozen, batch, self._key(state, stream, counter),
                                             old=state.old_lora)
        if spec.penalised:  # once per step: the mean over micro-batches of (CE + P) is mean CE + P
            penalty, penalty_grads = jax.value_and_grad(self._penalty)(state.params, state, spec)
            grads = jax.tree.map(jnp.add, grads, penalty_grads)
        if spec.outer_steps and spec.outer_loss_scale != 1.0:  # the reference's outer loss / accumulation steps
            scale = jnp.where(outer, jnp.float32(spec.outer_loss_scale), jnp.float32(1.0))
            grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
        grads = self._constrain(grads)
        # Outer steps with the shared optimizer (reference quirk) use the inner AdamW state and the
        # current learning rate without advancing the schedule, which counts inner steps only.
        lr = linear_warmup_decay(state.step, state.total_steps, peak=self.lr, warmup=self.warmup_steps)
        if spec.outer_steps and spec.separate_outer_optimizer:
            def inner_update():
                params, opt = self._apply(grads, state.opt_state, state.params, lr)
                return params, opt, state.outer_opt_state

            def outer_update():
                params, opt = self._apply(grads, state.outer_opt_state, state.params, jnp.float32(self.outer_lr))
                return params, state.opt_state, opt

            params, opt_state, outer_opt_state = jax.lax.cond(outer, outer_update, inner_update)
            lr = jnp.where(outer, jnp.float32(self.outer_lr), lr)
        else:
            params, opt_state = self._apply(grads, state.opt_state, state.params, lr)
            outer_opt_state = state.outer_opt_state
        new = state.replace(params=params, opt_state=opt_state, outer_opt_state=outer_opt_state)
        at = params if spec.importance_at_updated_params else state.params
        imp_grads = self._importance_grads(grads, spec)
        if spec.track_importance:
            skip = outer | (state.step < spec.importance_first_step)
            new = new.replace(imp_in=_where_tree(skip, state.imp_in, self._importance(state.imp_in, at, imp_grads,
                                                                                     spec)))
        if spec.outer_steps and spec.update_outer_importance:
            new = new.replace(imp_out=_where_tree(outer, self._importance(state.imp_out, at, imp_grads, spec),
                                                  state.imp_out))
        ok = jnp.isfinite(loss) & _all_finite(grads)
        if spec.penalised:
            ok = ok & jnp.isfinite(penalty)
        new = _where_tree(ok, new, state).replace(step=state.step + jnp.where(outer, 0, 1).astype(jnp.int32))
        new = self._constrain(new)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr, "finite": ok}
        if spec.penalised:
            metrics["penalty"] = penalty
        return new, metrics

    def _masks(self, imp: Any, spec: CycleSpec) -> Any:
        scores = kif_jax.importance_scores(imp, kind=spec.score)
        # Sharded scores: the counting threshold (no gather); replicated ones: the configured method.
        # Both give the same masks (kif_jax/core/thresholds.py).
        method = "bisect" if self.mesh is not None and sharding.is_sharded(scores, self.mesh) else spec.threshold_method
        return kif_jax.importance_masks(scores, quantile=spec.quantile, scope=spec.scope, method=method)

    def _fuse(self, base: Any, tau_in: Any, tau_out: Any, state: TrainState,
              spec: CycleSpec) -> tuple[Any, dict, TrainState]:
        """theta = base + w_in*tau_in + w_out*tau_out, with mask statistics for the logs.

        Returns the fused parameters, the statistics, and `state` with its masks remembered (`prev_masks`),
        for the next fusion's overlap statistics.
        """
        if spec.adaptive:  # +Adaptive: no masks
            return self._fuse_adaptive(base, tau_in, tau_out, state, spec)
        if not spec.identify:
            ones = jax.tree.map(lambda x: jnp.ones(x.shape, bool), base)
            fused = kif_jax.fuse_with_masks(base, tau_in, tau_out, ones, ones, scheme="binary")
            return fused, {}, state
        mask_in, mask_out = self._masks(state.imp_in, spec), self._masks(state.imp_out, spec)
        fused = kif_jax.fuse_with_masks(base, tau_in, tau_out, mask_in, mask_out, scheme=spec.scheme)
        both = jax.tree.map(jnp.logical_and, mask_in, mask_out)
        stats = {
            "mask_in_frac": kif_jax.mask_fractions(mask_in),
            "mask_out_frac": kif_jax.mask_fractions(mask_out),
            "mask_both_frac": kif_jax.mask_fractions(both),
            # Per-leaf shares, magnitudes inside / outside the masks, overlap with the last fusion (kif_jax/report.py).
            "fusion": fusion_stats(tau_in, tau_out, mask_in, mask_out, state.prev_masks or None),
        }
        if state.prev_masks:
            state = state.replace(prev_masks=(mask_in, mask_out))
        return fused, stats, state

    # --- programs -----------------------------------------------------------------------------
    def _run_cycle(self, state: TrainState, frozen: Any, inner_batches: Batch, outer_batches: Batch | None,
                   *, spec: CycleSpec) -> tuple[TrainState, dict]:
        """Q inner steps; for KIF also M outer steps and the fusion (or accumulation) of their task vectors."""
        theta_t = state.params
        q = spec.inner_steps
        if spec.outer_steps == 0:
            state, inner = jax.lax.scan(lambda s, b: self._step(s, b, False, 0, frozen, spec), state, inner_batches)
            return state, {f"inner_{k}": v for k, v in inner.items()}
        if all(a.shape[1:] == b.shape[1:] for a, b in zip(jax.tree.leaves(inner_batches), jax.tree.leaves(outer_batches))):
            def body(carry, xs):
                s, theta_k = carry
                batch, i = xs
                theta_k = _where_tree(i == q, s.params, theta_k)  # the parameters after the last inner step
                s, m = self._step(s, batch, i >= q, i - q, frozen, spec)
                return (s, theta_k), m

            batches = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), inner_batches, outer_batches)
            (state, theta_k), steps = jax.lax.scan(body, (state, state.params),
                                                   (batches, jnp.arange(q + spec.outer_steps)))
            inner = jax.tree.map(lambda x: x[:q], steps)
            outer = jax.tree.map(lambda x: x[q:], steps)
        else:  # inner and outer batches of different shapes: two scans
            state, inner = jax.lax.scan(lambda s, b: self._step(s, b, False, 0, frozen, spec), state, inner_batches)
            theta_k = state.params
            state, outer = jax.lax.scan(lambda s, xs: self._step(s, xs[0], True, xs[1], frozen, spec),
                                        state, (outer_batches, jnp.arange(spec.outer_steps)))
        metrics: dict[str, jax.Array] = {f"inner_{k}": v for k, v in inner.items()}
        metrics.update({f"outer_{k}": outer[k] for k in ("loss", "finite")})
        tau_in = kif_jax.task_vector(theta_k, theta_t)
        tau_out = kif_jax.task_vector(state.params, theta_k)
        if spec.accumulate:
            return state.replace(acc_in=jax.tree.map(jnp.add, state.acc_in, tau_in),
                                 acc_out=jax.tree.map(jnp.add, state.acc_out, tau_out)), metrics
        if spec.fuse:
            fused, stats, state = self._fuse(theta_t, tau_in, tau_out, state, spec)
            metrics.update(stats)
            state = state.replace(params=fused)
            if spec.reset_inner:
                state = state.replace(imp_in=kif_jax.init_importance(fused))
            if spec.reset_outer:
                state = state.replace(imp_out=kif_jax.init_importance(fused))
        return state, metrics

    def _fuse_adaptive(self, base: Any, tau_in: Any, tau_out: Any, state: TrainState,
                       spec: CycleSpec) -> tuple[Any, dict, TrainState]:
        """+Adaptive: weights w_in = S_in / (S_in + S_out), w_out = 1 - w_in from min-max normalised scores."""
        w_in, w_out = baselines.adaptive_weights(kif_jax.importance_scores(state.imp_in, kind=spec.score),
                                                 kif_jax.importance_scores(state.imp_out, kind=spec.score))
        fused = kif_jax.fuse_with_weights(base, tau_in, tau_out, w_in, w_out)
        leaves = jax.tree.leaves(w_in)
        w_in_mean = sum(jnp.sum(w) for w in leaves) / sum(w.size for w in leaves)
        return fused, {"w_in_mean": w_in_mean}, state

    def _consolidate_skills(self, state: TrainState, *, first: bool, quantile: float) -> tuple[TrainState, dict]:
        """TaSL at a task end: unit scores of the task; from task 2 on, the unit-wise merge with the
        consolidated parameters the task started from (`anchor`) and the new accumulated scores."""
        current = baselines.unit_scores(kif_jax.importance_scores(state.imp_in))
        if first:  # task 1 is kept as trained; its scores are the accumulated ones
            return state.replace(unit_scores=current), {"units": jnp.int32(current.size)}
        w, accumulated = baselines.tasl_weights(current, state.unit_scores, quantile=quantile)
        merged = baselines.tasl_merge(state.anchor, state.params, w)
        stats = {"units": jnp.int32(current.size), "units_current_only": jnp.sum(w == 1.0),
                 "units_previous_only": jnp.sum(w == 0.0), "units_both": jnp.sum(w == 0.3)}
        return state.replace(params=merged, unit_scores=accumulated), stats

    def _update_fisher(self, state: TrainState, frozen: Any, batches: Batch) -> tuple[TrainState, dict]:
        """EWC at a task end: F += mean over the K batches [K, A, mb, L] of the squared gradient of the
        batch's mean token loss (no dropout; non-finite batches left out); theta* = the parameters."""

        def body(carry, batch):
            total, count = carry
            loss, grads = self.accumulated_grads(state.params, frozen, batch, None, old=state.old_lora)
            ok = jnp.isfinite(loss) & _all_finite(grads)
            total = jax.tree.map(lambda t, g: t + jnp.where(ok, jnp.square(g.astype(jnp.float32)), 0.0), total, grads)
            return (self._constrain(total), count + ok.astype(jnp.int32)), None

        zeros = self._constrain(jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), state.params))
        (total, count), _ = jax.lax.scan(body, (zeros, jnp.int32(0)), batches)
        fisher = jax.tree.map(lambda f, t: f + t / jnp.maximum(count, 1), state.fisher, total)
        leaves = jax.tree.leaves(fisher)
        stats = {"fisher_batches": count, "fisher_mean": sum(jnp.sum(f) for f in leaves) / sum(f.size for f in leaves)}
        return state.replace(fisher=fisher, star=jax.tree.map(jnp.copy, state.params)), stats

    def _merge_task(self, state: TrainState, *, spec: CycleSpec) -> tuple[TrainState, dict]:
        """Global merge: one fusion of the task's summed task vectors from its starting parameters."""
        fused, stats, state = self._fuse(state.anchor, state.acc_in, state.acc_out, state, spec)
        return state.replace(params=fused), stats

    def _estimate_outer_importance(self, state: TrainState, frozen: Any, batches: Batch, *,
                                   spec: CycleSpec) -> TrainState:
        """Static importance (-DIE): outer importance from K memory batches at fixed parameters."""

        def body(imp, xs):
            batch, index = xs
            key = self._key(state, STATIC_STREAM, index)
            loss, grads = self.accumulated_grads(state.params, frozen, batch, key)
            ok = jnp.isfinite(loss) & _all_finite(grads)
            # The gradient an outer step would see: its loss scaled, then clipped if importance reads that.
            grads = self._importance_grads(jax.tree.map(lambda g: g * spec.outer_loss_scale, grads), spec)
            return _where_tree(ok, self._importance(imp, state.params, grads, spec), imp), None

        n = batches["input_ids"].shape[0]
        imp_out, _ = jax.lax.scan(body, state.imp_out, (batches, jnp.arange(n)))
        return state.replace(imp_out=imp_out)

    def _dev_loss(self, params: Any, frozen: Any, batches: Batch) -> jax.Array:
        """Mean token loss over stacked [K, mb, L] dev batches, without dropout."""

        def body(carry, batch):
            loss, count = self.token_loss(params, frozen, batch, None)
            return (carry[0] + loss * count, carry[1] + count), None

        (total, count), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)), batches)
        return total / jnp.maximum(count, 1)


def init_state(params: Any, tx: optax.GradientTransformation, *, key: jax.Array, total_steps: int,
               importance: bool, separate_outer: bool, merge_accumulators: bool, select_best: bool) -> TrainState:
    """A fresh state for one task (or phase); only the parts the method uses are allocated."""
    zeros = functools.partial(jax.tree.map, jnp.zeros_like)
    no_mask = functools.partial(jax.tree.map, lambda p: jnp.zeros(jnp.shape(p), bool))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        total_steps=jnp.asarray(total_steps, jnp.int32),
        params=jax.tree.map(jnp.copy, params),  # the caller's arrays survive the cycle's donation
        opt_state=tx.init(params),
        outer_opt_state=tx.init(params) if separate_outer else (),
        imp_in=kif_jax.init_importance(params) if importance else (),
        imp_out=kif_jax.init_importance(params) if importance else (),
        anchor=jax.tree.map(jnp.copy, params) if merge_accumulators else (),
        acc_in=zeros(params) if merge_accumulators else (),
        acc_out=zeros(params) if merge_accumulators else (),
        best_params=jax.tree.map(jnp.copy, params) if select_best else (),
        best_loss=jnp.asarray(jnp.inf, jnp.float32),
        prev_masks=(no_mask(params), no_mask(params)) if importance else (),
        rng=key,
    )
