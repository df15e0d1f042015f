"""Preemption and checkpoint fallback.

SIGTERM / SIGINT in the middle of a task: the run saves, prints one line, exits with 75, and the
same command resumes it to the identical result. A corrupt latest checkpoint falls back to the
newest intact one; unfinished temporary checkpoint directories are cleaned.
"""
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import helpers
import tiny_config
from kif_jax.errors import CheckpointError
from kif_jax.preemption import EXIT_CODE, Preempted, PreemptionGuard
from kif_jax.train import ResumePosition, train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "tiny_config.py"
# The checkpoints of a tiny run with checkpoint.every_steps = 2 (4 steps a task), in the order they are written.
TASK_1_END, TASK_2_STEP_2, TASK_2_END = (ResumePosition(1).checkpoint_id, ResumePosition(1, step=2).checkpoint_id,
                                         ResumePosition(2).checkpoint_id)
LONG_RUN = ("--config.methods=recurrent_kif", "--config.synthetic.n_train=800")  # 100 steps per task
PREEMPTED_LINE = ("preempted at task {task} step {step} (recurrent_kif); checkpoint saved; "
                  "run the same command to resume")


def main_command(workdir: pathlib.Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "main.py"), f"--config={TINY}", f"--workdir={workdir}", *overrides]


def records(workdir: pathlib.Path, method: str = "recurrent_kif") -> list[dict]:
    return helpers.read_metrics(workdir / method / "metrics.jsonl")  # stops at a line being written


def training_records(workdir: pathlib.Path, method: str = "recurrent_kif") -> list[tuple]:
    return helpers.training_records(workdir, method)


def accuracy_matrix(workdir: pathlib.Path, method: str = "recurrent_kif") -> list:
    return json.loads((workdir / method / "results.json").read_text())["accuracy_matrix"]


def wait_for_task_two(workdir: pathlib.Path, alive=lambda: True, timeout: float = 300.0) -> None:
    """Until the metrics show a training cycle of the second task (KIF's outer steps and fusion)."""
    deadline = time.time() + timeout
    while time.time() < deadline and alive():
        if any(r.get("phase") == 1 and "loss" in r for r in records(workdir)):
            return
        time.sleep(0.02)
    raise AssertionError("the run never reached its second task")


def no_temporary_checkpoints(workdir: pathlib.Path) -> bool:
    return not any(".orbax-checkpoint-tmp" in p.name for p in workdir.rglob("*"))


