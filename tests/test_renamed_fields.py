"""The fields that moved out of the `kif` section (kif_jax.config.RENAMED_FIELDS): Q is `cycle.steps`, the memory
buffer `memory_buffer.ratio`. The old names still set them, with one line on stderr, and checkpoints written
before the move resume: the fingerprint is the one the code before it computed."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

import tiny_config
from kif_jax import cli
from kif_jax.checkpointing import config_fingerprint
from kif_jax.config import RENAMED_FIELDS, base_config, validate_config, with_renamed_fields
from kif_jax.errors import CheckpointError, ConfigError
from kif_jax.methods import method_class, unrelated_sections
from kif_jax.train import ResumePosition, train_and_evaluate
from kif_jax.train.prefix import prefix_fingerprint

REPO = pathlib.Path(__file__).resolve().parent.parent
ALL_METHODS = "seq_lora,replay,recurrent_kif,mtl,ewc,o_lora,tasl,migu"
# Computed by the code before the move (commit a168e2a, `kif.inner_steps` and `kif.memory_ratio`) for the tiny
# config with every method above in `methods`: (checkpoint fingerprint, prefix fingerprint) of each method's run,
# and the whole config's (which checkpoints of still earlier versions carry).
OLD_TINY = {
    "seq_lora": ("87124054cf6a0cc3", "c5f2f8ec722a6afc"),
    "replay": ("87124054cf6a0cc3", "c5f2f8ec722a6afc"),
    "recurrent_kif": ("87124054cf6a0cc3", "c5f2f8ec722a6afc"),
    "static_importance": ("87124054cf6a0cc3", "c5f2f8ec722a6afc"),
    "mtl": ("87124054cf6a0cc3", "c5f2f8ec722a6afc"),
    "ewc": ("8577d891abb8b70c", "b897c3862dea3952"),
    "o_lora": ("0ace7012b85a09d3", "e387b4e7151485e4"),
    "tasl": ("0caeba1c716b5e31", "32bc5b75bd07a721"),
    "migu": ("d6cdf48fd95a52a7", "2a8709a251368d1f"),
}
OLD_TINY_WHOLE = "0fbcba02f707de1d"
# The checkpoints of SmolLM2 MTL, order 4, at step 128 (configs/smollm2_standard.py, --config.methods=mtl),
# written by commit 41e54a7 with data_dir /work/shared/cl_benchmark: their metadata's two fingerprints.
OLD_SMOLLM2_MTL = ("531f07d3696baf01", "ba031a1ce0ce21df")


def fingerprints(config, name):
    leave_out = unrelated_sections(config, method_class(name))
    return config_fingerprint(config, leave_out=leave_out), prefix_fingerprint(config, leave_out)


def test_fingerprints_are_those_the_code_before_the_move_computed():
    config = tiny_config.get_config()  # sets cycle.steps and memory_buffer.ratio: the same settings as before
    config.methods = ALL_METHODS
    assert {name: fingerprints(config, name) for name in OLD_TINY} == OLD_TINY
    assert config_fingerprint(config) == OLD_TINY_WHOLE
    spec = importlib.util.spec_from_file_location("smollm2_standard", REPO / "configs" / "smollm2_standard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    smollm2 = module.get_config()
    smollm2.methods = "mtl"
    smollm2.data_dir = "/work/shared/cl_benchmark"  # the run's (the fingerprint hashes the path)
    assert fingerprints(smollm2, "mtl") == OLD_SMOLLM2_MTL
    # Every setting still counts: another Q or buffer is another config for every method.
    for field in ("cycle", "memory_buffer"):
        other = tiny_config.get_config()
        other.methods = ALL_METHODS
        leaf = "steps" if field == "cycle" else "ratio"
        other[field][leaf] *= 2
        assert all(fingerprints(other, name)[0] != OLD_TINY[name][0] for name in OLD_TINY)


def test_a_checkpoint_written_before_the_move_resumes(tmp_path):
    config = tiny_config.get_config()
    config.methods = "replay"  # reads both moved fields: Q and the memory buffer
    first = train_and_evaluate(config, tmp_path / "first")["replay"]
    run = tmp_path / "resumed"
    train_and_evaluate(config, run)
    checkpoints = run / "replay" / "checkpoints"
    steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert steps[0] == ResumePosition(1).checkpoint_id and len(steps) > 1
    for step in steps:  # as the code before the move wrote them
        metadata = checkpoints / str(step) / "meta" / "metadata"
        metadata.write_text(json.dumps(dict(json.loads(metadata.read_text()), config_fingerprint=OLD_TINY["replay"][0])))
    for step in steps[1:]:  # resume from the first task's end: the second task trains again
        for path in sorted((checkpoints / str(step)).rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (checkpoints / str(step)).rmdir()
    (run / "replay" / "results.json").unlink()
    assert train_and_evaluate(config, run)["replay"]["accuracy_matrix"] == first["accuracy_matrix"]
    config.cycle.steps = 4
    with pytest.raises(CheckpointError, match="different config"):
        train_and_evaluate(config, run)


def test_old_names_in_a_config_file_set_the_new_fields_with_one_line(capsys):
    config = base_config()
    config.kif.inner_steps = 4  # what a config file written before the move does
    config.kif.memory_ratio = 0.1
    moved = with_renamed_fields(config)
    assert moved.cycle.steps == 4 and moved.memory_buffer.ratio == 0.1
    assert "inner_steps" not in moved.kif and "memory_ratio" not in moved.kif
    assert config.kif.inner_steps == 4  # the given config is left as it is
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: config field 'kif.inner_steps' is deprecated; it sets 'cycle.steps' (use that name)",
                   "warning: config field 'kif.memory_ratio' is deprecated; it sets 'memory_buffer.ratio' (use that "
                   "name)"]
    assert with_renamed_fields(moved) is moved and capsys.readouterr().err == ""


def test_old_names_on_the_command_line_set_the_new_fields(capsys):
    argv = ["main.py", "--config=configs/demo.py", "--config.kif.inner_steps=4", "--config.kif.memory_ratio", "0.1",
            "--config.kif.outer_steps=2"]
    assert cli.renamed_overrides(argv) == ["main.py", "--config=configs/demo.py", "--config.cycle.steps=4",
                                           "--config.memory_buffer.ratio", "0.1", "--config.kif.outer_steps=2"]
    assert len(capsys.readouterr().err.splitlines()) == 2
    assert set(RENAMED_FIELDS) == {"kif.inner_steps", "kif.memory_ratio"}
    # An argv that skipped the renaming gets the new name in one line.
    assert cli.unknown_override(["x", "--config.kif.inner_steps=4"]) == (
        "config field 'kif.inner_steps' in --config.kif.inner_steps=4 is now 'cycle.steps': use --config.cycle.steps")
    printed = subprocess.run([sys.executable, str(REPO / "main.py"), f"--config={REPO / 'tests' / 'tiny_config.py'}",
                              "--config.kif.inner_steps=4", "--print_config"], capture_output=True, text=True,
                             cwd=REPO, timeout=300)
    assert printed.returncode == 0, printed.stderr
    assert printed.stderr.strip().splitlines() == [
        "warning: config field 'kif.inner_steps' is deprecated; it sets 'cycle.steps' (use that name)"]
    lines = printed.stdout.splitlines()
    assert any(line.startswith("cycle.steps = 4 ") for line in lines)
    assert not any("inner_steps" in line or "memory_ratio" in line for line in lines)


@pytest.mark.parametrize("field, value, message", [
    ("cycle.steps", 0, "config field 'cycle.steps' must be a positive integer, got 0"),
    ("memory_buffer.ratio", 0.0, "config field 'memory_buffer.ratio' must lie in (0, 1], got 0.0"),
    ("memory_buffer.ratio", 1.5, "config field 'memory_buffer.ratio' must lie in (0, 1], got 1.5"),
])
def test_the_moved_fields_are_validated(field, value, message):
    config = tiny_config.get_config()
    section, leaf = field.split(".")
    config[section][leaf] = value
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    assert str(err.value) == message


def test_the_memory_plan_command_takes_the_old_names_too(capsys):
    """`python -m kif_jax.memory_plan` renames old overrides as main.py does: the same plan, one notice."""
    config = f"--config={REPO / 'configs' / 'llama2_13b_pod.py'}"
    base = ["memory_plan", config, "--devices=16", "--method=replay", "--json"]
    assert cli.memory_plan_main(base + ["--config.memory_buffer.ratio=0.5"]) == 0
    new = json.loads(capsys.readouterr().out)
    assert cli.memory_plan_main(base + ["--config.kif.memory_ratio=0.5"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == new
    assert captured.err.strip().splitlines() == [
        "warning: config field 'kif.memory_ratio' is deprecated; it sets 'memory_buffer.ratio' (use that name)"]
