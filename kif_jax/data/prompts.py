"""Prompt templates for decoder-only models: how a benchmark record's `input` becomes the prompt.

A benchmark input is `<instruction with "Option: ...">\n<example text>\nAnswer:`. Every template
keeps that text; `split_prompt` names its three parts so an over-long prompt can lose the end of
its example text while the instruction (with the options) and the closing line survive.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

TEMPLATES = ("none", "alpaca", "chat")

# The Alpaca template of the reference's LLaMA script (finetune_KIF_llama.py).
ALPACA_HEAD = ("Below is an instruction that describes a task, paired with an input that provides further "
               "context. Write a response that appropriately completes the request.\n\n### Instruction:\n")
ALPACA_MIDDLE = "\n\n### Input:\n"
ALPACA_TAIL = "\n\n### Response:\n"


def split_prompt(text: str) -> tuple[str, str, str]:
    """(instruction line incl. its newline, example text, last line with its newline before it).

    A text without two newlines is all example text (nothing is protected from truncation).
    """
    first, last = text.find("\n"), text.rfind("\n")
    if first < 0 or first == last:
        return "", text, ""
    return text[: first + 1], text[first + 1: last], text[last:]


def prompt_parts(text: str, template: str, tokenizer: Any = None, *,
                 parts: Sequence[str] | None = None) -> tuple[str, str, str]:
    """The rendered prompt as (protected head, truncatable body, protected tail). `parts`: the record's own
    (head, body, tail) where its task format gives them (a record's `prompt_parts`), else `split_prompt`."""
    head, body, tail = parts if parts is not None else split_prompt(text)
    if template == "none":
        return head, body, tail
    if template == "alpaca":  # instruction = the benchmark's instruction line, input = the example
        if not head:
            return ALPACA_HEAD, body, tail + ALPACA_TAIL
        return ALPACA_HEAD + head.rstrip("\n") + ALPACA_MIDDLE, body, tail + ALPACA_TAIL
    if template == "chat":
        marker = "\x00BODY\x00"
        rendered = tokenizer.apply_chat_template(head + marker + tail)
        before, after = rendered.split(marker)
        return before, body, after
    raise ValueError(f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}")


def render_prompt(text: str, template: str, tokenizer: Any = None, *, parts: Sequence[str] | None = None) -> str:
    """The whole prompt string of a benchmark input under `template`."""
    return "".join(prompt_parts(text, template, tokenizer, parts=parts))


TemplateFn = Callable[[str], tuple[str, str, str]]
