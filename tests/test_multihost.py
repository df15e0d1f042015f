"""Multi-process runs on one machine: 2 processes x 4 CPU devices joined by `jax.distributed` (gloo
collectives) against 1 process x 8 devices, on the same data 2 x fsdp 4 mesh.

- the two runs give the same accuracy matrix, training losses and memory plan;
- only process 0 writes the run's files (every write of each process is recorded by a Python audit
  hook; process 1 writes only its own shards inside Orbax's checkpoints);
- a 2-process run resumes from the checkpoint that a killed run left (mid-task) to the same result;
- the cycle program all-gathers only inside the model's forward and backward pass (FSDP's per-layer
  weights and activations), never an optimizer, importance or fusion state (from the compiled HLO);
- an incomplete set of the multi-process flags is one line and exit code 2.
"""
import importlib.util
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import helpers
from kif_jax import distributed, sharding
from kif_jax.config import validate_config
from kif_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "tiny_config.py"
METHOD = "recurrent_kif"
# data 2 x fsdp 4 (8 devices), one micro-batch row per device; option scoring gives non-trivial accuracies.
OVERRIDES = ("--config.sharding.num_devices=0", "--config.sharding.data_parallelism=2",
             "--config.sharding.fsdp_parallelism=4", "--config.train.micro_batch_size=8",
             "--config.model.lora.dropout=0.0", "--config.eval.mode=score", "--config.checkpoint.every_steps=2")
# Lines of every CPU run, skipped: gloo's connection reports (printed to stdout by both processes,
# sometimes interleaved mid-line) and XLA's warnings about the tiny model's attention layouts.
NOISE = ("[Gloo]", "connected peer ranks", "Involuntary full rematerialization")

# Runs main.py (argv[3:]) with an audit hook that records to argv[2] every file this process
# creates, writes, renames or removes under the workdir argv[1].
AUDITED_MAIN = r"""
import os, runpy, sys
root, log = os.path.realpath(sys.argv[1]), open(sys.argv[2], "w", buffering=1)
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def record(path):
    if isinstance(path, (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(path))
        if path == root or path.startswith(root + os.sep):
            log.write(os.path.relpath(path, root) + "\n")
def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if (any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE)):
            record(path)
    elif event == "os.rename":  # os.rename and os.replace
        record(args[0]); record(args[1])
    elif event in ("os.remove", "os.mkdir", "os.rmdir", "os.truncate", "shutil.rmtree"):
        record(args[0])
sys.addaudithook(hook)
sys.argv = [sys.argv[3], *sys.argv[4:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def cpu_env(devices: int, *xla_flags: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}", *xla_flags])
    return env


def stdout(path: pathlib.Path) -> str:
    """A process's output without the noise lines (gloo prints its connections to stdout)."""
    return "\n".join(line for line in path.read_text().splitlines() if not any(n in line for n in NOISE)).strip()


def stderr_tail(path: pathlib.Path) -> str:
    return "\n".join(stdout(path).splitlines()[-25:])


def launch(workdir: pathlib.Path, processes: int, *extra: str, env: dict | None = None) -> list[subprocess.Popen]:
    """Start main.py as `processes` processes (audited; logs beside the workdir); returns them."""
    args = [f"--config={TINY}", f"--workdir={workdir}", *OVERRIDES, *extra]
    if processes > 1:
        args += [f"--coordinator_address=localhost:{free_port()}", f"--num_processes={processes}"]
    procs = []
    for i in range(processes):
        tag = workdir.parent / f"{workdir.name}.p{i}"
        cmd = [sys.executable, "-c", AUDITED_MAIN, str(workdir), f"{tag}.writes", str(REPO / "main.py"), *args,
               *([f"--process_id={i}"] if processes > 1 else [])]
        with open(f"{tag}.out", "w") as out, open(f"{tag}.err", "w") as err:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO,
                                          env=env or cpu_env(8 // processes)))
    return procs


def wait(procs: list[subprocess.Popen], workdir: pathlib.Path, timeout: float = 400) -> None:
    """Wait for all; one failing (or the deadline) stops the others at once, and the test fails."""
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs):
        failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed or time.time() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            i = failed[0] if failed else 0
            pytest.fail(f"process {i} of {workdir.name} {'failed' if failed else 'timed out'}:\n"
                        + stderr_tail(workdir.parent / f"{workdir.name}.p{i}.err"))
        time.sleep(0.1)
    for i, p in enumerate(procs):
        assert p.returncode == 0, stderr_tail(workdir.parent / f"{workdir.name}.p{i}.err")


