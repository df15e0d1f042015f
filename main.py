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

from kif_jax import cli

_HERE = pathlib.Path(__file__).resolve().parent


def _fail(message: object) -> None:
    sys.exit(cli.fail(message))


if __name__ == "__main__":  # before the config flag is defined: it applies the overrides as it loads
    sys.argv[:] = cli.renamed_overrides(sys.argv)
    _unknown = cli.unknown_override(sys.argv)
    if _unknown:
        _fail(_unknown)
_CONFIG = cli.define_config_flag(flags.FLAGS, str(_HERE / "configs" / "demo.py"))
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
        return cli.parse_command_flags(flags.FLAGS, argv)
    except cli.CommandError as err:
        _fail(err)


def load_config():
    """The parsed config; a config file that cannot be loaded is one line, not a traceback."""
    try:
        return cli.loaded_config(_CONFIG, flags.FLAGS)
    except cli.CommandError as err:
        _fail(err)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from kif_jax import distributed
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
    sys.exit(cli.run(load_config(), _WORKDIR.value or f"runs/{config_name}"))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
