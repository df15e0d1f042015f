"""The report's figures: accuracy matrices and curves, and the Figure-5 analogues from the fusion statistics."""
from __future__ import annotations

import math
import pathlib
from typing import Any, Sequence

import numpy as np

from kif_jax.core.fusion_stats import HIST_EDGES
from kif_jax.report.runs import MethodData

_LEARNERS = ("in", "out")

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


def plot_accuracy_matrices(methods: Sequence[MethodData], path: pathlib.Path, *, metric: str = "accuracy") -> None:
    """The score matrices of every method side by side (shared color scale); `metric`: what they hold."""
    from kif_jax.run_files import draw_heatmap

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
    fig.suptitle(f"Test {metric} (%) on each task (columns) after training each task (rows)")
    fig.colorbar(image, ax=axes, label=f"test {metric} (%)", shrink=0.8)
    _save(fig, path)


def plot_accuracy_along_sequence(methods: Sequence[MethodData], tasks: Sequence[str], path: pathlib.Path, *,
                                 metric: str = "accuracy") -> None:
    """One panel per task: its test score after each training stage, one line per method (a point where the
    neighbouring stages were not evaluated)."""
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
            ax.set_ylabel(f"test {metric} (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(methods), 5), frameon=False)
    fig.suptitle(f"{metric[:1].upper()}{metric[1:]} of each task along the sequence (dotted: when the task is trained)")
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
