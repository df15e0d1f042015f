"""The comparison report of a run, with the paper's knowledge-location figures (its Figure 5) from the run's fusions.

`write_report(workdir)` reads what a finished run wrote (`<workdir>/<method>/results.json` and
`metrics.jsonl` of every method directory) and writes `<workdir>/report/report.md` with PNG figures
beside it: the OP / BWT / FWT table, the accuracy matrices side by side, each task's accuracy along
the sequence, and, for every method whose metrics hold fusion statistics (Recurrent-KIF and its
ablations with masks), analogues of the paper's Figure 5:

  (a) task-vector magnitude against importance: do large updates coincide with important parameters?
  (b) where the important parameters sit (per layer, attention block, module and LoRA factor), and
      whether the masks move from one fusion to the next and across task boundaries.

The training loop calls it at the end of `train_and_evaluate`; `python -m kif_jax.report <workdir>`
rebuilds it from the files (a missing or corrupt file: one line on stderr, exit code 2).

What the figures need is computed inside the jitted cycle at every fusion by `fusion_stats` (small
arrays, never copies of parameters) and logged to metrics.jsonl (see `MethodRun._log_fusion`):

  {"event": "fusion_leaves", "method", "phase", "names": [L leaf paths], "sizes": [L],
   "factors": [G last path names, e.g. lora_a, lora_b],
   "hist_edges": [edges of the |tau| / mean |tau| bins]}       (at the first fusion of each task)
  {"event": "fusion_stats", "method", "phase", "task", "step",
   "in_frac", "out_frac": [L] share of each leaf in the inner / outer mask,
   "tau_in_mean": mean |tau_in| over all entries, "tau_in_ratio": mean |tau_in| inside the inner
       mask / mean |tau_in| outside it, "tau_in_inside", "tau_in_outside": [G] the same two means
       per LoRA factor, in units of tau_in_mean (null where there are none); "tau_out_*" likewise,
   "hist_in", "hist_out": [[entries per |tau| bin], [important entries per bin]],
   "jaccard_in", "jaccard_out": |prev & cur| / |prev | cur| against the previous fusion's mask,
   "kept_in", "kept_out": |prev & cur| / |prev| (null at the first fusion of a run)}

Vectors are rounded to 3 significant digits: about 2.1 KB per fusion for SmolLM2's 120 LoRA tensors
(30 layers x q, v x A, B), and a 6 KB "fusion_leaves" record per task.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kif_jax import metrics
from kif_jax.core.tree import PyTree, leaf_groups, tree_path_names
from kif_jax.errors import DataError, KifError

REPORT_DIR = "report"
#: Edges of the magnitude bins: |tau| divided by the mean |tau| of the whole tree (scale-free), log2-spaced.
HIST_EDGES: tuple[float, ...] = tuple(2.0 ** k for k in range(-6, 4))
_LEARNERS = ("in", "out")


# --------------------------------------------------------------------------------------------
# Statistics of one fusion, inside the jitted cycle
# --------------------------------------------------------------------------------------------


def _factor_groups(tree: PyTree) -> tuple[list[int], list[str]]:
    """Group id of every leaf by its last path name (the LoRA factor, `lora_a` / `lora_b`), and the names."""
    groups, _ = leaf_groups(tree, "per_factor")
    names: dict[int, str] = {}
    for g, path in zip(groups, tree_path_names(tree)):
        names.setdefault(g, path[-1] if path else "")
    return groups, [names[g] for g in sorted(names)]


def _learner_stats(tau: PyTree, mask: PyTree, prev: PyTree | None) -> dict[str, jax.Array]:
    taus = [jnp.abs(jnp.asarray(t, jnp.float32)) for t in jax.tree.leaves(tau)]
    masks = [jnp.asarray(m, bool) for m in jax.tree.leaves(mask)]
    if len(taus) != len(masks):
        raise ValueError(f"task vector has {len(taus)} leaves, mask {len(masks)}")
    f32 = jnp.float32
    nan = jnp.float32(jnp.nan)
    sizes = [int(t.size) for t in taus]
    count = [jnp.sum(m, dtype=jnp.int32).astype(f32) for m in masks]
    s_inside = [jnp.sum(jnp.where(m, t, 0)) for t, m in zip(taus, masks)]
    s_outside = [jnp.sum(jnp.where(m, 0, t)) for t, m in zip(taus, masks)]
    frac = jnp.stack([c / max(n, 1) for c, n in zip(count, sizes)])

    def means(leaves: list[int]) -> tuple[jax.Array, jax.Array]:
        """Mean |tau| over the leaves' entries inside the mask, and outside it (NaN where none)."""
        k = sum((count[i] for i in leaves), f32(0))
        n = sum(sizes[i] for i in leaves)
        inside = sum((s_inside[i] for i in leaves), f32(0))
        outside = sum((s_outside[i] for i in leaves), f32(0))
        return (jnp.where(k > 0, inside / jnp.maximum(k, 1), nan),
                jnp.where(k < n, outside / jnp.maximum(n - k, 1), nan))

    # Magnitudes per LoRA factor (their scales differ) in units of the mean |tau| over every entry.
    groups, names = _factor_groups(tau)
    all_in, all_out = means(list(range(len(taus))))
    total = sum(sizes)
    tree_mean = (sum(s_inside, f32(0)) + sum(s_outside, f32(0))) / max(total, 1)
    mean = jnp.where(tree_mean > 0, tree_mean, 1.0)
    by_factor = [means([i for i, g in enumerate(groups) if g == k]) for k in range(len(names))]
    inside = jnp.stack([m[0] for m in by_factor]) / mean if by_factor else jnp.zeros((0,), f32)
    outside = jnp.stack([m[1] for m in by_factor]) / mean if by_factor else jnp.zeros((0,), f32)
    # Magnitude bins of |tau| / mean |tau|: bin b holds ratios in [edge_{b-1}, edge_b).
    edges = jnp.asarray(HIST_EDGES, f32)
    bins = jnp.arange(len(HIST_EDGES) + 1)
    hist = jnp.zeros((2, len(HIST_EDGES) + 1), f32)
    for t, m in zip(taus, masks):
        index = jnp.sum((t / mean)[..., None] >= edges, axis=-1)
        onehot = index[..., None] == bins
        axes = tuple(range(t.ndim))
        hist = hist + jnp.stack([jnp.sum(onehot, axis=axes, dtype=jnp.int32),
                                 jnp.sum(onehot & m[..., None], axis=axes, dtype=jnp.int32)]).astype(f32)
    out = {"frac": frac, "inside": inside, "outside": outside, "hist": hist, "mean": tree_mean,
           "ratio": all_in / all_out}
    if prev is not None:
        prevs = [jnp.asarray(p, bool) for p in jax.tree.leaves(prev)]
        inter = sum(jnp.sum(p & m, dtype=jnp.int32).astype(f32) for p, m in zip(prevs, masks))
        union = sum(jnp.sum(p | m, dtype=jnp.int32).astype(f32) for p, m in zip(prevs, masks))
        before = sum(jnp.sum(p, dtype=jnp.int32).astype(f32) for p in prevs)
        out["jaccard"] = jnp.where(before > 0, inter / jnp.maximum(union, 1), nan)
        out["kept"] = jnp.where(before > 0, inter / jnp.maximum(before, 1), nan)
    else:
        out["jaccard"] = out["kept"] = nan
    return out