def test_sigterm_mid_task_saves_exits_75_and_resumes_to_the_identical_result(tmp_path):
    reference = subprocess.run(main_command(tmp_path / "reference", *LONG_RUN), capture_output=True, text=True,
                               timeout=600, cwd=REPO)
    assert reference.returncode == 0, reference.stderr[-2000:]

    workdir = tmp_path / "preempted"
    proc = subprocess.Popen(main_command(workdir, *LONG_RUN), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    wait_for_task_two(workdir, alive=lambda: proc.poll() is None)
    assert proc.poll() is None, "the run ended before it could be preempted"
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    seconds = time.perf_counter() - sent
    print(f"SIGTERM to exit: {seconds:.2f} s")
    assert proc.returncode == EXIT_CODE, stderr[-2000:]
    assert seconds < 30
    assert "Traceback" not in stderr
    line = [x for x in stderr.splitlines() if x.startswith("preempted")]
    assert len(line) == 1, stderr
    step = int(line[0].split(" step ")[1].split()[0])
    assert 0 < step < 100 and line[0] == PREEMPTED_LINE.format(task=2, step=step)
    assert not (workdir / "recurrent_kif" / "results.json").exists()
    assert no_temporary_checkpoints(workdir)
    saved = sorted(int(p.name) for p in (workdir / "recurrent_kif" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == ResumePosition(phase=1, step=step).checkpoint_id  # the mid-task checkpoint of task 2

    resumed = subprocess.run(main_command(workdir, *LONG_RUN), capture_output=True, text=True, timeout=600,
                             cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert accuracy_matrix(workdir) == accuracy_matrix(tmp_path / "reference")
    # Bit-identical training: every logged loss, norm and mask share, in the same order.
    assert training_records(workdir) == training_records(tmp_path / "reference")


def test_sigint_in_process_raises_preempted_and_restores_the_handlers(tmp_path):
    config = tiny_config.get_config()
    config.synthetic.n_train = 800
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    workdir = tmp_path / "interrupted"

    def interrupt() -> None:
        wait_for_task_two(workdir)
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C (or a notebook's interrupt button) does

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(Preempted) as stop:
        train_and_evaluate(config, workdir)
    assert stop.value.saved and stop.value.task == 2 and 0 < stop.value.step < 100
    assert {sig: signal.getsignal(sig) for sig in before} == before
    resumed = train_and_evaluate(config, workdir)["recurrent_kif"]
    reference = train_and_evaluate(config, tmp_path / "reference")["recurrent_kif"]
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    assert training_records(workdir) == training_records(tmp_path / "reference")
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_guard_turns_signals_into_a_request_and_a_second_ctrl_c_into_keyboard_interrupt():
    before = signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop() and guard.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes of the main thread
    assert signal.getsignal(signal.SIGINT) is before


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> pathlib.Path:
    """A finished tiny run with checkpoints at task 1's end (id 1e7), task 2's step 2 and task 2's end."""
    workdir = tmp_path_factory.mktemp("finished")
    train_and_evaluate(_checkpointed_config(), workdir)
    return workdir


def _checkpointed_config():
    config = tiny_config.get_config()
    config.checkpoint.every_steps = 2
    config.checkpoint.keep = 3
    return config


def _checkpoints(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "recurrent_kif" / "checkpoints").iterdir() if p.name.isdigit())


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(finished_run, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    assert _checkpoints(workdir) == [TASK_1_END, TASK_2_STEP_2, TASK_2_END]
    latest = workdir / "recurrent_kif" / "checkpoints" / str(TASK_2_END)
    for f in (latest / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    (workdir / "recurrent_kif" / "results.json").unlink()

    with caplog.at_level(logging.WARNING):
        result = train_and_evaluate(_checkpointed_config(), workdir)["recurrent_kif"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and f"{latest}" in warnings[0] and f"resuming from checkpoint {TASK_2_STEP_2}" in warnings[0]
    assert result["accuracy_matrix"] == accuracy_matrix(finished_run)
    assert training_records(workdir) == training_records(finished_run)
    assert (workdir / "recurrent_kif" / "checkpoints.unreadable" / str(TASK_2_END)).is_dir()
    assert _checkpoints(workdir) == [TASK_1_END, TASK_2_STEP_2, TASK_2_END]  # task 2's end saved anew


def test_fallback_still_refuses_a_checkpoint_of_another_config(finished_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    (workdir / "recurrent_kif" / "checkpoints" / str(TASK_2_END) / "meta" / "metadata").write_text("{garbage")
    config = _checkpointed_config()
    config.train.lr = 5e-3
    with pytest.raises(CheckpointError, match=f"{TASK_2_STEP_2} was written under a different config"):
        train_and_evaluate(config, workdir)


def test_unfinished_temporary_checkpoints_are_ignored_and_cleaned(finished_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    checkpoints = workdir / "recurrent_kif" / "checkpoints"
    shutil.rmtree(checkpoints / str(TASK_2_END))  # resume from task 2's step 2
    (workdir / "recurrent_kif" / "results.json").unlink()
    for name in ("10000004.orbax-checkpoint-tmp-1234", "30000000.orbax-checkpoint-tmp-99"):
        (checkpoints / name / "state").mkdir(parents=True)
        (checkpoints / name / "state" / "half_written").write_bytes(b"\0" * 10)
    result = train_and_evaluate(_checkpointed_config(), workdir)["recurrent_kif"]
    assert no_temporary_checkpoints(workdir)
    assert result["accuracy_matrix"] == accuracy_matrix(finished_run)
    assert training_records(workdir) == training_records(finished_run)


class _GuardFiringAt(PreemptionGuard):
    """A guard whose `poll`-th poll reports a preemption, to stop at an exact point of the run."""

    def __init__(self, poll: int) -> None:
        super().__init__()
        self.fire_at, self.count = poll, 0

    def should_stop(self) -> bool:
        self.count += 1
        return self.count == self.fire_at


def test_preemption_at_every_kind_of_point_resumes_to_the_identical_result(finished_run, tmp_path, monkeypatch):
    """Polls of a tiny run: 1 at the method's start, 1 per cycle (2 per task), 1 before each evaluated task."""
    from kif_jax.train import loop

    workdir = tmp_path / "run"
    stops = []
    # Task 1's last cycle; then while evaluating task 1 (saved as trained); task 2's evaluation; the start.
    for poll in (3, 2, 6, 1):
        monkeypatch.setattr(loop, "PreemptionGuard", lambda poll=poll: _GuardFiringAt(poll))
        with pytest.raises(Preempted) as stop:
            train_and_evaluate(_checkpointed_config(), workdir)
        stops.append((stop.value.task, stop.value.step, stop.value.saved))
    assert stops == [(1, 4, True), (1, 4, True), (2, 4, True), (2, 4, False)]
    monkeypatch.setattr(loop, "PreemptionGuard", PreemptionGuard)
    result = train_and_evaluate(_checkpointed_config(), workdir)["recurrent_kif"]
    assert result["accuracy_matrix"] == accuracy_matrix(finished_run)
    assert training_records(workdir) == training_records(finished_run)
    assert records(workdir)[-1]["accuracy"] == records(finished_run)[-1]["accuracy"]  # evaluated after a resume
    # Preempted mid-evaluation twice, yet exactly the uninterrupted run's per-example records, once each.
    predictions = (workdir / "recurrent_kif" / "predictions.jsonl").read_text()
    assert predictions == (finished_run / "recurrent_kif" / "predictions.jsonl").read_text() and predictions


_TWO_PROCESS_POLLS = """
import sys, time
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from kif_jax.preemption import PreemptionGuard
with PreemptionGuard() as guard:
    print("polling", flush=True)
    for _ in range(2000):
        if guard.should_stop():
            print("stopped at poll", guard._polls, flush=True)
            break
        time.sleep(0.01)
"""


def test_two_processes_stop_at_the_same_poll_when_one_gets_sigterm():
    """Multi-process: JAX's preemption service catches SIGTERM and the sync point makes both agree."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_POLLS, address, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO) for i in range(2)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "polling"
        time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)
        lines = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert lines[0].startswith("stopped at poll") and lines[0] == lines[1], lines
