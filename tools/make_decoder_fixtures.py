"""Write tiny random decoder-only checkpoints and PyTorch golden outputs to tests/fixtures/ (offline, not CI).

Needs torch and transformers (used here only, never by kif_jax):

    python tools/make_decoder_fixtures.py [--only VARIANT ...]

Each checkpoint is written by Hugging Face's own `save_pretrained` (safetensors):
  decoder_llama/        GQA (4 heads, 2 kv heads), untied head, rope_theta 5e5, EOS made likely
  decoder_llama3/       llama3 rope scaling (its three frequency bands all occur), tied embeddings,
                        two stop ids (eos_token_id [2, 3])
  decoder_mistral/      sliding_window 32 (longer than every fixture sequence), one kv head
  decoder_qwen2/        q/k/v biases, tied embeddings
  decoder_qwen3/        per-head q/k RMSNorm, head_dim 16 != hidden 32 / 4 heads
  decoder_llama_bf16/   the llama weights in bfloat16, sharded into two files with an index
  decoder_mistral_window/  sliding_window 4, rows of 12 real tokens: every layer's window binds, in the
                        forward pass and while decoding
  decoder_gemma3/       Gemma 3 text: sliding, full, sliding layers (window 4, RoPE bases 1e4 / 1e6 with
                        linear scaling on the full layer), head_dim 16 != hidden 32 / 4 heads,
                        query_pre_attn_scalar 12, final logit soft-cap 10, tied head, two stop ids
  decoder_<variant>.npz a left-padded batch of 3 rows, its mask, float32 logits, torch's greedy tokens
                        (with the smallest top-2 logit gap on that path) and RoPE's inv_freq
"""
from __future__ import annotations

import argparse
import pathlib
import shutil

import numpy as np
import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config,
                          Qwen3Config)

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_NEW_TOKENS = 6
LENGTHS = (10, 7, 4)  # real tokens per row, left-padded to the first
COMMON = dict(num_hidden_layers=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              rms_norm_eps=1e-5, attn_implementation="eager")

VARIANTS = {
    "llama": (LlamaConfig, dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                num_key_value_heads=2, rope_theta=5e5, tie_word_embeddings=False)),
    # head_dim 16, theta 5e5: wavelengths 6.3, 32, 164, 840, ... against 256/4 and 256/1 -> every band.
    "llama3": (LlamaConfig, dict(vocab_size=200, hidden_size=64, intermediate_size=80, num_attention_heads=4,
                                 num_key_value_heads=4, tie_word_embeddings=True, eos_token_id=[2, 3],
                                 rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0,
                                                      low_freq_factor=1.0, high_freq_factor=4.0,
                                                      original_max_position_embeddings=256))),
    "mistral": (MistralConfig, dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                    num_key_value_heads=1, head_dim=8, sliding_window=32, rope_theta=1e4,
                                    tie_word_embeddings=False)),
    "qwen2": (Qwen2Config, dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True)),
    "qwen3": (Qwen3Config, dict(vocab_size=144, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, rope_theta=1e6, tie_word_embeddings=False)),
    "mistral_window": (MistralConfig, dict(vocab_size=160, hidden_size=32, intermediate_size=64,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                           rope_theta=1e4, tie_word_embeddings=False)),
    "gemma3": (Gemma3TextConfig, dict(
        vocab_size=180, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=12, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=1e4),
                         "full_attention": dict(rope_type="linear", rope_theta=1e6, factor=2.0)},
        final_logit_softcapping=10.0, tie_word_embeddings=True, eos_token_id=[2, 3])),
}
# Rows longer than the sliding windows for the variants that test them.
LENGTHS_OF = {"mistral_window": (12, 9, 5), "gemma3": (12, 9, 5)}


