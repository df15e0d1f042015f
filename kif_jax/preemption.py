"""Preemption: SIGTERM or SIGINT stops a run at the next cycle boundary, with a checkpoint to resume from.

Preemptible TPU VMs get SIGTERM and about 30 seconds. While the task loop runs, `PreemptionGuard`
turns SIGTERM and SIGINT into a request that the loop polls after every fusion cycle and between
evaluated tasks; the loop then saves a mid-task checkpoint and raises `Preempted`, and `main.py`
prints one line and exits with `EXIT_CODE`. Running the same command again resumes exactly.

Multi-process runs do not install handlers: JAX's preemption service (started by
`jax.distributed.initialize`) owns SIGTERM, and `reached_preemption_sync_point` makes every process
stop after the same cycle. SIGINT is host-local there, so it keeps its default (an immediate stop).
"""
from __future__ import annotations

import signal
import threading
import types
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils

# EX_TEMPFAIL from sysexits.h: a temporary failure, the same command should be run again.
EXIT_CODE = 75


class Preempted(Exception):
    """The run stopped on a preemption request; `saved` says whether a checkpoint was written for it."""

    def __init__(self, *, method: str, task: int, step: int, saved: bool) -> None:
        self.method, self.task, self.step, self.saved = method, task, step, saved
        what = "checkpoint saved" if saved else "no new progress to save"
        super().__init__(f"preempted at task {task} step {step} ({method}); {what}; "
                         "run the same command to resume")


class PreemptionGuard:
    """A context manager that installs the handlers and restores the previous ones on exit.

    `should_stop()` is the poll: every process must call it at the same points of the run, in the
    same order (after each cycle, between evaluated tasks), since in multi-process runs it is
    JAX's preemption sync point, numbered by the count of polls.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.received: int | None = None  # the first signal caught (host-local runs)
        self._previous: dict[int, Any] = {}
        self._polls = 0
        self._multi_process = False
        self._sync_failed = False

    def __enter__(self) -> PreemptionGuard:
        self._multi_process = jax.process_count() > 1
        if self._multi_process:
            return self
        if threading.current_thread() is not threading.main_thread():
            logging.warning("not in the main thread: SIGTERM and SIGINT stop the run at once (no preemption save)")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the best match.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signum

    def should_stop(self) -> bool:
        """True once a preemption was requested (in multi-process runs: once all processes agree)."""
        self._polls += 1
        if not self._multi_process:
            return self.received is not None
        if self._sync_failed:
            return False
        try:
            return multihost_utils.reached_preemption_sync_point(self._polls)
        except RuntimeError as err:  # jax_enable_preemption_service is off
            logging.warning("no preemption sync point (%s): SIGTERM stops the run at once", err)
            self._sync_failed = True
            return False
