"""Training: the generic step and jitted entries (steps.py), data assembly (data.py), states (state.py), the
resume position (position.py), what a method's hooks see (task.py), cycle records (records.py), the task
loop (loop.py) and the plan of a run not at hand (plan.py). Methods live in kif_jax/methods/."""
from kif_jax.train.loop import build_model, resolve_run, train_and_evaluate
from kif_jax.train.position import ResumePosition
from kif_jax.train.steps import Programs, TrainState, init_state, make_task_key

__all__ = ["Programs", "ResumePosition", "TrainState", "build_model", "init_state", "make_task_key", "resolve_run",
           "train_and_evaluate"]
