"""MIGU (Du et al., "Unlocking Continual Learning Abilities in Language Models", EMNLP 2024 Findings;
the authors' code wenyudu/MIGU @ 3f3b9f0, whose code is that of 6c05b06): magnitude-based gradient
updating. The audit table in docs/baselines.md compares it with their code item by item.

On every task after the first, each optimizer step keeps the gradient only where a linear layer's
output is large: per layer, the summed |output| of each output feature over the step's batch, and a
feature's gradient (the matrix slice that produces it) survives when its magnitude is at or above the
`migu.threshold` quantile of that layer's magnitudes; the rest is set to 0 before clipping and the
optimizer. No replay data, no task identity, no extra state.

What follows the authors' code (paths under their src/):
- LoRA: forward hooks on every `lora_A.default` and `lora_B.default` module (uie_trainer_lora.py:443-462)
  sum |output| per output feature over every row, position and micro-batch of a step, and are emptied
  after each optimizer step (:594-596). A's output is dropout(x) A, B's is (dropout(x) A) B before the
  LoRA scale (lora/tuners/lora.py:535-543). The gradient rows of each factor's weight (torch's [out, in]:
  one row per output feature) are multiplied by `activation >= torch.quantile(activation, ini_threshold)`
  (accelerate_local.py:13-29). So A's r outputs mask A's columns here (kif_jax's A is [in, r]) and B's
  outputs mask B's columns ([r, out]). Full fine-tuning (`model.trainable = "all"`; uie_trainer_ft.py:
  457-463 hooks every nn.Linear): each projection's kernel columns by the projection's output.
- The threshold: `ini_threshold` 0.7 in the authors' Standard-benchmark scripts
  (scripts/standard_benchmark_lora.sh:1, standard_benchmark_ft.sh:1), so 30% of each layer's features
  update; `>=`; linear interpolation (torch.quantile's and jnp.quantile's default).
- The positions the sums count: the hooks see each micro-batch as the authors' collator pads it, every
  row to the micro-batch's longest (padding="longest", run_uie_lora.py:457-461; T5: the inputs to the
  longest input, the labels and decoder inputs to the longest target, uie_collator.py:103-126; decoder
  LMs: prompt + target to the longest, uie_collator.py:132-196). kif_jax's batches are longer (a length
  bucket, then the cycle's longest batch) and an epoch's last batch is completed with filler rows, so
  each projection's |output| is weighted by its sequence's position weights (`position_weights` of the
  model family; T5's cross-attention keys and values read the encoder's): 1 below the micro-batch's
  longest real row in each real row, 0 beyond it and in filler rows. The padding positions up to that
  row count, as theirs do (leaving them out changes more features than the extra padding does).
  `migu.magnitude_positions = "all"` counts every position of kif_jax's padded batch instead (its MIGU
  results before this was read from the authors' collator).
- The first task trains without hooks or masks (`--is_first_task True`).
- The mask acts on the gradient before clipping and the optimizer step (accelerate_local.py:32-59:
  `engine.backward`, the mask, then `engine.step()`, which clips and steps AdamW).
- The paper's L1 normalisation, like the LoRA scale, multiplies a layer's magnitudes by one positive
  number and so changes no mask; neither is computed.
Their LoRA path does not run as published (run_uie_lora.py:20 imports a function accelerate_local.py no
longer defines; its LoRA backward masks only for the retired method name "cluster_activate"); kif_jax
does what its hooks and mask function, and the full-tuning backward that is wired up, do.

Readings that are ours:
- A micro-batch here is kif_jax's (`train.micro_batch_size` rows, over every data-parallel device); the
  authors' scripts run 8 rows per GPU without accumulation, each GPU's rows padded on their own. Their
  decoder-LM collator pads on the left, kif_jax's training rows on the right: the same positions count
  per row, but a padding position's output is not the same number.
- Tensors that no projection output belongs to (biases, norms, embeddings) are not masked, nor is a
  head computed without calling a projection (T5 v1.0's tied head, a decoder's untied head); the
  authors hook lm_head too, so their full fine-tuning masks its rows (a tied head: the shared
  embedding's gradient) by the logits' magnitudes.
- Across data-parallel devices the magnitudes are summed over the global batch (the authors average
  across processes: the same threshold decision).
- The optimizer, learning rate, schedule, epochs and LoRA dropout are kif_jax's, shared by every method
  (the authors' MIGU scripts: AdamW at a constant 1e-4, one epoch, LoRA dropout 0.1).

The magnitudes come from the models (`Program.capture_magnitudes`; kif_jax/models/layers.py taps each
projection's outputs and reports their sums as the gradient of a zero probe), so this module imports
no model code.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from kif_jax.errors import ConfigError
from kif_jax.methods.base import Learner, Method, Program


POSITIONS = ("authors", "all")  # the values of `migu.magnitude_positions`


def migu_config() -> ml_collections.ConfigDict:
    """The `migu` section (the authors' Standard-benchmark scripts, scripts/standard_benchmark_lora.sh:1)."""
    c = ml_collections.ConfigDict()
    # A feature keeps its gradient when its output magnitude is at or above this quantile of its
    # layer's magnitudes (the authors' ini_threshold: 0.7 keeps the largest 30%)
    c.threshold = 0.7
    # Which positions the magnitudes count: "authors" those of each micro-batch padded to its longest real row, as
    # the authors' collator pads it (no bucket padding beyond that row, no filler rows); "all" every position of
    # kif_jax's padded batch (kif_jax's MIGU before the audit, kept to reproduce its results)
    c.magnitude_positions = "authors"
    return c


def magnitude_mask(magnitudes: jax.Array, threshold: float) -> jax.Array:
    """1 where a feature's magnitude is at or above the `threshold` quantile of the layer's (linear
    interpolation, as torch.quantile), else 0; float32, shaped like `magnitudes`."""
    m = jnp.asarray(magnitudes, jnp.float32)
    return (m >= jnp.quantile(m, threshold)).astype(jnp.float32)


def masked_gradient(grads: Any, magnitudes: Any, threshold: float) -> Any:
    """Each tensor's gradient with the slices of its last axis (the features it produces) masked."""
    return jax.tree.map(lambda g, m: (g * magnitude_mask(m, threshold).astype(g.dtype)).astype(g.dtype),
                        grads, magnitudes)


@dataclasses.dataclass(frozen=True)
class MaskedSteps(Program):
    """SeqLoRA steps whose gradient keeps only the features with large outputs."""

    threshold: float = 0.7
    magnitude_positions: str = "authors"  # `migu.magnitude_positions` (a ClassVar of `Program`, a field here)

    capture_magnitudes: ClassVar[bool] = True

    def transform_grads(self, trainer: Any, state: Any, grads: Any, learner: Learner | None, magnitudes: Any) -> Any:
        return masked_gradient(grads, magnitudes, self.threshold)


class MIGU(Method):
    """Magnitude-based gradient updating from the second task on."""

    name = "migu"
    section = "migu"
    default_config = staticmethod(migu_config)

    @classmethod
    def validate_section(cls, config: ml_collections.ConfigDict) -> None:
        if not 0.0 <= config.migu.threshold < 1.0:
            raise ConfigError(f"config field 'migu.threshold' must lie in [0, 1), got {config.migu.threshold}")
        if config.migu.magnitude_positions not in POSITIONS:
            raise ConfigError(f"config field 'migu.magnitude_positions' must be one of {', '.join(POSITIONS)}, "
                              f"got {config.migu.magnitude_positions!r}")

    def cycle(self, task: Any, step: int, steps: int) -> tuple[Program, list[dict]]:
        if task.phase == 0:  # the authors' first task trains without hooks or masks (--is_first_task True)
            return Program(inner_steps=steps), []
        return MaskedSteps(inner_steps=steps, threshold=float(self.config.migu.threshold),
                           magnitude_positions=str(self.config.migu.magnitude_positions)), []


METHODS = (MIGU,)
