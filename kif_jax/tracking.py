"""Experiment tracking beside metrics.jsonl: TensorBoard (tensorboardX) and Weights & Biases, both optional.

`metrics.jsonl` stays the source of truth; a tracker receives the same records. With
`logging.tensorboard`, `<workdir>/<method>/tensorboard/` gets every numeric field of every record
as a scalar (`<event>/<field>`, training records under `train/`), each task's accuracies after every
task, OP / BWT / Avg / FWT at the end, and the accuracy heatmap as an image. With
`logging.wandb_project`, W&B gets the same (imported only then); the run id is kept in the
checkpoint, so a resumed run continues the same W&B run. Process 0 only. Install with
`pip install -e ".[tracking]"` (tensorboardX, wandb; no TensorFlow, no torch).

The x axis is the method's optimizer step counted over the whole task sequence (`global_step`).
"""
from __future__ import annotations

import math
import numbers
import pathlib
import secrets
from typing import Any, Sequence

import numpy as np

from kif_jax.errors import ConfigError
from kif_jax.run_files import heatmap_figure

TENSORBOARD_DIR = "tensorboard"


def _scalars(record: dict, tasks: Sequence[str]) -> dict[str, float]:
    """The finite numeric fields of a record, named `<event>/<field>` (`train/` for training records); a task
    end's accuracies as `accuracy/<task>`."""
    prefix = record.get("event", "train")
    out = {}
    if prefix == "task_end":
        out.update({f"accuracy/{t}": float(v) for t, v in zip(tasks, record.get("accuracy") or [])
                    if v is not None and math.isfinite(v)})
    for key, value in record.items():
        if key in ("phase", "step", "global_step", "event") or isinstance(value, bool):
            continue
        if isinstance(value, numbers.Number) and math.isfinite(float(value)):
            out[f"{prefix}/{key}"] = float(value)
    return out


class Trackers:
    """TensorBoard and/or W&B for one method's run; `log` every record, `finish` at the end."""

    def __init__(self, directory: pathlib.Path, *, method: str, tensorboard: bool, wandb_project: str,
                 wandb_id: str | None, config: dict, tasks: Sequence[str]) -> None:
        self.tb = self.wandb = None
        self.tasks = list(tasks)
        self.wandb_id = wandb_id
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ConfigError("config field 'logging.tensorboard' needs tensorboardX: "
                                  "pip install -e \".[tracking]\"") from None
            self.tb = SummaryWriter(logdir=str(directory / TENSORBOARD_DIR))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError("config field 'logging.wandb_project' needs wandb: "
                                  "pip install -e \".[tracking]\"") from None
            self.wandb_id = wandb_id or secrets.token_hex(4)
            self.wandb = wandb.init(project=wandb_project, name=f"{directory.parent.name}/{method}", id=self.wandb_id,
                                    resume="allow", dir=str(directory), config=config, reinit="create_new")

    @property
    def active(self) -> bool:
        return self.tb is not None or self.wandb is not None

    def log(self, record: dict, global_step: int) -> None:
        scalars = _scalars(record, self.tasks)
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, global_step)
        if self.wandb is not None and scalars:
            self.wandb.log(scalars, step=global_step)

    def log_results(self, result: dict, matrix: np.ndarray, tasks: Sequence[str], global_step: int) -> None:
        """OP / BWT / Avg / FWT and the accuracy heatmap of a finished method."""
        summary = {f"results/{k}": float(result[k]) for k in ("op", "bwt", "avg", "fwt") if result.get(k) is not None}
        figure = (heatmap_figure(matrix, tasks, result["method"], metric=result.get("metric") or "accuracy")
                  if self.active else None)
        if self.tb is not None:
            for name, value in summary.items():
                self.tb.add_scalar(name, value, global_step)
            self.tb.add_figure("results/accuracy_matrix", figure, global_step, close=False)
        if self.wandb is not None:
            import wandb

            self.wandb.log({**summary, "results/accuracy_matrix": wandb.Image(figure)}, step=global_step)
            for name, value in summary.items():
                self.wandb.summary[name] = value
        if figure is not None:
            import matplotlib.pyplot as plt

            plt.close(figure)

    def finish(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
