"""main.py as users run it: a SIGKILLed run resumes to the identical result; bad input is one line, exit 2."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import tiny_config
from kif_jax import cli

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "tiny_config.py"
METRIC_KEYS = ("phase", "step", "loss", "grad_norm", "lr", "outer_loss", "mask_in_frac", "mask_out_frac")


def main_command(workdir: pathlib.Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "main.py"), f"--config={TINY}", f"--workdir={workdir}",
            "--config.methods=seq_lora,recurrent_kif", "--config.checkpoint.every_steps=2", *overrides]


def run_main(workdir: pathlib.Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(main_command(workdir, *overrides), capture_output=True, text=True, timeout=600,
                          cwd=REPO)


def training_record(workdir: pathlib.Path, method: str) -> list[tuple]:
    lines = (workdir / method / "metrics.jsonl").read_text().splitlines()
    return [tuple(r.get(k) for k in METRIC_KEYS) for r in map(json.loads, lines) if "loss" in r]


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
        assert training_record(killed_dir, method) == training_record(tmp_path / "reference", method)
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
