"""The files a run writes besides checkpoints: JSON-lines records (metrics.jsonl, predictions.jsonl), results.json
(atomically) and the accuracy-matrix heatmap."""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Callable, Sequence

import jax
import numpy as np


class MetricsWriter:
    """Appends one JSON object per line (process 0 only); truncates to a saved offset on resume."""

    def __init__(self, path: pathlib.Path, *, resume_offset: int | None = None,
                 listener: Callable[[dict], None] | None = None) -> None:
        self.path = pathlib.Path(path)
        self.enabled = jax.process_index() == 0
        self.listener = listener  # also gets every record written (experiment trackers)
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_offset is None:
            self.path.write_text("")
        else:
            with open(self.path, "a+b") as f:
                f.truncate(resume_offset)

    def write(self, record: dict[str, Any]) -> None:
        self.write_many([record])

    def write_many(self, records: Sequence[dict[str, Any]]) -> None:
        """Append the records in one write."""
        if self.enabled and records:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(_jsonable(r)) + "\n" for r in records))
            if self.listener is not None:
                for record in records:
                    self.listener(_jsonable(record))

    def offset(self) -> int:
        return self.path.stat().st_size if self.enabled and self.path.exists() else 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "dtype"):
        value = np.asarray(value).tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: pathlib.Path, data: dict) -> None:
    """Write atomically (temporary file + rename), so a killed run never leaves half a file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2))
    os.replace(tmp, path)


def draw_heatmap(ax: Any, matrix: np.ndarray, tasks: Sequence[str], title: str, *, annotate: bool = True) -> Any:
    """Draw the accuracy matrix R (rows: after task i; columns: task j), in percent, on `ax`; returns the image."""
    values = np.asarray(matrix, dtype=float) * 100.0
    image = ax.imshow(np.ma.masked_invalid(values), vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks])
    for i in range(values.shape[0]) if annotate else ():
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center",
                        color="white" if values[i, j] < 60 else "black", fontsize=8)
    ax.set_title(title)
    return image


def heatmap_figure(matrix: np.ndarray, tasks: Sequence[str], title: str, *, metric: str = "accuracy") -> Any:
    """The score matrix R (rows: after task i; columns: task j) as an annotated matplotlib figure, in percent;
    `metric`: what it holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.55 * len(tasks) + 2.0)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = draw_heatmap(ax, matrix, tasks, title)
    fig.colorbar(image, ax=ax, label=f"test {metric} (%)")
    fig.tight_layout()
    return fig


def save_heatmap(path: pathlib.Path, matrix: np.ndarray, tasks: Sequence[str], title: str, *,
                 metric: str = "accuracy") -> None:
    """`heatmap_figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = heatmap_figure(matrix, tasks, title, metric=metric)
    fig.savefig(path, dpi=100)
    plt.close(fig)
