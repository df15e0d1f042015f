"""The dense matmuls of SmolLM2-135M decoding, alone: XLA's CPU kernels (default and Eigen) against PyTorch's.

Usage: python bench/bench_gemm.py [--repeats 7] [--batch 32] [--prompt-len 256]

bench_decode.py times whole generate calls; this asks how much of a call's time its dense matmuls need on
each side, so that a gap between the sides can be put on the kernels or on everything else. Shapes are
SmolLM2-135M's (hidden 576, MLP 1536, 3 key/value heads of 64, vocabulary 49152), each with the layout its
side keeps the weight in:
  - prefill: M = batch x (prompt-len - 1) rows (kif_jax reads the prompt but its last token into the cache)
    through q/o (576 -> 576), k/v (576 -> 192), gate/up (576 -> 1536) and down (1536 -> 576);
  - one decoding step: M = batch rows through the same, and the tied output head (576 -> 49152, the
    embedding [V, D] as it is stored).
Sides, alternated shape by shape after a warm-up, float32, the same input values:
  - jax: `x @ w` with w [in, out] as kif_jax's Dense keeps it, jitted with XLA's default CPU kernels
    (YNNPACK for dots in this jaxlib);
  - jax, Eigen: the same program compiled with `xla_cpu_experimental_ynn_fusion_type` empty (a per-jit
    compiler option; XLA's dots then run on Eigen). kif_jax does not use it: it would move the last bits of
    every committed record;
  - torch: `torch.nn.functional.linear(x, w)` with w [out, in] as nn.Linear keeps it, its default threads,
    inference mode.
A step's small matmuls carry each side's per-call overhead from Python, which a jitted decoding loop does not
pay: its sums are upper bounds for jax. Printed: each shape's median time and GFLOP/s per side, the largest difference from the jax result
relative to its largest magnitude, and each side's total over one prefill and one decoding step (30
layers: 2 x q/o, 2 x k/v, 2 x gate/up, 1 x down a layer, plus the head in a step).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_decode import alternate, conditions, cpu_model  # noqa: E402

HIDDEN, MLP, KV, VOCAB, LAYERS = 576, 1536, 192, 49152, 30
# (name, in, out, uses per layer); the head is once a step.
PROJECTIONS = (("q/o", HIDDEN, HIDDEN, 2), ("k/v", HIDDEN, KV, 2), ("gate/up", HIDDEN, MLP, 2), ("down", MLP, HIDDEN, 1))
EIGEN = {"xla_cpu_experimental_ynn_fusion_type": ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=256)
    args = parser.parse_args()

    import torch

    conditions("before")
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; CPU {cpu_model()}, {os.cpu_count()} logical cores")
    matmul = jax.jit(lambda x, w: x @ w)
    matmul_eigen = jax.jit(lambda x, w: x @ w, compiler_options=EIGEN)
    head = jax.jit(lambda x, e: x @ e.T)
    head_eigen = jax.jit(lambda x, e: x @ e.T, compiler_options=EIGEN)
    rng = np.random.default_rng(0)
    shapes = [("prefill", name, args.batch * (args.prompt_len - 1), n_in, n_out, LAYERS * uses)
              for name, n_in, n_out, uses in PROJECTIONS]
    shapes += [("step", name, args.batch, n_in, n_out, LAYERS * uses) for name, n_in, n_out, uses in PROJECTIONS]
    shapes.append(("step", "head", args.batch, HIDDEN, VOCAB, 1))
    sides = ("jax", "jax, Eigen", "torch")
    totals = {(phase, side): 0.0 for phase in ("prefill", "step") for side in sides}
    print(f"\n{'phase':8s} {'matmul':8s} {'M x K x N':>20s} | " + " | ".join(f"{s:>20s}" for s in sides)
          + " | max diff vs jax (relative)")
    with torch.inference_mode():
        for phase, name, m, n_in, n_out, count in shapes:
            x = rng.standard_normal((m, n_in), np.float32)
            w = rng.standard_normal((n_out, n_in) if name == "head" else (n_in, n_out), np.float32) / np.float32(np.sqrt(n_in))
            xj, wj = jax.device_put(x), jax.device_put(w)
            xt = torch.from_numpy(x)
            wt = torch.from_numpy(np.ascontiguousarray(w if name == "head" else w.T))  # nn.Linear's [out, in]
            jf, ef = (head, head_eigen) if name == "head" else (matmul, matmul_eigen)
            runs = [lambda: jf(xj, wj).block_until_ready(), lambda: ef(xj, wj).block_until_ready(),
                    lambda: torch.nn.functional.linear(xt, wt)]
            outs = [np.asarray(jf(xj, wj)), np.asarray(ef(xj, wj)), torch.nn.functional.linear(xt, wt).numpy()]
            scale = float(np.abs(outs[0]).max())
            diffs = [float(np.abs(o - outs[0]).max()) / scale for o in outs[1:]]
            alternate(runs, 1)  # warm-up
            times = [statistics.median(t) for t in alternate(runs, args.repeats)]
            flop = 2.0 * m * n_in * n_out
            for side, t in zip(sides, times):
                totals[phase, side] += count * t
            cells = " | ".join(f"{1e3 * t:8.2f} ms {flop / t / 1e9:5.0f} GF/s" for t in times)
            print(f"{phase:8s} {name:8s} {f'{m} x {n_in} x {n_out}':>20s} | {cells} | "
                  + ", ".join(f"{d:.1e}" for d in diffs))
    print("\ndense matmuls of one prefill and of one decoding step (30 layers; the step with the head), summed:")
    for phase in ("prefill", "step"):
        print(f"  {phase:8s} " + " | ".join(f"{side}: {totals[phase, side] * (1 if phase == 'prefill' else 1e3):.3f}"
                                            f"{' s' if phase == 'prefill' else ' ms'}" for side in sides))
    conditions("after")


if __name__ == "__main__":
    main()
