"""Training and evaluation speed: a t5-small-sized model (random weights) or SmolLM2-135M (LoRA on q and v).

Usage: python bench/bench_train.py [--model t5-small|smollm2-135m-instruct-q4] [--cycles 3] [--batch 8]
       [--input-len 128] [--target-len 8]
For the decoder-only model a training row is input-len + target-len tokens (prompt + label), with
the loss on the last target-len; decoding reads left-padded prompts of input-len tokens.
Prints: tokens/s of the inner and outer steps, the time of one fusion, the wall-time ratio of a
Recurrent-KIF cycle (Q=8 inner + M=4 outer + fusion) to 8 SeqLoRA steps (floor 1.5 with equal
batches), and test examples/s of batched greedy decoding. Everything is timed after compilation.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kif_jax
from kif_jax import models
from kif_jax.config import base_config
from kif_jax.methods import Learner, Program
from kif_jax.methods.recurrent_kif import KifCycle, RecurrentKIF
from kif_jax.train.steps import Programs, init_state, make_task_key

Q, M = 8, 4


def random_batches(rng: np.random.Generator, n: int, batch: int, input_len: int, target_len: int,
                   vocab: int, causal: bool = False) -> dict:
    """[n, 1, batch, length] int32 batches of random tokens (one micro-batch per step)."""
    if causal:
        ids = rng.integers(3, vocab, size=(n, 1, batch, input_len + target_len)).astype(np.int32)
        labels = np.where(np.arange(input_len + target_len) >= input_len, ids, -100).astype(np.int32)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}
    ids = rng.integers(3, vocab, size=(n, 1, batch, input_len)).astype(np.int32)
    labels = rng.integers(3, vocab, size=(n, 1, batch, target_len)).astype(np.int32)
    dec = np.concatenate([np.zeros_like(labels[..., :1]), labels[..., :-1]], axis=-1)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "decoder_input_ids": dec, "labels": labels}


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` (which must block), after one warm-up call (none if repeats is 0)."""
    if repeats == 0:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired(base, other, repeats: int) -> tuple[float, float, float]:
    """Alternate the two programs so machine drift hits both; medians of each and of the per-pair ratio."""
    base(), other()
    times_a, times_b, ratios = [], [], []
    for _ in range(repeats):
        a = timed(base, 0)
        b = timed(other, 0)
        times_a.append(a), times_b.append(b), ratios.append(b / a)
    return statistics.median(times_a), statistics.median(times_b), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=5, help="timed repeats (pairs for the KIF/SeqLoRA ratio)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--target-len", type=int, default=8)
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--eval-only", action="store_true", help="only the decoding and scoring figures")
    parser.add_argument("--model", default="t5-small", help="t5-small (random weights), or a decoder-only "
                        "model name/path such as smollm2-135m-instruct-q4 (pretrained weights)")
    args = parser.parse_args()

    if args.model == "t5-small":
        model = models.T5(models.preset("t5-small"), lora=models.LoRAConfig(rank=8, alpha=32.0, dropout=0.05),
                          rngs=nnx.Rngs(0))
    else:
        lora_config = models.LoRAConfig(rank=8, alpha=32.0, dropout=0.05, targets=("q_proj", "v_proj"))
        model = models.from_pretrained(models.loading.resolve_model_source(args.model), lora=lora_config)
    config = model.config
    family = models.family_of(model)
    causal = isinstance(family, models.CausalFamily)
    graphdef, lora, frozen = nnx.split(model, models.LoRAParam, ...)
    n_lora = sum(x.size for x in jax.tree.leaves(lora))
    programs = Programs(graphdef, family=family,
                        lr=3e-4, warmup_steps=50, max_grad_norm=1.0, weight_decay=0.0, donate=False)
    rng = np.random.default_rng(0)
    decode = jax.jit(lambda l, f, ids, mask: family.greedy(nnx.merge(graphdef, l, f), ids, mask,
                                                            max_new_tokens=args.target_len))
    ids = rng.integers(3, config.vocab_size, size=(args.eval_batch, args.input_len)).astype(np.int32)
    decode_s = timed(lambda: jax.block_until_ready(decode(lora, frozen, ids, np.ones_like(ids))), args.cycles)

    # Option scoring (eval.mode "score") of 4 candidate labels of target-len tokens, vs greedy decoding.
    options = rng.integers(3, config.vocab_size, size=(args.eval_batch, 4, args.target_len)).astype(np.int32)
    score = jax.jit(lambda l, f, ids, mask, o, om: family.score(nnx.merge(graphdef, l, f), ids, mask, o, om))
    score_s = timed(lambda: jax.block_until_ready(score(lora, frozen, ids, np.ones_like(ids), options,
                                                        np.ones_like(options))), args.cycles)

    # The floor of any scorer that reads the prompt: one option of one token is the prompt's forward
    # pass plus one position, so greedy decoding over this time bounds what option scoring can reach.
    one = options[:, :1, :1]
    prompt_s = timed(lambda: jax.block_until_ready(score(lora, frozen, ids, np.ones_like(ids), one,
                                                         np.ones_like(one))), args.cycles)

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; {args.model}, LoRA values: {n_lora:,}; "
          f"batch {args.batch} x ({args.input_len} + {args.target_len}) tokens")
    if not args.eval_only:
        train_figures(args, programs, graphdef, family, lora, frozen, config.vocab_size, causal, rng)
    print(f"greedy decoding: {args.eval_batch / decode_s:,.1f} examples/s "
          f"(batch {args.eval_batch}, {args.target_len} new tokens, no early stop on random weights)")
    print(f"option scoring:  {args.eval_batch / score_s:,.1f} examples/s (4 options of {args.target_len} tokens); "
          f"{decode_s / score_s:.2f}x greedy decoding")
    print(f"prompt forward alone (1 option of 1 token): {args.eval_batch / prompt_s:,.1f} examples/s; greedy decoding "
          f"/ this = {decode_s / prompt_s:.2f}x, the most any prompt-reading scorer can gain over decoding")


