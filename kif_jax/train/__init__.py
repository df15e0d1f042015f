"""Training: jitted KIF cycles (steps.py), method switches (methods.py), the task loop (loop.py)."""
from kif_jax.train.loop import build_model, resolve_run, train_and_evaluate
from kif_jax.train.methods import CycleSpec, MethodSpec, cycle_spec, method_spec
from kif_jax.train.steps import Programs, TrainState, init_state

__all__ = ["CycleSpec", "MethodSpec", "Programs", "TrainState", "build_model", "cycle_spec", "init_state",
           "method_spec", "resolve_run", "train_and_evaluate"]
