"""Tokenizers behind one small protocol: the byte-level ByT5 scheme (no files), Hugging Face's, and
the one a GGUF file describes in its `tokenizer.ggml.*` metadata (built without torch)."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator, Protocol, Sequence

from kif_jax.errors import ModelLoadError
from kif_jax.models import gguf

NO_TORCH_NOTICE = "PyTorch was not found. Models won't be available"


class _DropNoTorchNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NO_TORCH_NOTICE)


@contextlib.contextmanager
def no_torch_notice() -> Iterator[None]:
    """Drop only transformers' "PyTorch was not found" notice, which its first import logs (kif_jax uses
    its tokenizers, never its torch models); every other transformers message still shows."""
    logger = logging.getLogger("transformers")
    drop = _DropNoTorchNotice()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


class Tokenizer(Protocol):
    """What kif_jax needs of a tokenizer: ids (with the tokenizer's own special tokens), and text back."""

    pad_token_id: int
    eos_token_id: int
    bos_token_id: int | None
    vocab_size: int

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]: ...

    def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]: ...


class ByteTokenizer:
    """ByT5's byte-level scheme: id = byte + 3, with pad 0, EOS 1, UNK 2; needs no vocabulary file."""

    pad_token_id = 0
    eos_token_id = 1
    bos_token_id: int | None = None
    unk_token_id = 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return ids + [self.eos_token_id] if add_special_tokens else ids

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eos_token_id:
                break
            if self.offset <= i < self.offset + 256:  # ByT5 checkpoints add sentinel ids past the bytes
                out.append(i - self.offset)
        return out.decode("utf-8", errors="ignore")

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(row) for row in ids]


class HFTokenizer:
    """Adapter of a `transformers` tokenizer (T5's SentencePiece one adds EOS itself; SmolLM2's adds nothing).

    A tokenizer without a pad token pads with EOS (decoder-only models); masks, not ids, mark padding.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_token_id = self.eos_token_id if pad is None else int(pad)
        bos = tokenizer.bos_token_id
        self.bos_token_id: int | None = None if bos is None else int(bos)
        self.vocab_size = len(tokenizer)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return list(self.tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"])

    def apply_chat_template(self, prompt: str) -> str:
        """`prompt` as the single user turn of the tokenizer's chat template, ready for the reply."""
        if not getattr(self.tokenizer, "chat_template", None):
            name = getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
            raise ModelLoadError(f"tokenizer {name} has no chat template; use a plain prompt format instead")
        rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        # Templates that open with the BOS text (Gemma's, LLaMA-3's) would give two BOS ids where the
        # tokenizer adds its own: the rendered turn starts after it, and encoding adds it once.
        bos = getattr(self.tokenizer, "bos_token", None)
        if bos and rendered.startswith(bos) and self._adds_bos():
            rendered = rendered[len(bos):]
        return rendered

    def _adds_bos(self) -> bool:
        """Whether encoding with special tokens puts the BOS first."""
        ids = self.encode_batch(["a"], add_special_tokens=True)[0]
        return self.bos_token_id is not None and bool(ids) and ids[0] == self.bos_token_id

    def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
        cut = []
        for row in ids:
            row = [int(i) for i in row]
            cut.append(row[: row.index(self.eos_token_id)] if self.eos_token_id in row else row)
        return self.tokenizer.batch_decode(cut, skip_special_tokens=True)


BYTE_TOKENIZER_NAMES = ("byte", "byt5-bytes")


def load_tokenizer(path_or_repo_id: str) -> Tokenizer:
    """`"byte"` gives the file-free byte tokenizer; a `.gguf` file (or a GGUF preset name such as
    "smollm2-135m-instruct-q4") the tokenizer in its metadata; anything else goes through `AutoTokenizer`."""
    if path_or_repo_id in BYTE_TOKENIZER_NAMES:
        return ByteTokenizer()
    gguf_path = gguf.resolve_gguf_name(path_or_repo_id)
    if gguf_path is not None or str(path_or_repo_id).endswith(".gguf"):
        return HFTokenizer(gguf_tokenizer(gguf_path or os.path.expanduser(str(path_or_repo_id))))
    with no_torch_notice():
        from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(path_or_repo_id))


