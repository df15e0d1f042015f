"""Record every method's results on the tiny test config, for tests/test_method_golden.py.

    python tools/make_method_golden.py [--out tests/fixtures/method_golden.json] [--methods a,b]

Runs `tests/tiny_config.py` with each method under the test suite's XLA settings (tests/conftest.py:
LLVM optimisation level 0, 8 virtual CPU devices, one used) and writes, per method, the accuracy
matrix, every metrics.jsonl record without its timing fields, and predictions.jsonl, with the jax
version and CPU they were recorded on (XLA:CPU's float results follow them). The file
committed under tests/fixtures/ was written with the code before the methods package (commit
5a3571e), so the test checks that the refactor left every method's numbers as they were.
"""
import argparse
import json
import os
import pathlib
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def record_methods(methods: list[str], workdir: pathlib.Path, config_module) -> dict:
    """{method: its accuracy matrix, metrics.jsonl records without timing fields, predictions.jsonl records}."""
    from helpers import comparable_records, read_metrics
    from kif_jax.train import train_and_evaluate

    config = config_module.get_config()
    config.methods = ",".join(methods)
    results = train_and_evaluate(config, workdir)
    golden = {}
    for name in methods:
        golden[name] = {
            "accuracy_matrix": results[name]["accuracy_matrix"],
            "records": comparable_records(workdir / name / "metrics.jsonl"),
            "predictions": read_metrics(workdir / name / "predictions.jsonl"),
        }
    return golden


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "tests" / "fixtures" / "method_golden.json"))
    parser.add_argument("--methods", default="recurrent_kif,static_importance,no_identification,global_merge,"
                                               "no_share,adaptive,seq_lora,replay,mtl,o_lora,tasl,ewc,migu")
    args = parser.parse_args()
    import tiny_config

    with tempfile.TemporaryDirectory() as tmp:
        golden = record_methods(args.methods.split(","), pathlib.Path(tmp), tiny_config)
    from helpers import float_environment

    out = pathlib.Path(args.out)
    existing = json.loads(out.read_text()) if out.exists() else {"environment": float_environment(), "methods": {}}
    if existing["environment"] != float_environment():
        print(f"error: {out} was recorded with {existing['environment']}; this machine is {float_environment()}; "
              "record every method afresh (a new --out) rather than mix machines", file=sys.stderr)
        return 2
    existing["methods"].update(golden)
    out.write_text(json.dumps(existing, indent=1, sort_keys=True) + "\n")
    print(f"wrote {', '.join(golden)} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
