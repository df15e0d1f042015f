"""The README's figures are what the code prints today: its snippets and the demo's tables are rerun here."""
import contextlib
import io
import pathlib
import re

import pytest

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()


def blocks_after(heading: str) -> list[tuple[str, str]]:
    """The fenced code blocks (language, text) of the README section that starts at `heading`."""
    section = README.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w*)\n(.*?)```", section, flags=re.S)


def snippet_output(heading: str, leave_out: str = "") -> tuple[str, str]:
    """What the first python block after `heading` prints (less the text `leave_out`), and the block after it."""
    (lang, code), (_, shown) = blocks_after(heading)[:2]
    assert lang == "python"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace(leave_out, "") if leave_out else code, "README.md", "exec"), {})
    return out.getvalue(), shown


def test_core_snippet_prints_what_the_readme_shows():
    printed, shown = snippet_output("## The core on its own")
    assert printed == shown


def test_data_snippet_prints_what_the_readme_shows():
    """The benchmark, the offline SmolLM2 tokenizer, the memory buffer, a batch and the metrics."""
    printed, shown = snippet_output("## Data and metrics")
    assert printed == shown


@pytest.mark.slow
def test_models_snippet_prints_what_the_readme_shows(tmp_path, monkeypatch):
    """The offline part of the models snippet (all but the T5 hub checkpoint): SmolLM2 from its GGUF file,
    its greedy answer, and the adapter files PEFT reads."""
    code = blocks_after("## Models: load a checkpoint")[0][1]
    hub = re.search(r"^t5 = from_pretrained\(.*?\)\)\n", code, flags=re.M | re.S)
    assert hub, "the snippet's T5 statement moved: update this test"
    monkeypatch.chdir(tmp_path)
    printed, shown = snippet_output("## Models: load a checkpoint", leave_out=hub[0])
    assert printed == shown
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]


@pytest.mark.slow
def test_demo_tables_are_what_main_prints(tmp_path):
    """`python main.py` as a user runs it (one device, default XLA flags): its accuracy matrices and
    comparison table are the README demo section's blocks."""
    import os
    import subprocess
    import sys

    import jax

    measured = re.search(r"Measured with jax (\S+) on an? (.+?) CPU\.", " ".join(README.split()))
    cpu = next((line.split(":", 1)[1].strip() for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if pathlib.Path("/proc/cpuinfo").exists() else "unknown"
    assert measured, "the README's demo section must name the jax version and CPU it was measured with"
    if (jax.__version__, cpu) != measured.groups():
        pytest.skip(f"the README's demo numbers were measured with jax {measured[1]} on {measured[2]}; this is jax "
                    f"{jax.__version__} on {cpu}, whose float arithmetic may differ")
    repo = pathlib.Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's test-only compile flags
    result = subprocess.run([sys.executable, str(repo / "main.py"), f"--workdir={tmp_path}"], capture_output=True,
                            text=True, cwd=repo, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    shown = [text.rstrip("\n") for _, text in blocks_after("## The demo")]
    printed = result.stdout.split("\n\nresults in ")[0].split("\n\n")
    assert printed == shown


def test_smollm2_table_is_what_the_committed_runs_give():
    """Each row of the README's SmolLM2 table is what tools/smollm2_table.py prints from the committed run
    (results.json: OP, BWT, Avg, learned, final accuracies; metrics.jsonl and run.log: the time; metrics.jsonl:
    Recurrent-KIF's fusions), and that
    results.json's matrix is what its predictions.jsonl gives."""
    import importlib.util
    import json

    import numpy as np

    from kif_jax import compare, metrics

    repo = pathlib.Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("smollm2_table", repo / "tools" / "smollm2_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    names = {"SeqLoRA": "seq_lora", "Replay": "replay", "Recurrent-KIF": "recurrent_kif", "MTL": "mtl"}
    results = repo / "results"
    section = README.split("## A real pretrained LM, offline", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d) \| (SeqLoRA|Replay|Recurrent-KIF|MTL) \| (\d.*) \|$", section, flags=re.M)
    assert rows, "the SmolLM2 section has no result rows"
    for order, shown_name, rest in rows:
        method = names[shown_name]
        workdir = results / f"smollm2_o{order}"
        r = json.loads((workdir / method / "results.json").read_text())
        cells = [c.strip() for c in rest.split("|")]
        learned = float(np.mean(r["learned_accuracy"]))
        want = [f"{100 * r['op']:.1f}", f"{100 * r['bwt']:.1f}", f"{100 * r['avg']:.1f}", f"{100 * learned:.1f}",
                ", ".join(f"{100 * v:.1f}" for v in r["final_accuracy"])]
        assert [cells[0].split(" [")[0], *cells[1:5]] == want, (order, method)
        op_interval = table.op_intervals(workdir)[method]
        assert f"| {order} | {shown_name} | {rest} |" == table.result_row(workdir, method, op_interval)
        predictions = compare.load_predictions(workdir / method / "predictions.jsonl", method, r["tasks"])
        np.testing.assert_array_equal(predictions.matrix(), metrics.results_matrix(r))
    # The difference tables: exactly the rows the tool prints from the committed comparisons, and those are
    # what `python -m kif_jax.compare` writes from the committed predictions.
    orders = sorted({order for order, _, _ in rows})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        table.main([str(results / f"smollm2_o{order}") for order in orders])
    diff_row = r"^\| \d \| [\w-]+ \| (?:SeqLoRA|Replay) \| \w+ \| .*\|$"
    assert re.findall(diff_row, section, flags=re.M) == re.findall(diff_row, printed.getvalue(), flags=re.M)
    fusion_row = r"^\| \d \| \w+ \| \d+ \| [\d.]+ ; [\d.]+ \| .*\|$"  # Recurrent-KIF's fusions, per task
    assert re.findall(fusion_row, section, flags=re.M) == re.findall(fusion_row, printed.getvalue(), flags=re.M)
    for order in orders:
        path = results / f"smollm2_o{order}" / "report" / "paired_comparison.json"
        committed = json.loads(path.read_text()) if path.exists() else []  # none while one method has finished
        for baseline in {row["baseline"] for row in committed}:
            fresh = compare.compare(compare.load_workdir(results / f"smollm2_o{order}"), baseline, resamples=10_000)
            assert [row for row in committed if row["baseline"] == baseline] == fresh


def tool_and_section_lines(tool: str, dirs: list[str], section: str) -> tuple[list[str], list[str]]:
    """The table lines that tools/<tool>.py prints from results/<dirs>, and those of the README's `section`."""
    import importlib.util

    repo = pathlib.Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location(tool, repo / "tools" / f"{tool}.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        table.main([str(repo / "results" / d) for d in dirs])

    def lines(text):
        return [line for line in text.splitlines() if line.startswith(("|", "Order "))]

    return lines(printed.getvalue()), lines(section)


def test_paper_tables_are_what_the_committed_runs_give():
    """The seven-method tables (the paper's Table 1 layout), Recurrent-KIF's paired differences and the verdicts
    are what tools/paper_table.py prints from the committed runs, line for line."""
    section = README.split("### The paper's comparison", 1)[1].split("\n### ", 1)[0]
    printed, shown = tool_and_section_lines("paper_table", ["smollm2_o4", "smollm2_o5"], section)
    assert printed and shown == printed


def test_superni_tables_are_what_the_committed_runs_give():
    """The SuperNI section's tables and verdicts are what tools/superni_table.py prints from results/, line for line
    (rows not yet run read "not finished")."""
    section = README.split("## Beyond classification: SuperNI", 1)[1].split("\n## ", 1)[0]
    printed, shown = tool_and_section_lines("superni_table", ["superni_o1", "superni_o2"], section)
    assert printed and shown == printed


def test_smollm2_orders_agree_on_their_shared_first_tasks():
    """Orders 4 and 5 start with the same two tasks (dbpedia, amazon) and one seed: a method finished in both
    orders has the same training losses and the same predictions there, record for record, though the runs
    were made hours apart and some shared the CPU or were paused."""
    import json

    results = pathlib.Path(__file__).resolve().parent.parent / "results"
    o4, o5 = results / "smollm2_o4", results / "smollm2_o5"
    tasks = [json.loads((d / "seq_lora" / "results.json").read_text())["tasks"] for d in (o4, o5)]
    shared = next(i for i, (a, b) in enumerate(zip(*tasks)) if a != b)
    assert shared == 2
    both = sorted({p.parent.name for p in o4.glob("*/results.json")} & {p.parent.name for p in o5.glob("*/results.json")}
                  - {"mtl"})  # MTL trains every task in one phase: its data order follows the task order
    assert "seq_lora" in both

    def records(directory, method):
        lines = lambda name: [json.loads(line) for line in (directory / method / name).read_text().splitlines()]
        losses = [r["loss"] for r in lines("metrics.jsonl") if "loss" in r and r["phase"] < shared]
        return losses, [r for r in lines("predictions.jsonl") if r["after_task"] < shared]

    for method in both:
        losses, predictions = records(o4, method)
        assert len(losses) >= 2 * 15 and len(predictions) == 3 * 200, method  # 15 cycles a task at least
        assert (losses, predictions) == records(o5, method), method


def test_decoding_figures_are_those_of_the_committed_printouts():
    """The Speed section's decoding and matmul figures are the committed bench printouts', rounded as shown."""
    bench = pathlib.Path(__file__).resolve().parent.parent / "results" / "bench"
    speed = README.split("\n## Speed", 1)[1].split("\n## ", 1)[0]
    text = " ".join(speed.split())  # the README wraps its lines
    decode = (bench / "decode_2026-12-07_7eb09be.txt").read_text()
    whole = {side: float(t) for side, t in re.findall(r"^  (kif_jax|torch, 2 threads \(default\)) +([\d.]+) s ",
                                                          decode, re.M)}
    phases = {side: (float(p), float(d)) for side, p, d in re.findall(
        r"^  (kif_jax|torch, 2 threads \(default\)) +prefill +([\d.]+) s; decode +([\d.]+) ms", decode, re.M)}
    ratio = re.search(r"speed ratio kif_jax / torch, 2 threads \(default\): ([\d.]+)x", decode).group(1)
    kif, torch = "kif_jax", "torch, 2 threads (default)"
    assert f"| kif_jax | {whole[kif]:.1f} s (prefill {phases[kif][0]:.1f} s, then {phases[kif][1]:.0f} ms a step)" in text
    assert (f"| torch, its default 2 threads | {whole[torch]:.1f} s (prefill {phases[torch][0]:.1f} s, then "
            f"{phases[torch][1]:.0f} ms a step)") in text
    assert f"**kif_jax decodes at {ratio}x of PyTorch" in text
    gemm = (bench / "gemm_2026-12-07_6221ffc.txt").read_text()
    jax_s, eigen_s, torch_s = map(float, re.search(
        r"prefill +jax: ([\d.]+) s \| jax, Eigen: ([\d.]+) s \| torch: ([\d.]+) s", gemm).groups())
    assert f"take {jax_s:.1f} s with XLA's kernels and {torch_s:.1f} s with torch's" in text
    outside = phases[kif][0] - jax_s, phases[torch][0] - torch_s
    assert f"about {outside[0]:.1f} s of its prefill outside them" in text and f"torch about {outside[1]:.1f} s" in text
    steps = whole[kif] - phases[kif][0]  # the call less its prefill: the decoding steps
    assert f"a call would take about {jax_s + steps:.1f} s ({whole[torch] / (jax_s + steps):.2f}x torch's" in text
    assert f"in {eigen_s:.1f} s, {100 * (1 - eigen_s / jax_s):.0f}% less (a call of about {eigen_s + steps:.1f} s, " \
           f"{whole[torch] / (eigen_s + steps):.2f}x)" in text


def test_reevaluation_figures_are_those_of_the_committed_printout():
    """The README's re-evaluation sentence: every run of the printout exits 0 with all its predictions the
    recorded ones, and their total is the README's."""
    printout = sorted((pathlib.Path(__file__).resolve().parent.parent / "results" / "reevaluate").glob("smollm2_*.txt"))
    assert len(printout) == 1
    text = printout[0].read_text()
    runs = re.findall(r"^== (o\d)/(\w+) ", text, flags=re.M)
    totals = [int(n) for n in re.findall(r"^(\d+) predictions of \d+ task\(s\): every prediction and score is the "
                                         r"recorded one$", text, flags=re.M)]
    assert runs == [("o4", "tasl"), ("o5", "migu")] and text.count("\nexit 0\n") == 2 and len(totals) == 2
    said = " ".join(README.split())
    assert f"give every one of their {sum(totals)} final-row predictions again with today's code" in said
