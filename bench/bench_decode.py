"""Batched greedy decoding: kif_jax (KV cache, jitted loop) against transformers' `generate` in PyTorch, alternated.

Usage: python bench/bench_decode.py [--repeats 5] [--batch 32] [--prompt-len 256] [--new-tokens 64]
       [--torch-threads default[,1]] [--phase-repeats N | --no-phases] [--model smollm2-135m-instruct-q4]
       [--data ../shared/superni_benchmark/test]

Both sides hold the same weights: SmolLM2-135M-Instruct's (`from_pretrained("smollm2-135m-instruct-q4")`,
the Q4_1 GGUF dequantized to float32), handed to transformers' `LlamaForCausalLM` by kif_jax's own
`save_pretrained` (bench/hf_peer.py). Every figure is float32 on the CPU (or jax's default device);
torch uses its default thread count (`--torch-threads default,1` adds a 1-thread side: on a CPU shared
with other busy processes, torch's default of one thread per core can be far slower than one thread).

Prompts: `--batch` real texts, each a SuperNI test instance ("<task definition>\\n\\nInput: <input>\\nOutput:",
read at run time from `--data`, tasks in sorted order, taken round-robin), tokenized with the model's
tokenizer (its GGUF metadata); the first whose length lies in [prompt-len - 32, prompt-len] are kept and
LEFT-padded to `--prompt-len` (`decoder_generate.pad_left`; the same ids and mask go to both sides).

Decoding: greedy, at most `--new-tokens` new tokens, the same stop rule on both sides: a row that
produced one of the config's EOS ids gets the pad id after it, and the loop stops once every row has
(kif_jax's `greedy_decode_lm`; transformers' `generate` with the same eos and pad ids). The script
prints how many steps ran (the new tokens counted below are batch x steps) and checks the generated ids
of the two sides for equality, row by row.

Timing: the sides are alternated (kif_jax, torch, kif_jax, ...) after a warm-up each (kif_jax's is a
whole call, compiling included; torch's generates 2 tokens), so machine drift hits every side. The ids
are compared on the first timed round, and each side's on every timed call against its first. Printed
are the median wall times of the whole generate call (prefill included, ids back on the host),
tokens/s = batch x new tokens / that time, and the speed ratio (kif_jax tokens/s / torch tokens/s:
ratio of medians, and median of per-round ratios). Unless --no-phases, a second alternated run
generates one token only (prefill: kif_jax reads the prompt but its last token into the cache and runs
one cached step, transformers reads the whole prompt), and per-token decode time is
(whole - prefill) / (steps - 1). The conditions (versions, CPU, threads, load average and the busiest
other processes, before and after) are printed too.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_peer import transformers_peer  # noqa: E402  (bench/hf_peer.py)
from kif_jax import models  # noqa: E402
from kif_jax.models.decoder.generate import greedy_decode_lm, pad_left  # noqa: E402
from kif_jax.models.tokenizers import load_tokenizer  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "superni_benchmark",
                            "test")


def superni_prompts(data_dir: str, tokenizer: Any, n: int, length: int, slack: int = 32) -> list[list[int]]:
    """`n` token rows of length in [length - slack, length] from SuperNI test instances, round-robin over tasks."""
    files = sorted(glob.glob(os.path.join(data_dir, "*.json")))
    if not files:
        raise SystemExit(f"no SuperNI task files in {data_dir} (--data)")
    tasks = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            task = json.load(f)
        definition = " ".join(task["Definition"])
        texts = [f"{definition}\n\nInput: {x['input']}\nOutput:" for x in task["Instances"]]
        rows = tokenizer.encode_batch(texts, add_special_tokens=True)
        tasks.append([r for r in rows if length - slack <= len(r) <= length])
    picked: list[list[int]] = []
    for i in range(max(map(len, tasks))):
        for rows in tasks:
            if i < len(rows) and len(picked) < n:
                picked.append(rows[i])
    if len(picked) < n:
        raise SystemExit(f"only {len(picked)} SuperNI prompts of {length - slack}..{length} tokens in {data_dir}")
    return picked


def conditions(label: str) -> None:
    """The machine's load average and its busiest processes (other runs share this CPU)."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{label}: load average (1, 5, 15 min) {load}")
    try:
        ps = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu", "--no-headers"], capture_output=True,
                            text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return
    busy = [line for line in ps if line.split(None, 1)[0] != str(os.getpid()) and float(line.split()[1]) >= 5.0]
    for line in busy[:5]:
        print(f"  busy: {line.strip()[:110]}")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def steps_run(tokens: np.ndarray, eos_ids: tuple[int, ...]) -> int:
    """How many loop steps produced `tokens` [B, N]: up to the last row's first EOS (or N)."""
    done = np.isin(tokens, eos_ids)
    ends = np.where(done.any(axis=1), done.argmax(axis=1) + 1, tokens.shape[1])
    return int(ends.max())


