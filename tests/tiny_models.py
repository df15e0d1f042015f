"""A 1-layer T5 with LoRA and random teacher-forced batches, for tests that drive the programs directly."""
import numpy as np
from flax import nnx

from kif_jax import models


def tiny_t5_lora() -> models.T5:
    config = models.T5Config(vocab_size=259, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                             num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                             scale_decoder_outputs=False, dropout_rate=0.0)
    return models.T5(config, lora=models.LoRAConfig(rank=4, alpha=8.0, dropout=0.0), rngs=nnx.Rngs(3))


def random_t5_batches(rng: np.random.Generator, n: int, *, micro: int, rows: int, length: int,
                      target: int) -> dict:
    """n stacked batches [n, micro, rows, L] of random byte-token ids (decoder inputs: labels shifted right)."""
    ids = rng.integers(3, 259, size=(n, micro, rows, length)).astype(np.int32)
    labels = rng.integers(3, 259, size=(n, micro, rows, target)).astype(np.int32)
    dec = np.concatenate([np.zeros_like(labels[..., :1]), labels[..., :-1]], axis=-1)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "decoder_input_ids": dec, "labels": labels}