# --- tokenizers described by a GGUF file -------------------------------------------------------------

#: Pre-tokenizer split regexes of byte-level BPE vocabularies, by `tokenizer.ggml.pre` (llama.cpp's
#: names). Types not listed use GPT-2's own regex, as llama.cpp does for "default".
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
               "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
               "deepseek-r1-qwen": _QWEN2_SPLIT}
#: `tokenizer.ggml.pre` types that isolate every number character before GPT-2's split (llama.cpp's
#: SMOLLM; the `Digits(individual_digits=True)` + `ByteLevel` of SmolLM2's own tokenizer.json).
#: transformers' GGUF converter (5.23) leaves this split out; its ids then differ where whitespace
#: precedes a number ("a  1", " ²"): ~0.3% of the benchmark's texts.
GGUF_DIGIT_SPLIT = ("smollm",)
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _byte_alphabet() -> set[str]:
    """The 256 printable characters GPT-2's byte-level BPE spells bytes with."""
    from tokenizers import pre_tokenizers

    return set(pre_tokenizers.ByteLevel.alphabet())


def gguf_tokenizer(path: str) -> Any:
    """A `PreTrainedTokenizerFast` rebuilt from a GGUF file's `tokenizer.ggml.*` metadata, without torch.

    Byte-level BPE (`tokenizer.ggml.model` "gpt2": SmolLM2, Qwen2/3, LLaMA-3): vocabulary and merges
    from the file, control tokens as special tokens, the pre-tokenizer named by `tokenizer.ggml.pre`,
    BOS/EOS added as `add_bos_token` / `add_eos_token` say, pad = the file's padding id else EOS,
    and the file's chat template.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as CoreTokenizer

    with no_torch_notice():
        from transformers import PreTrainedTokenizerFast

    reader = gguf.open_gguf(path)
    meta = gguf.read_metadata(reader, tuple(k for k in reader.fields if k.startswith("tokenizer.")))
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(f"{path}: GGUF tokenizer type {kind!r} is not supported (only byte-level BPE, "
                             "'gpt2'); pass the model's Hugging Face tokenizer directory instead")
    tokens = list(meta.get("tokenizer.ggml.tokens") or ())
    merges = list(meta.get("tokenizer.ggml.merges") or ())
    if not tokens or not merges:
        raise ModelLoadError(f"{path}: GGUF file has no tokenizer.ggml.tokens / merges")
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    core = CoreTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                                    fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
                                          use_regex=pre not in GGUF_SPLITS)
    if pre in GGUF_SPLITS:
        core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GGUF_SPLITS[pre]), "isolated"),
                                                      byte_level])
    elif pre in GGUF_DIGIT_SPLIT:
        core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        core.pre_tokenizer = byte_level
    core.decoder = decoders.ByteLevel()

    alphabet = _byte_alphabet()
    # A control token spelled outside the byte alphabet is a mislabelled ordinary token in llama.cpp
    # files; transformers skips those too.
    core.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok, ty in zip(tokens, types)
                             if ty == _CONTROL and set(tok) <= alphabet])
    core.add_tokens([AddedToken(tok, special=False, normalized=False) for tok, ty in zip(tokens, types)
                     if ty == _USER_DEFINED])

    def special(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

    bos, eos, unk = special("bos_token_id"), special("eos_token_id"), special("unknown_token_id")
    pad = special("padding_token_id") or eos
    if eos is None:
        raise ModelLoadError(f"{path}: GGUF tokenizer has no tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    used = [t for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    core.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                        special_tokens=[(t, vocab[t]) for t in dict.fromkeys(used)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, unk_token=unk,
                                   pad_token=pad, chat_template=meta.get("tokenizer.chat_template"),
                                   clean_up_tokenization_spaces=False,
                                   name_or_path=os.path.basename(path))
