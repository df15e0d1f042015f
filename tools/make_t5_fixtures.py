"""Write tiny random T5 checkpoints and PyTorch golden outputs to tests/fixtures/ (offline, not CI).

Needs torch and transformers in a separate environment (never in kif_jax's):

    python3 -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch==2.13.0 transformers safetensors numpy
    /tmp/venv-torch/bin/python tools/make_t5_fixtures.py

Each checkpoint is written by Hugging Face's own `save_pretrained` (safetensors):
  t5_v1_0/              ReLU, tied head, d_model**-0.5 output scaling (config as transformers 5 writes it)
  t5_v1_1/              gated-GELU, separate lm_head, no scaling, 2 encoder / 3 decoder layers,
                        num_heads * d_kv != d_model, few buckets (config rewritten in the hub's style)
  t5_v1_1_bf16_sharded/ the v1_1 weights in bfloat16, split into shards with an index; its config is
                        transformers 5's (tie_word_embeddings true, scale_decoder_outputs false)
  t5_*.npz              inputs, logits, encoder output and greedy tokens of the reference
  t5_buckets.npz        relative-position buckets for offsets -600..600 (bit-exact reference)
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil

import numpy as np
import torch
from transformers import T5Config, T5ForConditionalGeneration

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_NEW_TOKENS = 8

KINDS = {
    "t5_v1_0": dict(vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    feed_forward_proj="relu", tie_word_embeddings=True),
    "t5_v1_1": dict(vocab_size=288, d_model=32, d_kv=12, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                    relative_attention_num_buckets=16, relative_attention_max_distance=20,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def build(kind: str, seed: int) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(**KINDS[kind], dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                   attn_implementation="eager")
    model = T5ForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:  # the init sets them to 1; random values test the mapping
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        if not cfg.scale_decoder_outputs:  # v1.1: a separate head, with EOS made likely enough to occur
            head = torch.randn(cfg.vocab_size, cfg.d_model) * cfg.d_model ** -0.5
            head[cfg.eos_token_id] *= 5.0
            model.lm_head.weight = torch.nn.Parameter(head)
    return model.eval()


def inputs(vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Three rows padded to 24 input tokens, decoder inputs shifted right, a padded decoder mask."""
    rng = np.random.default_rng(seed)
    lengths, b, s, t = [24, 17, 9], 3, 24, 7
    ids = np.zeros((b, s), np.int64)
    mask = np.zeros((b, s), np.int64)
    for r, n in enumerate(lengths):
        ids[r, : n - 1] = rng.integers(3, vocab, n - 1)
        ids[r, n - 1] = 1
        mask[r, :n] = 1
    labels = rng.integers(3, vocab, (b, t))
    dec = np.concatenate([np.zeros((b, 1), np.int64), labels[:, :-1]], axis=1)
    dec_mask = np.ones((b, t), np.int64)
    dec_mask[1, 5:] = 0
    dec_mask[2, 3:] = 0
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)


def golden(model: T5ForConditionalGeneration, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    cfg = model.config
    with torch.no_grad():
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                       decoder_input_ids=t["decoder_input_ids"]).logits
        logits_dec_mask = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                                decoder_input_ids=t["decoder_input_ids"],
                                decoder_attention_mask=t["decoder_attention_mask"]).logits
        enc = model.encoder(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
        gen = model.generate(input_ids=t["input_ids"], attention_mask=t["attention_mask"], do_sample=False,
                             num_beams=1, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=0,
                             output_scores=True, return_dict_in_generate=True,
                             # transformers 5.23 sizes the decoder's cache by num_layers and fails
                             # when num_decoder_layers differs; without a cache it recomputes.
                             use_cache=cfg.num_decoder_layers == cfg.num_layers)
    tokens = gen.sequences[:, 1:].numpy()
    greedy = np.full((tokens.shape[0], MAX_NEW_TOKENS), cfg.pad_token_id, np.int32)
    greedy[:, : tokens.shape[1]] = tokens
    # The smallest gap between the best and second-best logit along the greedy path: the parity
    # test is only meaningful if it is far above the 1e-4 logit tolerance.
    margins = []
    for step in gen.scores:
        top2 = torch.topk(step, 2, dim=-1).values
        margins.append((top2[:, 0] - top2[:, 1]).min().item())
    return dict(logits=logits.numpy(), logits_dec_mask=logits_dec_mask.numpy(), encoder_hidden=enc.numpy(),
                greedy=greedy, greedy_min_margin=np.float32(min(margins)))


def bucket_tables() -> dict[str, np.ndarray]:
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-600, 601)
    out = {"relative_position": rel.numpy().astype(np.int32)}
    for nb, md in ((32, 128), (16, 20), (8, 10)):
        for bidir in (True, False):
            b = T5Attention._relative_position_bucket(rel, bidirectional=bidir, num_buckets=nb, max_distance=md)
            out[f"b{nb}_d{md}_{'bi' if bidir else 'uni'}"] = b.numpy().astype(np.int32)
    return out


def hub_style_config(directory: pathlib.Path) -> None:
    """Make config.json look like google/flan-t5-*'s: tie_word_embeddings false, no scale key."""
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("scale_decoder_outputs", None)
    cfg["tie_word_embeddings"] = False
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "tests" / "fixtures"))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "t5_buckets.npz", **bucket_tables())
    for seed, kind in enumerate(KINDS):
        model = build(kind, seed)
        directory = out / kind
        shutil.rmtree(directory, ignore_errors=True)
        model.save_pretrained(directory)
        if kind == "t5_v1_1":
            hub_style_config(directory)
        x = inputs(model.config.vocab_size, 100 + seed)
        g = golden(model, x)
        print(f"{kind}: greedy {g['greedy'].tolist()} min margin {g['greedy_min_margin']:.4f}")
        assert g["greedy_min_margin"] > 1e-3, "near-tie on the greedy path: pick another seed"
        np.savez_compressed(out / f"{kind}.npz", **x, **g)
        if kind == "t5_v1_1":
            half = build(kind, seed).to(torch.bfloat16)
            sharded = out / f"{kind}_bf16_sharded"
            shutil.rmtree(sharded, ignore_errors=True)
            half.save_pretrained(sharded, max_shard_size="100KB")  # config kept as transformers 5 writes it
            rounded = half.to(torch.float32).eval()  # the bf16 weights, computed in float32
            gb = golden(rounded, x)
            np.savez_compressed(out / f"{kind}_bf16_sharded.npz", **x, **gb)
            print(f"{kind}_bf16_sharded: {sorted(p.name for p in sharded.iterdir())}")


if __name__ == "__main__":
    main()
