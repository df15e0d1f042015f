"""A run's workdir: checked writable before any model loads, and held by one run at a time.

`WorkdirLock(workdir)` creates the directory, proves it writable, and takes an exclusive `flock` on
`<workdir>/.kif_lock`, which names the holder (pid, host, start time). A second run on the same
workdir stops with one line naming the holder. The operating system drops the lock when its
process dies, so a lock file left by a killed run never blocks the next one. Only process 0 of a
multi-process run takes it (the others write nothing outside the checkpoints).
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import pathlib
import socket

from kif_jax.errors import ConfigError

LOCK_FILE = ".kif_lock"


def check_writable(workdir: pathlib.Path) -> None:
    """Create `workdir` and write a probe file in it; one-line ConfigError if either fails."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".kif_write_probe_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"workdir {workdir} cannot be created or written: {err.strerror or err}") from None


class WorkdirLock:
    """Exclusive use of a workdir for the length of a `with` block."""

    def __init__(self, workdir: str | os.PathLike) -> None:
        self.workdir = pathlib.Path(workdir)
        self._file = None

    def __enter__(self) -> "WorkdirLock":
        check_writable(self.workdir)
        path = self.workdir / LOCK_FILE
        f = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read() or "{}")
            except ValueError:
                holder = {}
            f.close()
            raise ConfigError(f"workdir {self.workdir} is in use by another run (pid {holder.get('pid', '?')} on host "
                              f"{holder.get('host', '?')}, started {holder.get('started', '?')}); wait for it to end "
                              f"or give another --workdir") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": datetime.datetime.now().isoformat(timespec="seconds")}))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