def fusion_stats(tau_in: PyTree, tau_out: PyTree, mask_in: PyTree, mask_out: PyTree,
                 prev_masks: tuple[PyTree, PyTree] | None = None) -> dict[str, jax.Array]:
    """Summary statistics of one fusion (traceable), see the module doc: per leaf (`jax.tree.leaves`
    order) the mask shares, per LoRA factor the mean |tau| inside / outside the masks, histograms, overlaps.

    `prev_masks` is the (inner, outer) mask pair of the previous fusion; with None, or an empty
    previous mask, the overlaps are NaN. Cost: a few elementwise passes and reductions over the
    trained parameters; results are two [L] and four [factors] vectors, two [2, 11] histograms, scalars.
    """
    prev_in, prev_out = prev_masks if prev_masks is not None else (None, None)
    stats: dict[str, jax.Array] = {}
    for name, tau, mask, prev in (("in", tau_in, mask_in, prev_in), ("out", tau_out, mask_out, prev_out)):
        s = _learner_stats(tau, mask, prev)
        stats[f"{name}_frac"] = s["frac"]
        stats[f"tau_{name}_mean"] = s["mean"]
        stats[f"tau_{name}_ratio"] = s["ratio"]
        stats[f"tau_{name}_inside"] = s["inside"]
        stats[f"tau_{name}_outside"] = s["outside"]
        stats[f"hist_{name}"] = s["hist"]
        stats[f"jaccard_{name}"] = s["jaccard"]
        stats[f"kept_{name}"] = s["kept"]
    return stats


