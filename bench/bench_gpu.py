"""One LoRA training step of a t5-large and a LLaMA-2-7B shape on one GPU: kif_jax vs PyTorch + peft, alternated.

Usage: python bench/bench_gpu.py [--shape t5-large|llama2-7b|both] [--batch 8] [--seq 1024] [--target 128]
                                 [--steps 10] [--remat none|full|dots|dots_with_no_batch_dims]
                                 [--dtype bfloat16|float32] [--no-dropout] [--no-torch] [--tiny]

The GPU counterpart of bench/bench_vs_torch.py (whose helpers it imports: FLOP counts, batches, the
torch + peft peer built from kif_jax's own `save_pretrained` / `save_adapter`, the float32 matmul
roofline); everything it adds is what a GPU needs:
  shapes   t5-large: the original T5-large (d_model 1024, d_kv 64, 16 heads, d_ff 4096 ReLU, 24 + 24
           layers, vocab 32128), batch x (seq input + target) tokens, teacher-forced decoder.
           llama2-7b: LLaMA-2-7B (hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000,
           `kif_jax.models.decoder.PRESET_CONFIGS`), batch x seq tokens, the loss on the last `target`.
           Random weights in both (no checkpoint is read); LoRA r 8, alpha 32 on q, v (T5) / q_proj,
           v_proj (LLaMA); AdamW lr 3e-4, no weight decay, clipping at norm 1.0 in both.
  dtypes   base weights and compute bf16 (kif_jax: `dtype=param_dtype=bfloat16`, as `model.dtype:
           bfloat16` builds it; its adapters stay float32 and are cast to bf16 for their matmuls);
           torch: the same weights as bf16 on cuda, the LoRA factors float32 (peft computes the adapter
           path in float32), TF32 allowed for any float32 matmul.
  remat    kif_jax's `train.remat` policy (`set_remat`, per layer); torch gets transformers' gradient
           checkpointing (per layer, everything recomputed) for any policy but "none". Default: "none"
           for t5-large, "full" for llama2-7b (8 x 1024 tokens of a 7B model do not fit otherwise,
           and both sides share the device's memory).
  memory   jax is told not to preallocate (XLA_PYTHON_CLIENT_PREALLOCATE=false unless already set) so
           torch can allocate beside it; peaks are jax's `device.memory_stats()["peak_bytes_in_use"]`
           (since the process started, so a later shape shows max(earlier, its own)) and torch's
           `torch.cuda.max_memory_allocated()` (reset per shape). What the batch needs is the sum of both
           sides' peaks (jax keeps its pool); --no-torch measures kif_jax alone.
If peft is not installed the torch side is skipped (one line says so) and kif_jax is measured alone.

Steps are alternated (jax, torch, jax, ...) after a warm-up each (jax's includes compiling); each is
timed to its loss on the host (a device sync). Printed per side: median s/step, tokens/s, achieved
TFLOP/s, MFU and the peak memory; then the speed ratio kif_jax / torch.

FLOPs of a step (the same count for both sides, `t5_flops` / `decoder_flops` of bench_vs_torch; a
multiply-add is 2 FLOPs): step = 2 * F_dense + 3 * F_attn, where F_dense is the forward FLOPs of every
frozen matmul (each projection over the rows it sees, the output head over the labelled positions)
and the backward through a frozen matmul computes only its input gradient (one more F_dense), and
F_attn is the forward FLOPs of the two attention matmuls (q k^T and probs v, causal ones in full)
whose backward differentiates both operands (two more F_attn). LoRA matmuls, norms, softmax, the
optimizer and any rematerialised recomputation are not counted (MFU counts useful work only).
MFU = step FLOPs / step time / peak, the peak from a table by device name (H100 and H200: 989 TFLOP/s
dense bf16; A100: 312), or, on a device not in the table (the CPU of a --tiny run), the measured
float32 matmul roofline of bench_vs_torch.

--tiny shrinks both models to 2 layers of width 64 (vocabularies kept) and the batch to 2 x (32 + 8)
tokens, float32 unless --dtype is given, so the script can be smoke-tested on a CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch allocates beside jax

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_vs_torch import (  # noqa: E402
    decoder_flops, kif_jax_step, make_batch, matmul_roofline, t5_flops, torch_peer, torch_peer_step)

from kif_jax import models  # noqa: E402
from kif_jax.models.decoder import PRESET_CONFIGS  # noqa: E402
from kif_jax.models.layers import REMAT_POLICIES, set_remat  # noqa: E402

#: dense bf16 peak FLOP/s by a substring of the device name (jax's device_kind / torch's device name).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops(device_kind: str) -> tuple[float | None, str]:
    for name, peak in PEAK_BF16.items():
        if name.lower() in device_kind.lower():
            return peak, f"{name} dense bf16 table value"
    return None, ""


def jax_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def build(shape: str, args: argparse.Namespace, dtype) -> tuple[nnx.Module, object, float, int, int, int, str]:
    """The kif_jax model, its config, the step FLOPs, batch, input and target lengths, and a description."""
    lora_dropout = 0.0 if args.no_dropout else 0.05
    if shape == "t5-large":
        config = models.preset("t5-large")
        if args.tiny:
            config = dataclasses.replace(config, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                                         num_decoder_layers=2)
        if args.no_dropout:
            config = dataclasses.replace(config, dropout_rate=0.0)
        lora = models.LoRAConfig(rank=8, alpha=32.0, dropout=lora_dropout, targets=("q", "v"))
        model = models.T5(config, lora=lora, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
        input_len, target_len = args.seq, args.target
        flops = t5_flops(config, args.batch, input_len, target_len)
    else:
        config = PRESET_CONFIGS["llama-2-7b"]
        if args.tiny:
            config = dataclasses.replace(config, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4)
        lora = models.LoRAConfig(rank=8, alpha=32.0, dropout=lora_dropout, targets=("q_proj", "v_proj"))
        model = models.DecoderLM(config, lora=lora, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
        input_len, target_len = args.seq - args.target, args.target
        flops = decoder_flops(config, args.batch, args.seq, target_len)
    what = f"{shape}{' (tiny)' if args.tiny else ''} shape, random weights"
    return model, config, flops, args.batch, input_len, target_len, what


def torch_gpu_peer(model: nnx.Module, causal: bool, dropout: bool, dtype, remat: str, device):
    """bench_vs_torch's peer (read as float32) with its base weights cast to `dtype`, LoRA float32, on `device`."""
    import torch

    peer = torch_peer(model, causal, dropout)
    tdtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
    for name, p in peer.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(tdtype)
    peer.to(device)
    if remat != "none":
        peer.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peer.base_model.model.config.use_cache = False
    return peer


