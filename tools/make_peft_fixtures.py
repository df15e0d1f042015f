"""Write PEFT LoRA adapters and golden PEFT logits to tests/fixtures/ (offline, not CI), and check the other way.

Needs torch, peft and transformers beside kif_jax (never imported by kif_jax itself):

    python tools/make_peft_fixtures.py [--only t5|llama|gemma3]

For each tiny base checkpoint (t5_v1_1, then decoder_llama and decoder_gemma3 once tools/ has written them;
Gemma 3 with every projection of its blocks adapted):
  peft_<name>_adapter/      PEFT LoRA (r 4, alpha 16, q,v / q_proj,v_proj) with seeded random non-zero
                            A and B, written by `PeftModel.save_pretrained`
  peft_<name>_adapter.npz   the input batch and the PEFT model's float32 logits on it
Then the reverse check: an adapter written by kif_jax's `save_adapter` (other random values) is read
by `PeftModel.from_pretrained` with warnings as errors, and its logits are compared with kif_jax's.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import warnings

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RANK, ALPHA = 4, 16
TOL = 1e-4

# name -> (base fixture, PEFT task type, target modules = kif_jax LoRA targets)
KINDS = {
    "t5": ("t5_v1_1", "SEQ_2_SEQ_LM", ["q", "v"]),
    "llama": ("decoder_llama", "CAUSAL_LM", ["q_proj", "v_proj"]),
    "gemma3": ("decoder_gemma3", "CAUSAL_LM", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]),
}


def hf_base(kind: str, fixtures: pathlib.Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, T5ForConditionalGeneration

    directory = fixtures / KINDS[kind][0]
    cls = T5ForConditionalGeneration if kind == "t5" else AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers 5's note on the untied T5 head
        return cls.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32).eval()


def batch(kind: str, fixtures: pathlib.Path, vocab: int) -> dict[str, np.ndarray]:
    """T5: the t5_v1_1 parity batch (padded encoder inputs). LLaMA: three right-padded rows of 12."""
    if kind == "t5":
        g = np.load(fixtures / "t5_v1_1.npz")
        return {k: g[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
    rng = np.random.default_rng(7)
    lengths, s = [12, 9, 5], 12
    ids = np.zeros((len(lengths), s), np.int64)
    mask = np.zeros((len(lengths), s), np.int64)
    for r, n in enumerate(lengths):
        ids[r, :n] = rng.integers(3, vocab, n)
        mask[r, :n] = 1
    return dict(input_ids=ids, attention_mask=mask)


def hf_logits(model: torch.nn.Module, kind: str, x: dict[str, np.ndarray]) -> np.ndarray:
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    with torch.no_grad():
        return model(**t).logits.float().numpy()


def kif_logits(model, kind: str, x: dict[str, np.ndarray]) -> np.ndarray:
    import jax

    with jax.default_matmul_precision("float32"):
        if kind == "t5":
            from kif_jax.models import forward

            return np.asarray(forward(model, x["input_ids"], x["decoder_input_ids"], x["attention_mask"],
                                      np.ones_like(x["decoder_input_ids"])))
        return np.asarray(model(x["input_ids"], x["attention_mask"]))


def randomise_peft(model: torch.nn.Module, seed: int) -> int:
    """Seeded random non-zero lora_A and lora_B (B is zero at init, which would test nothing)."""
    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
                n += 1
    return n


def make(kind: str, fixtures: pathlib.Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    from kif_jax.models import LoRAConfig, from_pretrained
    from kif_jax.models.peft import save_adapter

    base_name, task, targets = KINDS[kind]
    base = hf_base(kind, fixtures)
    x = batch(kind, fixtures, base.config.vocab_size)
    base_logits = hf_logits(base, kind, x)

    peft_model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets,
                                                 task_type=task)).eval()
    n = randomise_peft(peft_model, seed={"t5": 1, "llama": 2}.get(kind, 4))
    golden = hf_logits(peft_model, kind, x)
    moved = float(np.abs(golden - base_logits).max())
    assert moved > 0.1, f"{kind}: the adapter barely changes the logits ({moved})"
    out = fixtures / f"peft_{kind}_adapter"
    shutil.rmtree(out, ignore_errors=True)
    peft_model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # the model card PEFT writes; not part of the format
    config_file = out / "adapter_config.json"  # the base as a repo-relative path, not this machine's
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = f"tests/fixtures/{base_name}"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    np.savez_compressed(fixtures / f"peft_{kind}_adapter.npz", **x, logits=golden, base_logits=base_logits)
    print(f"{kind}: {n} LoRA tensors, PEFT adapter -> {out}, max |logit change| from the base {moved:.3f}")

    # The reverse direction: kif_jax writes, PEFT reads, logits agree.
    import jax.numpy as jnp

    from kif_jax.models.layers import LoRAParam
    from flax import nnx

    lora = LoRAConfig(rank=RANK, alpha=float(ALPHA), dropout=0.0, targets=tuple(targets))
    model = from_pretrained(str(fixtures / base_name), lora=lora, seed=3)
    rng = np.random.default_rng(3)
    state = nnx.state(model, LoRAParam)
    flat = [(p, v.replace(jnp.asarray(0.15 * rng.standard_normal(v[...].shape), jnp.float32)))
            for p, v in nnx.to_flat_state(state)]
    nnx.update(model, nnx.from_flat_state(flat))
    mine = kif_logits(model, kind, x)
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, tmp, base_model_name_or_path=str(fixtures / base_name))
        hf = hf_base(kind, fixtures)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reread = PeftModel.from_pretrained(hf, tmp).eval()
        # transformers 5's own deprecation notes (FutureWarning) are not about the adapter.
        about_adapter = [f"{w.category.__name__}: {w.message}" for w in caught if w.category is not FutureWarning]
        assert not about_adapter, f"{kind}: PEFT warned reading kif_jax's adapter: {about_adapter}"
        theirs = hf_logits(reread, kind, x)
        from peft import get_peft_model_state_dict
        from safetensors.numpy import load_file

        written = load_file(str(pathlib.Path(tmp) / "adapter_model.safetensors"))
        assert set(get_peft_model_state_dict(reread)) == set(written), f"{kind}: PEFT adapted other modules"
    # Compared where the model reads real tokens: at right-padded positions of a decoder-only batch
    # the two implementations mask differently, and nothing uses those logits.
    valid = np.ones(mine.shape[:2], bool) if kind == "t5" else x["attention_mask"].astype(bool)
    diff = float(np.abs(mine - theirs)[valid].max())
    print(f"{kind}: kif_jax save_adapter -> PeftModel.from_pretrained (no warnings): "
          f"max |logit diff| {diff:.2e} (logits change {np.abs(theirs - base_logits).max():.3f} from the base)")
    assert diff <= TOL, f"{kind}: PEFT reads kif_jax's adapter differently ({diff})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "tests" / "fixtures"))
    parser.add_argument("--only", choices=sorted(KINDS))
    args = parser.parse_args()
    fixtures = pathlib.Path(args.out)
    for kind in KINDS if args.only is None else [args.only]:
        if not (fixtures / KINDS[kind][0] / "config.json").exists():
            print(f"{kind}: no base checkpoint {fixtures / KINDS[kind][0]}; skipped")
            continue
        make(kind, fixtures)


if __name__ == "__main__":
    main()
