"""Multi-task learning: one phase on the union of every task's training data (the upper bound).

It has one row of the accuracy matrix, the last, so no BWT; its zero-shot row is not evaluated
(its one phase already trains every task).
"""
from __future__ import annotations

from typing import Sequence

from kif_jax.methods.base import Method


class MultiTask(Method):
    """Every task at once."""

    name = "mtl"

    def phases(self, tasks: Sequence[str]) -> list[list[str]]:
        return [list(tasks)]


METHODS = (MultiTask,)