def run_shape(shape: str, args: argparse.Namespace, peak: float, peak_what: str, with_torch: bool) -> None:
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    remat = args.remat or ("full" if shape == "llama2-7b" and not args.tiny else "none")
    jax_peak_before = jax_peak_bytes()
    model, config, flops, batch, input_len, target_len, what = build(shape, args, dtype)
    set_remat(model, remat)
    family = models.family_of(model)
    causal = isinstance(family, models.CausalFamily)
    b = make_batch(np.random.default_rng(0), causal, batch, input_len, target_len, config.vocab_size)
    tokens = batch * (input_len + target_len)

    jax_step, jax_loss0, n_lora = kif_jax_step(model, family, b)

    print(f"\n{shape}: {what}; {args.dtype} compute and base weights, float32 LoRA ({n_lora:,} values); "
          f"batch {batch} x ({input_len} + {target_len}) tokens; remat {remat}; "
          f"dropout {'off in both' if args.no_dropout else 'as the reference (LoRA 0.05)'}")
    print(f"  step FLOPs {flops / 1e9:,.1f} G (2 x dense + 3 x attention, see docstring)")

    torch_step = None
    if with_torch:
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        peer = torch_gpu_peer(model, causal, not args.no_dropout, dtype, remat, device)
        torch_step, torch_loss0, _ = torch_peer_step(peer, b, device)
        # bf16 runs of two stacks agree only loosely; float32 ones must agree as in bench_vs_torch.
        tol = (1e-3 if dtype == jnp.float32 else 3e-2) * max(1.0, abs(torch_loss0))
        diff = abs(jax_loss0 - torch_loss0)
        print(f"  first-step loss, dropout off: kif_jax {jax_loss0:.5f}  torch {torch_loss0:.5f}  "
              f"(|diff| {diff:.1e}{'' if diff <= tol else ', MISMATCH'})")
        if dtype == jnp.float32 and not diff <= tol:
            raise SystemExit("the two sides do not compute the same function")
    else:
        print(f"  first-step loss, dropout off: kif_jax {jax_loss0:.5f}")

    start = time.perf_counter()
    jax_train0 = jax_step()
    compile_s = time.perf_counter() - start
    line = f"  first training step's loss: kif_jax {jax_train0:.5f}"
    if torch_step is not None:
        start = time.perf_counter()
        line += f"  torch {torch_step():.5f}"
        line += f" (torch warm-up {time.perf_counter() - start:.1f} s)"
    print(line + f"; kif_jax first call incl. compile {compile_s:.1f} s")

    jt, tt = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        jax_step()
        jt.append(time.perf_counter() - start)
        if torch_step is not None:
            start = time.perf_counter()
            torch_step()
            tt.append(time.perf_counter() - start)

    jax_peak = jax_peak_bytes()
    mem = {"kif_jax": gib(jax_peak) + (" (<= an earlier shape's)" if jax_peak is not None and
                                        jax_peak == jax_peak_before else "")}
    rows = [("kif_jax", statistics.median(jt), jt)]
    if torch_step is not None:
        import torch

        mem["torch+peft"] = gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else "n/a"
        rows.append(("torch+peft", statistics.median(tt), tt))
    for name, s, _ in rows:
        achieved = flops / s
        print(f"  {name:11s} {s:8.4f} s/step  {tokens / s:10,.0f} tokens/s  {achieved / 1e12:8.3g} TFLOP/s  "
              f"MFU {100 * achieved / peak:5.1f}%  peak memory {mem[name]}")
    if torch_step is not None:
        j, t = rows[0][1], rows[1][1]
        pair = statistics.median(b_ / a_ for a_, b_ in zip(jt, tt))
        print(f"  speed ratio kif_jax / torch: {t / j:.2f}x (ratio of medians), {pair:.2f}x (median of "
              f"{args.steps} pairs)")
    print("  per-step s: " + "; ".join(f"{name} {[round(x, 4) for x in ts]}" for name, _, ts in rows)
          + f" (MFU against {peak / 1e12:.3g} TFLOP/s, {peak_what})")

    if torch_step is not None:
        import torch

        del peer, torch_step  # the step's closure holds the optimizer and the batch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("t5-large", "llama2-7b", "both"), default="both")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default 8; --tiny 2)")
    parser.add_argument("--seq", type=int, default=None,
                        help="T5: input tokens; LLaMA: tokens per row, target included (default 1024; --tiny 32)")
    parser.add_argument("--target", type=int, default=None,
                        help="labelled tokens per row: T5's decoder length, LLaMA's last tokens "
                             "(default 128; --tiny 8)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side (alternated)")
    parser.add_argument("--remat", choices=tuple(REMAT_POLICIES), default=None,
                        help="kif_jax train.remat policy (torch: gradient checkpointing unless none); "
                             "default none for t5-large, full for llama2-7b")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="compute and base-weight dtype (default bfloat16; --tiny float32)")
    parser.add_argument("--no-dropout", action="store_true", help="dropout off in both (default: the reference's)")
    parser.add_argument("--no-torch", action="store_true", help="measure kif_jax alone")
    parser.add_argument("--tiny", action="store_true", help="2 layers of width 64: a CPU smoke test")
    args = parser.parse_args()
    args.batch = args.batch or (2 if args.tiny else 8)
    args.target = args.target or (8 if args.tiny else 128)
    args.seq = args.seq or (32 if args.tiny else 1024)
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    if args.shape != "t5-large" and args.seq <= args.target:
        parser.error("--seq must exceed --target for llama2-7b (the sequence includes the target)")

    with_torch = not args.no_torch
    torch_line = ""
    if with_torch and importlib.util.find_spec("peft") is None:
        print("peft is not installed: the torch side is skipped, kif_jax is measured alone")
        with_torch = False
    if with_torch:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        tdev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
        torch_line = f"; torch {torch.__version__} on {tdev}"

    kind = jax.devices()[0].device_kind
    peak, peak_what = peak_flops(kind)
    if peak is None:
        peak = matmul_roofline() * 1e9
        peak_what = "measured float32 matmul roofline (device not in the table)"
    print(f"device: {kind} ({jax.default_backend()}) x{jax.device_count()}{torch_line}; "
          f"peak {peak / 1e12:.3g} TFLOP/s ({peak_what})")
    for shape in (("t5-large", "llama2-7b") if args.shape == "both" else (args.shape,)):
        run_shape(shape, args, peak, peak_what, with_torch)
        gc.collect()  # the shape's arrays go before the next is built


if __name__ == "__main__":
    main()
