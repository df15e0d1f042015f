"""Shared test setup: 8 virtual CPU devices for sharding tests, a compilation cache, the benchmark path, and the
`fp32_matmuls` fixture. Helpers shared by test files are in tests/helpers.py."""
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
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # xdist workers inherit the controller's
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kif_jax_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


# The end-to-end, multi-process and real-model tests (each takes from several seconds to minutes on 2 CPU
# cores): `python -m pytest -q -m "not slow"` leaves them out for a fast local run; CI runs everything.
SLOW_FILES = {"test_causal_training.py", "test_evaluation.py", "test_gguf.py", "test_multihost.py", "test_notebook.py",
              "test_preemption.py", "test_scale_out.py", "test_tokenizers_gguf.py", "test_tracking.py", "test_train.py",
              "test_method_golden.py"}
FAST_IN_SLOW_FILES = {"test_baselines.py": {"test_tasl_minmax_and_four_case_merge_by_hand",
                                            "test_o_lora_branches_and_loss_by_hand"}}
SLOW_TESTS = {
    "test_baselines.py": None,  # every test but FAST_IN_SLOW_FILES'
    "test_main.py": {"test_sigkilled_run_resumes_to_the_identical_result", "test_one_run_per_workdir_and_a_dead_runs_lock_does_not_block",
                     "test_progress_lines_when_not_a_terminal_and_nothing_to_run_on_a_finished_workdir"},
    "test_report.py": {"test_remembered_masks_survive_a_checkpoint_restore", "test_report_names_every_method_with_its_op",
                       "test_every_figure_of_the_report_is_a_png",
                       "test_fusion_stats_on_a_hand_made_tree", "test_the_cli_rebuilds_the_same_files"},
    "test_decoder_model.py": {"test_dropout_comes_from_the_call_rngs"},
    "test_generate.py": {"test_cached_decoding_equals_full_recompute"},
    "test_tokenizers.py": {"test_no_pytorch_notice_from_the_tokenizer_path_and_nothing_else_hidden"},
    "test_memory_plan_cli.py": {"test_command_prints_and_writes_memory_json", "test_module_entry_point", "test_13b_pod_plan"},
    "test_migu.py": {"test_migu_end_to_end", "test_migu_resumes_exactly"},
    "test_own_method.py": {"test_main_runs_a_method_from_its_own_module"},
}


def _is_slow(item: pytest.Item) -> bool:
    file, name = item.path.name, item.originalname
    if file in SLOW_FILES:
        return True
    if file in SLOW_TESTS:
        names = SLOW_TESTS[file]
        return name not in FAST_IN_SLOW_FILES.get(file, ()) if names is None else name in names
    return False


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--skip-slow", action="store_true", help="leave out tests marked slow (real-model tests)")


# xdist units (pyproject.toml: --dist loadfile --no-loadscope-reorder, and the scheduler below). A file is one
# unit, as with loadfile, so its module fixtures are built once; the files that read the costliest session
# fixture, `every_method_run`, are one unit, so that it is built once, not once a worker. Units go out in this
# order, the heaviest first (seconds on 2 cores, from `--durations=0`), so that no long one starts when the
# other worker is nearly done; the rest follow in collection order.
SHARED_UNITS = {"test_train.py": "every_method_run", "test_method_golden.py": "every_method_run",
                "test_baselines.py": "every_method_run", "test_reevaluate.py": "every_method_run"}
HEAVIEST_UNITS = ("every_method_run", "test_readme.py", "test_causal_training.py", "test_multihost.py",
                  "test_preemption.py", "test_audit_migu.py", "test_scale_out.py", "test_main.py",
                  "test_decoder_model.py", "test_gguf.py", "test_notebook.py", "test_migu.py")


def xdist_unit(file_name: str) -> str:
    return SHARED_UNITS.get(file_name, file_name)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """loadfile's scheduler with SHARED_UNITS' files as one unit (xdist's loadgroup marks no longer reach the
    scheduler under pytest 9, whose node ids ignore the suffix xdist writes)."""
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SHARED_UNITS.get(path.rsplit("/", 1)[-1], path)

    return UnitScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {unit: i for i, unit in enumerate(HEAVIEST_UNITS)}
    items.sort(key=lambda item: rank.get(xdist_unit(item.path.name), len(rank)))  # stable within a rank
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
    if config.getoption("--skip-slow"):
        skip = pytest.mark.skip(reason="--skip-slow given")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def fp32_matmuls():
    """Matmuls in full float32 (XLA's CPU default may use fewer bits), for parity with reference values."""
    with jax.default_matmul_precision("float32"):
        yield


def benchmark_dir() -> pathlib.Path:
    """The shared benchmark: $KIF_DATA_DIR, else ../shared/cl_benchmark beside the repo."""
    return pathlib.Path(os.environ.get("KIF_DATA_DIR", REPO_ROOT.parent / "shared" / "cl_benchmark"))


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    path = benchmark_dir()
    if not (path / "MANIFEST.json").exists():
        pytest.fail(f"benchmark not found at {path}; set KIF_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def every_method_run(tmp_path_factory):
    """One run of every built-in method on tests/tiny_config.py, shared by the tests that read finished runs
    (it is the suite's costliest setup): (config, workdir, results). Mid-task checkpoints every 2 steps (4 a
    task, all kept) serve the resume tests; checkpointing changes no result."""
    import tiny_config
    from kif_jax.methods import builtin_names
    from kif_jax.train import train_and_evaluate

    config = tiny_config.get_config()
    config.methods = ",".join(builtin_names())
    config.checkpoint.every_steps = 2
    config.checkpoint.keep = 4
    workdir = tmp_path_factory.mktemp("every_method")
    return config, workdir, train_and_evaluate(config, workdir)
