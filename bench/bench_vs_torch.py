"""One LoRA training step in kif_jax and in PyTorch + peft (the reference's stack), alternated in one run.

Usage: python bench/bench_vs_torch.py [--shape t5-small|smollm2|both] [--steps 5] [--no-dropout]

Shapes (LoRA r 8, alpha 32 on the attention's q and v projections; AdamW lr 3e-4, no weight decay,
gradient clipping at norm 1.0 in both):
  t5-small  random t5-small weights, batch 8 x (256 input + 8 target) tokens (teacher-forced decoder).
  smollm2   SmolLM2-135M-Instruct's real weights (`from_pretrained("smollm2-135m-instruct-q4")`, the
            Q4_1 GGUF dequantized to float32), copied into a transformers `LlamaForCausalLM` built from
            the same config; batch 8 x 192 tokens, the loss on the last 8 (prompt + label rows).
Both sides hold the same weights (kif_jax's base weights and adapters are written with its own
`save_pretrained` / `save_adapter` and read by transformers / peft), and the first-step loss of the
two (dropout off) is printed and checked to agree. Dropout is the reference's by default (T5's
dropout_rate 0.1 and LoRA dropout 0.05 in both; SmolLM2 has no attention dropout), or off in both
with --no-dropout. Every figure is float32 on the CPU (or jax's default device); torch uses its
default thread count.

The two steps are alternated (jax, torch, jax, ...) after a warm-up each (jax's includes compiling),
so machine drift hits both; printed are the median step times, tokens/s, the speed ratio (kif_jax
tokens/s / torch tokens/s, ratio of medians and median of per-pair ratios) and the achieved GFLOP/s.

FLOPs of a step (the same count for both sides; a multiply-add is 2 FLOPs):
  step = 2 * F_dense + 3 * F_attn
  F_dense: forward matmuls with frozen weights, 2 * rows * in * out summed over every projection (the
           rows each projection sees: encoder tokens, decoder tokens, or encoder tokens for T5's cross
           keys/values) and the output head over the positions that carry a label; the backward pass
           through a frozen matmul computes only the activation gradient, one more F_dense.
  F_attn:  the two attention matmuls (scores q k^T and probs v), 2 * 2 * B * heads * T * S * head_dim
           per layer (causal ones in full, as both sides compute them); their backward differentiates
           both operands, two more F_attn.
  The LoRA matmuls (rank 8), norms, softmax and the optimizer are left out (under 1%).
The roofline is a float32 [n, n] x [n, n] matmul in jax (the best of 10, measured before and after the
shapes; the higher counts), so "% of roofline" is achieved GFLOP/s over what this device reaches on one
large matmul.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_peer import transformers_peer  # noqa: E402  (bench/hf_peer.py)
from kif_jax import models  # noqa: E402
from kif_jax.methods import Program  # noqa: E402
from kif_jax.train.steps import Programs, init_state, make_task_key  # noqa: E402

LR, CLIP = 3e-4, 1.0


def matmul_roofline(n: int = 3072, repeats: int = 10) -> float:
    """GFLOP/s of a float32 [n, n] @ [n, n] matmul in jax: the best of `repeats` after a warm-up.

    The best, not the median: the roofline is what the device can reach, and a shared CPU's slow
    repeats would lower it and flatter every "% of roofline".
    """
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def t5_flops(cfg, batch: int, s: int, t: int) -> float:
    """FLOPs of one LoRA step of a T5 (see the module docstring)."""
    d, inner, ff = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    ff_mats = 3 if cfg.is_gated else 2
    enc_rows, dec_rows = batch * s, batch * t
    dense = 0.0
    dense += cfg.num_layers * enc_rows * (4 * d * inner + ff_mats * d * ff)  # encoder q, k, v, o and FF
    dense += cfg.num_decoder_layers * dec_rows * (4 * d * inner + 2 * d * inner + ff_mats * d * ff)  # self, cross q/o
    dense += cfg.num_decoder_layers * enc_rows * 2 * d * inner  # cross-attention keys and values
    dense += dec_rows * d * cfg.vocab_size  # head
    attn = 2 * batch * cfg.num_heads * cfg.d_kv * (cfg.num_layers * s * s + cfg.num_decoder_layers * (t * t + t * s))
    return 2 * (2 * dense) + 3 * (2 * attn)


def decoder_flops(cfg, batch: int, length: int, labelled: int) -> float:
    """FLOPs of one LoRA step of a decoder-only LM with `labelled` label positions per row."""
    d, hd = cfg.hidden_size, cfg.head_dim
    per_token = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 3 * d * cfg.intermediate_size
    dense = cfg.num_hidden_layers * batch * length * per_token + batch * labelled * d * cfg.vocab_size
    attn = cfg.num_hidden_layers * 2 * batch * cfg.num_attention_heads * length * length * hd
    return 2 * (2 * dense) + 3 * (2 * attn)


def make_batch(rng: np.random.Generator, causal: bool, batch: int, input_len: int, target_len: int,
               vocab: int) -> dict[str, np.ndarray]:
    """One batch [batch, length] of random tokens (the same for both sides)."""
    if causal:
        ids = rng.integers(3, vocab, size=(batch, input_len + target_len)).astype(np.int32)
        labels = np.where(np.arange(input_len + target_len) >= input_len, ids, -100).astype(np.int32)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}
    ids = rng.integers(3, vocab, size=(batch, input_len)).astype(np.int32)
    labels = rng.integers(3, vocab, size=(batch, target_len)).astype(np.int32)
    dec = np.concatenate([np.zeros_like(labels[:, :1]), labels[:, :-1]], axis=-1)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "decoder_input_ids": dec, "labels": labels}


def torch_peer(model: nnx.Module, dropout: bool):
    """The same model (base weights and adapters) in transformers + peft, in training mode."""
    import torch

    peer = transformers_peer(model, adapter=True, trainable=True)
    if not dropout:
        for m in peer.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    return peer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("t5-small", "smollm2", "both"), default="both")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (alternated)")
    parser.add_argument("--no-dropout", action="store_true", help="dropout off in both (default: the reference's)")
    parser.add_argument("--roofline-n", type=int, default=3072)
    args = parser.parse_args()

    import torch

    roofline = matmul_roofline(args.roofline_n)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; float32 matmul roofline ({args.roofline_n}^3): {roofline:.0f} GFLOP/s")
    shapes = ("t5-small", "smollm2") if args.shape == "both" else (args.shape,)
    results = [run_shape(shape, args) for shape in shapes]
    after = matmul_roofline(args.roofline_n)
    roofline = max(roofline, after)
    print(f"\nroofline measured again after the shapes: {after:.0f} GFLOP/s; the higher, {roofline:.0f}, counts")
    for shape, (flops, seconds) in zip(shapes, results):
        print(f"  {shape:9s} " + "  ".join(f"{name} {100 * flops / s / 1e9 / roofline:4.1f}%" for name, s in seconds.items())
              + " of roofline")


def kif_jax_step(model: Any, family: Any, batch: dict) -> tuple[Callable[[], float], float, int]:
    """kif_jax's training program itself (Programs.run_cycle, one SeqLoRA step per call, state donated).

    Returns the step (it returns the step's loss, a host sync), the loss with dropout off before any
    step, and the number of LoRA values.
    """
    graphdef, lora_state, frozen = nnx.split(model, models.LoRAParam, ...)
    programs = Programs(graphdef, family=family, lr=LR, warmup_steps=0, max_grad_norm=CLIP, weight_decay=0.0,
                        donate=True)
    program = Program(inner_steps=1)
    stacked = {k: jnp.asarray(v[None, None]) for k, v in batch.items()}  # [Q=1, A=1, mb, L]
    holder = {"state": init_state(lora_state, programs.tx, key=make_task_key(0, 1, "rbg"), total_steps=10_000,
                                  select_best=False)}

    def step() -> float:
        holder["state"], metrics = programs.run_cycle(holder["state"], frozen, stacked, None, program=program)
        return float(metrics["inner_loss"][0])

    loss0 = float(jax.jit(lambda l, f, x: family.token_loss(nnx.merge(graphdef, l, f), x, key=None)[0])(
        lora_state, frozen, {k: jnp.asarray(v) for k, v in batch.items()}))
    return step, loss0, sum(x.size for x in jax.tree.leaves(lora_state))


def torch_peer_step(peer: Any, batch: dict, device: Any = None) -> tuple[Callable[[], float], float, int]:
    """The peer's training step (AdamW, clipping at CLIP) on `batch`, as `kif_jax_step` returns kif_jax's:
    the step (returns its loss), the loss in eval mode (dropout off) before any step, and the number
    of trainable values."""
    import torch

    tb = {k: torch.from_numpy(v.astype(np.int64)).to(device) for k, v in batch.items()}
    peer.eval()
    with torch.no_grad():
        loss0 = float(peer(**tb).loss)
    peer.train()
    params = [p for p in peer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def step() -> float:
        loss = peer(**tb).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, loss0, sum(p.numel() for p in params)


def run_shape(shape: str, args: argparse.Namespace) -> tuple[float, dict[str, float]]:
    """Times one shape on both sides; returns the step's FLOPs and each side's median seconds a step."""
    dropout = not args.no_dropout
    lora_dropout = 0.05 if dropout else 0.0
    if shape == "t5-small":
        config = models.preset("t5-small")
        if not dropout:
            import dataclasses

            config = dataclasses.replace(config, dropout_rate=0.0)
        model = models.T5(config, lora=models.LoRAConfig(rank=8, alpha=32.0, dropout=lora_dropout), rngs=nnx.Rngs(0))
        batch, input_len, target_len = 8, 256, 8
        flops = t5_flops(config, batch, input_len, target_len)
        what = "t5-small shape, random weights"
    else:
        lora = models.LoRAConfig(rank=8, alpha=32.0, dropout=lora_dropout, targets=("q_proj", "v_proj"))
        model = models.from_pretrained(models.loading.resolve_model_source("smollm2-135m-instruct-q4"), lora=lora)
        config = model.config
        batch, input_len, target_len = 8, 184, 8
        flops = decoder_flops(config, batch, input_len + target_len, target_len)
        what = "SmolLM2-135M-Instruct (real Q4_1 weights as float32)"
    family = models.family_of(model)
    causal = isinstance(family, models.CausalFamily)
    rng = np.random.default_rng(0)
    b = make_batch(rng, causal, batch, input_len, target_len, config.vocab_size)
    tokens = batch * (input_len + target_len)

    jax_step, jax_loss0, n_lora = kif_jax_step(model, family, b)

    torch_step, torch_loss0, n_torch = torch_peer_step(torch_peer(model, dropout), b)
    print(f"\n{shape}: {what}; batch {batch} x ({input_len} + {target_len}) tokens; LoRA values {n_lora:,} "
          f"(torch {n_torch:,}); dropout {'as the reference (LoRA 0.05)' if dropout else 'off in both'}")
    print(f"  first-step loss, dropout off: kif_jax {jax_loss0:.5f}  torch {torch_loss0:.5f}  "
          f"(|diff| {abs(jax_loss0 - torch_loss0):.1e})")
    if not abs(jax_loss0 - torch_loss0) <= 1e-3 * max(1.0, abs(torch_loss0)):
        raise SystemExit("the two sides do not compute the same function")

    start = time.perf_counter()
    jax_train0 = jax_step()
    compile_s = time.perf_counter() - start
    torch_train0 = torch_step()
    print(f"  first training step's loss: kif_jax {jax_train0:.5f}  torch {torch_train0:.5f}"
          f"{'' if dropout else ' (no dropout: must agree)'}")
    jt, tt = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        jax_step()
        jt.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch_step()
        tt.append(time.perf_counter() - start)
    j, t = statistics.median(jt), statistics.median(tt)
    pair = statistics.median(b_ / a_ for a_, b_ in zip(jt, tt))
    print(f"  step FLOPs {flops / 1e9:.1f} G (2 x dense + 3 x attention, see docstring); "
          f"kif_jax first call incl. compile {compile_s:.1f} s")
    for name, s in (("kif_jax", j), ("torch+peft", t)):
        gflops = flops / s / 1e9
        print(f"  {name:11s} {s:7.3f} s/step  {tokens / s:8,.0f} tokens/s  {gflops:6.1f} GFLOP/s")
    print(f"  speed ratio kif_jax / torch: {t / j:.2f}x (ratio of medians), {pair:.2f}x (median of "
          f"{args.steps} pairs); per-step times kif_jax {[round(x, 2) for x in jt]} torch {[round(x, 2) for x in tt]}")
    return flops, {"kif_jax": j, "torch+peft": t}


if __name__ == "__main__":
    main()
