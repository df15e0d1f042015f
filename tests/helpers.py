"""Helpers shared by the test files: reading a run's records, the fields a bit-identity check compares."""
from __future__ import annotations

import json
import pathlib
from typing import Any

#: Recurrent-KIF, its ablations with masks or without, and the paper's baselines (the prior methods and
#: +Adaptive run in tests/test_baselines.py).
CORE_METHODS = ("recurrent_kif", "seq_lora", "replay", "mtl", "static_importance", "no_identification",
                "global_merge", "no_share")
TIMING_FIELDS = ("steps_per_s", "tokens_per_s")  # wall-clock figures: never reproducible
#: The fields of a training record that a resumed or refactored run must reproduce bit for bit.
TRAINING_KEYS = ("phase", "step", "loss", "grad_norm", "lr", "outer_loss", "mask_in_frac", "mask_out_frac")


def read_metrics(path: pathlib.Path) -> list[dict]:
    """Every record of a metrics.jsonl (or predictions.jsonl); a line being written ends the list."""
    path = pathlib.Path(path)
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def training_records(workdir: pathlib.Path, method: str) -> list[tuple]:
    """The TRAINING_KEYS of every training-cycle record of a method, in order."""
    return [tuple(r.get(k) for k in TRAINING_KEYS) for r in read_metrics(workdir / method / "metrics.jsonl")
            if "loss" in r]


def comparable_records(path: pathlib.Path) -> list[dict]:
    """Every metrics.jsonl record without its timing fields."""
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_metrics(path)]


def kif_state(programs: Any, params: Any, *, total_steps: int = 100) -> Any:
    """A Recurrent-KIF training state of task 2 (both learners' importance; the reference switches)."""
    from kif_jax.config import base_config
    from kif_jax.methods.recurrent_kif import RecurrentKIF
    from kif_jax.train import init_state, make_task_key

    method_state = RecurrentKIF(base_config()).init_state(1, params, tx=programs.tx)
    return init_state(params, programs.tx, key=make_task_key(0, 1, "rbg"), total_steps=total_steps,
                      select_best=False, method_state=method_state)


def float_environment() -> dict:
    """What XLA:CPU's float results depend on: the jax version, the CPU model and its vector instruction sets
    (kernels and reduction orders follow them), for fixtures of exact numbers recorded on one machine."""
    import jax

    cpuinfo = pathlib.Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    isa = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4")))
    return {"jax": jax.__version__, "cpu": model, "isa": isa}
