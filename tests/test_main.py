"""main.py as users run it: a SIGKILLed run resumes to the identical result; bad input is one line, exit 2."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import tiny_config
from helpers import training_records
from kif_jax import cli, compare, metrics

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "tiny_config.py"


def main_command(workdir: pathlib.Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "main.py"), f"--config={TINY}", f"--workdir={workdir}",
            "--config.methods=seq_lora,recurrent_kif", "--config.checkpoint.every_steps=2", *overrides]


def run_main(workdir: pathlib.Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(main_command(workdir, *overrides), capture_output=True, text=True, timeout=600,
                          cwd=REPO)


def kill_mid_method_and_resume(tmp_path: pathlib.Path, *overrides: str) -> subprocess.CompletedProcess:
    """Run to the end once; run again, SIGKILL it once the second method has checkpointed, resume it;
    assert the resumed run's results and logged training records equal the uninterrupted run's."""
    reference = run_main(tmp_path / "reference", *overrides)
    assert reference.returncode == 0, reference.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(main_command(killed_dir, *overrides), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO)
    checkpoints = killed_dir / "recurrent_kif" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
            break  # the second method has written its first checkpoint: kill mid-method
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "recurrent_kif" / "results.json").exists()

    resumed = run_main(killed_dir, *overrides)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for method in ("seq_lora", "recurrent_kif"):
        want = json.loads((tmp_path / "reference" / method / "results.json").read_text())
        got = json.loads((killed_dir / method / "results.json").read_text())
        assert got["accuracy_matrix"] == want["accuracy_matrix"]
        # Bit-identical training: every logged loss, norm and mask share, in the same order.
        assert training_records(killed_dir, method) == training_records(tmp_path / "reference", method)
        # The per-example records of an uninterrupted run, and exactly the matrix results.json holds.
        predictions = (killed_dir / method / "predictions.jsonl").read_text()
        assert predictions == (tmp_path / "reference" / method / "predictions.jsonl").read_text()
        rebuilt = compare.load_predictions(killed_dir / method / "predictions.jsonl", method, got["tasks"]).matrix()
        np.testing.assert_array_equal(rebuilt, metrics.results_matrix(got))  # NaN where not evaluated
    return resumed


def test_sigkilled_run_resumes_to_the_identical_result(tmp_path):
    resumed = kill_mid_method_and_resume(tmp_path)
    assert "recurrent_kif" in resumed.stdout and "OP" in resumed.stdout


def assert_one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("Pass --help")]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]


def test_missing_config_file_and_unknown_override_are_one_line(tmp_path):
    missing = subprocess.run([sys.executable, str(REPO / "main.py"), "--config=configs/nope.py"],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert_one_line_error(missing, "nope.py")
    unknown = subprocess.run([sys.executable, str(REPO / "main.py"), f"--config={TINY}", "--config.train.bogus=1"],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert_one_line_error(unknown, "bogus")


@pytest.mark.parametrize("field, value, needle", [
    ("methods", "seq_lora,bogus", "unknown method 'bogus'"),
    ("tasks", "topic,nope", "nope"),
    ("kif.quantile", 1.5, "kif.quantile"),
    ("data_dir", "", "data_dir"),
    ("data_dir", "/nonexistent/benchmark", "/nonexistent/benchmark"),
    ("train.micro_batch_size", 3, "micro_batch_size"),
])
def test_bad_config_values_give_one_line_and_exit_2(tmp_path, capsys, field, value, needle):
    config = tiny_config.get_config()
    node = config
    *parents, leaf = field.split(".")
    for name in parents:
        node = node[name]
    node[leaf] = value
    assert cli.run(config, str(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not any(tmp_path.iterdir())  # validation comes before anything is written


def test_malformed_data_file_is_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    for split in ("train", "test"):
        (data / split).mkdir(parents=True)
        (data / split / "topic.json").write_text('[{"id": "1", "input": "x Option: a, b.\\nAnswer:", "output": "a"}')
    config = tiny_config.get_config()
    config.data_dir = str(data)
    config.tasks = "topic"
    assert cli.run(config, str(tmp_path / "work")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "topic.json" in err[0]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env=env)


@pytest.mark.parametrize("with_config", [False, True], ids=["default_config", "config_given"])
def test_config_typo_is_one_line_with_the_nearest_field(with_config):
    args = ([f"--config={TINY}"] if with_config else []) + ["--config.kif.quantil=0.9"]
    result = run_cli(*args)
    assert result.returncode == 2
    assert_one_line_error(result, "unknown config field in --config.kif.quantil=0.9; did you mean --config.kif.quantile?")


def test_help_and_print_config_exit_0_without_running(tmp_path):
    helped = run_cli("--help")
    assert helped.returncode == 0 and "--print_config" in helped.stdout and "--config." in helped.stdout
    printed = run_cli("--config=configs/smollm2_standard.py", "--config.train.lr=0.002", "--print_config",
                      f"--workdir={tmp_path / 'w'}")
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert any(line.startswith("train.lr = 0.002") and "# AdamW peak learning rate" in line for line in lines)
    assert any(line.startswith("kif.outer_loss_scale = 0.25  ") for line in lines)
    from kif_jax.config import _flatten, base_config

    assert len(lines) == len(_flatten(base_config()))  # every field, one line each
    assert all("  # " in line for line in lines)  # each with its doc
    assert not (tmp_path / "w").exists()


def test_unwritable_workdir_is_one_line_before_the_model_loads(tmp_path, capsys):
    config = tiny_config.get_config()
    config.model.name = "smollm2-135m-instruct-q4"  # never loaded: the workdir check comes first
    for workdir in ("/proc/kif_jax_test", str(tmp_path / "file" / "sub")):
        (tmp_path / "file").write_text("a file, not a directory")
        assert cli.run(config, workdir) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: workdir {workdir} cannot be created or written")


def test_one_run_per_workdir_and_a_dead_runs_lock_does_not_block(tmp_path, capsys):
    import fcntl

    from kif_jax.workdir import LOCK_FILE, WorkdirLock

    config = tiny_config.get_config()
    config.methods = "seq_lora"
    with WorkdirLock(tmp_path):  # another run holds the workdir
        assert cli.run(config, str(tmp_path)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by another run (pid {os.getpid()} on host " in err[0]
    # A lock file left by a killed run: the file stays, the lock went with its process.
    holder = subprocess.run([sys.executable, "-c", f"from kif_jax.workdir import WorkdirLock; "
                             f"WorkdirLock({str(tmp_path)!r}).__enter__(); import os; os._exit(9)"], cwd=REPO)
    assert holder.returncode == 9 and (tmp_path / LOCK_FILE).exists()
    assert cli.run(config, str(tmp_path)) == 0
    with open(tmp_path / LOCK_FILE) as f:  # released at the end of the run
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_progress_lines_when_not_a_terminal_and_nothing_to_run_on_a_finished_workdir(tmp_path):
    args = [f"--config={TINY}", f"--workdir={tmp_path}", "--config.methods=seq_lora",
            "--config.logging.progress_every_steps=2"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    lines = [line for line in first.stderr.splitlines() if line.startswith("[kif_jax]")]
    assert any("compiling a training cycle" in line for line in lines)
    steps = [line for line in lines if ": step " in line]
    assert steps and all("steps/s" in line and ("ETA" in line or line.endswith("done")) for line in steps)
    assert any("evaluating after task 1/2" in line for line in lines)
    assert any("evaluated in" in line for line in lines)
    again = run_cli(*args)
    assert again.returncode == 0 and "seq_lora: nothing to run: finished; its results are from 20" in again.stderr
    assert "compiling" not in again.stderr