def writes(workdir: pathlib.Path, process: int) -> set[str]:
    return set((workdir.parent / f"{workdir.name}.p{process}.writes").read_text().split())


def results(workdir: pathlib.Path) -> dict:
    return json.loads((workdir / METHOD / "results.json").read_text())


def training_records(workdir: pathlib.Path) -> list[tuple]:
    return helpers.training_records(workdir, METHOD)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process run, and the 1-process 8-device run (with the cycle programs' HLO dumped)."""
    root = tmp_path_factory.mktemp("multihost")
    t0 = time.perf_counter()
    dump = root / "hlo"
    env = cpu_env(8, f"--xla_dump_to={dump}", "--xla_dump_hlo_as_text", "--xla_dump_hlo_module_re=run_cycle")
    one = launch(root / "one", 1, env=env)  # beside the 2-process run: their waits overlap
    wait(launch(root / "two", 2), root / "two")
    wait(one, root / "one")
    print(f"\n1-process and 2-process runs side by side: {time.perf_counter() - t0:.0f} s")
    return root


def test_two_processes_equal_one_process_and_only_process_0_writes(runs):
    root = runs
    one, two = root / "one", root / "two"
    want, got = results(one), results(two)
    assert got["accuracy_matrix"] == want["accuracy_matrix"]
    assert any(v for row in want["accuracy_matrix"] for v in row if v is not None)  # not all zeros
    mine, ref = training_records(two), training_records(one)
    assert [r[:2] for r in mine] == [r[:2] for r in ref] and len(mine) >= 4
    # gloo's reductions add in another order than one process's: equal to float32 rounding.
    np.testing.assert_allclose(np.array([r[2:] for r in mine], float), np.array([r[2:] for r in ref], float),
                               rtol=1e-5, equal_nan=True)
    plan = json.loads((two / METHOD / "memory.json").read_text())
    assert plan == json.loads((one / METHOD / "memory.json").read_text())
    assert plan["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}

    p0, p1 = writes(two, 0), writes(two, 1)
    for name in (f"{METHOD}/results.json", f"{METHOD}/metrics.jsonl", f"{METHOD}/accuracy_matrix.png",
                 f"{METHOD}/memory.json", "comparison.md"):
        assert name in p0 or f"{name}.tmp" in p0, name  # the hook sees process 0's writes
    outside = sorted(p for p in p1 if "checkpoints" not in pathlib.PurePath(p).parts)
    assert not outside, f"process 1 wrote {outside}"
    out0, out1 = (stdout(root / f"two.p{i}.out") for i in (0, 1))
    assert METHOD in out0 and "OP" in out0 and METHOD not in out1 and "OP" not in out1  # process 0 prints them


def test_two_processes_resume_from_a_mid_task_checkpoint(runs):
    """A killed run's workdir: the checkpoints up to the middle of task 2, no results yet."""
    root = runs
    resumed = root / "resumed"
    shutil.copytree(root / "two", resumed)
    checkpoints = sorted((resumed / METHOD / "checkpoints").iterdir(), key=lambda p: int(p.name))
    assert [p.name for p in checkpoints] == ["10000000", "10000002", "20000000"]  # task ends kept; task 2 step 2
    shutil.rmtree(checkpoints[-1])
    for name in (f"{METHOD}/results.json", "comparison.md", "report"):
        path = resumed / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    wait(launch(resumed, 2), resumed)
    print(f"\nresumed 2-process run: {time.perf_counter() - t0:.0f} s")
    assert results(resumed)["accuracy_matrix"] == results(root / "two")["accuracy_matrix"]
    assert training_records(resumed) == training_records(root / "two")  # bit-identical, in order
    outside = sorted(p for p in writes(resumed, 1) if "checkpoints" not in pathlib.PurePath(p).parts)
    assert not outside, f"process 1 wrote {outside}"


# --------------------------------------------------------------------------------------------
# No silent all-gather of a state: from the compiled HLO
# --------------------------------------------------------------------------------------------

_ALL_GATHER = re.compile(r"=\s*(\S+)\s+all-gather(?:-start)?\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def stray_all_gathers(hlo: str) -> list[str]:
    """The all-gathers of an HLO module outside the differentiated model (whose op_name has no `jvp(`):
    an optimizer, importance or fusion update that gathers its operand; as "shape op_name"."""
    stray = []
    for line in hlo.splitlines():
        match = _ALL_GATHER.search(line)
        if match:
            name = _OP_NAME.search(line)
            if name is None or "jvp(" not in name.group(1):
                stray.append(f"{match.group(1)} {name.group(1) if name else '(no op_name)'}")
    return stray


def test_cycle_program_all_gathers_only_inside_the_model(runs):
    root = runs
    modules = sorted((root / "hlo").glob("*run_cycle*after_optimizations.txt"))
    assert len(modules) >= 2  # task 1 (inner steps only) and task 2 (outer steps and fusion)
    for path in modules:
        hlo = path.read_text()
        assert _ALL_GATHER.search(hlo), path.name  # FSDP gathers weights: the pattern does match
        assert not stray_all_gathers(hlo), (path.name, stray_all_gathers(hlo)[:5])


def test_stray_all_gather_is_detected():
    """The check's negative control: an exact quantile over FSDP-sharded scores gathers all of them."""
    mesh = jax.make_mesh((2, 4, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=jax.devices()[:8])
    scores = jax.device_put(jnp.arange(64.0).reshape(16, 4), NamedSharding(mesh, P("fsdp")))
    hlo = jax.jit(lambda s: s > jnp.quantile(s, 0.8)).lower(scores).compile().as_text()
    assert stray_all_gathers(hlo)


# --------------------------------------------------------------------------------------------
# Flags, the pod config
# --------------------------------------------------------------------------------------------


def test_no_flags_join_a_tpu_slice_by_itself_and_nothing_elsewhere(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(distributed, "on_tpu_vm", lambda: False)
    assert distributed.initialize(None, None, None) is False and not calls  # not a TPU VM
    monkeypatch.setattr(distributed, "on_tpu_vm", lambda: True)
    assert distributed.initialize(None, None, None) is True and calls == [((), {})]  # no arguments
    assert distributed.initialize(None, 1, None) is False and len(calls) == 1  # explicitly one process


def test_incomplete_multi_process_flags_are_one_line_and_exit_2():
    with pytest.raises(ConfigError, match="missing --coordinator_address, --process_id"):
        distributed.initialize(None, 2, None)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        distributed.initialize("localhost", 2, 0)
    with pytest.raises(ConfigError, match="--process_id must be in"):
        distributed.initialize("localhost:1234", 2, 2)
    result = subprocess.run([sys.executable, str(REPO / "main.py"), f"--config={TINY}", "--num_processes=2",
                             "--process_id=0"], capture_output=True, text=True, cwd=REPO, timeout=120,
                            env=cpu_env(1))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: multi-process runs need --coordinator_address, --num_processes and --process_id "
                     "together; missing --coordinator_address"]


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("chips", [16, 32], ids=["v4-32", "v5e-32"])
def test_pod_config_is_llama2_13b_with_fsdp_over_every_chip(chips):
    pod, single = load_config("llama2_13b_pod"), load_config("llama2_13b")
    differ = {k for k, v in flatten(pod.to_dict()).items() if flatten(single.to_dict())[k] != v}
    assert differ == {"sharding.data_parallelism", "sharding.fsdp_parallelism", "train.micro_batch_size"}
    assert pod.train.batch_size == 64 and pod.train.lr == single.train.lr == 3e-4
    assert sharding.mesh_shape(pod.sharding, device_count=chips) == {"data": 1, "fsdp": chips, "tensor": 1}
    for rows in (pod.train.micro_batch_size, pod.eval.batch_size):
        assert rows % chips == 0  # every chip gets its own rows of each batch
    pod.data_dir = "synthetic"  # the fields' checks, not the benchmark's presence
    validate_config(pod)


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
