"""The commands' bodies: `main.py` (train and evaluate) and `python -m kif_jax.memory_plan`, with one
flag parser for both: a config file with `--config.<field>=<value>` overrides, every user error one
line on stderr and exit code 2.

A preempted run (SIGTERM or SIGINT; see kif_jax/preemption.py) prints one line and exits with 75.
In multi-process runs only process 0 prints the tables.
"""
from __future__ import annotations

import json
import pathlib
import sys
from typing import Any, Sequence

import ml_collections

from kif_jax.errors import KifError


class CommandError(Exception):
    """A user error of a command line: printed as one line, exit code 2."""


def fail(message: Any) -> int:
    """Print a user error as one line; returns the exit code 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def renamed_overrides(argv: Sequence[str]) -> list[str]:
    """`argv` with every `--config.<field>` override of a renamed field (kif_jax.config.RENAMED_FIELDS) given its
    new name, and a one-line notice on stderr for each. Applied before the config flag is defined."""
    from kif_jax.config import RENAMED_FIELDS, renamed_field_notice

    out = list(argv[:1])
    for arg in argv[1:]:
        name, sep, value = arg.partition("=")
        if name.startswith("--config.") and name[len("--config."):] in RENAMED_FIELDS:
            old = name[len("--config."):]
            print(renamed_field_notice(old), file=sys.stderr)
            arg = f"--config.{RENAMED_FIELDS[old]}{sep}{value}"
        out.append(arg)
    return out


def unknown_override(argv: Sequence[str]) -> str | None:
    """The message for the first `--config.<field>` the schema lacks (with the nearest field), else None.

    Checked before the config flag is defined: ml_collections applies overrides as it loads the file,
    and its own error for a missing field is a traceback.
    """
    from kif_jax.config import RENAMED_FIELDS, closest_field, known_field

    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        name = arg[len("--config."):].split("=", 1)[0]
        if name in RENAMED_FIELDS:  # both commands rename these first (`renamed_overrides`)
            return f"config field '{name}' in {arg} is now '{RENAMED_FIELDS[name]}': use --config.{RENAMED_FIELDS[name]}"
        if not known_field(name):
            near = closest_field(name)
            return f"unknown config field in {arg}" + (f"; did you mean --config.{near}?" if near else "")
    return None


def define_config_flag(flag_values: Any, default: str | None, argv: Sequence[str] | None = None) -> Any:
    """The `--config` flag (a config file; fields overridable as --config.a.b=v) on `flag_values`.

    ml_collections defines a flag for each override it finds in `argv` (default: sys.argv), so a command
    that parses another argv must pass it here too.
    """
    from ml_collections import config_flags

    return config_flags.DEFINE_config_file(
        "config", default, "Config file (configs/*.py); fields overridable as --config.a.b=v.",
        flag_values=flag_values, lock_config=True, sys_argv=None if argv is None else list(argv))


def parse_command_flags(flag_values: Any, argv: Sequence[str]) -> list[str]:
    """absl's parsing of `argv`; a bad flag raises `CommandError` with one line."""
    from absl import flags

    try:
        return flag_values(list(argv))
    except flags.Error as err:
        raise CommandError(str(err).splitlines()[0]) from None
    except (KeyError, AttributeError) as err:  # ml_collections: an override it cannot apply
        raise CommandError(f"cannot apply a --config override: {' '.join(str(err).split())}") from None


def loaded_config(holder: Any, flag_values: Any) -> ml_collections.ConfigDict:
    """The parsed config, renamed fields moved to their new names; a file that cannot be loaded, or an override that
    cannot be applied, raises `CommandError` with one line."""
    from kif_jax.config import with_renamed_fields

    try:
        config = holder.value
        config.keys()  # a file that failed to load raises only on first use
        return with_renamed_fields(config)
    except OSError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise CommandError(f"cannot load config file {flag_values['config'].config_filename}: {lines[-1]}") from None
    except (KeyError, AttributeError, TypeError, ValueError) as err:  # an override applied on first use
        raise CommandError(f"cannot apply a --config override: {' '.join(str(err).split())}") from None


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Train and evaluate every configured method; returns the process exit code."""
    # jax and the training code load here, once the flags are good: a user error stays a fast one-liner.
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
        print(metrics.accuracy_table(result["accuracy_matrix"], result["tasks"], method=result["method"],
                                     metric=metrics.results_metric(result),
                                     split=result.get("config", {}).get("eval", {}).get("split", "test")))
        print()
    print(metrics.comparison_table(results))
    print(f"\nresults in {workdir}/<method>/results.json; comparison in {workdir}/comparison.md")
    return 0


def memory_plan_main(argv: Sequence[str] | None = None) -> int:
    """`python -m kif_jax.memory_plan --config=configs/x.py --devices=N [--method=M] [--workdir=W] [--json]`.

    Prints the memory.json plan of each method (the config's `methods`, or `--method`) on N devices,
    and writes `<workdir>/<method>/memory.json` with `--workdir`. A user error is one line and exit 2.
    """
    from absl import flags

    argv = renamed_overrides(list(sys.argv if argv is None else argv))
    problem = unknown_override(argv)
    if problem:
        return fail(problem)
    fv = flags.FlagValues()
    holder = define_config_flag(fv, None, argv)
    flags.DEFINE_integer("devices", None, "Number of devices of the mesh to plan for.", flag_values=fv)
    flags.DEFINE_string("method", None, "Method to plan (default: each of the config's `methods`).", flag_values=fv)
    flags.DEFINE_string("workdir", None, "If set, write <workdir>/<method>/memory.json.", flag_values=fv)
    flags.DEFINE_bool("json", False, "Print the plans as JSON (one object per method) instead of a table.",
                      flag_values=fv)
    try:
        rest = parse_command_flags(fv, argv)
        if len(rest) > 1:
            raise CommandError(f"unexpected arguments: {' '.join(rest[1:])}")
        if fv["config"].value is None:
            raise CommandError("--config is required")
        if fv["devices"].value is None:
            raise CommandError("--devices (the number of devices to plan for) is required")
        if fv["devices"].value < 1:
            raise CommandError(f"--devices must be a positive integer, got {fv['devices'].value}")
        config = loaded_config(holder, fv)
    except CommandError as err:
        return fail(err)
    from kif_jax.config import split_list  # jax and the training code load once the flags are good
    from kif_jax.memory_plan import chip_fit, format_plan, report_memory_plan
    from kif_jax.train.plan import plan_abstract

    methods = [fv["method"].value] if fv["method"].value else split_list(config.methods)
    try:
        for method in methods:
            plan, origin = plan_abstract(config, fv["devices"].value, method)
            if fv["workdir"].value:
                report_memory_plan(plan, pathlib.Path(fv["workdir"].value) / method / "memory.json", method)
            if fv["json"].value:
                gib = {k: round(v / 2**30, 4) for k, v in plan["per_device_bytes"].items()}
                print(json.dumps({"method": method, **plan, "per_device_gib": gib, "chips": chip_fit(plan)}))
            else:
                print(format_plan(plan, method=method, origin=origin))
    except KifError as err:
        return fail(err)
    return 0