def _round(x: Any, digits: int) -> float | None:
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def fusion_record(stats: dict[str, Any]) -> dict[str, Any]:
    """`fusion_stats` output (fetched to the host) as compact JSON: vectors to 3 significant digits,
    scalars to 4, histogram counts as integers, null for NaN."""
    record: dict[str, Any] = {}
    for key, value in stats.items():
        arr = np.asarray(value)
        if key.startswith("hist_"):
            record[key] = np.rint(arr).astype(np.int64).tolist()
        elif arr.ndim == 0:
            record[key] = _round(arr, 4)
        else:
            record[key] = [_round(v, 3) for v in arr.ravel()]
    return record


def leaf_layout(params: PyTree) -> dict[str, Any]:
    """The leaf names and sizes of the trained tree, and its LoRA factors (the order of `fusion_stats`' vectors)."""
    return {"names": ["/".join(n) for n in tree_path_names(params)],
            "sizes": [int(np.prod(np.shape(x))) for x in jax.tree.leaves(params)],
            "factors": _factor_groups(params)[1], "hist_edges": list(HIST_EDGES)}


# --------------------------------------------------------------------------------------------
# Reading a run
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MethodData:
    """One method directory of a run: its results.json and its metrics.jsonl records."""

    name: str
    results: dict
    records: list[dict]

    @property
    def tasks(self) -> list[str]:
        return list(self.results["tasks"])

    @property
    def matrix(self) -> np.ndarray:
        return metrics.results_matrix(self.results)

    def fusions(self) -> list[tuple[dict, dict]]:
        """(fusion_stats record, the leaf layout it refers to), in the order of the run."""
        layout, out = None, []
        for r in self.records:
            if r.get("event") == "fusion_leaves":
                layout = r
            elif r.get("event") == "fusion_stats" and layout is not None:
                if len(r.get("in_frac") or []) == len(layout["names"]):
                    out.append((r, layout))
        return out


def _method_order(name: str) -> tuple[int, str]:
    from kif_jax.config import METHODS

    return (METHODS.index(name) if name in METHODS else len(METHODS), name)


def _read_results(path: pathlib.Path) -> dict:
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not a readable results.json ({type(err).__name__}: {err})") from err
    if not isinstance(results, dict) or not all(k in results for k in ("method", "tasks", "accuracy_matrix")):
        raise DataError(f"{path} is not a results.json: it needs 'method', 'tasks' and 'accuracy_matrix'")
    try:
        R = metrics.results_matrix(results)
        if R.shape != (len(results["tasks"]),) * 2:
            raise ValueError(f"a {R.shape} matrix for {len(results['tasks'])} tasks")
    except (ValueError, TypeError) as err:
        raise DataError(f"{path} has a malformed accuracy_matrix ({err})") from err
    return results


