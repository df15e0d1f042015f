"""Finding and reading Hugging Face checkpoints (safetensors only, no torch), for every model family."""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Mapping, Sequence

import numpy as np

from kif_jax.errors import ModelLoadError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
#: What `snapshot_download` may fetch: weights, configs and tokenizer files, never pickles.
HUB_ALLOW_PATTERNS = ("*.safetensors", "*.json", "*.model", "*.txt", "tokenizer*")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def convert_hint(directory: str) -> str:
    return (f"{directory} holds only PyTorch pickles (pytorch_model.bin); kif_jax reads safetensors only. "
            "Convert it once on a machine with torch: python -c \"from transformers import "
            "AutoModel as M; M.from_pretrained('SRC').save_pretrained('DST')\" "
            "(transformers >= 5 writes model.safetensors), then load DST.")


def resolve_checkpoint(path_or_repo_id: str) -> str:
    """A local directory holding the checkpoint: the path itself, or a hub snapshot."""
    path = os.path.expanduser(str(path_or_repo_id))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ModelLoadError(f"{path} is a file; pass the checkpoint directory (with config.json)")
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep in path.replace("/", ""):
        raise ModelLoadError(f"checkpoint directory {path} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=list(HUB_ALLOW_PATTERNS))
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one message
        raise ModelLoadError(f"cannot fetch {path!r} from the Hugging Face hub "
                             f"({type(e).__name__}: {e}); pass a local checkpoint directory instead") from None


def weight_files(directory: str) -> dict[str, str]:
    """tensor name -> safetensors file, from the index of a sharded checkpoint or the single file."""
    from safetensors import safe_open

    index = os.path.join(directory, SAFE_INDEX)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot read {index}: {e}") from None
        missing = sorted({v for v in weight_map.values() if not os.path.exists(os.path.join(directory, v))})
        if missing:
            raise ModelLoadError(f"{index} names shard(s) that are not in {directory}: {', '.join(missing)}")
        return {k: os.path.join(directory, v) for k, v in weight_map.items()}
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        if any(f.endswith(".bin") for f in os.listdir(directory)):
            raise ModelLoadError(convert_hint(directory))
        raise ModelLoadError(f"no *.safetensors file in {directory}")
    out = {}
    for name in files:
        file = os.path.join(directory, name)
        try:
            with safe_open(file, framework="numpy") as f:
                out.update({k: file for k in f.keys()})
        except Exception as e:  # noqa: BLE001 - a corrupt file of any kind
            raise ModelLoadError(f"cannot read {file}: {e}") from None
    return out


class SafetensorsReader:
    """Lazy access to tensors spread over safetensors files: shapes first, data on demand."""

    def __init__(self, files: dict[str, str]) -> None:
        from safetensors import safe_open

        self.files = files
        self._handles = {f: safe_open(f, framework="numpy") for f in sorted(set(files.values()))}

    def names(self) -> list[str]:
        return sorted(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.files[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return str(self._handles[self.files[name]].get_slice(name).get_dtype())

    def get(self, name: str) -> np.ndarray:
        return self._handles[self.files[name]].get_tensor(name)


def summarise(title: str, items: list[str], limit: int = 12) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n    {shown}{more}"




def read_config(directory: str) -> dict:
    """`config.json` of a checkpoint directory as a dict."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise ModelLoadError(f"no config.json in {directory}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None


Transform = Callable[[np.ndarray], np.ndarray] | None


def transpose(x: np.ndarray) -> np.ndarray:
    """[out, in] (torch `nn.Linear`) <-> [in, out] (kif_jax `Dense`); its own inverse."""
    return x.T


class NameTable:
    """Hugging Face tensor names <-> dotted model paths, both ways, from one table of templates.

    Rows are (HF template, model template, transform); `{field}` placeholders match the regexes in
    `fields` and carry over from one side to the other. Transforms here are their own inverses.
    """

    def __init__(self, rows: Sequence[tuple[str, str, Transform]], fields: Mapping[str, str]) -> None:
        def compile_(template: str) -> re.Pattern[str]:
            out, pos = [], 0
            for m in re.finditer(r"\{(\w+)\}", template):
                out.append(re.escape(template[pos:m.start()]))
                out.append(f"(?P<{m.group(1)}>{fields[m.group(1)]})")
                pos = m.end()
            out.append(re.escape(template[pos:]))
            return re.compile("".join(out))

        self._to_model = tuple((compile_(hf), model, fn) for hf, model, fn in rows)
        self._to_hf = tuple((compile_(model), hf, fn) for hf, model, fn in rows)

    @staticmethod
    def _lookup(table: tuple, name: str) -> tuple[str, Transform] | None:
        for pattern, template, fn in table:
            m = pattern.fullmatch(name)
            if m:
                return template.format(**m.groupdict()), fn
        return None

    def to_model(self, name: str) -> tuple[str, Transform] | None:
        """The model path of a Hugging Face tensor name and its transform; None if unknown."""
        return self._lookup(self._to_model, name)

    def to_hf(self, path: str) -> tuple[str, Transform] | None:
        """The Hugging Face name of a dotted model path and its (inverse) transform."""
        return self._lookup(self._to_hf, path)
