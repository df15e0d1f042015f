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

Modules: `runs` (reading a finished run), `plots` (the figures), `markdown` (report.md and the command).
The statistics behind the figures are computed inside the jitted cycle at every fusion by
kif_jax/core/fusion_stats.py, re-exported here.
"""
from kif_jax.core.fusion_stats import HIST_EDGES, fusion_record, fusion_stats, leaf_layout
from kif_jax.report.markdown import build_report, main, write_report
from kif_jax.report.plots import (describe_leaf, plot_accuracy_along_sequence, plot_accuracy_matrices,
                                  plot_importance_by_layer, plot_importance_by_module, plot_magnitude_ratio,
                                  plot_magnitude_vs_importance, plot_mask_overlap)
from kif_jax.report.runs import REPORT_DIR, MethodData, load_run

__all__ = ["HIST_EDGES", "REPORT_DIR", "MethodData", "build_report", "describe_leaf", "fusion_record",
           "fusion_stats", "leaf_layout", "load_run", "main", "plot_accuracy_along_sequence",
           "plot_accuracy_matrices", "plot_importance_by_layer", "plot_importance_by_module",
           "plot_magnitude_ratio", "plot_magnitude_vs_importance", "plot_mask_overlap", "write_report"]