def _read_records(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {n}, is not JSON ({err.msg})") from err
    return records


def load_run(workdir: str | pathlib.Path, *, skip_unfinished: bool = False) -> tuple[list[MethodData], list[str]]:
    """Every method directory of `workdir` (one with results.json or metrics.jsonl), in `config.METHODS` order.

    A directory without results.json is an unfinished method: a `DataError`, or with `skip_unfinished`
    left out and named in the second return value.
    """
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise DataError(f"run directory {workdir} does not exist")
    dirs = sorted((d for d in workdir.iterdir() if d.is_dir() and d.name != REPORT_DIR
                   and ((d / "results.json").exists() or (d / "metrics.jsonl").exists())),
                  key=lambda d: _method_order(d.name))
    methods, unfinished = [], []
    for d in dirs:
        if not (d / "results.json").exists():
            if skip_unfinished:
                unfinished.append(d.name)
                continue
            raise DataError(f"{d / 'results.json'} is missing: method {d.name} has not finished "
                            "(run the training command again to finish it)")
        methods.append(MethodData(d.name, _read_results(d / "results.json"), _read_records(d / "metrics.jsonl")))
    if not methods:
        raise DataError(f"no finished method in {workdir} (no <method>/results.json)")
    return methods, unfinished


# --------------------------------------------------------------------------------------------
# Leaf names -> layer, attention block, module, LoRA factor
# --------------------------------------------------------------------------------------------

_CONTAINERS = {"blocks", "block", "layers", "layer", "h", "model"}


def describe_leaf(name: str) -> dict[str, str]:
    """Groups of one leaf path, e.g. 'encoder/blocks/0/self_attention/q/lora_a' ->
    layer 'encoder 0', block 'encoder/self_attention', module 'q', factor 'lora_a'.

    A leaf outside the numbered layers is its own "layer", named by its module path: 'shared/embedding'
    -> layer and block 'shared'; 'encoder/final_norm/scale' -> layer 'encoder/final_norm', block 'encoder'."""
    parts = name.split("/")
    factor = parts[-1]
    module = parts[-2] if len(parts) > 1 else parts[-1]
    index = next((i for i, p in enumerate(parts[:-2]) if p.isdigit()), None)
    if index is None:
        own = "/".join(p for p in parts[:-1] if p not in _CONTAINERS) or "/".join(parts[:-1]) or name
        stack = "/".join(parts[:-2]) or own
        return {"layer": own, "block": stack, "module": module, "factor": factor}
    prefix = [p for p in parts[:index] if p not in _CONTAINERS]
    layer = " ".join(prefix + [parts[index]]) if prefix else f"layer {parts[index]}"
    block = "/".join(prefix + parts[index + 1:-2]) or "-"
    return {"layer": layer, "block": block, "module": module, "factor": factor}


def _layer_key(layer: str) -> tuple:
    """Encoder layers, then decoder ones (layers of each stack in order, then its other parts), then the rest."""
    words = layer.split()
    numbered = len(words) > 1 and words[-1].isdigit()
    stack = " ".join(words[:-1]) if numbered else layer.split("/")[0]
    order = {"encoder": 0, "decoder": 1, "layer": 1}.get(stack, 2)
    return (order, stack, 0 if numbered else 1, int(words[-1]) if numbered else 0, layer)


def _grouped(values: Sequence[float | None], sizes: Sequence[int], groups: Sequence[str]) -> dict[str, float]:
    """Size-weighted mean of per-leaf values per group (leaves with null values left out)."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for v, n, g in zip(values, sizes, groups):
        num.setdefault(g, 0.0)
        den.setdefault(g, 0.0)
        if v is not None:
            num[g] += v * n
            den[g] += n
    return {g: (num[g] / den[g] if den[g] else math.nan) for g in num}


def _ratios(record: dict, layout: dict, learner: str) -> dict[str, float]:
    """Mean |tau| inside the mask / mean |tau| outside it: "all" entries and per LoRA factor (NaN if undefined)."""
    out = {"all": _number(record.get(f"tau_{learner}_ratio"))}
    for factor, inside, outside in zip(layout.get("factors", []), record.get(f"tau_{learner}_inside", []),
                                       record.get(f"tau_{learner}_outside", [])):
        out[factor] = inside / outside if inside is not None and outside else math.nan
    return out


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    return _plt().subplots(*args, layout="constrained", **kwargs)


def _save(fig: Any, path: pathlib.Path) -> None:
    fig.savefig(path, dpi=100, metadata={"Software": None})
    _plt().close(fig)


def _colors(names: Sequence[str]) -> dict[str, Any]:
    """A distinct colour per name: tab10 up to 10 names, tab20 (dark hues first) up to 20, else evenly spaced hues."""
    plt = _plt()
    n = len(names)
    if n <= 10:
        colors = [plt.get_cmap("tab10")(i) for i in range(n)]
    elif n <= 20:
        colors = [plt.get_cmap("tab20")(i) for i in (*range(0, 20, 2), *range(1, 20, 2))][:n]
    else:
        colors = [plt.get_cmap("turbo")(0.05 + 0.9 * i / (n - 1)) for i in range(n)]
    return dict(zip(names, colors))


def _legend_outside(ax: Any, *, title: str | None = None, fontsize: float = 7) -> Any:
    """The axes' legend to the right of it, outside the data (two columns for long lists)."""
    handles, labels = ax.get_legend_handles_labels()
    return ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=fontsize,
                     title=title, title_fontsize=fontsize, ncol=1 if len(labels) <= 12 else 2, frameon=False,
                     borderaxespad=0.0)


