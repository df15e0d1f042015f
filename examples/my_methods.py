"""A continual-learning method of one's own, outside kif_jax: SeqLoRA pulled toward where the last task ended.

    PYTHONPATH=examples python main.py --config.methods=seq_lora,my_methods:L2Anchor

Its loss adds (strength / 2) * ||theta - theta_prev||^2 from the second task on, theta_prev being the
trainable parameters at the end of the previous task (the method's state, checkpointed with the rest).
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from kif_jax.methods import Method, Program


@dataclasses.dataclass(frozen=True)
class AnchoredSteps(Program):
    """SeqLoRA steps with the pull toward the anchor (the program is jitted; its fields are static)."""

    strength: float = 0.0

    @property
    def penalised(self) -> bool:
        return True

    def penalty(self, params, anchor):
        squares = jax.tree.map(lambda p, a: jnp.sum(jnp.square(p - a)), params, anchor)
        return self.strength / 2 * sum(jax.tree.leaves(squares))


class L2Anchor(Method):
    name = "l2_anchor"  # its results go to <workdir>/l2_anchor/
    section = "l2_anchor"  # its settings: config.l2_anchor

    @staticmethod
    def default_config():
        c = ml_collections.ConfigDict()
        c.strength = 100.0  # weight of the pull toward the previous task's parameters
        return c

    def init_state(self, phase, params, *, tx):
        return jax.tree.map(jnp.copy, params)  # where this task starts: where the last one ended

    def cycle(self, task, step, steps):
        if task.phase == 0:
            return Program(inner_steps=steps), []  # the first task: plain SeqLoRA steps
        return AnchoredSteps(inner_steps=steps, strength=self.config.l2_anchor.strength), []
