"""Shared test setup: 8 virtual CPU devices for sharding tests, a compilation cache, the benchmark path."""
import os
import pathlib
import tempfile

# Tests run tiny models, where XLA's CPU compile time dwarfs run time: skip LLVM's expensive
# optimisations (compile ~30% faster). Must be set before the backend starts; subprocesses inherit it.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

# Must run before any JAX backend is initialised; single-device tests still use device 0.
jax.config.update("jax_num_cpu_devices", 8)

# One XLA compilation cache for the session and its subprocesses: the same tiny training programs
# are built by several tests, and CPU compilation dominates their run time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="kif_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--skip-slow", action="store_true", help="leave out tests marked slow (real-model tests)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--skip-slow"):
        skip = pytest.mark.skip(reason="--skip-slow given")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


def benchmark_dir() -> pathlib.Path:
    """The shared benchmark: $KIF_DATA_DIR, else ../shared/cl_benchmark beside the repo."""
    return pathlib.Path(os.environ.get("KIF_DATA_DIR", REPO_ROOT.parent / "shared" / "cl_benchmark"))


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    path = benchmark_dir()
    if not (path / "MANIFEST.json").exists():
        pytest.fail(f"benchmark not found at {path}; set KIF_DATA_DIR")
    return path