def _is_lora(fusions: Sequence[tuple[dict, dict]]) -> bool:
    """Whether the trained leaves are LoRA factors (else e.g. kernel / scale / embedding of a fully trained model)."""
    factors = {f for _, layout in fusions for f in layout.get("factors") or
               [n.rsplit("/", 1)[-1] for n in layout["names"]]}
    return bool(factors) and all(f.startswith("lora_") for f in factors)


def _factor_label(fusions: Sequence[tuple[dict, dict]]) -> str:
    return "LoRA factor" if _is_lora(fusions) else "parameter kind"


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(n, max_cols))
    return math.ceil(n / cols), cols


def plot_accuracy_matrices(methods: Sequence[MethodData], path: pathlib.Path) -> None:
    """The accuracy matrices of every method side by side (shared color scale)."""
    from kif_jax.reporting import draw_heatmap

    rows, cols = _grid(len(methods), 4)
    b = max(len(m.tasks) for m in methods)
    size = max(3.2, 0.45 * b + 1.8)
    fig, axes = _subplots(rows, cols, figsize=(size * cols + 1.0, size * rows), squeeze=False)
    image = None
    for k, (ax, m) in enumerate(zip(axes.flat, methods)):
        image = draw_heatmap(ax, m.matrix, m.tasks, title=m.name, annotate=b <= 10)
        if k % cols:
            ax.set_yticklabels([])
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.suptitle("Test accuracy (%) on each task (columns) after training each task (rows)")
    fig.colorbar(image, ax=axes, label="test accuracy (%)", shrink=0.8)
    _save(fig, path)


def plot_accuracy_along_sequence(methods: Sequence[MethodData], tasks: Sequence[str], path: pathlib.Path) -> None:
    """One panel per task: its test accuracy after each training stage, one line per method."""
    rows, cols = _grid(len(tasks), 4)
    fig, axes = _subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False, sharey=True)
    colors = _colors([m.name for m in methods])
    x = np.arange(len(tasks))
    for j, (ax, task) in enumerate(zip(axes.flat, tasks)):
        for m in methods:
            ax.plot(x, m.matrix[:, j] * 100, marker="o", ms=4, color=colors[m.name], label=m.name)
        ax.axvline(j, color="grey", ls=":", lw=1)
        ax.set_title(f"task {j + 1}: {task}")
        ax.set_xticks(x, [str(i + 1) for i in x])
        ax.set_xlabel("after training task #")
        ax.set_ylim(-3, 103)
        if j % cols == 0:
            ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(methods), 5), frameon=False)
    fig.suptitle("Accuracy of each task along the sequence (dotted: when the task is trained)")
    _save(fig, path)


def _task_marks(ax: Any, fusions: Sequence[tuple[dict, dict]]) -> None:
    """Fusions are numbered from 1; dotted lines where a task's fusions begin, its name on the top axis."""
    from matplotlib.ticker import MaxNLocator

    starts: list[int] = []
    names: list[str] = []
    for i, (r, _) in enumerate(fusions, 1):
        if i == 1 or r["phase"] != fusions[i - 2][0]["phase"]:
            starts.append(i)
            names.append(r["task"])
            if i > 1:
                ax.axvline(i - 0.5, color="grey", ls=":", lw=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, len(fusions) + 0.5)
    top = ax.secondary_xaxis("top")
    top.set_xticks(starts, names, fontsize=7, rotation=30 if len(starts) > 6 else 0, ha="left")
    top.tick_params(length=0)


def plot_magnitude_vs_importance(method: str, index: int, record: dict, layout: dict, path: pathlib.Path) -> None:
    """Figure 5(a) analogue for one fusion: the share of important entries per |tau| magnitude bin."""
    edges = layout.get("hist_edges") or list(HIST_EDGES)
    labels = [f"<{_pow2(edges[0])}"] + [f"{_pow2(a)}-{_pow2(b)}" for a, b in zip(edges[:-1], edges[1:])] + \
             [f">={_pow2(edges[-1])}"]
    fig, axes = _subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, learner, title in zip(axes, _LEARNERS, ("inner (current task)", "outer (memory of earlier tasks)")):
        total, important = (np.asarray(h, float) for h in record[f"hist_{learner}"])
        share = np.divide(important, total, out=np.full_like(total, np.nan), where=total > 0) * 100
        x = np.arange(len(total))
        ax.bar(x, np.nan_to_num(share), color="tab:blue" if learner == "in" else "tab:orange")
        overall = important.sum() / max(total.sum(), 1) * 100
        ax.axhline(overall, color="black", ls="--", lw=1, label=f"all entries: {overall:.1f}%")
        for xi, n, h in zip(x, total, np.nan_to_num(share)):
            ax.text(xi, h + 1, f"n={int(n)}", rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, labels, rotation=45, ha="right")
        ax.set_xlabel(f"|tau_{learner}| / mean |tau_{learner}|")
        ax.set_title(f"{title}: m_{learner}")
        ax.legend(loc="upper left", fontsize=8)
        ax.set_ylim(0, 105)
    axes[0].set_ylabel("important entries in the bin (%)")
    fig.suptitle(f"{method}: task-vector magnitude vs importance, fusion {index + 1} (task {record['task']}, "
                 f"step {record['step']})")
    _save(fig, path)