def alternate(runs: list[Callable[[], Any]], repeats: int) -> list[list[float]]:
    """Wall times of each `run()` (each must block), called in turn `repeats` times."""
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, t in zip(runs, times):
            start = time.perf_counter()
            run()
            t.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct-q4")
    parser.add_argument("--data", default=DEFAULT_DATA, help="SuperNI test task files (*.json)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per side (alternated)")
    parser.add_argument("--torch-threads", default="default", help="comma-separated torch thread counts, each "
                        "its own alternated side ('default': torch's own; e.g. 'default,1')")
    parser.add_argument("--phase-repeats", type=int, default=None, help="timed prefill-only calls per side "
                        "(default: --repeats)")
    parser.add_argument("--no-phases", action="store_true", help="skip the prefill-only run")
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import GenerationConfig

    conditions("before")
    print(f"jax {jax.__version__} (devices: {jax.devices()[0].device_kind} x{jax.device_count()}), "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, transformers {transformers.__version__}; "
          f"CPU {cpu_model()}, {os.cpu_count()} logical cores")

    model = models.from_pretrained(models.loading.resolve_model_source(args.model))
    cfg = model.config
    tokenizer = load_tokenizer(args.model)
    rows = superni_prompts(args.data, tokenizer, args.batch, args.prompt_len)
    ids, mask = pad_left(rows, args.prompt_len, pad_id=cfg.pad_token_id)
    lengths = [len(r) for r in rows]
    print(f"model {args.model} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}), "
          f"float32; batch {args.batch} x {args.prompt_len} tokens, left-padded (real lengths {min(lengths)}-"
          f"{max(lengths)}, mean {np.mean(lengths):.0f}); up to {args.new_tokens} new tokens, greedy; stop rule on "
          f"both: EOS {list(cfg.eos_token_ids)} kept, pad {cfg.pad_token_id} after, the loop ends when every row has")

    hf = transformers_peer(model).eval()
    t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
    default_threads = torch.get_num_threads()
    threads = [default_threads if x == "default" else int(x) for x in args.torch_threads.split(",")]

    def gen_config(new_tokens: int) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=0, do_sample=False, num_beams=1,
                                eos_token_id=list(cfg.eos_token_ids), pad_token_id=cfg.pad_token_id,
                                bos_token_id=cfg.bos_token_id, use_cache=True)

    def jax_run(new_tokens: int) -> Callable[[], np.ndarray]:
        return lambda: np.asarray(greedy_decode_lm(model, ids, mask, max_new_tokens=new_tokens))

    def torch_run(new_tokens: int, n_threads: int) -> Callable[[], np.ndarray]:
        config = gen_config(new_tokens)

        def run() -> np.ndarray:
            torch.set_num_threads(n_threads)
            with torch.inference_mode():
                out = hf.generate(input_ids=t_ids, attention_mask=t_mask, generation_config=config)
            new = out[:, args.prompt_len:].numpy().astype(np.int32)
            if new.shape[1] < new_tokens:  # generate stops when every row is done; kif_jax pads to the width
                new = np.pad(new, ((0, 0), (0, new_tokens - new.shape[1])), constant_values=cfg.pad_token_id)
            return new

        return run

    def sides(new_tokens: int) -> dict[str, Callable[[], np.ndarray]]:
        out = {"kif_jax": jax_run(new_tokens)}
        for n_threads in threads:
            label = "default" if n_threads == default_threads else "set"
            out[f"torch, {n_threads} thread{'s' * (n_threads > 1)} ({label})"] = torch_run(new_tokens, n_threads)
        return out

    n = args.new_tokens
    start = time.perf_counter()
    jax_run(n)()
    compile_s = time.perf_counter() - start
    warm = []
    for n_threads in threads:
        start = time.perf_counter()
        torch_run(2, n_threads)()
        warm.append(f"{time.perf_counter() - start:.1f} s ({n_threads} threads)")
    print(f"warm-up: kif_jax's first call incl. compile {compile_s:.1f} s; torch generating 2 tokens {', '.join(warm)}")

    runs = sides(n)
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in runs}

    def keep(name: str, run: Callable[[], np.ndarray]) -> Callable[[], None]:
        return lambda: outputs[name].append(run())

    times = dict(zip(runs, alternate([keep(name, run) for name, run in runs.items()], args.repeats)))
    jax_tokens = outputs["kif_jax"][0]
    steady = all(np.array_equal(x, side[0]) for side in outputs.values() for x in side)
    steps = steps_run(jax_tokens, cfg.eos_token_ids)
    stopped = np.isin(jax_tokens, cfg.eos_token_ids).any(axis=1)
    for name, out in outputs.items():
        if name == "kif_jax":
            continue
        other = out[0]
        same_rows = int(np.sum(np.all(jax_tokens == other, axis=1)))
        print(f"generated ids, kif_jax vs {name}: {same_rows}/{args.batch} rows identical"
              + ("" if same_rows == args.batch else ", first differing positions "
                 + str([int(np.argmax(a != b)) for a, b in zip(jax_tokens, other) if np.any(a != b)]))
              + f"; steps run {steps} (kif_jax) / {steps_run(other, cfg.eos_token_ids)} (torch) of {n}")
    print(f"  every side's ids {'the same' if steady else 'NOT the same'} in each of its timed calls; "
          f"{int(stopped.sum())} rows produced EOS (then pad; every row is still computed at every step)")
    longest = int(np.argmax(np.where(stopped, np.isin(jax_tokens, cfg.eos_token_ids).argmax(axis=1), n)))
    print(f"  e.g. row {longest}: {tokenizer.decode_batch([jax_tokens[longest]])[0][:150]!r}")

    tokens = args.batch * steps
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"\nwhole generate call ({args.batch} x {steps} new tokens, prefill included), medians of {args.repeats}:")
    width = max(map(len, runs))
    for name, s in medians.items():
        print(f"  {name:{width}s} {s:8.3f} s  {tokens / s:8,.1f} new tokens/s  times {[round(x, 2) for x in times[name]]}")
    for name in list(runs)[1:]:
        pair = statistics.median(b / a for a, b in zip(times["kif_jax"], times[name]))
        print(f"  speed ratio kif_jax / {name}: {medians[name] / medians['kif_jax']:.2f}x (ratio of medians), "
              f"{pair:.2f}x (median of {args.repeats} pairs)")

    phase_repeats = args.repeats if args.phase_repeats is None else args.phase_repeats
    if not args.no_phases and steps > 1 and phase_repeats > 0:
        prefill = sides(1)
        prefill["kif_jax"]()  # compiles
        ptimes = dict(zip(prefill, alternate(list(prefill.values()), phase_repeats)))
        print(f"prefill (generate 1 token: the {args.batch} x {args.prompt_len} prompt's forward pass), "
              f"medians of {phase_repeats}; decode per step = (whole - prefill) / {steps - 1}:")
        for name, t in ptimes.items():
            p = statistics.median(t)
            print(f"  {name:{width}s} prefill {p:8.3f} s; decode {1000 * (medians[name] - p) / (steps - 1):7.1f} ms "
                  f"per step ({args.batch} tokens)  prefill times {[round(x, 2) for x in t]}")
    conditions("after")


if __name__ == "__main__":
    main()
