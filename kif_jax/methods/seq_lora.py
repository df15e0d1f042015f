"""SeqLoRA: one LoRA (or, with `model.trainable = "all"`, every parameter) trained on the tasks in order.

The lower bound of the paper's tables, and the defaults every other method starts from
(`kif_jax.methods.base`): nothing but the task's own cross-entropy, no state between tasks.
"""
from __future__ import annotations

from kif_jax.methods.base import Method


class SeqLoRA(Method):
    """Each task in turn, from where the previous one ended."""

    name = "seq_lora"


METHODS = (SeqLoRA,)
