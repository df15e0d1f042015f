"""MIGU (Du et al., "Unlocking Continual Learning Abilities in Language Models", EMNLP 2024 Findings;
the authors' code wenyudu/MIGU @ 6c05b06): magnitude-based gradient updating.

On every task after the first, each optimizer step keeps the gradient only where a linear layer's
output is large: per layer, the summed |output| of each output feature over the step's batch, and a
feature's gradient (the matrix slice that produces it) survives when its magnitude is at or above the
`migu.threshold` quantile of that layer's magnitudes; the rest is set to 0 before clipping and the
optimizer. No replay data, no task identity, no extra state.

What follows the authors' code (src/uie_trainer_lora.py, src/accelerate_local.py):
- LoRA: forward hooks on every `lora_A.default` and `lora_B.default` module record sum |output| per
  output feature over all of a step's positions and micro-batches (reset after each optimizer step);
  the gradient rows of each factor's weight (torch's [out, in]: one row per output feature) are
  multiplied by `activation >= torch.quantile(activation, ini_threshold)`. So A's r outputs mask A's
  columns here (kif_jax's A is [in, r]) and B's outputs (the layer's out features, before the LoRA
  scale) mask B's columns ([r, out]). Full fine-tuning (`model.trainable = "all"`): each projection's
  kernel columns by the projection's output (bias included).
- The threshold: `ini_threshold` 0.7 in the authors' Standard-benchmark LoRA script
  (scripts/standard_benchmark_lora.sh), so 30% of each layer's features update. `>=` as their latest code.
- The first task trains without masks (`is_first_task`).
- The mask acts on the gradient before clipping and the optimizer step (DeepSpeed's `engine.step()`,
  which clips, runs after their masking in `backward`).
- The paper's L1 normalisation of the magnitudes does not change which features pass a quantile
  threshold, so it is not computed.

Readings that are ours:
- The magnitudes include padding positions, as the hooks do (they see the whole padded batch).
- Tensors that no projection output belongs to (biases, norms, embeddings; a decoder's untied head,
  whose loss kif_jax computes without calling the projection) are not masked; the authors hook only
  linear layers' weights.
- Across data-parallel devices the magnitudes are summed over the global batch (the authors average
  across processes: the same threshold decision).

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


def migu_config() -> ml_collections.ConfigDict:
    """The `migu` section (the authors' Standard-benchmark LoRA script)."""
    c = ml_collections.ConfigDict()
    # A feature keeps its gradient when its output magnitude is at or above this quantile of its
    # layer's magnitudes (the authors' ini_threshold: 0.7 keeps the largest 30%)
    c.threshold = 0.7
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

    def cycle(self, task: Any, step: int, steps: int) -> tuple[Program, list[dict]]:
        if task.phase == 0:  # the authors' first task trains without masks
            return Program(inner_steps=steps), []
        return MaskedSteps(inner_steps=steps, threshold=float(self.config.migu.threshold)), []


METHODS = (MIGU,)
