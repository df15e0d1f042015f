"""The methods package: one registry that the config, its messages, the report and the memory plan read; a
training loop that names no method; checkpoints of the earlier state layout refused in one line."""
import copy
import json
import pathlib
import re

import pytest

import tiny_config
from kif_jax import cli
from kif_jax.checkpointing import STATE_LAYOUT, config_fingerprint
from kif_jax.config import base_config, field_docs, validate_config
from kif_jax.errors import ConfigError
from kif_jax.methods import builtin_names, method_class, sections, unrelated_sections
from kif_jax.report.runs import _method_order
from kif_jax.train import ResumePosition, train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parent.parent
BUILTIN = ("recurrent_kif", "static_importance", "no_identification", "global_merge", "no_share", "adaptive",
           "seq_lora", "replay", "mtl", "o_lora", "tasl", "ewc", "migu")


def test_one_registry_lists_every_method_and_section():
    assert builtin_names() == BUILTIN
    assert list(sections()) == ["kif", "o_lora", "tasl", "ewc", "migu"]
    config = base_config()
    for section, cls in sections().items():  # each method module owns its section's defaults and docs
        assert config[section].to_dict() == cls.default_config().to_dict()
    docs = field_docs()
    assert docs["cycle.steps"] == "Q: optimizer steps per cycle (Recurrent-KIF: inner steps per fusion)"
    assert docs["memory_buffer.ratio"] == "share of every earlier task's training set kept for replay"
    assert docs["migu.threshold"].startswith("A feature keeps its gradient when its output magnitude")
    assert all(method_class(name).name == name for name in BUILTIN)
    # The report orders method directories by the registry.
    assert sorted(["migu", "seq_lora", "zzz_own", "recurrent_kif"], key=_method_order) == [
        "recurrent_kif", "seq_lora", "migu", "zzz_own"]


def test_validation_messages_read_the_registry():
    config = tiny_config.get_config()
    config.methods = "seq_lora,nope"
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    assert str(err.value).startswith("unknown method 'nope' in config field 'methods'; known: " + ", ".join(BUILTIN))
    config.methods = "migu,seq_lora,migu"
    with pytest.raises(ConfigError, match="names a method twice"):
        validate_config(config)
    config.methods = "seq_lora"
    config.kif.scope = "nowhere"  # a section is checked whichever methods run
    with pytest.raises(ConfigError, match="config field 'kif.scope' is 'nowhere'; expected one of global"):
        validate_config(config)


def test_the_training_loop_names_no_method():
    names = set(BUILTIN) | set(sections()) | {"SeqLoRA", "Recurrent-KIF", "O-LoRA", "TaSL", "EWC", "MIGU"}
    for path in sorted((REPO / "kif_jax" / "train").glob("*.py")):
        text = path.read_text()
        found = [n for n in names if re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", text, re.I)]
        assert not found, (path.name, found)


def test_a_methods_checkpoints_ignore_the_other_methods_sections():
    """Changing EWC's lambda keeps SeqLoRA's and Recurrent-KIF's finished runs; Q and the memory buffer are every
    method's; `methods` itself is never fingerprinted. The kif section stays in every method's fingerprint: it held
    Q and the buffer when the checkpoints of earlier runs were written (tests/test_renamed_fields.py)."""
    config = tiny_config.get_config()
    config.methods = "seq_lora,recurrent_kif,ewc"

    def fingerprints(c):
        return {n: config_fingerprint(c, unrelated_sections(c, method_class(n))) for n in ("seq_lora", "recurrent_kif",
                                                                                          "ewc")}

    assert unrelated_sections(config, method_class("seq_lora")) == ["ewc", "kif", "migu", "o_lora", "tasl"]
    assert unrelated_sections(config, method_class("ewc")) == ["kif", "migu", "o_lora", "tasl"]
    before = fingerprints(config)
    assert before["seq_lora"] == before["recurrent_kif"] != before["ewc"]
    other = copy.deepcopy(config)
    other.ewc.lambda_ *= 2
    after = fingerprints(other)
    assert after["seq_lora"] == before["seq_lora"] and after["recurrent_kif"] == before["recurrent_kif"]
    assert after["ewc"] != before["ewc"]
    for field, value in (("cycle.steps", 4), ("memory_buffer.ratio", 0.5), ("kif.quantile", 0.7)):
        other = copy.deepcopy(config)
        section, leaf = field.split(".")
        other[section][leaf] = value
        assert all(a != b for a, b in zip(fingerprints(other).values(), before.values())), field
    other = copy.deepcopy(config)
    other.methods = "seq_lora"
    assert fingerprints(other) == before


def test_a_checkpoint_of_the_earlier_state_layout_is_refused_in_one_line(tmp_path, capsys):
    config = tiny_config.get_config()
    config.methods = "seq_lora"
    train_and_evaluate(config, tmp_path)
    checkpoints = tmp_path / "seq_lora" / "checkpoints"
    for step in (ResumePosition(1).checkpoint_id, ResumePosition(2).checkpoint_id):
        metadata = checkpoints / str(step) / "meta" / "metadata"
        meta = json.loads(metadata.read_text())
        assert meta.pop("state_layout") == STATE_LAYOUT
        metadata.write_text(json.dumps(meta))  # as an earlier kif_jax wrote it
    capsys.readouterr()  # the first run's progress lines
    assert cli.run(config, str(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: checkpoint {checkpoints}/{ResumePosition(2).checkpoint_id} "
                                               "holds a training state of layout 1, written by an earlier kif_jax")
    assert f"delete {checkpoints}" in err[0]
