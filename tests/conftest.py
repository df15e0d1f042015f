"""Shared test setup: 8 virtual CPU devices for sharding tests, and the benchmark path."""
import os
import pathlib

import jax

# Must run before any JAX backend is initialised; single-device tests still use device 0.
jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def benchmark_dir() -> pathlib.Path:
    """The shared benchmark: $KIF_DATA_DIR, else ../shared/cl_benchmark beside the repo."""
    return pathlib.Path(os.environ.get("KIF_DATA_DIR", REPO_ROOT.parent / "shared" / "cl_benchmark"))


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    path = benchmark_dir()
    if not (path / "MANIFEST.json").exists():
        pytest.fail(f"benchmark not found at {path}; set KIF_DATA_DIR")
    return path
