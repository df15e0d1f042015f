"""Pure training programs on explicit state: the generic optimizer step, and the jitted entries that run a
method's programs (kif_jax/methods/base.py).

A batch here is a dict of int32 arrays shaped [A, mb, L] (A accumulated micro-batches of mb rows);
a cycle takes Q of them stacked to [Q, A, mb, L] and, for a method with batches of its own, those stacked
too, and runs everything in one XLA program (`lax.scan`), so an accelerator never waits on the host
between steps. Non-finite steps are gated off (state unchanged) and flagged; the
host stops or skips.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from kif_jax import sharding
from kif_jax.core.tree import tree_path_names
from kif_jax.methods.base import Learner, Program, all_finite, where_tree
from kif_jax.models.family import ModelFamily
from kif_jax.models.layers import capture_output_magnitudes

Batch = dict[str, jax.Array]


@struct.dataclass
class TrainState:
    """Everything a step changes; checkpointed whole."""

    step: jax.Array  # int32 [], inner optimizer steps taken in the current task
    total_steps: jax.Array  # int32 [], inner steps of the current task (learning-rate schedule)
    params: Any  # the trainable pytree (LoRA factors, or every parameter)
    opt_state: Any  # AdamW state
    best_params: Any  # select_best: parameters with the lowest dev loss so far, else ()
    best_loss: jax.Array  # float32 [], that dev loss (inf before the first measurement)
    rng: jax.Array  # uint32 key data of the task's dropout key (see `make_task_key`); steps fold in counters
    method: Any = ()  # the method's own state (kif_jax/methods/), checkpointed, sharded and planned with the rest


def make_task_key(seed: int, phase: int, impl: str) -> jax.Array:
    """The raw key data of task `phase`'s dropout key, for the PRNG implementation `impl`.

    "rbg" draws bits with XLA's RngBitGenerator, which compiles in a fraction of threefry's time
    (threefry dominated compile time on CPU); its bits are reproducible on a fixed device count
    but may differ between meshes. "threefry" is sharding-invariant.
    """
    return jax.random.key_data(jax.random.fold_in(jax.random.key(seed, impl=impl), phase))


def adam_transform(max_grad_norm: float, weight_decay: float) -> optax.GradientTransformation:
    """Clipping + Adam + decoupled decay, without the learning rate (applied per step, see `Programs.apply`)."""
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


def init_state(params: Any, tx: optax.GradientTransformation, *, key: jax.Array, total_steps: int,
               select_best: bool, method_state: Any = ()) -> TrainState:
    """A fresh state for one task (or phase), with the method's part `method_state`."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        total_steps=jnp.asarray(total_steps, jnp.int32),
        params=jax.tree.map(jnp.copy, params),  # the caller's arrays survive the cycle's donation
        opt_state=tx.init(params),
        best_params=jax.tree.map(jnp.copy, params) if select_best else (),
        best_loss=jnp.asarray(jnp.inf, jnp.float32),
        rng=key,
        method=method_state,
    )


def _magnitude_taps(probes: Any) -> dict[str, dict[str, jax.Array]]:
    """{dotted module path: {leaf name: probe}} of a trainable tree's probes, for the layers to find."""
    taps: dict[str, dict[str, jax.Array]] = {}
    for names, probe in zip(tree_path_names(probes), jax.tree.leaves(probes)):
        taps.setdefault(".".join(names[:-1]), {})[names[-1]] = probe
    return taps