def train_figures(args, programs, graphdef, family, lora, frozen, vocab: int, causal: bool,
                  rng: np.random.Generator) -> None:
    """Prints the inner and outer step, the fusion, the KIF/SeqLoRA cycle ratio and the forward pass."""
    inner = random_batches(rng, Q, args.batch, args.input_len, args.target_len, vocab, causal)
    outer = random_batches(rng, M, args.batch, args.input_len, args.target_len, vocab, causal)
    tokens_per_step = args.batch * (args.input_len + args.target_len)

    def state(kif: bool):
        method_state = RecurrentKIF(base_config()).init_state(1 if kif else 0, lora, tx=programs.tx)
        return init_state(lora, programs.tx, key=make_task_key(0, 1, "rbg"), total_steps=1000, select_best=False,
                          method_state=method_state)

    # A SeqLoRA program, and a Recurrent-KIF cycle with the raw gradient in the importance and an unscaled
    # outer loss (the programs this bench has always timed; the reference defaults add one clip per step).
    seq_program = Program(inner_steps=Q)
    kif_program = KifCycle(inner_steps=Q, outer_steps=M, importance_clipped_grads=False, outer_loss_scale=1.0)
    seq_state, kif_state = state(False), state(True)
    run_seq = lambda: jax.block_until_ready(programs.run_cycle(seq_state, frozen, inner, None, program=seq_program))
    run_kif = lambda: jax.block_until_ready(programs.run_cycle(kif_state, frozen, inner, outer, program=kif_program))
    seq_s, kif_s, ratio = paired(run_seq, run_kif, args.cycles)

    one_outer = jax.jit(lambda s, b: programs.step(kif_program, s, b, frozen, Learner(True, jnp.int32(0))))
    first_outer = jax.tree.map(lambda x: x[0], outer)
    outer_s = timed(lambda: jax.block_until_ready(one_outer(kif_state, first_outer)), args.cycles)

    scores = [kif_jax.importance_scores(kif_jax.update_importance(kif_jax.init_importance(lora), lora, lora))] * 2
    fuse = jax.jit(lambda p, a, b, s1, s2: kif_jax.fuse(p, a, b, s1, s2))
    fuse_s = timed(lambda: jax.block_until_ready(fuse(lora, lora, lora, *scores)), args.cycles)

    forward = jax.jit(lambda l, f, b: family.token_loss(nnx.merge(graphdef, l, f), b, key=None)[0])
    first_inner = jax.tree.map(lambda x: x[0, 0], inner)
    forward_s = timed(lambda: jax.block_until_ready(forward(lora, frozen, first_inner)), args.cycles)

    print(f"inner step (SeqLoRA cycle / {Q}): {seq_s / Q * 1e3:8.1f} ms  {Q * tokens_per_step / seq_s:10,.0f} tokens/s")
    print(f"outer step (alone):            {outer_s * 1e3:8.1f} ms  {tokens_per_step / outer_s:10,.0f} tokens/s")
    print(f"fusion (exact, global):        {fuse_s * 1e3:8.2f} ms")
    print(f"Recurrent-KIF cycle / SeqLoRA {Q} steps: {kif_s:.2f} s / {seq_s:.2f} s; median paired ratio "
          f"{ratio:.3f} over {args.cycles} pairs (floor {(Q + M) / Q:.2f})")
    print(f"forward (loss, no gradient):   {forward_s * 1e3:8.1f} ms  {tokens_per_step / forward_s:10,.0f} tokens/s")


if __name__ == "__main__":
    main()
