"""SuperNI through the generation format: reading Super-NaturalInstructions task files, SAPT's prompt, ROUGE-L and
exact match against hand-computed values, the orders, the held-out dev split, one-line errors before any model
loads, and a tiny run end to end on hand-made task files."""
import json
import math
import pathlib

import numpy as np
import pytest

import tiny_config
from kif_jax import cli, compare, metrics
from kif_jax.config import default_data_dir
from kif_jax.data import SUPERNI_GEN5_ORDERS, SUPERNI_ORDERS, load_split, resolve_tasks, validate_tasks
from kif_jax.errors import DataError
from kif_jax.tasks import get_format
from kif_jax.tasks.generation import exact_match, normalize_text, rouge_l, sapt_prompt, training_reference

SUPERNI = pathlib.Path(default_data_dir("superni"))
needs_superni = pytest.mark.skipif(not (SUPERNI / "MANIFEST.json").is_file(),
                                   reason=f"the SuperNI benchmark is not at {SUPERNI} (set KIF_SUPERNI_DIR)")

DEFINITION = "Answer with the animal the sentence names."
# Two tiny tasks in the official format: list outputs (one with two references) and plain-string outputs.
TASKS = {
    "task901_animal": {
        "train": [("a cat sat", ["cat"]), ("the dog ran", ["dog", "a dog"]), ("one cow", ["cow"]),
                  ("a hen ate", ["hen"]), ("two pigs", ["pig"]), ("an owl", ["owl"]), ("the fox", ["fox"]),
                  ("a bat", ["bat"]), ("one yak", ["yak"]), ("the elk", ["elk"]), ("a rat", ["rat"]),
                  ("an ant", ["ant"])],
        "test": [("a cat ran", ["cat"]), ("the dog sat", ["dog", "a dog"]), ("a fox", ["fox"])],
    },
    "task902_colour": {
        "train": [(f"the {c} car", c) for c in ("red", "blue", "green", "pink", "gray", "gold", "tan", "teal",
                                                 "navy", "lime")],
        "test": [("a red hat", "red"), ("a blue cup", "blue")],
    },
}


def write_task(path: pathlib.Path, name: str, instances, definition=(DEFINITION,)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "Contributors": ["tests"], "Source": ["hand-made"], "Categories": ["Information Extraction"],
        "Definition": list(definition), "Positive Examples": [{"input": "x", "output": "y", "explanation": "z"}],
        "Negative Examples": [], "Instances": [{"id": f"{name}-{i}", "input": text, "output": output}
                                               for i, (text, output) in enumerate(instances)]}))


def write_benchmark(root: pathlib.Path) -> pathlib.Path:
    for name, splits in TASKS.items():
        for split, instances in splits.items():
            write_task(root / split / f"{name}.json", name, instances,
                       definition=(DEFINITION if name == "task901_animal" else "  Name the colour.  ",))
    return root


def test_prompt_is_sapts_zero_shot_superni_prompt():
    head, body, tail = sapt_prompt("  Given a phrase, extract the relation. ", "person can have offspring")
    assert head + body + tail == ("Definition: Given a phrase, extract the relation.\n\n"
                                  "Now complete the following example -\n"
                                  "Input: person can have offspring\n"
                                  "Output: ")
    assert body == "person can have offspring"  # what an over-long prompt may shorten


def test_an_over_long_prompt_is_cut_as_the_standard_benchmarks_are():
    """Decoder-only: the instance input loses its end, the definition and "Output: " stay; T5: the end goes."""
    from kif_jax.models.decoder.tokenize import tokenize_causal_records
    from kif_jax.models.t5.tokenize import tokenize_records
    from kif_jax.models.tokenizers import ByteTokenizer

    head, body, tail = sapt_prompt(DEFINITION, "x" * 500)
    record = {"id": "1", "task": "t", "input": head + body + tail, "output": "cat", "references": ["cat"],
              "prompt_parts": (head, body, tail)}
    tokenizer = ByteTokenizer()
    causal = tokenize_causal_records([record], tokenizer, max_input_length=len(head) + len(tail) + 10)
    assert tokenizer.decode(causal.input_ids[0]) == head + "x" * 10 + tail
    seq2seq = tokenize_records([record], tokenizer, max_input_length=len(head) + 10)
    assert tokenizer.decode(seq2seq.input_ids[0]) == head + "x" * 9  # and its EOS


