"""Print the README's PyTorch parity figures: the largest |logit difference| between kif_jax and transformers
on each tiny decoder fixture's left-padded batch (float32 matmuls; fixtures from tools/make_decoder_fixtures.py).

    python bench/parity_figures.py

tests/test_decoder_model.py asserts each is at most 1e-4 (under the test suite's XLA flags, which move the
last digits); this prints them under default flags, as a user's run computes.
"""
import pathlib
import sys

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
VARIANTS = ("llama", "llama3", "mistral", "qwen2", "qwen3", "mistral_window", "gemma3")


def main() -> int:
    sys.path.insert(0, str(REPO))
    from kif_jax.models.decoder import hf as decoder_hf
    from kif_jax.models.decoder.generate import forward_lm

    with jax.default_matmul_precision("float32"):
        for variant in VARIANTS:
            model = decoder_hf.load_decoder(str(FIXTURES / f"decoder_{variant}"))
            golden = dict(np.load(FIXTURES / f"decoder_{variant}.npz"))
            logits = np.asarray(forward_lm(model, golden["input_ids"], golden["attention_mask"]))
            real = golden["attention_mask"].astype(bool)
            diff = float(np.abs(logits - golden["logits"])[real].max())
            print(f"{variant:15s} batch {golden['input_ids'].shape}  max |logit diff| {diff:.2g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
