"""What a training cycle leaves in metrics.jsonl, and the non-finite check of its steps."""
from __future__ import annotations

import numpy as np
from absl import logging

from kif_jax.data.batching import IGNORE_INDEX
from kif_jax.errors import NonFiniteError


def batch_tokens(batches: list[dict]) -> int:
    """Input + target tokens of host batches (for tokens/s)."""
    return sum(int(b["attention_mask"].sum() + (b["labels"] != IGNORE_INDEX).sum()) for b in batches)


def cycle_record(*, method: str, phase: int, tasks: list[str], step: int, steps: int, tokens: int, elapsed: float,
                 out: dict, method_fields: dict) -> dict:
    """One cycle's record: the mean loss, last learning rate and mean gradient norm of its steps, its speed,
    the method's own fields, and a loss term besides the cross-entropy (`penalty`) where there is one."""
    record = {"method": method, "phase": phase, "task": ",".join(tasks), "step": step,
              "loss": float(np.mean(out["inner_loss"])), "lr": float(out["inner_lr"][-1]),
              "grad_norm": float(np.mean(out["inner_grad_norm"])),
              "steps_per_s": steps / elapsed, "tokens_per_s": tokens / elapsed,  # input + target tokens
              "skipped_steps": int(steps - np.sum(out["inner_finite"]))}
    record.update(method_fields)
    if "inner_penalty" in out:  # the loss term besides the cross-entropy (`loss`)
        record["penalty"] = float(np.mean(out["inner_penalty"]))
    return record


def check_finite(out: dict, *, where: str, step: int, on_nonfinite: str) -> None:
    """Raise (`train.on_nonfinite = "stop"`) or warn about a cycle with a non-finite step.

    `out["inner_finite"]` flags the cycle's steps; other `*_finite` flags (a method's other learners)
    belong to the cycle's last step. `step` is the step count before the cycle.
    """
    inner_ok = np.asarray(out["inner_finite"])
    others_ok = all(np.asarray(v).all() for k, v in out.items() if k.endswith("_finite") and k != "inner_finite")
    if inner_ok.all() and others_ok:
        return
    # 1-based step of the first bad inner step; a bad step of another learner belongs to the cycle's last step.
    bad = step + (int(np.argmin(inner_ok)) if not inner_ok.all() else len(inner_ok) - 1) + 1
    where = f"{where}, step {bad}"
    if on_nonfinite == "stop":
        raise NonFiniteError(f"non-finite loss or gradient in {where}; the last checkpoint is kept")
    logging.warning("skipped a non-finite step in %s", where)
