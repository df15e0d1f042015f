"""TensorBoard and W&B (offline) beside metrics.jsonl: the event file read back, one W&B run across a resume."""
import json
import pathlib
import struct

import numpy as np
import pytest

import tiny_config
from kif_jax.train import train_and_evaluate

tensorboardX = pytest.importorskip("tensorboardX")
from tensorboardX.proto import event_pb2  # noqa: E402


def read_events(directory: pathlib.Path) -> list:
    """Every Event of the TFRecord event files under `directory` (length, crc, data, crc per record)."""
    events = []
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4
    return events


def scalars(events: list) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list] = {}
    for event in events:
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_and_wandb_log_what_metrics_jsonl_holds(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_config.get_config()
    config.methods = "recurrent_kif"
    config.logging.tensorboard = True
    config.logging.wandb_project = "kif-jax-test"
    result = train_and_evaluate(config, tmp_path)["recurrent_kif"]
    method_dir = tmp_path / "recurrent_kif"
    records = [json.loads(line) for line in (method_dir / "metrics.jsonl").read_text().splitlines()]
    training = [r for r in records if "loss" in r]
    events = read_events(method_dir / "tensorboard")
    got = scalars(events)
    # The loss curve: one point per logged cycle, at the step counted over the whole sequence.
    steps_task1 = max(r["step"] for r in training if r["phase"] == 0)
    want = [(r["step"] + (steps_task1 if r["phase"] == 1 else 0), r["loss"]) for r in training]
    assert [s for s, _ in got["train/loss"]] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in got["train/loss"]], [v for _, v in want], rtol=1e-6)
    assert "train/mask_in_frac" in got and "train/outer_loss" in got
    assert got["results/op"][-1][1] == pytest.approx(result["op"], rel=1e-6)
    assert got["results/avg"][-1][1] == pytest.approx(result["avg"], rel=1e-6)
    assert got["accuracy/topic"][0][1] == pytest.approx(result["accuracy_matrix"][0][0], rel=1e-6)
    assert any(v.HasField("image") for e in events for v in e.summary.value)  # the accuracy heatmap
    runs = list((method_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # A rerun resumes from the last checkpoint and continues the same W&B run (its id is in the checkpoint).
    (method_dir / "results.json").unlink()
    train_and_evaluate(config, tmp_path)
    runs = sorted((method_dir / "wandb").glob("offline-run-*"))
    ids = {p.name.rsplit("-", 1)[-1] for p in runs}
    assert len(runs) == 2 and len(ids) == 1


def test_tracking_off_writes_nothing_and_imports_neither(tmp_path):
    import subprocess
    import sys

    code = ("import sys, tiny_config; from kif_jax.train import train_and_evaluate; c = tiny_config.get_config(); "
            "c.methods = 'seq_lora'; train_and_evaluate(c, sys.argv[1]); "
            "print('wandb' in sys.modules, 'tensorboardX' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         cwd=pathlib.Path(__file__).parent, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]
    assert not (tmp_path / "seq_lora" / "tensorboard").exists() and not (tmp_path / "seq_lora" / "wandb").exists()
