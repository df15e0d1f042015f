"""Comma-separated config strings ("seq_lora,replay", "q,v") as lists.

Apart from kif_jax.config so that the method registry, which the config schema reads its sections
from, can read `config.methods` without importing the schema.
"""
from __future__ import annotations


def split_list(value: str) -> list[str]:
    """A comma-separated config string as a list, blanks dropped."""
    return [part.strip() for part in str(value).split(",") if part.strip()]