def build(variant: str, seed: int) -> torch.nn.Module:
    """A random model whose every parameter (norms and biases too) is far from its init."""
    torch.manual_seed(seed)
    cls, kwargs = VARIANTS[variant]
    cfg = cls(**{**COMMON, **kwargs})
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if variant == "gemma3" and name.endswith("norm.weight"):  # Gemma scales by 1 + w
                p.copy_((2.0 if name == "model.norm.weight" else 0.2) * torch.randn_like(p))
            elif name == "model.norm.weight":  # a larger logit scale: clear margins on the greedy path
                p.copy_(3.0 * (1.0 + 0.2 * torch.randn_like(p)))
            elif name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
        if variant == "llama":  # some rows reach EOS within the new tokens
            model.lm_head.weight[2] *= 3.2
    return model.eval()


def inputs(vocab: int, seed: int, lengths: tuple[int, ...] = LENGTHS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = lengths[0]
    ids = np.zeros((len(lengths), s), np.int64)
    mask = np.zeros((len(lengths), s), np.int64)
    for r, n in enumerate(lengths):
        ids[r, s - n:] = rng.integers(4, vocab, n)
        mask[r, s - n:] = 1
    return dict(input_ids=ids, attention_mask=mask)


def golden(model: torch.nn.Module, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ids, mask = torch.from_numpy(x["input_ids"]), torch.from_numpy(x["attention_mask"])
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate() derives them
    cfg = model.config
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                             max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=0, pad_token_id=cfg.pad_token_id,
                             eos_token_id=cfg.eos_token_id, output_scores=True, return_dict_in_generate=True)
    tokens = gen.sequences[:, ids.shape[1]:].numpy()
    greedy = np.full((ids.shape[0], MAX_NEW_TOKENS), cfg.pad_token_id, np.int32)
    greedy[:, : tokens.shape[1]] = tokens
    margins = []
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    for step, tok in zip(gen.scores, gen.sequences[:, ids.shape[1]:].T):
        top2 = torch.topk(step, 2, dim=-1).values
        gap = top2[:, 0] - top2[:, 1]
        if (~done).any():
            margins.append(gap[~done].min().item())
        done |= torch.isin(tok, torch.tensor(eos))
    rotary = model.model.rotary_emb
    if hasattr(rotary, "inv_freq"):
        freqs = dict(inv_freq=rotary.inv_freq.float().numpy())
    else:  # one table per layer type (Gemma 3)
        freqs = {f"inv_freq_{kind}": getattr(rotary, f"{kind}_inv_freq").float().numpy()
                 for kind in ("full_attention", "sliding_attention")}
    return dict(logits=logits.numpy(), greedy=greedy, greedy_min_margin=np.float32(min(margins)), **freqs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "tests" / "fixtures"))
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="write these variants only")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed, variant in enumerate(VARIANTS):
        if args.only and variant not in args.only:
            continue
        model = build(variant, seed)
        directory = out / f"decoder_{variant}"
        shutil.rmtree(directory, ignore_errors=True)
        model.save_pretrained(directory)
        x = inputs(model.config.vocab_size, 100 + seed, LENGTHS_OF.get(variant, LENGTHS))
        g = golden(model, x)
        print(f"{variant}: greedy {g['greedy'].tolist()} min margin {g['greedy_min_margin']:.4f}")
        assert g["greedy_min_margin"] > 1e-3, "near-tie on the greedy path: pick another seed"
        np.savez_compressed(out / f"decoder_{variant}.npz", **x, **g)
        if variant == "llama":
            half = build(variant, seed).to(torch.bfloat16)
            sharded = out / f"decoder_{variant}_bf16"
            shutil.rmtree(sharded, ignore_errors=True)
            half.save_pretrained(sharded, max_shard_size="120KB")
            rounded = build(variant, seed)  # the bf16 weights computed in float32; RoPE buffers not rounded
            with torch.no_grad():
                for p in rounded.parameters():
                    p.copy_(p.to(torch.bfloat16).to(torch.float32))
            np.savez_compressed(out / f"decoder_{variant}_bf16.npz", **x, **golden(rounded, x))
            print(f"{variant}_bf16: {sorted(p.name for p in sharded.iterdir())}")


if __name__ == "__main__":
    main()