def test_reading_list_and_string_outputs(tmp_path):
    root = write_benchmark(tmp_path)
    animal = load_split(root, "task901_animal", "test", "generation")
    assert [r["references"] for r in animal] == [["cat"], ["dog", "a dog"], ["fox"]]
    assert animal[0] == {"id": "task901_animal-0", "task": "task901_animal", "output": "cat", "references": ["cat"],
                         "input": f"Definition: {DEFINITION}\n\nNow complete the following example -\n"
                                  "Input: a cat ran\nOutput: ",
                         "prompt_parts": (f"Definition: {DEFINITION}\n\nNow complete the following example -\n"
                                          "Input: ", "a cat ran", "\nOutput: ")}
    assert animal[1]["output"] == training_reference("task901_animal-1", ["dog", "a dog"])
    colour = load_split(root, "task902_colour", "train", "generation")
    assert [r["references"] for r in colour][:2] == [["red"], ["blue"]] and colour[0]["output"] == "red"
    assert colour[0]["input"].startswith("Definition: Name the colour.\n\n")  # the definition stripped
    assert validate_tasks(root, list(TASKS), splits=("train", "test"), task_format="generation") == {
        "task901_animal": [], "task902_colour": []}


def test_training_reference_is_fixed_by_the_id():
    refs = ["a", "b", "c"]
    picks = {training_reference(f"t-{i}", refs) for i in range(50)}
    assert picks == set(refs)  # spread over the references, as SAPT's random draw
    assert all(training_reference(f"t-{i}", refs) == training_reference(f"t-{i}", list(refs)) for i in range(50))


@pytest.mark.parametrize("prediction, references, rouge, em", [
    # LCS "the cat on the mat" = 5 of 6 tokens either side: P = R = F = 5/6.
    ("the cat sat on the mat", ["the cat is on the mat"], 5 / 6, False),
    # The Porter stemmer (words over 3 characters): running -> run, dogs -> dog.
    ("running dogs", ["run dog"], 1.0, False),
    # The best reference: "a blue sky" shares 2 tokens: P = 2/2, R = 2/3, F = 2PR / (P + R) = 0.8.
    ("blue sky", ["green grass", "a blue sky"], 0.8, False),
    # Case and punctuation: ROUGE's tokenizer and exact match's normalisation drop both.
    ("Paris.", ["paris"], 1.0, True),
    ("Hello,  World!", ["hello world"], 1.0, True),
    # Articles are kept by exact match; ROUGE-L: P = 2/3, R = 1, F = 0.8.
    ("the Eiffel Tower", ["Eiffel Tower"], 0.8, False),
    ("", ["anything"], 0.0, False),
    ("dog", ["cat", "a dog", "dog"], 1.0, True),
])
def test_rouge_l_and_exact_match_by_hand(prediction, references, rouge, em):
    assert rouge_l(prediction, references) == pytest.approx(rouge, abs=1e-12)
    assert exact_match(prediction, references) is em
    scored = get_format("generation").score(prediction, {"references": references})
    assert scored == {"score": pytest.approx(rouge, abs=1e-12), "exact_match": em} and "correct" not in scored


def test_rouge_l_is_rouge_scores_own():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pred, refs = "the quick brown foxes jumped", ["a quick brown fox jumps", "the lazy dog"]
    assert rouge_l(pred, refs) == max(scorer.score(r, pred)["rougeL"].fmeasure for r in refs)
    assert normalize_text("  It's  A-OK!  ") == "its aok"


def test_orders_and_benchmarks():
    assert resolve_tasks(benchmark="superni") == list(SUPERNI_ORDERS[1])
    assert resolve_tasks(benchmark="superni", order=2) == list(SUPERNI_ORDERS[2])
    short = {t.split("_")[0] for t in SUPERNI_GEN5_ORDERS[1]}
    assert [t.split("_")[0] for t in resolve_tasks(benchmark="superni_gen5", order=1)] == [
        "task1510", "task1729", "task073", "task748", "task591"] and len(short) == 5
    assert [t.split("_")[0] for t in resolve_tasks(benchmark="superni_gen5", order=2)] == [
        "task748", "task073", "task591", "task1510", "task1729"]
    assert resolve_tasks(order=1)[0] == "mnli"  # an order alone is still the CL benchmark's
    with pytest.raises(DataError, match="not part of benchmark 'superni'"):
        resolve_tasks(benchmark="superni", order=4)


