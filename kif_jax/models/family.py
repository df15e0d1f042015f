"""The model-family seam: everything shared code needs of a model, asked of its family, never of its type.

A family (`ModelFamily`, one per `Architecture.family`, registered in `FAMILIES`) builds its models and reads and
writes their checkpoints, tokenizes benchmark records into its batch layout, computes the per-token loss of a
batch, decodes and scores options, names its projections for PEFT and sizes the memory plan. The training loop,
`Programs` and the `Evaluator` hold a family object; loading and building (kif_jax/models/loading.py), export,
PEFT and the memory plan look the family up (`family_of` a model, `family_class` of a model type). The built-in families are kif_jax/models/t5/ and
kif_jax/models/decoder/; a new one is one package and its module's line in `BUILTIN_FAMILY_MODULES`, or
`FAMILIES.register` from outside kif_jax (docs/models.md).
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kif_jax.class_registry import ClassRegistry
from kif_jax.data.batching import IGNORE_INDEX, TokenizedDataset
from kif_jax.errors import ConfigError
from kif_jax.models.architectures import BUILTIN_FAMILY_MODULES, Architecture, architecture, register_architecture
from kif_jax.models.hf_weights import TensorReader
from kif_jax.models.layers import LoRAConfig

Batch = dict[str, jax.Array]


class ModelSizes(NamedTuple):
    """The sizes the memory plan's activation estimate reads (`memory_plan.activation_bytes`)."""

    hidden: int  # model width
    ffn: int  # MLP width
    heads: int  # attention heads
    vocab: int
    layers: int  # every layer of the network (encoder and decoder together)


