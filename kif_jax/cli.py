"""The body of main.py: run, print the tables, and turn user errors into one line and exit code 2.

A preempted run (SIGTERM or SIGINT; see kif_jax/preemption.py) prints one line and exits with 75.
In multi-process runs only process 0 prints the tables.
"""
from __future__ import annotations

import sys

import ml_collections

from kif_jax.errors import KifError


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Train and evaluate every configured method; returns the process exit code."""
    from kif_jax import distributed, metrics
    from kif_jax.preemption import EXIT_CODE, Preempted
    from kif_jax.train import train_and_evaluate

    try:
        results = train_and_evaluate(config, workdir)
    except KifError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)  # one line, whatever the cause says
        return 2
    except Preempted as stop:
        print(stop, file=sys.stderr)
        return EXIT_CODE
    if not distributed.is_main():
        return 0  # process 0 prints the tables
    for result in results.values():
        print(metrics.accuracy_table(result["accuracy_matrix"], result["tasks"], method=result["method"]))
        print()
    print(metrics.comparison_table(results))
    print(f"\nresults in {workdir}/<method>/results.json; comparison in {workdir}/comparison.md")
    return 0
