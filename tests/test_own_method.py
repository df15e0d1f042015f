"""A method of one's own, written outside kif_jax (examples/my_methods.py, the code of docs/adding_a_method.md),
run by main.py as `--config.methods=my_methods:L2Anchor`, and through a registration call."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

import tiny_config
from helpers import read_metrics
from kif_jax.config import validate_config, with_method_sections
from kif_jax.errors import ConfigError
from kif_jax.methods import method_class, names, register

REPO = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.mark.parametrize("document", ["docs/adding_a_method.md", "README.md"])
def test_the_guide_shows_the_example_file_verbatim(document):
    code = (EXAMPLES / "my_methods.py").read_text()
    body = code.split('"""\n', 1)[1].strip()  # the file without its docstring
    blocks = re.findall(r"```python\n(.*?)```", (REPO / document).read_text(), re.S)
    assert any(block.strip() == body for block in blocks)


def test_main_runs_a_method_from_its_own_module(tmp_path):
    """Added to a workdir whose SeqLoRA run has finished, as the guide does after the demo: SeqLoRA's run stands."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(EXAMPLES), os.environ.get("PYTHONPATH")])))

    def main(methods):
        return subprocess.run([sys.executable, str(REPO / "main.py"), f"--config={REPO / 'tests' / 'tiny_config.py'}",
                               f"--workdir={tmp_path}", f"--config.methods={methods}"],
                              capture_output=True, text=True, cwd=REPO, timeout=900, env=env)

    assert main("seq_lora").returncode == 0
    done = main("seq_lora,my_methods:L2Anchor")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "seq_lora: nothing to run: finished" in done.stdout + done.stderr
    result = json.loads((tmp_path / "l2_anchor" / "results.json").read_text())
    assert result["method"] == "l2_anchor" and result["config"]["l2_anchor"] == {"strength": 100.0}
    assert "l2_anchor" in (tmp_path / "comparison.md").read_text()
    own = [r for r in read_metrics(tmp_path / "l2_anchor" / "metrics.jsonl") if "loss" in r]
    seq = [r for r in read_metrics(tmp_path / "seq_lora" / "metrics.jsonl") if "loss" in r]
    # Task 1 runs SeqLoRA's program: the same losses, bit for bit, and no penalty.
    assert [r["loss"] for r in own if r["phase"] == 0] == [r["loss"] for r in seq if r["phase"] == 0]
    assert all("penalty" not in r for r in own if r["phase"] == 0)
    # Task 2 starts at its anchor: no pull in the first cycle (its first step is the warm-up's, at learning
    # rate 0, so both of its steps sit at the anchor); then the parameters move away and it pulls.
    penalties = [r["penalty"] for r in own if r["phase"] == 1]
    assert len(penalties) == 2 and penalties[0] == 0.0 and penalties[1] > 0
    assert own[-1]["loss"] != seq[-1]["loss"]


def test_a_registration_call_names_it_like_a_built_in_method():
    sys.path.insert(0, str(EXAMPLES))
    try:
        from my_methods import L2Anchor
    finally:
        sys.path.remove(str(EXAMPLES))
    assert register(L2Anchor) is L2Anchor and "l2_anchor" in names() and method_class("l2_anchor") is L2Anchor
    config = tiny_config.get_config()
    config.methods = "seq_lora,l2_anchor"
    config = with_method_sections(config)
    validate_config(config)
    assert config.l2_anchor.strength == 100.0
    config.l2_anchor.strenght = 10.0  # a typo in the method's own section is caught like any other
    with pytest.raises(ConfigError, match="unknown config field 'l2_anchor.strenght'"):
        validate_config(config)

    class Impostor(L2Anchor):
        pass

    with pytest.raises(ConfigError, match="is taken by"):
        register(Impostor)


@pytest.mark.parametrize("entry, needle", [
    ("no_such_module:Thing", "cannot import module 'no_such_module'"),
    ("kif_jax.methods.seq_lora:Nope", "has no 'Nope'"),
    ("kif_jax.methods.seq_lora:METHODS", "is not a kif_jax.methods.Method subclass"),
])
def test_a_bad_module_class_entry_is_one_line(entry, needle):
    config = tiny_config.get_config()
    config.methods = entry
    with pytest.raises(ConfigError, match=re.escape(needle)) as err:
        validate_config(config)
    assert "\n" not in str(err.value)
