"""Times `kif_jax.fuse` (jitted, after warm-up) at T5-large's LoRA size and at 100M values.

Usage: python bench/bench_fuse.py [--sizes t5-large,100m] [--methods exact,bisect] [--repeats 5]
Prints, per size and method: median and best milliseconds per call, and parameter values per second.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax

import kif_jax

# name -> (number of modules, values per LoRA factor); each module has a `lora_a` and a `lora_b`.
SIZES: dict[str, tuple[int, int]] = {
    "t5-large": (144, 8192),  # 24 enc self + 24 dec self + 24 dec cross, q and v: 144 x 2 x (1024 x 8)
    "100m": (100, 500_000),  # 100 modules x 2 factors x 500k = 100M values
}


def make_tree(modules: int, per_factor: int, key: jax.Array) -> dict:
    """A LoRA-shaped tree of float32 uniform values, laid out [rank 8, per_factor / 8] per factor."""
    keys = iter(jax.random.split(key, 2 * modules))
    return {
        f"m{i:03d}": {name: jax.random.uniform(next(keys), (8, per_factor // 8)) for name in ("lora_a", "lora_b")}
        for i in range(modules)
    }


def bench(size: str, method: str, repeats: int, scope: str) -> tuple[int, float, float]:
    """Returns (values, median seconds, best seconds) of one jitted `fuse` call."""
    modules, per_factor = SIZES[size]
    trees = [make_tree(modules, per_factor, jax.random.key(s)) for s in range(5)]
    fuse = jax.jit(functools.partial(kif_jax.fuse, method=method, scope=scope))
    jax.block_until_ready(fuse(*trees))  # warm-up: compile and one run
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fuse(*trees))
        times.append(time.perf_counter() - t0)
    n = sum(x.size for x in jax.tree.leaves(trees[0]))
    del trees
    return n, statistics.median(times), min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="t5-large,100m", help=f"comma-separated, of {sorted(SIZES)}")
    ap.add_argument("--methods", default="exact,bisect", help="comma-separated, of exact, bisect")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per size and method (100m: at most 2)")
    ap.add_argument("--scope", default="global", help="threshold scope: global, per_tensor, per_factor")
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, scope {args.scope}")
    print(f"{'size':>9} {'values':>11} {'method':>7} {'median ms':>10} {'best ms':>9} {'values/s':>10}")
    for size in args.sizes.split(","):
        for method in args.methods.split(","):
            repeats = args.repeats if SIZES[size][1] < 1_000_000 else min(args.repeats, 2)
            n, med, best = bench(size, method, repeats, args.scope)
            print(f"{size:>9} {n:>11,} {method:>7} {med * 1e3:>10.1f} {best * 1e3:>9.1f} {n / med:>10.3g}", flush=True)


if __name__ == "__main__":
    main()
