"""Shipped model configs for gated hub checkpoints: valid offline, sized from the built-in presets, and a
run without the hub stops at the download with one line."""
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
GEMMA3 = "configs/gemma3_270m_standard.py"


def _main(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env=env)


def test_gemma3_config_validates_and_stops_at_the_download_in_one_line(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}  # an empty cache, no network
    printed = _main(f"--config={GEMMA3}", "--print_config", env=env)
    assert printed.returncode == 0, printed.stderr
    assert "model.name = 'gemma-3-270m-it'" in printed.stdout and "model.prompt_template = 'chat'" in printed.stdout
    run = _main(f"--config={GEMMA3}", f"--workdir={tmp_path / 'w'}", env=env)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert len(lines) == 1 and "google/gemma-3-270m-it" in lines[0], run.stderr


def test_gemma3_config_is_sized_from_the_preset_without_weights(capsys):
    from kif_jax.cli import memory_plan_main

    assert memory_plan_main(["memory_plan", f"--config={REPO / GEMMA3}", "--devices=1", "--method=seq_lora"]) == 0
    out = capsys.readouterr().out
    assert "PRESET_CONFIGS" in out
    # 268,098,176 parameters in bfloat16: the 270M model's published size.
    assert "frozen             536,196,352 bytes" in out