class Programs:
    """The jitted programs of one model (graphdef, family) and optimizer setting.

    `run_cycle(state, frozen, inner, extra, program=...)` runs a method's training program (state donated);
    `run_hook(...)` the same for its task-start and task-end programs (no donation); `dev_loss` measures.
    Programs are static arguments: equal programs share one compiled XLA program.
    """

    def __init__(self, graphdef: nnx.GraphDef, *, family: ModelFamily, lr: float, warmup_steps: int,
                 max_grad_norm: float, weight_decay: float, prng_impl: str = "rbg", donate: bool = True,
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
        self.tx = adam_transform(max_grad_norm, weight_decay)
        self.max_grad_norm = max_grad_norm
        self.run_cycle = jax.jit(self._pinned(self._run_cycle), static_argnames=("program",),
                                 donate_argnames=("state",) if donate else ())
        self.run_hook = jax.jit(self._pinned(self._run_hook), static_argnames=("program",))
        self.dev_loss = jax.jit(self._dev_loss)

    def constrain(self, tree: Any) -> Any:
        """`tree` pinned to its `kif_jax.sharding` layout on the mesh (no-op without a mesh)."""
        return tree if self.mesh is None else sharding.constrain(tree, self.mesh)

    def _pinned(self, fn: Any) -> Any:
        @functools.wraps(fn)
        def pinned(*args: Any, **kwargs: Any) -> Any:
            return self.constrain(fn(*args, **kwargs))

        return pinned

    # Two names for one body, so that compiled modules (profiles, HLO dumps) say which kind they are.
    def _run_cycle(self, state: Any, frozen: Any, batches: Batch | None = None, extra: Batch | None = None, *,
                   program: Any) -> tuple[Any, dict]:
        return program.run(self, state, frozen, batches, extra)

    def _run_hook(self, state: Any, frozen: Any, batches: Batch | None = None, extra: Batch | None = None, *,
                  program: Any) -> tuple[Any, dict]:
        return program.run(self, state, frozen, batches, extra)

    # --- losses -------------------------------------------------------------------------------
    def token_loss(self, params: Any, frozen: Any, batch: Batch, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Mean target cross-entropy of one micro-batch [mb, L] (padding ignored), and its token count."""
        return self.family.token_loss(nnx.merge(self.graphdef, params, frozen), batch, key=key)

    def accumulated_grads(self, program: Program, params: Any, method_state: Any, frozen: Any, batch: Batch,
                          key: jax.Array | None) -> tuple[jax.Array, Any, Any]:
        """Loss, gradient and (with `program.capture_magnitudes`, else None) layer-output magnitudes,
        averaged over the A micro-batches of a [A, mb, L] batch (Hugging Face Trainer's accumulation).

        `key` None: no dropout. The model runs with `program.model_params(method_state, params)`.
        """
        def loss(p: Any, micro: Batch, k: jax.Array | None) -> jax.Array:
            return self.token_loss(program.model_params(method_state, p), frozen, micro, k)[0]

        n_micro = batch["input_ids"].shape[0]
        zeros = lambda tree: self.constrain(jax.tree.map(jnp.zeros_like, tree))  # noqa: E731
        micro_key = lambda index: None if key is None else jax.random.fold_in(key, index)  # noqa: E731
        if not program.capture_magnitudes:
            grad_fn = jax.value_and_grad(loss)

            def body(carry, xs):
                loss_sum, grad_sum = carry
                micro, index = xs
                value, grads = grad_fn(params, micro, micro_key(index))
                return (loss_sum + value, jax.tree.map(jnp.add, grad_sum, grads)), None

            init = (jnp.zeros((), jnp.float32), zeros(params))
            (loss_sum, grad_sum), _ = jax.lax.scan(body, init, (batch, jnp.arange(n_micro)))
            return loss_sum / n_micro, jax.tree.map(lambda g: g / n_micro, grad_sum), None

        # Each trainable tensor gets a zero probe over its last axis; the layers' taps return the summed
        # |output| of the features that axis produces as the probe's "gradient" (kif_jax/models/layers.py),
        # over the positions `program.magnitude_positions` names, per micro-batch.
        probes = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p)[-1:], jnp.float32), params)
        if program.magnitude_positions not in ("authors", "all"):
            raise ValueError(f"magnitude_positions must be 'authors' or 'all', got {program.magnitude_positions!r}")

        def tapped_loss(p: Any, probe: Any, micro: Batch, k: jax.Array | None) -> jax.Array:
            weights = self.family.position_weights(micro) if program.magnitude_positions == "authors" else None
            with capture_output_magnitudes(_magnitude_taps(probe), weights):
                return loss(p, micro, k)

        grad_fn = jax.value_and_grad(tapped_loss, argnums=(0, 1))

        def tapped_body(carry, xs):
            loss_sum, grad_sum, magnitude_sum = carry
            micro, index = xs
            value, (grads, magnitudes) = grad_fn(params, probes, micro, micro_key(index))
            return (loss_sum + value, jax.tree.map(jnp.add, grad_sum, grads),
                    jax.tree.map(jnp.add, magnitude_sum, magnitudes)), None

        init = (jnp.zeros((), jnp.float32), zeros(params), jax.tree.map(jnp.zeros_like, probes))
        (loss_sum, grad_sum, magnitudes), _ = jax.lax.scan(tapped_body, init, (batch, jnp.arange(n_micro)))
        return loss_sum / n_micro, jax.tree.map(lambda g: g / n_micro, grad_sum), magnitudes

    # --- steps --------------------------------------------------------------------------------
    def key(self, state: TrainState, stream: Any, counter: Any) -> jax.Array:
        """The dropout key of one step: the task's key, folded with a stream and a counter."""
        key = jax.random.wrap_key_data(state.rng, impl=self.prng_impl)
        return jax.random.fold_in(jax.random.fold_in(key, stream), counter)

    def apply(self, grads: Any, opt_state: Any, params: Any, lr: jax.Array) -> tuple[Any, Any]:
        """One AdamW update (clipping inside) at learning rate `lr`."""
        updates, opt_state = self.tx.update(grads, opt_state, params)
        new_params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), params, updates)
        return new_params, opt_state

    def clip(self, grads: Any) -> Any:
        """`grads` clipped to the global norm `train.max_grad_norm`, as the optimizer clips them."""
        return optax.clip_by_global_norm(self.max_grad_norm).update(grads, optax.EmptyState())[0]

    def step(self, program: Program, state: TrainState, batch: Batch, frozen: Any,
             learner: Learner | None = None) -> tuple[TrainState, dict]:
        """One optimizer step of `program` on a [A, mb, L] batch; `learner` for programs with several."""
        loss, grads, magnitudes = self.accumulated_grads(program, state.params, state.method, frozen, batch,
                                                         program.step_key(self, state, learner))
        penalty = None
        if program.penalised:  # once per step: the mean over micro-batches of (CE + P) is mean CE + P
            penalty, penalty_grads = jax.value_and_grad(program.penalty)(state.params, state.method)
            grads = jax.tree.map(jnp.add, grads, penalty_grads)
        grads = self.constrain(program.transform_grads(self, state, grads, learner, magnitudes))
        lr = linear_warmup_decay(state.step, state.total_steps, peak=self.lr, warmup=self.warmup_steps)
        new, lr = program.update(self, state, grads, lr, learner)
        new = program.after_update(self, state, new, grads, learner)
        ok = jnp.isfinite(loss) & all_finite(grads)
        if penalty is not None:
            ok = ok & jnp.isfinite(penalty)
        new = where_tree(ok, new, state).replace(step=state.step + program.counts_as_step(learner))
        new = self.constrain(new)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr, "finite": ok}
        if penalty is not None:
            metrics["penalty"] = penalty
        return new, metrics

    def scan_steps(self, program: Program, state: TrainState, frozen: Any, batches: Batch,
                   learner: Learner | None = None) -> tuple[TrainState, dict]:
        """`program`'s steps over stacked batches [n, A, mb, L]; metrics stacked [n]."""
        return jax.lax.scan(lambda s, b: self.step(program, s, b, frozen, learner), state, batches)

    # --- measurement --------------------------------------------------------------------------
    def _dev_loss(self, params: Any, frozen: Any, batches: Batch) -> jax.Array:
        """Mean token loss over stacked [K, mb, L] dev batches, without dropout."""

        def body(carry, batch):
            loss, count = self.token_loss(params, frozen, batch, None)
            return (carry[0] + loss * count, carry[1] + count), None

        (total, count), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)), batches)
        return total / jnp.maximum(count, 1)