def _pow2(v: float) -> str:
    k = round(math.log2(v))
    return str(2 ** k) if k >= 0 else f"1/{2 ** -k}"


def plot_magnitude_ratio(method: str, fusions: Sequence[tuple[dict, dict]], path: pathlib.Path) -> None:
    """Figure 5(a) over the sequence: mean |tau| inside the mask over mean |tau| outside it, per fusion."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    fig, axes = _subplots(1, 2, figsize=(13, 3.8), sharey=True)
    x = np.arange(1, len(fusions) + 1)
    lines = {learner: {} for learner in _LEARNERS}
    for learner in _LEARNERS:
        for i, (r, layout) in enumerate(fusions):
            for name, value in _ratios(r, layout, learner).items():
                lines[learner].setdefault(name, [math.nan] * len(fusions))[i] = value
    names = list(dict.fromkeys(n for learner in _LEARNERS for n in lines[learner] if n != "all"))
    colors = {"all": "black", **_colors(names)}
    # A log scale: ratios r and 1/r lie equally far from 1, and one far-off kind leaves the others readable.
    for ax, learner, title in zip(axes, _LEARNERS, ("inner: |tau_in| in m_in", "outer: |tau_out| in m_out")):
        for name, values in lines[learner].items():
            v = np.asarray(values, float)
            ax.plot(x, np.where(v > 0, v, np.nan), marker=".", lw=2 if name == "all" else 1, color=colors[name],
                    label="all entries" if name == "all" else name)
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.set_yscale("log")
        _task_marks(ax, fusions)
        ax.set_xlabel("fusion #")
        ax.set_title(title, pad=16)
        ax.grid(alpha=0.3, which="both")
    low, high = axes[0].get_ylim()
    for ax in axes:  # ticks as plain numbers; 1-2-5 steps over a wide range, linear steps over a narrow one
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)) if high / low >= 8 else
                                   MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    _legend_outside(axes[1], title=f"per {_factor_label(fusions)}", fontsize=8)
    axes[0].set_ylabel("mean |tau| inside / outside the mask\n(log scale)")
    fig.suptitle(f"{method}: do large updates fall on important parameters? (1 = no relation)")
    _save(fig, path)


def _shares(fusions: Sequence[tuple[dict, dict]], learner: str, kind: str) -> tuple[list[str], np.ndarray]:
    """Group names and the [groups, fusions] size-weighted share of important entries per group."""
    names: list[str] = []
    table: list[dict[str, float]] = []
    for r, layout in fusions:
        groups = [describe_leaf(n)[kind] for n in layout["names"]]
        names.extend(g for g in dict.fromkeys(groups) if g not in names)
        table.append(_grouped(r[f"{learner}_frac"], layout["sizes"], groups))
    if kind == "layer":
        names.sort(key=_layer_key)
    return names, np.array([[t.get(g, math.nan) for t in table] for g in names], dtype=float).reshape(len(names), -1)


def plot_importance_by_layer(method: str, fusions: Sequence[tuple[dict, dict]], path: pathlib.Path) -> None:
    """Figure 5(b) analogue: the share of important parameters of each layer at every fusion."""
    layers, _ = _shares(fusions, "in", "layer")
    fig, axes = _subplots(1, 2, figsize=(12, max(3.0, 0.22 * len(layers) + 1.8)), sharey=True)
    for ax, learner in zip(axes, _LEARNERS):
        names, values = _shares(fusions, learner, "layer")
        top = float(np.nanmax(values * 100)) if np.isfinite(values).any() else 40.0
        image = ax.imshow(values * 100, aspect="auto", cmap="magma", interpolation="nearest", vmin=0,
                          vmax=max(40.0, top), extent=(0.5, len(fusions) + 0.5, len(names) - 0.5, -0.5))
        ax.set_yticks(range(len(names)), names, fontsize=7 if len(names) > 20 else 9)
        _task_marks(ax, fusions)
        ax.set_xlabel("fusion #")
        ax.set_title(f"m_{learner}: {'inner' if learner == 'in' else 'outer'} mask", pad=16)
        fig.colorbar(image, ax=ax, label="important entries of the layer (%)")
    axes[0].set_ylabel("layer")
    fig.suptitle(f"{method}: where the important parameters sit, layer by layer")
    _save(fig, path)


def plot_importance_by_module(method: str, fusions: Sequence[tuple[dict, dict]], path: pathlib.Path) -> None:
    """Figure 5(b) analogue: the share of important parameters per attention block, module and LoRA factor
    (parameter kind when the trained leaves are not LoRA factors).

    One row per grouping, m_in left and m_out right; a name has one colour in both, legend to the right."""
    lora = _is_lora(fusions)
    kinds = (("block", "attention block"), ("module", "projection" if lora else "module"),
             ("factor", _factor_label(fusions)))
    fig, axes = _subplots(3, 2, figsize=(14, 9.5), sharex=True, sharey=True)
    x = np.arange(1, len(fusions) + 1)
    for row, (kind, label) in enumerate(kinds):
        shares = {learner: _shares(fusions, learner, kind) for learner in _LEARNERS}
        colors = _colors(list(dict.fromkeys(n for names, _ in shares.values() for n in names)))
        for col, learner in enumerate(_LEARNERS):
            ax = axes[row, col]
            names, values = shares[learner]
            for name, v in zip(names, values):
                ax.plot(x, v * 100, marker=".", ms=4, lw=1.2, color=colors[name], label=name)
            _task_marks(ax, fusions)
            ax.set_title(f"m_{learner} by {label}", pad=16)
            ax.grid(alpha=0.3)
            if row == len(kinds) - 1:
                ax.set_xlabel("fusion #")
            if col == 0:
                ax.set_ylabel("important entries (%)")
        _legend_outside(axes[row, 1], title=label)
    fig.suptitle(f"{method}: share of important parameters per attention block, "
                 f"{kinds[1][1]} and {kinds[2][1]}")
    _save(fig, path)


def plot_mask_overlap(method: str, fusions: Sequence[tuple[dict, dict]], path: pathlib.Path) -> None:
    """Does importance move? The share of the previous fusion's important entries still important."""
    fig, ax = _subplots(figsize=(10, 4))
    x = np.arange(1, len(fusions) + 1)
    first = [i for i, (r, _) in enumerate(fusions) if i > 0 and r["phase"] != fusions[i - 1][0]["phase"]]
    for learner, color in zip(_LEARNERS, ("tab:blue", "tab:orange")):
        kept = np.array([np.nan if r.get(f"kept_{learner}") is None else r[f"kept_{learner}"] * 100
                         for r, _ in fusions])
        chance = [_grouped(r[f"{learner}_frac"], lay["sizes"], ["all"] * len(lay["sizes"]))["all"] * 100
                  for r, lay in fusions]
        ax.plot(x, kept, marker=".", color=color, label=f"m_{learner}: still important")
        ax.plot(x, chance, ls=":", color=color, label=f"m_{learner}: chance (share of important entries)")
        if first:
            ax.scatter(x[first], kept[first], marker="X", s=60, color=color, zorder=3,
                       label=f"m_{learner}: first fusion of a task")
    _task_marks(ax, fusions)
    ax.set_xlabel("fusion #")
    ax.set_ylabel("of the previous fusion's important entries (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    ax.set_title(f"{method}: how much of each mask survives to the next fusion", pad=16)
    _save(fig, path)


# --------------------------------------------------------------------------------------------
# The markdown report
# --------------------------------------------------------------------------------------------


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def _fusion_table(fusions: Sequence[tuple[dict, dict]]) -> list[str]:
    """Per task: mask shares (overall and per factor), magnitude ratios, and mask overlaps."""
    by_task: dict[int, list[tuple[dict, dict]]] = {}
    for f in fusions:
        by_task.setdefault(f[0]["phase"], []).append(f)
    lines = ["| task | fusions | important in / out (%) | m_in by factor (%) | m_out by factor (%) "
             "| mean \\|tau\\| inside / outside the mask, in ; out | Jaccard with previous fusion, in ; out "
             "| Jaccard at the task's first fusion, in ; out |",
             "|---|---:|---|---|---|---|---|---|"]

    def mean(values: Iterable[float]) -> float:
        v = [x for x in values if x is not None and math.isfinite(x)]
        return sum(v) / len(v) if v else math.nan

    def num(v: float, digits: int = 2) -> str:
        return "-" if not math.isfinite(v) else f"{v:.{digits}f}"

    for phase, items in by_task.items():
        cells = [items[0][0]["task"], str(len(items))]
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
                 unfinished: Sequence[str] = (), paired: str = "") -> pathlib.Path:
    """Write report.md and its figures into `outdir` (stale PNGs there are removed); returns report.md's path.

    `paired`: the markdown of `kif_jax.compare` (differences with 95% intervals), or why there is none."""
    outdir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def figure(alt: str, name: str, draw: Any, *args: Any) -> str:
        """Draw a figure into `outdir/name`; its markdown image link."""
        draw(*args, outdir / name)
        written.append(name)
        return f"![{alt}]({name})"

    tasks = methods[0].tasks
    same = [m for m in methods if m.tasks == tasks]
    other = [m.name for m in methods if m.tasks != tasks]
    md = [f"# Comparison report: {title}", ""]
    config = methods[0].results.get("config") or {}
    model = (config.get("model") or {}).get("name", "?")
    md.append(f"Model `{model}`, {len(tasks)} tasks in order: " + ", ".join(f"`{t}`" for t in tasks) + ". "
              f"Methods: {', '.join(f'`{m.name}`' for m in methods)}.")
    md.append("Built by `kif_jax/report.py` from each `<method>/results.json` and `metrics.jsonl`; "
              "rebuild with `python -m kif_jax.report <workdir>`.")
    if unfinished:
        md.append(f"Not finished, left out: {', '.join(f'`{u}`' for u in unfinished)}.")
    if other:
        md.append(f"Run on another task sequence, left out of the figures: {', '.join(f'`{o}`' for o in other)}.")
    md += ["", "## Overall performance", "",
           "OP: mean final accuracy over all tasks; BWT: mean change on each earlier task from just after "
           "learning it to the end; FWT: mean gain on a task before training it over its zero-shot "
           "accuracy (percent; `-`: not defined or not evaluated).", "",
           "| method | OP | BWT | FWT |", "|---|---:|---:|---:|"]
    for m in methods:
        r = m.results
        o, b, f = (r.get(k, None) for k in ("op", "bwt", "fwt"))
        md.append(f"| {m.name} | {_pct(o)} | {_pct(b, True)} | {_pct(f, True)} |")
    if paired:
        md += ["", "## Paired differences on the same test examples", "",
               "Each method minus the baseline, in points, with a 95% percentile bootstrap interval over the "
               "test examples (stratified by task, the same resampled examples for both methods; "
               "`python -m kif_jax.compare`); resolved: the interval excludes 0.", "", paired]
    md += ["", "Final accuracy (%) on each task:", "",
           "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for m in same:
        md.append(f"| {m.name} | " + " | ".join(_pct(float(v)) for v in m.matrix[-1]) + " |")
    md += ["", "## Accuracy matrices", "",
           figure("accuracy matrices", "accuracy_matrices.png", plot_accuracy_matrices, same), "",
           "## Each task's accuracy along the sequence", "",
           figure("accuracy along the sequence", "accuracy_along_sequence.png", plot_accuracy_along_sequence,
                  same, tasks), ""]

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
        md += _fusion_table(fusions)
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
    paired = ""
    if len(methods) > 1:
        from kif_jax import compare

        try:
            paired = compare.markdown(compare.write_comparison(workdir)[1])
        except DataError as err:
            paired = f"No paired comparison: {' '.join(str(err).split())}."
    return build_report(methods, workdir / REPORT_DIR, title=workdir.resolve().name, unfinished=unfinished,
                        paired=paired)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kif_jax.report <workdir>`: rebuild the report; a user error is one line and exit code 2."""
    parser = argparse.ArgumentParser(prog="python -m kif_jax.report", description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="the --workdir of a finished run")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.workdir)
    except KifError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    print(f"report in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