@needs_superni
def test_the_shared_benchmark_reads_and_its_orders_are_the_manifests():
    manifest = json.loads((SUPERNI / "MANIFEST.json").read_text())
    assert {int(k): tuple(v) for k, v in manifest["orders"].items()} == SUPERNI_ORDERS
    validate_tasks(SUPERNI, SUPERNI_ORDERS[1], splits=("train", "test"), task_format="generation")
    # superni_gen5: generative (not the three sentiment / emotion classifications), >= 975 training and 100 test
    # examples, mean training input under 600 characters.
    chosen = {t for t, v in manifest["tasks"].items() if v["train"]["instances"] >= 975 and
              v["test"]["instances"] >= 100 and v["train"]["mean_input_chars"] < 600 and "classification" not in t}
    assert chosen == set(SUPERNI_GEN5_ORDERS[1]) == set(SUPERNI_GEN5_ORDERS[2])
    first = load_split(SUPERNI, "task1510_evalution_relation_extraction", "test", "generation")[0]
    assert first["input"] == (
        "Definition: Given a phrase describing the relationship between two words, extract the words and the lexical "
        "relationship between them. The relation has to be of the type 'MemberOf', 'MadeOf', 'Synonym', 'Entails', "
        "'HasA', 'HasProperty', 'PartOf', 'Antonym' or 'IsA'. The output should have the format: word1 relation "
        "word2.\n\nNow complete the following example -\nInput: person can have or can contain offspring\nOutput: ")
    assert first["output"] == "person HasA offspring"
    strings = load_split(SUPERNI, "task363_sst2_polarity_classification", "test", "generation")
    assert all(len(r["references"]) == 1 for r in strings)  # plain-string outputs


def test_dev_examples_are_held_out_of_training(tmp_path):
    from kif_jax.train.data import RunData, held_out_rows

    root = write_benchmark(tmp_path)
    config = tiny_config.get_config()
    config.eval.split = "dev"
    data = RunData(config, root, family=None, tokenizer=None, task_format=get_format("generation"))
    full = load_split(root, "task901_animal", "train", "generation")
    dev = data.eval_records("task901_animal")
    train = data.train_records("task901_animal")
    assert len(dev) == 12 // 10 and held_out_rows("task901_animal", 12) == held_out_rows("task901_animal", 12)
    assert {r["id"] for r in dev}.isdisjoint(r["id"] for r in train)
    assert sorted(r["id"] for r in dev + train) == sorted(r["id"] for r in full)
    assert {r["id"] for r in dev}.isdisjoint(r["id"] for r in load_split(root, "task901_animal", "test", "generation"))
    memory = data.memory_records(["task901_animal", "task902_colour"], ratio=0.5)
    assert memory and {r["id"] for r in memory}.isdisjoint(r["id"] for r in dev)
    assert len(held_out_rows("t", 1000)) == 100
    config.eval.split = "test"  # a test run trains on the whole training file
    data = RunData(config, root, family=None, tokenizer=None, task_format=get_format("generation"))
    assert data.train_records("task901_animal") == full and data.eval_records("task901_animal") == load_split(
        root, "task901_animal", "test", "generation")


def superni_config(root: pathlib.Path):
    config = tiny_config.get_config()
    config.data_dir = str(root)
    config.tasks = ",".join(TASKS)
    config.task_format = "generation"
    config.train.max_input_length = 160
    return config


@pytest.mark.parametrize("content, needle", [
    ('[{"id": "1", "input": "x", "output": "y"}]', "not a Super-NaturalInstructions task: expected a JSON object"),
    ('{"Instances": [{"id": "1", "input": "x", "output": ["y"]}]}', "has no 'Definition'"),
    ('{"Definition": ["d"]}', "has no 'Instances'"),
    ('{"Definition": ["d"], "Instances": [{"id": "1", "input": "x", "output": []}]}', "has no reference"),
    ('{"Definition": ["d"], "Instances": [{"id": "1", "input": "x"}]}', "has no reference"),
])
def test_bad_task_files_are_one_line_and_exit_2_before_the_model_loads(tmp_path, capsys, monkeypatch, content, needle):
    from kif_jax.train import loop

    root = write_benchmark(tmp_path / "data")
    (root / "test" / "task902_colour.json").write_text(content)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loop, "build_model", no_model)
    assert cli.run(superni_config(root), str(tmp_path / "work")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0] and "task902_colour.json" in err[0]


