"""Tokenizers behind one small protocol: the byte-level ByT5 scheme (no files) and Hugging Face's."""
from __future__ import annotations

from typing import Protocol, Sequence


class Tokenizer(Protocol):
    """What kif_jax needs of a tokenizer: ids with a trailing EOS, and text back."""

    pad_token_id: int
    eos_token_id: int
    vocab_size: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]: ...


class ByteTokenizer:
    """ByT5's byte-level scheme: id = byte + 3, with pad 0, EOS 1, UNK 2; needs no vocabulary file."""

    pad_token_id = 0
    eos_token_id = 1
    unk_token_id = 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")] + [self.eos_token_id]

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eos_token_id:
                break
            if self.offset <= i < self.offset + 256:  # ByT5 checkpoints add sentinel ids past the bytes
                out.append(i - self.offset)
        return out.decode("utf-8", errors="ignore")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(row) for row in ids]


class HFTokenizer:
    """Adapter of a `transformers` tokenizer (T5's SentencePiece one adds EOS itself)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.vocab_size = len(tokenizer)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return list(self.tokenizer(list(texts), add_special_tokens=True)["input_ids"])

    def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
        cut = []
        for row in ids:
            row = [int(i) for i in row]
            cut.append(row[: row.index(self.eos_token_id)] if self.eos_token_id in row else row)
        return self.tokenizer.batch_decode(cut, skip_special_tokens=True)


BYTE_TOKENIZER_NAMES = ("byte", "byt5-bytes")


def load_tokenizer(path_or_repo_id: str) -> Tokenizer:
    """`"byte"` gives the file-free byte tokenizer; anything else goes through `AutoTokenizer`."""
    if path_or_repo_id in BYTE_TOKENIZER_NAMES:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(path_or_repo_id))
