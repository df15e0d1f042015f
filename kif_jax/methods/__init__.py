"""Continual-learning methods: one module per method, one registry (docs/adding_a_method.md).

`Method` (host side) and `Program` (one jitted training program) are the interface; `registry` lists the
methods. The training loop (kif_jax/train/) composes what a method provides and never names one.
"""
from kif_jax.methods.base import Learner, Method, Program, all_finite, where_tree
from kif_jax.methods.registry import (builtin_names, method_class, names, register, resolve, sections,
                                      unrelated_sections)

__all__ = ["Learner", "Method", "Program", "all_finite", "builtin_names", "method_class", "names", "register",
           "resolve", "sections", "unrelated_sections", "where_tree"]