def test_a_superni_benchmark_on_the_classification_directory_names_the_right_one(tmp_path, capsys):
    (tmp_path / "cl" / "train").mkdir(parents=True)
    config = tiny_config.get_config()
    config.data_dir = str(tmp_path / "cl")
    config.tasks = ""
    config.benchmark = "superni_gen5"
    assert cli.run(config, str(tmp_path / "work")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing data file" in err[0] and f"--config.data_dir={SUPERNI}" in err[0]


def test_classification_files_read_as_superni_say_so(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "cb.json").write_text('[{"id": "1", "input": "x Option: a, b.\\nAnswer:", "output": "a"}]')
    with pytest.raises(DataError, match="classification benchmark's format"):
        load_split(tmp_path, "cb", "train", "generation")


def test_a_tiny_superni_run_goes_through_the_same_loop(tmp_path):
    """Two methods on two hand-made SuperNI tasks: ROUGE-L matrices, float scores with exact match beside them,
    the report and the paired comparison (no McNemar: the scores are not binary)."""
    from kif_jax.train import train_and_evaluate

    root = write_benchmark(tmp_path / "data")
    config = superni_config(root)
    config.methods = "seq_lora,replay"
    workdir = tmp_path / "work"
    results = train_and_evaluate(config, workdir)
    for method, result in results.items():
        assert result["metric"] == "ROUGE-L" and set(result["also"]) == {"exact_match"}
        records = [json.loads(line) for line in (workdir / method / "predictions.jsonl").read_text().splitlines()]
        assert len(records) == 3 + 3 + 2  # task 1 after task 1; both tasks after task 2
        for r in records:
            assert "correct" not in r and isinstance(r["score"], float) and 0 <= r["score"] <= 1
            assert isinstance(r["exact_match"], bool)
            refs = [ref for ref in r.get("references", [r["label"]])]
            assert r["score"] == rouge_l(r["prediction"], refs)  # the record's score is the format's
        assert [r.get("references") for r in records if r["index"] == 1 and r["task"] == "task901_animal"][0] == [
            "dog", "a dog"]
        R = metrics.results_matrix(result)
        rebuilt = compare.load_predictions(workdir / method / "predictions.jsonl", method, result["tasks"])
        np.testing.assert_array_equal(rebuilt.matrix(), R)
        assert not rebuilt.binary
        em = compare.load_predictions(workdir / method / "predictions.jsonl", method, result["tasks"],
                                      field="exact_match").matrix()
        np.testing.assert_array_equal(em, np.array([[v if v is not None else np.nan for v in row]
                                                    for row in result["also"]["exact_match"]], dtype=float))
        assert math.isfinite(result["op"]) and math.isfinite(result["bwt"])
        # Answers are decoded to the longest training reference (bytes here): "a dog" has 5.
        assert all(len(r["prediction"].encode()) <= 5 for r in records if r["task"] == "task901_animal")
    rows = json.loads((workdir / "report" / "paired_comparison.json").read_text())
    assert rows and all(r["metric"] != "mcnemar" for r in rows)
    report = (workdir / "report" / "report.md").read_text()
    assert "Final ROUGE-L (%) on each task" in report and "Final exact_match (%) on each task" in report
    assert "test ROUGE-L (%)" in metrics.accuracy_table(R, result["tasks"], method="m", metric="ROUGE-L")


def write_scored_run(workdir: pathlib.Path, method: str, tasks: list[str], means: np.ndarray, seed: int) -> dict:
    """A finished SuperNI run's records as tools/collect_run.py leaves them: predictions.jsonl with per-example
    ROUGE-L drawn around `means` (row i: after task i) and exact match beside it, and the results.json of them."""
    rng = np.random.default_rng(seed)
    n, b = 40, len(tasks)
    R, em = np.full((b, b), np.nan), np.full((b, b), np.nan)
    records = []
    for i in range(b):
        for j in range(i + 1):
            scores = np.clip(means[i, j] + rng.normal(0, 0.1, n), 0, 1).round(4)
            exact = scores > 0.9
            R[i, j], em[i, j] = scores.mean(), exact.mean()
            records += [{"after_task": i, "task": tasks[j], "index": k, "id": f"{tasks[j]}-{k}", "label": "ref",
                         "prediction": "p", "score": float(s), "exact_match": bool(e)}
                        for k, (s, e) in enumerate(zip(scores, exact))]
    result = metrics.make_results(method, tasks, R, metric="ROUGE-L", also={"exact_match": em},
                                  timing={"train_s": 60.0 * (10 + seed), "eval_s": 120.0})
    (workdir / method).mkdir(parents=True)
    (workdir / method / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (workdir / method / "results.json").write_text(json.dumps(result))
    return result


def test_superni_table_prints_the_records_figures_and_the_rules_verdicts(tmp_path, capsys):
    """tools/superni_table.py, which prints the README's SuperNI tables, on hand-made records of two orders: each
    row holds its run's figures, and the verdicts follow the rule (both orders, interval excluding 0)."""
    import importlib.util

    repo = pathlib.Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("superni_table", repo / "tools" / "superni_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    tasks = {"1": ["task1_a", "task2_b"], "2": ["task2_b", "task1_a"]}
    means = {  # after task 1, after task 2: SeqLoRA forgets, Recurrent-KIF keeps, Replay is beside it in order 2
        "seq_lora": np.array([[0.8, 0], [0.2, 0.8]]),
        "replay": {"1": np.array([[0.8, 0], [0.5, 0.8]]), "2": np.array([[0.8, 0], [0.78, 0.8]])},
        "recurrent_kif": np.array([[0.8, 0], [0.75, 0.8]]),
    }
    written = {}
    for order in ("1", "2"):
        for seed, method in enumerate(("seq_lora", "replay", "recurrent_kif")):
            m = means[method][order] if isinstance(means[method], dict) else means[method]
            written[order, method] = write_scored_run(tmp_path / f"superni_o{order}", method, tasks[order], m,
                                                      seed + 3 * int(order))
    table.main([str(tmp_path / "superni_o1"), str(tmp_path / "superni_o2")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Order 1 (task1_a, task2_b):"
    for order in ("1", "2"):
        start = lines.index(next(line for line in lines if line.startswith(f"Order {order} (")))
        for method, name in table.NAMES.items():
            r = written[order, method]
            row = next(line for line in lines[start:] if line.startswith(f"| {name} | "))
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert cells[1].split(" [")[0] == f"{100 * r['op']:.1f}" and cells[2] == f"{100 * r['bwt']:.1f}"
            assert cells[3] == f"{50 * sum(r['learned_accuracy']):.1f}"
            assert cells[4] == f"{50 * sum(r['also']['exact_match'][-1]):.1f}"
            assert cells[5] == f"{10 + 3 * int(order) + list(table.NAMES).index(method)} + 2 min"
            lo, hi = (float(v) for v in cells[1].split(" [")[1].rstrip("]").split(", "))
            assert lo < 100 * r["op"] < hi
        per_task = lines.index(f"Order {order}, each task's ROUGE-L right after learning it → after the last task (%):")
        kif = written[order, "recurrent_kif"]
        assert "| Recurrent-KIF | " + " | ".join(f"{100 * a:.1f} → {100 * b:.1f}" for a, b in zip(
            kif["learned_accuracy"], kif["final_accuracy"])) + " |" in lines[per_task:]
    diff = next(line for line in lines if line.startswith("| Recurrent-KIF - SeqLoRA | 1 | "))
    op = float(diff.split("|")[3].split(" [")[0])
    assert op == pytest.approx(100 * (written["1", "recurrent_kif"]["op"] - written["1", "seq_lora"]["op"]), abs=0.051)
    assert "| Recurrent-KIF vs SeqLoRA | Recurrent-KIF beats SeqLoRA |" in lines
    assert "| Replay vs SeqLoRA | Replay beats SeqLoRA |" in lines
    assert "| Recurrent-KIF vs Replay | unresolved |" in lines  # above it in order 1, beside it in order 2
    table.main([str(tmp_path / "superni_o1")])  # one order: the rule cannot decide yet
    lines = capsys.readouterr().out.splitlines()
    assert "| Recurrent-KIF vs SeqLoRA | not finished in every order |" in lines
