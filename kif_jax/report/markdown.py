"""The markdown report: `<workdir>/report/report.md` with its figures, and `python -m kif_jax.report <workdir>`."""
from __future__ import annotations

import argparse
import functools
import math
import pathlib
import sys
from typing import Any, Iterable, Sequence

from kif_jax import metrics
from kif_jax.errors import DataError, KifError
from kif_jax.report.plots import (_LEARNERS, _grouped, _ratios, _shares, plot_accuracy_along_sequence,
                                  plot_accuracy_matrices, plot_importance_by_layer, plot_importance_by_module,
                                  plot_magnitude_ratio, plot_magnitude_vs_importance, plot_mask_overlap)
from kif_jax.report.runs import REPORT_DIR, MethodData, load_run

# --------------------------------------------------------------------------------------------
# The markdown report
# --------------------------------------------------------------------------------------------


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def fusion_table(fusions: Sequence[tuple[dict, dict]]) -> list[str]:
    """Per task: mask shares (overall and per factor), magnitude ratios, and mask overlaps."""
    by_task: dict[int, list[tuple[dict, dict]]] = {}
    for f in fusions:
        by_task.setdefault(f[0]["phase"], []).append(f)
    lines = ["| task | fusions | mean \\|tau\\| (1e-3), in ; out | important in / out (%) | m_in by factor (%) "
             "| m_out by factor (%) | mean \\|tau\\| inside / outside the mask, in ; out "
             "| Jaccard with previous fusion, in ; out | Jaccard at the task's first fusion, in ; out |",
             "|---|---:|---|---|---|---|---|---|---|"]

    def mean(values: Iterable[float]) -> float:
        v = [x for x in values if x is not None and math.isfinite(x)]
        return sum(v) / len(v) if v else math.nan

    def num(v: float, digits: int = 2) -> str:
        return "-" if not math.isfinite(v) else f"{v:.{digits}f}"

    for phase, items in by_task.items():
        cells = [items[0][0]["task"], str(len(items))]
        # The task vectors' sizes: how far each learner moved from the fused weights before this fusion.
        cells.append(" ; ".join(num(1e3 * mean(r[f"tau_{x}_mean"] for r, _ in items), 3) for x in _LEARNERS))
        shares = {x: mean(_grouped(r[f"{x}_frac"], lay["sizes"], ["all"] * len(lay["sizes"]))["all"]
                          for r, lay in items) for x in _LEARNERS}
        cells.append(f"{_pct(shares['in'])} / {_pct(shares['out'])}")
        for x in _LEARNERS:
            names, values = _shares(items, x, "factor")
            cells.append(", ".join(f"{g} {_pct(mean(v))}" for g, v in zip(names, values)))
        ratios = [num(mean(_ratios(r, lay, x)["all"] for r, lay in items)) for x in _LEARNERS]
        cells.append(" ; ".join(ratios))
        cells.append(" ; ".join(num(mean(r.get(f"jaccard_{x}") for r, _ in items[1:])) for x in _LEARNERS))
        cells.append(" ; ".join(num(math.nan if items[0][0].get(f"jaccard_{x}") is None
                                    else items[0][0][f"jaccard_{x}"]) for x in _LEARNERS))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def build_report(methods: Sequence[MethodData], outdir: pathlib.Path, *, title: str,
                 unfinished: Sequence[str] = (), paired: str = "", own: str = "") -> pathlib.Path:
    """Write report.md and its figures into `outdir` (stale PNGs there are removed); returns report.md's path.

    `paired`: the markdown of `kif_jax.compare` (differences with 95% intervals), or why there is none;
    `own`: `kif_jax.compare.intervals_markdown` (each method's metrics with their intervals), or empty."""
    outdir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def figure(alt: str, name: str, draw: Any, *args: Any) -> str:
        """Draw a figure into `outdir/name`; its markdown image link."""
        draw(*args, outdir / name)
        written.append(name)
        return f"![{alt}]({name})"

    tasks = methods[0].tasks
    metric = metrics.results_metric(methods[0].results)  # what the score matrices hold (accuracy, ROUGE-L, ...)
    same = [m for m in methods if m.tasks == tasks]
    other = [m.name for m in methods if m.tasks != tasks]
    md = [f"# Comparison report: {title}", ""]
    config = methods[0].results.get("config") or {}
    model = (config.get("model") or {}).get("name", "?")
    md.append(f"Model `{model}`, {len(tasks)} tasks in order: " + ", ".join(f"`{t}`" for t in tasks) + ". "
              f"Methods: {', '.join(f'`{m.name}`' for m in methods)}.")
    md.append("Built by `kif_jax/report/` from each `<method>/results.json` and `metrics.jsonl`; "
              "rebuild with `python -m kif_jax.report <workdir>`.")
    if unfinished:
        md.append(f"Not finished, left out: {', '.join(f'`{u}`' for u in unfinished)}.")
    if other:
        md.append(f"Run on another task sequence, left out of the figures: {', '.join(f'`{o}`' for o in other)}.")
    md += ["", "## Overall performance", "",
           f"OP: mean final {metric} over all tasks; BWT: mean change on each earlier task from just after "
           "learning it to the end; FWT: mean gain on a task before training it over its zero-shot "
           f"{metric} (percent; `-`: not defined or not evaluated).", "",
           "| method | OP | BWT | FWT |", "|---|---:|---:|---:|"]
    for m in methods:
        r = m.results
        o, b, f = (r.get(k, None) for k in ("op", "bwt", "fwt"))
        md.append(f"| {m.name} | {_pct(o)} | {_pct(b, True)} | {_pct(f, True)} |")
    if own:
        md += ["", "Each method's metrics (points) with a 95% percentile bootstrap interval over its test "
               "examples, stratified by task (`python -m kif_jax.compare`):", "", own]
    if paired:
        md += ["", "## Paired differences on the same test examples", "",
               "Each method minus the baseline, in points, with a 95% percentile bootstrap interval over the "
               "test examples (stratified by task, the same resampled examples for both methods; "
               "`python -m kif_jax.compare`); resolved: the interval excludes 0.", "", paired]
    md += ["", f"Final {metric} (%) on each task:", "",
           "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for m in same:
        md.append(f"| {m.name} | " + " | ".join(_pct(float(v)) for v in m.matrix[-1]) + " |")
    for name in dict.fromkeys(n for m in same for n in (m.results.get("also") or {})):
        md += ["", f"Final {name} (%) on each task (beside {metric}):", "",
               "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        for m in same:
            if name in (m.results.get("also") or {}):
                row = m.results["also"][name][-1]
                md.append(f"| {m.name} | " + " | ".join(_pct(v) for v in row) + " |")
    md += ["", "## Accuracy matrices", "",
           figure("accuracy matrices", "accuracy_matrices.png", functools.partial(plot_accuracy_matrices, metric=metric),
                  same), "",
           "## Each task's accuracy along the sequence", "",
           figure("accuracy along the sequence", "accuracy_along_sequence.png",
                  functools.partial(plot_accuracy_along_sequence, metric=metric), same, tasks), ""]

    kif = [(m, m.fusions()) for m in same]
    kif = [(m, f) for m, f in kif if f]
    md += ["## Where knowledge sits (the paper's Figure 5, from this run's fusions)", ""]
    if not kif:
        md += ["No method of this run logged fusion statistics (they come from methods that fuse with "
               "importance masks, e.g. `recurrent_kif`).", ""]
    else:
        md += ["At every fusion the cycle logs, per LoRA tensor, the share of entries in the inner mask m_in "
               "(important for the current task) and the outer mask m_out (important for the earlier tasks, "
               "from the memory buffer), the mean task-vector magnitude inside and outside each mask, a "
               "histogram of magnitudes with the important share per bin, and the overlap with the previous "
               "fusion's masks. (a) If large updates were what makes a parameter important, the important share "
               "would rise with |tau| and the inside/outside ratio would be well above 1. (b) Shares per layer, "
               "block, projection and factor show where the important parameters sit; the overlap shows "
               "whether they move as training goes on and when a new task starts.", ""]
        without = [m.name for m in same if not m.fusions()]
        if without:
            md += [f"No fusion statistics (no masks): {', '.join(f'`{n}`' for n in without)}.", ""]
    for m, fusions in kif:
        n = m.name
        # A fusion in the middle of the last task (the reference schedule's learning rate is 0 at a task's
        # last step, so its last fusion has no outer update).
        last_task = [i for i, (r, _) in enumerate(fusions) if r["phase"] == fusions[-1][0]["phase"]]
        pick = last_task[(len(last_task) - 1) // 2]
        md += [f"### {n}", ""]
        md += fusion_table(fusions)
        md += ["", f"(a) Task-vector magnitude against importance, at fusion {pick + 1} (the middle of the last "
               "task) and over the sequence (a gap: no update of that learner, e.g. the outer steps of a "
               "task's last cycle, which the reference's schedule runs at learning rate 0):", "",
               figure(f"{n} magnitude vs importance", f"{n}_magnitude_vs_importance.png",
                      plot_magnitude_vs_importance, n, pick, *fusions[pick]), "",
               figure(f"{n} magnitude ratio", f"{n}_magnitude_ratio.png", plot_magnitude_ratio, n, fusions), "",
               "(b) Where the important parameters sit, and how the masks move:", "",
               figure(f"{n} importance by layer", f"{n}_importance_by_layer.png", plot_importance_by_layer, n,
                      fusions), "",
               figure(f"{n} importance by module", f"{n}_importance_by_module.png", plot_importance_by_module, n,
                      fusions), "",
               figure(f"{n} mask overlap", f"{n}_mask_overlap.png", plot_mask_overlap, n, fusions), ""]
    for stale in outdir.glob("*.png"):
        if stale.name not in written:
            stale.unlink()
    path = outdir / "report.md"
    path.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    return path


def write_report(workdir: str | pathlib.Path, *, skip_unfinished: bool = False) -> pathlib.Path:
    """Build `<workdir>/report/` from the run's files; returns the path of report.md."""
    workdir = pathlib.Path(workdir)
    methods, unfinished = load_run(workdir, skip_unfinished=skip_unfinished)
    from kif_jax import compare

    paired, own = "", ""
    try:
        own = compare.intervals_markdown(compare.write_intervals(workdir)[1])
    except DataError:  # runs written before per-example predictions: no intervals, the tables still stand
        pass
    if len(methods) > 1:
        try:
            paired = compare.markdown(compare.write_comparison(workdir)[1])
        except DataError as err:
            paired = f"No paired comparison: {' '.join(str(err).split())}."
    return build_report(methods, workdir / REPORT_DIR, title=workdir.resolve().name, unfinished=unfinished,
                        paired=paired, own=own)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kif_jax.report <workdir>`: rebuild the report; a user error is one line and exit code 2."""
    parser = argparse.ArgumentParser(prog="python -m kif_jax.report", description="Rebuild the comparison report of a finished run.")
    parser.add_argument("workdir", help="the --workdir of a finished run")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.workdir)
    except KifError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    print(f"report in {path}")
    return 0
