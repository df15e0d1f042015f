"""Continual learning with Recurrent-KIF and its baselines.

    python main.py                                   # offline demo (configs/demo.py)
    python main.py --config=configs/t5_large.py --workdir=runs/t5_large --config.order=2
    python main.py ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I   # on every process

Several processes (hosts) run the same command: with the three flags, or with none of them on a Cloud
TPU VM (`jax.distributed.initialize()` from the slice's metadata); see kif_jax/distributed.py.

    python main.py --config=configs/smollm2_standard.py --print_config   # every field, its value and its doc

Exit codes: 0 done; 2 a user error (one line); 75 preempted by SIGTERM / SIGINT after saving a
checkpoint (run the same command to resume).
"""
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = pathlib.Path(__file__).resolve().parent


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _check_overrides(argv: list[str]) -> None:
    """A `--config.<field>` that the schema lacks is one line with the nearest field (exit 2)."""
    from kif_jax.config import closest_field, known_field

    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        name = arg[len("--config."):].split("=", 1)[0]
        if not known_field(name):
            near = closest_field(name)
            _fail(f"unknown config field in {arg}" + (f"; did you mean --config.{near}?" if near else ""))


if __name__ == "__main__":  # before DEFINE_config_file, which applies the overrides as it is defined
    _check_overrides(sys.argv)
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_HERE / "configs" / "demo.py"), "Config file (configs/*.py); fields overridable as --config.a.b=v.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Results, metrics and checkpoints; default runs/<config name>.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-process runs: HOST:PORT of process 0 (the same on every process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many processes in all.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index, 0 .. N-1.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config, each field with its "
                                  "one-line doc, and exit without running.")


def _usage() -> None:
    print(__doc__.strip() + "\n\nFlags:")
    for flag in (flags.FLAGS[name] for name in ("config", "workdir", "print_config", "coordinator_address",
                                                 "num_processes", "process_id")):
        print(f"  --{flag.name}: {flag.help}")
    print("  --config.<section>.<field>=<value>: override one config field; --print_config lists them all")
    sys.exit(0)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad flag reported in one line (exit 2) instead of a traceback."""
    if any(arg in ("--help", "-h", "--helpshort") for arg in argv[1:]):
        _usage()
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        _fail(str(err).splitlines()[0])
    except (KeyError, AttributeError) as err:  # ml_collections: an override it cannot apply
        _fail(f"cannot apply a --config override: {' '.join(str(err).split())}")


def load_config():
    """The parsed config; a config file that cannot be loaded is one line, not a traceback."""
    try:
        config = _CONFIG.value
        config.keys()  # a file that failed to load raises only on first use
        return config
    except OSError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        _fail(f"cannot load config file {flags.FLAGS['config'].config_filename}: {lines[-1]}")
    except (KeyError, AttributeError, TypeError, ValueError) as err:  # an override applied on first use
        _fail(f"cannot apply a --config override: {' '.join(str(err).split())}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from kif_jax import distributed
    from kif_jax.cli import run
    from kif_jax.config import describe_config
    from kif_jax.errors import KifError

    if _PRINT_CONFIG.value:
        try:
            print(describe_config(load_config()))
        except BrokenPipeError:  # e.g. piped into head
            pass
        sys.exit(0)

    quiet = not flags.FLAGS["verbosity"].present
    if quiet:
        # Orbax logs every checkpoint save at length at INFO; --verbosity=0 shows it and the per-task logs.
        logging.set_verbosity(logging.WARNING)
    try:  # before anything starts a JAX backend
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except KifError as err:
        _fail(str(err))
    if quiet and not distributed.is_main():
        logging.set_verbosity(logging.ERROR)  # process 0 speaks for the run
    config_name = pathlib.Path(flags.FLAGS["config"].config_filename).stem
    sys.exit(run(load_config(), _WORKDIR.value or f"runs/{config_name}"))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
