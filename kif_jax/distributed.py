"""Multi-process runs: joining the processes, and the process-0 helpers every file write goes through.

One command runs on every host (or as N processes on one machine); each process drives its own
devices and the programs span all of them (multi-controller JAX):

- `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (all three, on every process):
  `jax.distributed.initialize(HOST:PORT, N, I)`; on CPU the processes' collectives go through gloo,
  so N processes on one machine are a real multi-host run (tests/test_multihost.py);
- none of them, on a Cloud TPU VM: `jax.distributed.initialize()` with no arguments (JAX reads the
  slice's workers from the TPU metadata; on a single-host TPU VM that is one process; where it finds
  no slice, one warning line and one process);
- `--num_processes=1` alone, or none of them elsewhere: one process, no initialisation.

Every process computes the same global batches from the same seeded numpy streams and places only its
own rows (`kif_jax.sharding.shard_rows`); only process 0 writes results, metrics, plots and the
comparison (`is_main`, `barrier`); checkpoints go through Orbax, which every process calls.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from kif_jax.errors import ConfigError


def on_tpu_vm() -> bool:
    """Whether this machine has TPU chips (read from the PCI devices; starts no JAX backend)."""
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # a JAX without this helper, or an unreadable /sys: not a TPU VM we can detect
        return False


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """Join the run's processes (see the module docstring); returns whether jax.distributed started.

    Must come before anything starts a JAX backend. An incomplete or inconsistent set of flags is a
    `ConfigError` naming them.
    """
    given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
             "--process_id": process_id}
    if num_processes == 1 and coordinator_address is None and process_id in (None, 0):
        return False  # explicitly one process
    if all(v is None for v in given.values()):
        if not on_tpu_vm():
            return False
        try:
            jax.distributed.initialize()  # a TPU slice: workers, ids and the coordinator from its metadata
        except ValueError as err:  # no slice metadata (e.g. a TPU VM outside Cloud TPU): one process
            logging.warning("a TPU VM without a detectable slice (%s): running as one process", err)
            return False
        return True
    missing = [name for name, v in given.items() if v is None]
    if missing:
        raise ConfigError(f"multi-process runs need --coordinator_address, --num_processes and --process_id "
                          f"together; missing {', '.join(missing)}")
    if ":" not in coordinator_address or not coordinator_address.rsplit(":", 1)[1].isdigit():
        raise ConfigError(f"--coordinator_address must be HOST:PORT, got {coordinator_address!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(f"--process_id must be in [0, --num_processes) and --num_processes >= 1, "
                          f"got {process_id} and {num_processes}")
    # CPU devices of different processes reach each other through gloo (TPUs and GPUs have their own
    # interconnect; this setting only concerns the CPU backend).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def is_main() -> bool:
    """Whether this process writes the run's files (process 0; always true in one-process runs)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all arrive (a no-op in one-process runs)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def fetch(tree: Any) -> Any:
    """Every array of `tree` as a whole numpy array on every process.

    `jax.device_get` needs an array whose shards this process holds all of; an output split over
    several processes' devices (e.g. decoded tokens, whose rows follow the batch) is gathered first.
    """
    def get(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)
