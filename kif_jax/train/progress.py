"""What a person watching a run sees: a bar on a terminal or in a notebook, else a line every N steps.

Under `nohup`, in CI or in any log file (stderr not a terminal) a line is printed every `every` steps
with the loss, steps/s and the time left in the task; on a terminal, and in Jupyter / Colab (whose
streams are not terminals), a `tqdm.auto` bar. `note` prints the one-off lines (compiling,
evaluating, nothing to run). Only process 0 prints.
"""
from __future__ import annotations

import sys
import time

import jax


def _in_notebook() -> bool:
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ in ("ZMQInteractiveShell", "Shell")  # Jupyter, Colab


def note(message: str) -> None:
    """One line on stderr (process 0), flushed so logs show it at once."""
    if jax.process_index() == 0:
        print(f"[kif_jax] {message}", file=sys.stderr, flush=True)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Progress of one task's training: `update(step, loss)` after every cycle, `close()` at the end."""

    def __init__(self, desc: str, *, total: int, initial: int, every: int) -> None:
        self.desc, self.total, self.every = desc, total, max(1, every)
        self.enabled = jax.process_index() == 0
        self.start_step, self.last_line = initial, initial
        self.t0 = time.perf_counter()
        self.bar = None
        if self.enabled and (sys.stderr.isatty() or _in_notebook()):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, disable=False)

    def update(self, step: int, n: int, loss: float, steps_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(loss=f"{loss:.3f}", steps_s=f"{steps_per_s:.2f}")
            return
        if step - self.last_line < self.every and step < self.total:
            return
        self.last_line = step
        rate = (step - self.start_step) / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        note(f"{self.desc}: step {step}/{self.total}  loss {loss:.4f}  {rate:.3g} steps/s  "
             f"{'ETA ' + format_seconds(eta) if step < self.total else 'done'}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
