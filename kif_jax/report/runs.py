"""Reading a finished run: every method directory's results.json and metrics.jsonl."""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from kif_jax import metrics
from kif_jax.errors import DataError
from kif_jax.methods import names

REPORT_DIR = "report"


@dataclasses.dataclass
class MethodData:
    """One method directory of a run: its results.json and its metrics.jsonl records."""

    name: str
    results: dict
    records: list[dict]

    @property
    def tasks(self) -> list[str]:
        return list(self.results["tasks"])

    @property
    def matrix(self) -> np.ndarray:
        return metrics.results_matrix(self.results)

    def fusions(self) -> list[tuple[dict, dict]]:
        """(fusion_stats record, the leaf layout it refers to), in the order of the run."""
        layout, out = None, []
        for r in self.records:
            if r.get("event") == "fusion_leaves":
                layout = r
            elif r.get("event") == "fusion_stats" and layout is not None:
                if len(r.get("in_frac") or []) == len(layout["names"]):
                    out.append((r, layout))
        return out


def _method_order(name: str) -> tuple[int, str]:
    """Registry order (kif_jax/methods/registry.py), then unknown directories by name."""
    known = names()
    return (known.index(name) if name in known else len(known), name)


def _read_results(path: pathlib.Path) -> dict:
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not a readable results.json ({type(err).__name__}: {err})") from err
    if not isinstance(results, dict) or not all(k in results for k in ("method", "tasks", "accuracy_matrix")):
        raise DataError(f"{path} is not a results.json: it needs 'method', 'tasks' and 'accuracy_matrix'")
    try:
        R = metrics.results_matrix(results)
        if R.shape != (len(results["tasks"]),) * 2:
            raise ValueError(f"a {R.shape} matrix for {len(results['tasks'])} tasks")
    except (ValueError, TypeError) as err:
        raise DataError(f"{path} has a malformed accuracy_matrix ({err})") from err
    return results


def _read_records(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {n}, is not JSON ({err.msg})") from err
    return records


def load_run(workdir: str | pathlib.Path, *, skip_unfinished: bool = False) -> tuple[list[MethodData], list[str]]:
    """Every method directory of `workdir` (one with results.json or metrics.jsonl), in the method registry's order.

    A directory without results.json is an unfinished method: a `DataError`, or with `skip_unfinished`
    left out and named in the second return value.
    """
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise DataError(f"run directory {workdir} does not exist")
    dirs = sorted((d for d in workdir.iterdir() if d.is_dir() and d.name != REPORT_DIR
                   and ((d / "results.json").exists() or (d / "metrics.jsonl").exists())),
                  key=lambda d: _method_order(d.name))
    methods, unfinished = [], []
    for d in dirs:
        if not (d / "results.json").exists():
            if skip_unfinished:
                unfinished.append(d.name)
                continue
            raise DataError(f"{d / 'results.json'} is missing: method {d.name} has not finished "
                            "(run the training command again to finish it)")
        methods.append(MethodData(d.name, _read_results(d / "results.json"), _read_records(d / "metrics.jsonl")))
    if not methods:
        raise DataError(f"no finished method in {workdir} (no <method>/results.json)")
    return methods, unfinished
