"""Training states of a method's phases: fresh, carried over a task boundary, and their memory plan."""
from __future__ import annotations

from typing import Any

import jax

from kif_jax.memory_plan import METHOD_PARTS, memory_plan
from kif_jax.methods.base import Method
from kif_jax.train.steps import TrainState, init_state, make_task_key


def fresh_state(method: Method, phase: int, params: Any, *, init_params: Any, tx: Any, total_steps: int) -> TrainState:
    """A fresh state of task `phase` (also the template a checkpoint of that task is restored into)."""
    c = method.config
    params = method.task_params(phase, params, init_params)
    state = init_state(params, tx, key=make_task_key(c.seed, phase, c.train.prng_impl), total_steps=total_steps,
                       select_best=c.train.select_best)
    return state.replace(method=method.init_state(phase, params, tx=tx))


def next_task_state(method: Method, prev: TrainState | None, phase: int, params: Any, *, init_params: Any, tx: Any,
                    total_steps: int) -> TrainState:
    """The state task `phase` starts with: fresh, with the method's state carried over the boundary, and
    with `train.reset_at_task_boundary = False` also the optimizer state."""
    state = fresh_state(method, phase, params, init_params=init_params, tx=tx, total_steps=total_steps)
    if prev is None:
        return state
    reset = bool(method.config.train.reset_at_task_boundary)
    state = state.replace(method=method.carry_state(prev, state.method, reset=reset))
    return state if reset else state.replace(opt_state=prev.opt_state)


def state_parts(method: Method, state: TrainState) -> dict[str, Any]:
    """The state split into the memory plan's parts (`memory_plan.memory_plan`)."""
    own = method.memory_parts(state.method)
    unknown = set(own) - {"optimizer", *METHOD_PARTS}
    if unknown:
        raise ValueError(f"method {method.name}: memory_parts has unknown parts {sorted(unknown)}")
    return {"trainable": state.params, "optimizer": (state.opt_state, own.get("optimizer", ())),
            **{part: own.get(part, ()) for part in METHOD_PARTS}}


def planned_state(method: Method, params: Any, num_phases: int, tx: Any) -> TrainState:
    """The abstract (shapes only) state of the method's largest phase, which the memory plan sizes."""
    phase = method.largest_state_phase(num_phases)
    return jax.eval_shape(lambda p: fresh_state(method, phase, p, init_params=p, tx=tx, total_steps=1), params)


def plan_method_memory(method: Method, params: Any, frozen: Any, mesh: Any, *, num_phases: int, tx: Any,
                       activations: int) -> dict:
    """The memory.json plan of `method`'s largest state with `frozen` on `mesh` (arrays or abstract)."""
    state = planned_state(method, params, num_phases, tx)
    return memory_plan(state_parts(method, state), frozen, mesh, activations=activations)