class ModelFamily(abc.ABC):
    """A model family: its models, checkpoints, batch layout, loss and decoding.

    `name` is the `Architecture.family` of its `architectures`; `tiny_name` the config's `model.name` of its
    randomly initialised model of the sizes in `model.tiny`. An instance serves one run (`template`: the
    config's `model.prompt_template`, for the families that use one).
    """

    name: ClassVar[str] = ""
    architectures: ClassVar[tuple[Architecture, ...]] = ()
    tiny_name: ClassVar[str | None] = None
    peft_task_type: ClassVar[str] = ""  # PEFT's `task_type` of its adapters

    def __init__(self, template: str = "none") -> None:
        self.template = template

    # --- the training loop and the evaluator ---

    @abc.abstractmethod
    def tokenize(self, records: Sequence[dict], tokenizer: Any, *, max_input_length: int,
                 max_target_length: int) -> TokenizedDataset:
        """Benchmark records -> a dataset in this family's batch layout."""

    @abc.abstractmethod
    def token_loss(self, model: nnx.Module, batch: Batch, *, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Mean cross-entropy over the batch's target tokens and their count (dropout iff `key`)."""

    @abc.abstractmethod
    def position_weights(self, batch: Batch) -> dict[str, jax.Array]:
        """Float32 [mb, length] weights of each sequence a training micro-batch's projections read
        (`layers.ENCODER`, `layers.DECODER`), for `layers.capture_output_magnitudes`: 1 below the
        micro-batch's longest real row, 0 beyond it and in filler rows (see `longest_row_weights`)."""

    @abc.abstractmethod
    def greedy(self, model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, *,
               max_new_tokens: int) -> jax.Array:
        """Greedy continuation int32 [B, max_new_tokens] of a decoding batch (traceable under jit)."""

    @abc.abstractmethod
    def score(self, model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, option_ids: jax.Array,
              option_mask: jax.Array) -> jax.Array:
        """Summed log-likelihood float32 [B, C] of each option [B, C, T] (mask: real option tokens)."""

    # --- decoding texts (`decoding.generate_texts`) ---

    @abc.abstractmethod
    def encode_prompts(self, tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
        """Texts -> the token rows a decoding batch holds."""

    @abc.abstractmethod
    def pad_prompts(self, rows: Sequence[Sequence[int]], length: int, *, tokenizer: Any,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Token rows -> (ids, mask) int32 [batch_size, length] as `greedy` reads them."""

    # --- models and checkpoints ---

    @abc.abstractmethod
    def build(self, config: Any, *, lora: LoRAConfig | None, dtype: Any, rngs: nnx.Rngs) -> nnx.Module:
        """A randomly initialised model of `config` (parameters and compute in `dtype`)."""

    @abc.abstractmethod
    def tiny_config(self, tiny: Any) -> Any:
        """The config of its tiny model from the config's `model.tiny` section."""

    @abc.abstractmethod
    def load(self, source: str, *, dtype: Any, lora: LoRAConfig | None, seed: int, mesh: Any) -> nnx.Module:
        """A model with its pretrained weights from a checkpoint directory (or a file this family reads)."""

    @abc.abstractmethod
    def config_from_hf(self, hf: dict, reader: TensorReader | None = None) -> Any:
        """The config a checkpoint's config.json describes (`reader`: its tensors, when at hand)."""

    @abc.abstractmethod
    def save_pretrained(self, model: nnx.Module, directory: str) -> None:
        """Write config.json and model.safetensors (LoRA merged) in Hugging Face's format."""

    @abc.abstractmethod
    def to_hf_state_dict(self, model: nnx.Module) -> dict[str, np.ndarray]:
        """Hugging Face names -> numpy arrays (LoRA merged)."""

    @abc.abstractmethod
    def peft_module(self, path: str) -> str:
        """The Hugging Face module name (as PEFT keys name it) of a projection's model path."""

    def preset_source(self, name: str) -> str | None:
        """The hub id (or file) a preset name of this family stands for; None when it is no preset."""
        return None

    def preset_config(self, name: str) -> tuple[Any, str] | None:
        """(config, where it came from) of a preset whose sizes are built in; None otherwise."""
        return None

    # --- the memory plan ---

    @abc.abstractmethod
    def sizes(self, config: Any) -> ModelSizes:
        """The sizes of a config the activation estimate reads."""

    @abc.abstractmethod
    def loss_logit_positions(self, model: Any, *, input_length: int, target_length: int) -> int:
        """Positions a row whose float32 logits the training loss holds at once (`model` may be abstract)."""


class _FamilyRegistry(ClassRegistry):
    """The families by name; registering one registers its architectures too."""

    def register(self, cls: type[ModelFamily]) -> type[ModelFamily]:
        for arch in getattr(cls, "architectures", ()):
            if arch.family != cls.name:
                raise ConfigError(f"architecture {arch.model_type!r} of model family {cls.name!r} names family "
                                  f"{arch.family!r}")
        super().register(cls)
        for arch in cls.architectures:
            register_architecture(arch)
        return cls


#: Every model family, by `Architecture.family` (the built-in ones load on first use).
FAMILIES: ClassRegistry = _FamilyRegistry(ModelFamily, kind="model family", field="Architecture.family",
                                          public="ModelFamily", builtin_modules=BUILTIN_FAMILY_MODULES,
                                          attr="FAMILIES")


def family_class(model_type: Any, *, where: str = "model_type") -> type[ModelFamily]:
    """The family of a model type (a one-line ConfigError for an unknown type)."""
    return FAMILIES.lookup(architecture(model_type, where=where).family)


def family_of(model: nnx.Module, template: str = "none") -> ModelFamily:
    """The family of a built (or abstract) model, from its class's `family` name."""
    name = getattr(type(model), "family", None)
    if not isinstance(name, str):
        raise TypeError(f"{type(model).__name__} is no model of a kif_jax model family (it has no `family` name)")
    return FAMILIES.lookup(name)(template)


# --------------------------------------------------------------------------------------------
# Loss helpers every family may use
# --------------------------------------------------------------------------------------------


def masked_mean_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy of `logits` [mb, T, V] at the `labels` [mb, T] that are not IGNORE_INDEX, and their count."""
    mask = labels != IGNORE_INDEX
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, labels, 0))
    count = jnp.sum(mask)
    return jnp.sum(nll * mask) / jnp.maximum(count, 1), count


def longest_row_weights(real: jax.Array, examples: jax.Array) -> jax.Array:
    """float32 [mb, L]: 1 at the positions below the longest of the `examples` rows [mb] (bool), in those
    rows; 0 beyond that length and in every other row. `real` [mb, L] marks each row's real positions.

    What a collator that pads each micro-batch to its longest row (Hugging Face's padding="longest")
    would put in front of the model, as positions of kif_jax's longer padded batch: the rows' real
    positions and the padding up to the longest; nothing of the bucket's extra padding nor of the
    filler rows that complete an epoch's last batch (kif_jax/data/batching.py)."""
    length = real.shape[-1]
    ends = jnp.max(jnp.where(real.astype(bool), jnp.arange(1, length + 1), 0), axis=-1)  # last real position + 1
    longest = jnp.max(jnp.where(examples, ends, 0))
    return ((jnp.arange(length) < longest)[None, :] & examples[:, None]).astype(jnp.float32)
