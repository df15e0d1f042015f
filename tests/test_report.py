"""The comparison report: written at the end of a run, rebuilt by `python -m kif_jax.report`, its fusion statistics."""
import json
import math
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_config
from helpers import read_metrics
from kif_jax import metrics, report
from kif_jax.core import fusion_stats as fusion_stats_module
from kif_jax.report import plots
from kif_jax.train import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def figures(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def run_report_cli(workdir: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kif_jax.report", str(workdir)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny 2-task run of Recurrent-KIF and SeqLoRA, saving mid-task too (for the resume test)."""
    config = tiny_config.get_config()
    config.methods = "recurrent_kif,seq_lora"
    config.checkpoint.every_steps = 2
    workdir = tmp_path_factory.mktemp("run")
    return workdir, train_and_evaluate(config, workdir)


def test_report_names_every_method_with_its_op(finished_run):
    workdir, results = finished_run
    md = (workdir / "report" / "report.md").read_text()
    for method in ("recurrent_kif", "seq_lora"):
        saved = json.loads((workdir / method / "results.json").read_text())
        assert saved["op"] == pytest.approx(results[method]["op"])
        row = next(line for line in md.splitlines() if line.startswith(f"| {method} | "))
        assert row.split("|")[2].strip() == f"{100 * saved['op']:.1f}"  # OP column, percent
    assert "### recurrent_kif" in md and "### seq_lora" not in md  # only a method with masks has Figure 5


def test_every_figure_of_the_report_is_a_png(finished_run):
    workdir, _ = finished_run
    out = workdir / "report"
    names = figures((out / "report.md").read_text())
    assert "accuracy_matrices.png" in names and "recurrent_kif_mask_overlap.png" in names
    assert len(names) == len(set(names)) == 7  # 2 comparison figures + 5 for recurrent_kif
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
    assert sorted(p.name for p in out.glob("*.png")) == sorted(names)


def test_the_cli_rebuilds_the_same_files(finished_run, tmp_path):
    workdir, _ = finished_run
    before = {p.name: p.read_bytes() for p in (workdir / "report").iterdir()}
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("checkpoints", "report", "synthetic_data"))
    (copy / "report").mkdir()
    (copy / "report" / "stale.png").write_bytes(PNG_MAGIC)  # a figure of an earlier report is removed
    result = run_report_cli(copy)
    assert result.returncode == 0, result.stderr[-2000:]
    after = {p.name: p.read_bytes() for p in (copy / "report").iterdir()}
    assert sorted(after) == sorted(before)
    assert after["report.md"].replace(b"copy", b"x") == before["report.md"].replace(workdir.name.encode(), b"x")
    for name in before:
        if name.endswith(".png"):
            assert after[name] == before[name], name  # matplotlib's Agg output is deterministic


def test_fusion_statistics_are_logged_compactly_and_agree_with_the_mask_shares(finished_run):
    workdir, _ = finished_run
    records = read_metrics(workdir / "recurrent_kif" / "metrics.jsonl")
    layouts = [r for r in records if r.get("event") == "fusion_leaves"]
    fusions = [r for r in records if r.get("event") == "fusion_stats"]
    cycles = [r for r in records if "mask_in_frac" in r]
    assert len(layouts) == 1 and len(fusions) == len(cycles) == 2  # task 2: two cycles of Q = 2
    names, sizes = layouts[0]["names"], layouts[0]["sizes"]
    assert len(names) == 12 and "encoder/blocks/0/self_attention/q/lora_a" in names
    for fusion, cycle in zip(fusions, cycles):
        assert (fusion["phase"], fusion["step"]) == (cycle["phase"], cycle["step"])
        for learner in ("in", "out"):
            share = sum(f * n for f, n in zip(fusion[f"{learner}_frac"], sizes)) / sum(sizes)
            assert share == pytest.approx(cycle[f"mask_{learner}_frac"], abs=1e-3)
            total, important = fusion[f"hist_{learner}"]
            assert sum(total) == sum(sizes) and sum(important) == pytest.approx(share * sum(sizes), abs=1)
        line = json.dumps(fusion)
        assert len(line) < 400 + 50 * len(names)  # about 3 KB for SmolLM2's 60 leaves
    assert fusions[0]["kept_in"] is None  # the first fusion of the run has no previous mask
    assert 0 < fusions[1]["jaccard_in"] <= fusions[1]["kept_in"] <= 1
    # The report's fusion table shows each task's mean task-vector sizes, the mean over its fusions.
    md = (workdir / "report" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith(f"| {fusions[0]['task']} | 2 | "))
    shown = [float(v) for v in row.split("|")[3].split(";")]
    for learner, value in zip(("in", "out"), shown):
        assert value == pytest.approx(1e3 * np.mean([f[f"tau_{learner}_mean"] for f in fusions]), abs=5e-4)
    assert shown[0] > 0 and shown[1] > 0


def test_remembered_masks_survive_a_checkpoint_restore(finished_run, tmp_path):
    """Resume from the mid-task checkpoint (after task 2's first fusion): the same fusion statistics."""
    workdir, results = finished_run
    copy = tmp_path / "resumed"
    shutil.copytree(workdir, copy)
    checkpoints = copy / "recurrent_kif" / "checkpoints"
    steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert steps == [10_000_000, 10_000_002, 20_000_000]  # task ends are kept; task 2 at step 2
    shutil.rmtree(checkpoints / str(steps[-1]))
    config = tiny_config.get_config()
    config.checkpoint.every_steps = 2
    resumed = train_and_evaluate(config, copy)["recurrent_kif"]
    assert resumed["accuracy_matrix"] == results["recurrent_kif"]["accuracy_matrix"]
    assert not (copy / "recurrent_kif" / "checkpoints.unreadable").exists()

    def fusion_records(run: pathlib.Path) -> list[dict]:
        return [r for r in read_metrics(run / "recurrent_kif" / "metrics.jsonl") if "fusion" in r.get("event", "")]

    assert fusion_records(copy) == fusion_records(workdir)  # incl. the overlap with the restored masks


def _tree(a, b, c):
    leaf = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return {"enc": {"q": {"lora_a": leaf(a)}, "v": {"lora_a": leaf(c)}}, "dec": {"v": {"lora_b": leaf(b)}}}


def _masks(a, b, c):
    return jax.tree.map(lambda x: x > 0, _tree(a, b, c))


# The whole-tree counts run over buckets of joined leaves: all three leaves in one (the default), two
# buckets [4], [6 + 2] (cap 8), or three with the [2, 3] leaf larger than the cap and kept in its shape (cap 5);
# or, as for sharded trees, leaf by leaf.
@pytest.mark.parametrize("bucket_size,join", [(1 << 22, True), (8, True), (5, True), (1 << 22, False)],
                         ids=["one_bucket", "two_buckets", "leaf_over_cap", "leaf_by_leaf"])
def test_fusion_stats_on_a_hand_made_tree(bucket_size, join, monkeypatch):
    monkeypatch.setattr(fusion_stats_module, "BUCKET_SIZE", bucket_size)
    # Leaves in jax.tree.leaves order: dec/v/lora_b [4], enc/q/lora_a [2, 3], enc/v/lora_a [2].
    tau_in = _tree([[1.0, -2.0, 3.0], [0.0, 0.5, -0.5]], [4.0, -4.0, 0.0, 2.0], [0.0, 0.0])
    mask_in = _masks([[1, 0, 1], [0, 0, 0]], [1, 0, 0, 0], [0, 0])
    prev_in = _masks([[1, 1, 0], [0, 0, 0]], [0, 0, 0, 0], [0, 0])
    tau_out = jax.tree.map(lambda x: 2 * x, tau_in)
    mask_out = _masks(np.zeros((2, 3)), np.ones(4), np.ones(2))
    prev_out = _masks(np.zeros((2, 3)), np.zeros(4), np.zeros(2))  # an empty previous mask

    stats = jax.jit(lambda *a: report.fusion_stats(*a, join_leaves=join))(tau_in, tau_out, mask_in, mask_out,
                                                                          (prev_in, prev_out))
    np.testing.assert_allclose(stats["in_frac"], [1 / 4, 2 / 6, 0])
    # Mean |tau| inside / outside the mask per factor (lora_b, lora_a), in units of the mean |tau| (17 / 12).
    mean_in = 17 / 12
    assert float(stats["tau_in_mean"]) == pytest.approx(mean_in)
    np.testing.assert_allclose(stats["tau_in_inside"], np.array([4.0, (1 + 3) / 2]) / mean_in, rtol=1e-6)
    np.testing.assert_allclose(stats["tau_in_outside"], np.array([(4 + 0 + 2) / 3, (2 + 0.5 + 0.5) / 6]) / mean_in,
                               rtol=1e-6)
    assert float(stats["tau_in_ratio"]) == pytest.approx((8 / 3) / (9 / 9))  # 4, 1, 3 inside; 9 over 9 outside
    # |tau_in| / mean |tau_in| in bins [.., 1/4, 1/2, 1, 2, 4, ..]: entries per bin, important ones.
    total = [4, 0, 0, 0, 0, 2, 1, 2, 3, 0, 0]  # zeros; 0.5 (x2); 1; 2 (x2); 3, 4 (x2)
    important = [0, 0, 0, 0, 0, 0, 1, 0, 2, 0, 0]  # 1 -> [1/2, 1); 3, 4 -> [2, 4)
    np.testing.assert_array_equal(stats["hist_in"], [total, important])
    assert float(stats["jaccard_in"]) == pytest.approx(1 / 4)  # |prev & cur| = 1, |prev | cur| = 4
    assert float(stats["kept_in"]) == pytest.approx(1 / 2)  # 1 of the 2 previous entries still on
    # Outer: all of dec and enc/v (zeros), none of enc/q; an empty previous mask has no overlap.
    mean_out = 34 / 12
    np.testing.assert_allclose(stats["out_frac"], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(stats["tau_out_inside"], np.array([5.0, 0.0]) / mean_out, rtol=1e-6)
    np.testing.assert_allclose(stats["tau_out_outside"], np.array([np.nan, 14 / 6]) / mean_out, rtol=1e-6)
    assert float(stats["tau_out_ratio"]) == pytest.approx((20 / 6) / (14 / 6))
    assert math.isnan(stats["jaccard_out"]) and math.isnan(stats["kept_out"])
    np.testing.assert_array_equal(stats["hist_out"], [total, [3, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0]])

    no_prev = report.fusion_stats(tau_in, tau_out, mask_in, mask_out)
    assert math.isnan(no_prev["kept_in"]) and math.isnan(no_prev["jaccard_out"])
    record = report.fusion_record(jax.device_get(stats))
    assert record["tau_out_outside"] == [None, 0.824] and record["in_frac"] == [0.25, 0.333, 0.0]
    assert record["hist_in"] == [total, important] and record["kept_out"] is None
    layout = report.leaf_layout(tau_in)
    assert layout["names"] == ["dec/v/lora_b", "enc/q/lora_a", "enc/v/lora_a"] and layout["sizes"] == [4, 6, 2]
    assert layout["factors"] == ["lora_b", "lora_a"]


def test_leaf_names_are_grouped_by_layer_block_module_and_factor():
    assert report.describe_leaf("decoder/blocks/3/cross_attention/q/lora_b") == {
        "layer": "decoder 3", "block": "decoder/cross_attention", "module": "q", "factor": "lora_b"}
    assert report.describe_leaf("model/layers/11/self_attn/v_proj/lora_a") == {
        "layer": "layer 11", "block": "self_attn", "module": "v_proj", "factor": "lora_a"}
    # Leaves outside the numbered layers: named by their module path, never "-".
    assert report.describe_leaf("shared/embedding") == {
        "layer": "shared", "block": "shared", "module": "shared", "factor": "embedding"}
    assert report.describe_leaf("encoder/final_norm/scale") == {
        "layer": "encoder/final_norm", "block": "encoder", "module": "final_norm", "factor": "scale"}
    assert report.describe_leaf("model/embed_tokens/embedding")["layer"] == "embed_tokens"


def _write_method(workdir: pathlib.Path, method: str, R: list) -> None:
    (workdir / method).mkdir(parents=True)
    result = metrics.make_results(method, ["a", "b"], np.array(R, dtype=float))
    (workdir / method / "results.json").write_text(json.dumps(result))


def test_a_missing_or_corrupt_results_json_is_one_line_and_exit_2(tmp_path, capsys):
    _write_method(tmp_path, "seq_lora", [[0.5, math.nan], [0.25, 0.75]])
    _write_method(tmp_path, "adaptive", [[0.5, math.nan], [0.5, 0.5]])  # any method directory is reported
    assert report.main([str(tmp_path)]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| adaptive | 50.0 | +0.0 | - |" in md and "| seq_lora | 50.0 | -25.0 | - |" in md

    (tmp_path / "replay").mkdir()
    (tmp_path / "replay" / "metrics.jsonl").write_text("{}\n")  # started, never finished
    capsys.readouterr()
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "replay/results.json is missing" in err[0]
    assert report.main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err

    (tmp_path / "replay" / "results.json").write_text('{"method": "replay", "tasks": ["a", "b"], "accur')
    result = run_report_cli(tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "replay/results.json is not a readable results.json" in lines[0], result.stderr


# --- the figures, drawn from hand-made fusion records ------------------------------------------


def _demo_like_layout() -> dict:
    """The leaves of a fully trained 2-layer T5 (as the demo trains it): 14 modules, kernel / scale / embedding."""
    names = []
    for stack in ("encoder", "decoder"):
        for i in range(2):
            attentions = ("self_attention", "cross_attention") if stack == "decoder" else ("self_attention",)
            for attention in attentions:
                names += [f"{stack}/blocks/{i}/{attention}/{m}/kernel" for m in "qkvo"]
                names.append(f"{stack}/blocks/{i}/{attention}_norm/scale")
            names += [f"{stack}/blocks/{i}/ff/{m}/kernel" for m in ("wi_0", "wi_1", "wo")]
            names.append(f"{stack}/blocks/{i}/ff_norm/scale")
        names += [f"{stack}/final_norm/scale", f"{stack}/relative_attention_bias/embedding"]
    names += ["lm_head/kernel", "shared/embedding"]
    factors = list(dict.fromkeys(n.rsplit("/", 1)[-1] for n in names))
    return {"names": names, "sizes": [64 if n.endswith("scale") else 4096 for n in names], "factors": factors,
            "hist_edges": list(report.HIST_EDGES)}


def _lora_layout(layers: int = 3) -> dict:
    names = [f"model/layers/{i}/self_attn/{m}/{f}" for i in range(layers) for m in ("q_proj", "v_proj")
             for f in ("lora_a", "lora_b")]
    return {"names": names, "sizes": [512] * len(names), "factors": ["lora_a", "lora_b"],
            "hist_edges": list(report.HIST_EDGES)}


def _fusions(layout: dict, per_task: int = 4, outlier: str | None = None) -> list:
    """Records of 2 tasks x `per_task` fusions; `outlier`'s magnitude ratio is 40, the others' about 1.3."""
    rng = np.random.default_rng(0)
    n, g = len(layout["names"]), len(layout["factors"])
    fusions = []
    for phase, task in enumerate(("topic", "parity")):
        for k in range(per_task):
            r = {"event": "fusion_stats", "phase": phase, "task": task, "step": 8 * (k + 1)}
            for x in ("in", "out"):
                r[f"{x}_frac"] = rng.uniform(0.05, 0.4, n).round(3).tolist()
                r[f"tau_{x}_ratio"] = 1.3
                r[f"tau_{x}_inside"] = [40.0 if f == outlier else 1.2 + 0.1 * i
                                        for i, f in enumerate(layout["factors"])]
                r[f"tau_{x}_outside"] = [1.0] * g
                r[f"kept_{x}"] = r[f"jaccard_{x}"] = None if not fusions else 0.5
            fusions.append((r, layout))
    return fusions


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plotting functions draw, kept open (drawn) instead of saved."""
    figures = []

    def keep(fig, path):
        fig.canvas.draw()
        figures.append(fig)

    monkeypatch.setattr(plots, "_save", keep)
    yield figures
    for fig in figures:
        plots._plt().close(fig)


def _series(ax) -> list:
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def _assert_legends_outside_every_axes(fig) -> None:
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), (legend.get_title().get_text(), ax.get_title())


def test_importance_by_module_gives_each_series_its_own_colour_and_keeps_legends_off_the_data(drawn):
    from matplotlib.colors import to_rgba

    report.plot_importance_by_module("kif", _fusions(_demo_like_layout()), pathlib.Path("unused.png"))
    (fig,) = drawn
    modules = [ax for ax in fig.axes if ax.get_title().endswith("by module")]
    assert len(modules) == 2 and all(len(_series(ax)) == 14 for ax in modules)
    for ax in fig.axes:
        lines = _series(ax)
        assert len({to_rgba(line.get_color()) for line in lines}) == len(lines), ax.get_title()
    # The same name has the same colour in the m_in and m_out panels.
    colors = [{line.get_label(): to_rgba(line.get_color()) for line in _series(ax)} for ax in modules]
    assert colors[0] == colors[1]
    _assert_legends_outside_every_axes(fig)
    titles = {ax.get_title() for ax in fig.axes}
    # The demo trains all parameters: its leaves are kernels, scales and embeddings, not LoRA factors.
    assert {"m_in by parameter kind", "m_out by parameter kind"} <= titles
    assert not any("LoRA" in t or "projection" in t for t in titles | {fig._suptitle.get_text()})


def test_importance_by_module_of_lora_leaves_names_lora_factors(drawn):
    report.plot_importance_by_module("kif", _fusions(_lora_layout()), pathlib.Path("unused.png"))
    titles = {ax.get_title() for ax in drawn[0].axes}
    assert {"m_in by LoRA factor", "m_out by LoRA factor", "m_in by projection"} <= titles


def test_importance_by_layer_labels_every_row(drawn):
    fusions = _fusions(_demo_like_layout())
    report.plot_importance_by_layer("kif", fusions, pathlib.Path("unused.png"))
    image_axes = [ax for ax in drawn[0].axes if ax.get_images()]
    assert len(image_axes) == 2
    labels = [t.get_text() for t in image_axes[0].get_yticklabels()]
    assert labels == ["encoder 0", "encoder 1", "encoder/final_norm", "encoder/relative_attention_bias",
                      "decoder 0", "decoder 1", "decoder/final_norm", "decoder/relative_attention_bias",
                      "lm_head", "shared"]
    assert image_axes[0].get_images()[0].get_array().shape == (len(labels), len(fusions))


def test_magnitude_ratio_keeps_an_outlier_from_flattening_the_others(drawn):
    report.plot_magnitude_ratio("kif", _fusions(_demo_like_layout(), outlier="embedding"),
                                pathlib.Path("unused.png"))
    (fig,) = drawn
    axes = [ax for ax in fig.axes if _series(ax)]
    assert len(axes) == 2
    for ax in axes:
        assert ax.get_yscale() == "log"
        low, high = ax.get_ylim()
        assert 0 < low < 1.0 and high > 40.0  # 1 (no relation) and the outlier both in view
        # On the log axis the lines near 1.3 still span a visible share of the height.
        span = (math.log(1.4) - math.log(1.2)) / (math.log(high) - math.log(low))
        assert span > 0.03
        labels = [line.get_label() for line in _series(ax)]
        assert labels == ["all entries", "kernel", "scale", "embedding"]
    _assert_legends_outside_every_axes(fig)
    assert axes[1].get_legend().get_title().get_text() == "per parameter kind"
