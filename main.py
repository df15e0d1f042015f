"""Continual learning with Recurrent-KIF and its baselines.

    python main.py                                   # offline demo (configs/demo.py)
    python main.py --config=configs/t5_large.py --workdir=runs/t5_large --config.order=2
"""
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

_HERE = pathlib.Path(__file__).resolve().parent
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_HERE / "configs" / "demo.py"), "Config file (configs/*.py); fields overridable as --config.a.b=v.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Results, metrics and checkpoints; default runs/<config name>.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from kif_jax.cli import run

    config_name = pathlib.Path(flags.FLAGS["config"].config_filename).stem
    sys.exit(run(_CONFIG.value, _WORKDIR.value or f"runs/{config_name}"))


if __name__ == "__main__":
    app.run(main)
