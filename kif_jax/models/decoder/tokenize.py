"""The decoder-only family's tokenization of benchmark records: the "causal" batch layout
(kif_jax/data/batching.py), the prompt and its label tokenized apart."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from kif_jax.data.batching import TokenizedDataset
from kif_jax.data.prompts import prompt_parts


def tokenize_causal_records(
    records: Sequence[dict],
    tokenizer: Any,
    *,
    max_input_length: int = 1024,
    max_target_length: int = 128,
    template: str = "none",
) -> TokenizedDataset:
    """Decoder-only rows: the prompt (template applied, led by the BOS if the tokenizer adds one, no
    EOS) and, tokenized separately, the label + EOS, so BPE never merges across the boundary.

    A prompt over `max_input_length` tokens loses the end of its example text: the instruction line
    (with its options) and the closing line ("Answer:") are kept whole (or the head and tail of the record's
    `prompt_parts`, where its task format gives them).
    """
    if max_input_length < 2 or max_target_length < 2:
        raise ValueError("max_input_length and max_target_length must be at least 2 (a token and EOS)")
    eos = int(tokenizer.eos_token_id)
    prefix = leading_special_ids(tokenizer)
    parts = [prompt_parts(r["input"], template, tokenizer, parts=r.get("prompt_parts")) for r in records]
    inputs = []
    for ids, (head, body, tail) in zip(tokenizer.encode_batch(["".join(p) for p in parts], add_special_tokens=False),
                                       parts):
        ids = prefix + list(ids)
        if len(ids) > max_input_length:
            ids = prefix + _cut_body(tokenizer, head, body, tail, max_input_length - len(prefix))
        inputs.append(np.asarray(ids, dtype=np.int32))
    labels = tokenizer.encode_batch([r["output"] for r in records], add_special_tokens=False)
    return TokenizedDataset(
        input_ids=tuple(inputs),
        target_ids=tuple(np.asarray(list(t)[: max_target_length - 1] + [eos], dtype=np.int32) for t in labels),
        references=tuple(r["output"] for r in records),
        ids=tuple(str(r.get("id", i)) for i, r in enumerate(records)),
        tasks=tuple(str(r.get("task", "")) for r in records),
        pad_token_id=int(tokenizer.pad_token_id),
        eos_token_id=eos,
        max_input_length=max_input_length,
        max_target_length=max_target_length,
        layout="causal",
    )


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before a text (LLaMA's BOS; none for SmolLM2, T5 or bytes)."""
    plain = list(tokenizer.encode_batch(["a"], add_special_tokens=False)[0])
    full = list(tokenizer.encode_batch(["a"], add_special_tokens=True)[0])
    for start in range(len(full) - len(plain) + 1):
        if full[start: start + len(plain)] == plain:
            return full[:start]
    return []


def _cut_body(tokenizer: Any, head: str, body: str, tail: str, max_length: int) -> list[int]:
    """head + the start of body + tail in at most `max_length` ids (head and tail kept whole)."""
    head_ids, body_ids, tail_ids = (list(x) for x in tokenizer.encode_batch([head, body, tail],
                                                                             add_special_tokens=False))
    room = max_length - len(head_ids) - len(tail_ids)
    if room < 0:  # not even the protected parts fit: keep the end, where the answer is asked for
        return (head_ids + tail_ids)[-max_length:]
    return head_ids + body_ids[:room] + tail_ids
