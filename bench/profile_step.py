"""Where a kif_jax training step spends its time: jax.profiler trace + the optimized HLO, per op.

Usage: python bench/profile_step.py [--shape smollm2|t5-small|tiny] [--steps 1] [--top 20] [--keep DIR]

Runs the same step as bench_vs_torch.py (Programs.run_cycle, one SeqLoRA step, the reference's
dropout), warms it up, traces `--steps` steps with `jax.profiler` (perfetto JSON) while XLA dumps the
optimized HLO, and prints where the time goes:
  - by op kind: the HLO instructions the CPU runtime executed, their numeric suffix dropped
    (ynn_fusion = matmuls through YNNPACK, with whatever XLA fused into them; *_fusion = loops);
  - the matmuls by shape (output <- operands, contraction dims);
  - everything else by the jax operation it came from (the HLO's op_name metadata) and its shape.
Times are fair shares of wall time: when k ops run at once on the runtime's threads, each gets 1/k of
that interval, so the shares add up to the time anything was running. The figures are relative; on a
shared machine the absolute times stretch. `--shape tiny` is a seconds-long smoke test.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

_DUMP = tempfile.mkdtemp(prefix="kif_profile_hlo_")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={_DUMP} --xla_dump_hlo_as_text".strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_vs_torch import kif_jax_step, make_batch  # noqa: E402

from kif_jax import models  # noqa: E402

_SKIP = ("ThunkExecutor", "Slinky", "end:", "while")


def build(shape: str):
    """(model, family, batch) of the bench's shapes; `tiny` is a random 2-layer decoder."""
    lora = models.LoRAConfig(rank=8, alpha=32.0, dropout=0.05, targets=("q_proj", "v_proj"))
    if shape == "t5-small":
        model = models.T5(models.preset("t5-small"), lora=models.LoRAConfig(rank=8, alpha=32.0, dropout=0.05),
                          rngs=nnx.Rngs(0))
        lengths = (256, 8)
    elif shape == "smollm2":
        model = models.from_pretrained(models.loading.resolve_model_source("smollm2-135m-instruct-q4"), lora=lora)
        lengths = (184, 8)
    else:
        config = models.DecoderConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        model = models.DecoderLM(config, lora=lora, rngs=nnx.Rngs(0))
        lengths = (24, 8)
    family = models.family_of(model)
    causal = isinstance(family, models.CausalFamily)
    batch = make_batch(np.random.default_rng(0), causal, 8, *lengths, model.config.vocab_size)
    return model, family, batch


def op_events(trace_dir: str) -> list[tuple[float, float, str]]:
    """(start, end, HLO name) of every op the XLA runtime threads executed."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
            if e.get("ph") == "X" and "XLA" in threads.get((e["pid"], e["tid"]), "")
            and not e["name"].startswith(_SKIP)]


def fair_shares(ops: list[tuple[float, float, str]]) -> tuple[dict[str, float], float]:
    """Each op's share of wall time (k ops running at once get 1/k each), and the busy wall time (us)."""
    edges = sorted([(s, 1, n) for s, _, n in ops] + [(t, -1, n) for _, t, n in ops])
    running: collections.Counter = collections.Counter()
    share: dict[str, float] = collections.defaultdict(float)
    last, busy = None, 0.0
    for ts, delta, name in edges:
        if last is not None and running:
            k = sum(running.values())
            busy += ts - last
            for n, c in running.items():
                share[n] += (ts - last) * c / k
        last = ts
        running[name] += delta
        if running[name] == 0:
            del running[name]
    return share, busy


def hlo_index(hlo: str) -> tuple[dict[str, tuple[str, str, str]], dict[str, str]]:
    """name -> (shape, op_name metadata, rest of line) of every instruction; computation name -> body."""
    instructions = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (.*)$", hlo, re.M):
        meta = re.search(r'op_name="([^"]+)"', m.group(3))
        instructions[m.group(1)] = (m.group(2), meta.group(1) if meta else "?", m.group(3))
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%?([\w.\-]+) .*?\{\n(.*?)\n\}", hlo, re.M | re.S)}
    return instructions, bodies


def describe_dot(body: str) -> str | None:
    """'out <- lhs, rhs (contracting ...)' of the first dot in a fused computation, if any."""
    m = re.search(r"= (\S+) dot\(([^)]*)\),? ?(.*?)(?:, metadata|$)", body, re.M)
    if not m:
        return None
    operands = re.findall(r"(\w+\[[\d,]*\])", m.group(2))
    dims = re.sub(r"lhs_|rhs_", "", " ".join(re.findall(r"\w+_dims=\{[\d,]*\}", m.group(3))))
    if not operands:  # operands named without shapes: look the parameters up
        operands = re.findall(r"= (\w+\[[\d,]*\])\{?[\d,]*\}? parameter\(", body)[:2]
    return f"{m.group(1).split('{')[0]} <- {', '.join(operands)} ({dims})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("smollm2", "t5-small", "tiny"), default="smollm2")
    parser.add_argument("--steps", type=int, default=1, help="traced steps (after 2 warm-up steps)")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--keep", default=None, help="keep the trace here (default: a temporary folder)")
    args = parser.parse_args()

    model, family, batch = build(args.shape)
    step, _, _ = kif_jax_step(model, family, batch)
    step(), step()
    trace_dir = args.keep or tempfile.mkdtemp(prefix="kif_profile_trace_")
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
            step()
    wall = time.perf_counter() - start

    shares, busy = fair_shares(op_events(trace_dir))
    hlo_files = glob.glob(os.path.join(_DUMP, "*run_cycle*cpu_after_optimizations.txt"))
    instructions, bodies = hlo_index(open(hlo_files[0]).read()) if hlo_files else ({}, {})
    print(f"{args.shape}: {args.steps} traced step(s) in {wall:.2f} s wall; ops busy {busy / 1e6:.2f} s "
          f"(fair shares; HLO {'found' if hlo_files else 'not found'})")

    def table(title: str, groups: dict[str, float], counts: collections.Counter) -> None:
        print(f"\n{title}")
        for key, t in sorted(groups.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {t / 1e3:9.1f} ms {100 * t / busy:5.1f}%  x{counts[key]:<4d} {key}")

    kinds, kind_n = collections.defaultdict(float), collections.Counter()
    dots, dot_n = collections.defaultdict(float), collections.Counter()
    others, other_n = collections.defaultdict(float), collections.Counter()
    for name, t in shares.items():
        kind = re.sub(r"[._]\d+$", "", name)
        kinds[kind] += t
        kind_n[kind] += 1
        shape, op_name, rest = instructions.get(name, ("?", "?", ""))
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        dot = describe_dot(bodies.get(called.group(1), "")) if called else None
        if dot:
            dots[dot] += t
            dot_n[dot] += 1
        else:
            key = f"{re.sub(r'^.*closed_call/', '', op_name)[:70]}  {shape.split('{')[0]}"
            others[key] += t
            other_n[key] += 1
    table("by op kind", kinds, kind_n)
    table("matmuls by shape", dots, dot_n)
    table("everything else, by the jax operation it came from", others, other_n)


if __name__ == "__main__":
    main()
