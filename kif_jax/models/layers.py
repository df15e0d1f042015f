"""Building blocks shared by every model family: LoRA config and variables, dropout keys, projections.

A projection (`Dense`) stores its kernel [in, out]; with LoRA it adds dropout(x) @ A @ B * alpha / r
(A [in, r], B [r, out], float32 `LoRAParam`s), so `nnx.split(model, LoRAParam, ...)` gives
(graphdef, LoRA, frozen) for every family. Random choices of a call come from the call's `rngs`.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
import zlib
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kif_jax.errors import ConfigError

# Added to the scores of masked keys: large enough that exp() underflows to exactly 0 in
# float32, finite so that a row with every key masked gives a uniform row instead of NaN.
MASKED = -1e9

@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters: delta(x) = dropout(x) @ A @ B * (alpha / rank), B = 0 at init.

    `targets` name projections: a bare name (`q`, `k`, `v`, `o`, `wi`, `wi_0`, `wi_1`, `wo`,
    `lm_head`) matches it everywhere; anything else is a regex matched in full against the dotted
    path, e.g. `decoder\\.blocks\\.\\d+\\.cross_attention\\.q`.
    """

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, (int, np.integer)) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"LoRAConfig.rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ConfigError("LoRAConfig.targets is empty")
        for t in self.targets:
            try:
                re.compile(t)
            except re.error as e:
                raise ConfigError(f"LoRAConfig.targets: {t!r} is not a valid regex ({e})") from None

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def matches(self, path: str) -> bool:
        """Whether the projection at dotted `path` gets an adapter."""
        leaf = path.rsplit(".", 1)[-1]
        return any(t == leaf or re.fullmatch(t, path) for t in self.targets)


class LoRAParam(nnx.LoRAParam):
    """The trainable LoRA factors; list it first in `nnx.split` (it subclasses `Param`).

    A subclass of `flax.nnx.LoRAParam`, so filters on that type (Tunix, Qwix) find these adapters.
    """


Axes = tuple[str | None, ...]


def param(value: jax.Array, axes: Axes | None, cls: type[nnx.Param] = nnx.Param) -> nnx.Param:
    """A parameter whose dimensions carry logical axis names (`kif_jax.sharding.LOGICAL_AXIS_RULES`).

    The names are NNX sharding metadata (`out_sharding`), applied lazily by `kif_jax.sharding`, never
    at construction (no mesh is needed to build a model).
    """
    if not axes or all(a is None for a in axes):
        return cls(value)
    return cls(value, out_sharding=tuple(axes), eager_sharding=False)


#: `train.remat`: "none", "full" (keep only each layer's input), or a jax.checkpoint_policies name.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_layer(fn: Any, policy: str) -> Any:
    """`fn` (one layer's call) under jax.checkpoint with the named policy; unchanged for "none"."""
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy])


def set_remat(model: nnx.Module, policy: str) -> None:
    """Rematerialise each layer of `model`'s stacks in the backward pass (`train.remat`)."""
    if policy not in REMAT_POLICIES:
        raise ConfigError(f"remat policy {policy!r} unknown; known: {', '.join(REMAT_POLICIES)}")
    for _, m in nnx.iter_graph(model):
        if isinstance(m, nnx.Module) and hasattr(m, "remat"):
            m.remat = policy


class KeyStream:
    """A stream of keys: one key drawn from `nnx.Rngs`, then fold_in of a Python counter.

    Drawing every key from `nnx.Rngs` under a trace costs time quadratic in the number of draws
    (each draw updates its counter variable; about 7 s for T5-large's `eval_shape`, more for a
    training step's dropout sites); folding in a counter is linear. Used only during one call.
    """

    def __init__(self, key: jax.Array) -> None:
        self.key = key
        self.count = 0

    def __call__(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)

    dropout = __call__  # so `_dropout` takes either this or an `nnx.Rngs`


def dropout_keys(deterministic: bool, rngs: nnx.Rngs | KeyStream | None) -> KeyStream | None:
    """One draw from the caller's `rngs` per model call (none when nothing is random)."""
    if deterministic or rngs is None or isinstance(rngs, KeyStream):
        return rngs
    return KeyStream(rngs.dropout())


#: What the building blocks accept as `rngs`: the model's public methods turn an `nnx.Rngs` into `KeyStream`.
RngsLike = nnx.Rngs | KeyStream | None


def _mix32(h: jax.Array) -> jax.Array:
    """A bijective uint32 hash with low bias (murmur3's finalizer shape, constants from Wellons' "lowbias32")."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def dropout_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 bits [*shape] for a dropout mask: a counter-based hash of each element's index under `key`.

    Two words are drawn from `key`; each element's bits are mix(mix(index ^ w0) + w1). The hash
    fuses into the mask's elementwise loop: on CPU it costs about 1/20 of drawing every value from the
    key (XLA's RngBitGenerator or threefry, ~10 ns a value), which made dropout most of a training
    step. The bits depend only on the key and the index, so a sharded array gets the same mask.
    (Indices wrap at 2**32 elements.)
    """
    words = jax.random.bits(key, (2,), jnp.uint32)
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return _mix32(_mix32(index ^ words[0]) + words[1])


def dropout(x: jax.Array, rate: float, deterministic: bool, rngs: RngsLike) -> jax.Array:
    """Inverted dropout whose key comes from the call's `rngs` (stream `dropout`); see `dropout_bits`."""
    if deterministic or rate == 0.0:
        return x
    if rngs is None:
        raise ValueError("dropout needs rngs=nnx.Rngs(dropout=key) when deterministic=False")
    keep = dropout_bits(rngs.dropout(), x.shape) >= jnp.uint32(min(round(rate * 2**32), 2**32 - 1))
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def softmax_parts(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
    """exp(scores - row max) and its row sums: softmax(scores) = e / sums[..., None].

    Attention divides its output ([..., T, head_dim]) by the sums after the value matmul instead of
    normalising the [..., T, S] probabilities: the division, its broadcast and their gradients then
    run on tensors S / head_dim times smaller. On CPU this took 22% off a SmolLM2 training step. Dropout
    on e equals dropout on the probabilities (the same mask, an elementwise scale).
    """
    e = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    return e, jnp.sum(e, axis=-1)


def mask_bias(mask: jax.Array) -> jax.Array:
    """Boolean/0-1 mask -> additive float32 bias (0 where kept, `MASKED` where masked)."""
    return jnp.where(mask.astype(bool), 0.0, MASKED).astype(jnp.float32)


# --- layer-output magnitudes, for methods that read them (MIGU) -------------------------------
_OUTPUT_TAPS: contextvars.ContextVar["_Capture | None"] = contextvars.ContextVar("kif_jax_output_taps", default=None)
_SEQUENCE: contextvars.ContextVar[str | None] = contextvars.ContextVar("kif_jax_sequence", default=None)

#: The sequences a projection can read (`reading`): T5's encoder input (its self-attention and the
#: cross-attention's keys and values) and the decoder's (T5's decoder, a decoder-only LM's one sequence).
ENCODER, DECODER = "encoder", "decoder"


@dataclasses.dataclass(frozen=True)
class _Capture:
    taps: dict[str, dict[str, jax.Array]]
    weights: dict[str, jax.Array] | None


@contextlib.contextmanager
def capture_output_magnitudes(taps: dict[str, dict[str, jax.Array]],
                              weights: dict[str, jax.Array] | None = None) -> Iterator[None]:
    """While tracing a loss inside this context, `Dense` layers report how large their outputs are.

    `taps` maps a projection's dotted path to {leaf name: probe}: "kernel" (the projection's output,
    bias included, before LoRA), "lora_a" (x A, the adapter's r features) and "lora_b" ((x A) B, before
    the LoRA scale). Each probe is a float32 zero vector over those features; the loss's gradient with
    respect to it is the summed |output| per feature, not a true gradient (see `magnitude_tap`).

    `weights` None: the sum runs over every position of the batch (padding included). Otherwise it maps
    each sequence (`ENCODER`, `DECODER`) to float32 position weights [rows, length]: a projection's output
    [rows, length, F] counts sum |y| * weight, with the weights of the sequence it reads, which the model
    names around its calls (`reading`); a tapped projection outside any `reading`, or whose output's leading
    shape is not its weights', is an error (no guessing by shape). The forward values and every other
    gradient are unchanged. Reading them as gradients works through `jax.checkpoint` (train.remat) and
    scans alike.
    """
    token = _OUTPUT_TAPS.set(_Capture(taps, weights))
    try:
        yield
    finally:
        _OUTPUT_TAPS.reset(token)


@contextlib.contextmanager
def reading(sequence: str) -> Iterator[None]:
    """The projections called inside read `sequence` (`ENCODER` or `DECODER`): a model says so around its
    stacks (and T5 around its cross-attention's keys and values), so that `capture_output_magnitudes`
    weighs each projection's positions by its own sequence's weights. Nothing else reads it."""
    token = _SEQUENCE.set(sequence)
    try:
        yield
    finally:
        _SEQUENCE.reset(token)


@jax.custom_vjp
def magnitude_tap(y: jax.Array, probe: jax.Array) -> jax.Array:
    """Identity on `y` [..., F]; the "gradient" of `probe` [F] is sum |y| over every leading position."""
    return y


def _tap_fwd(y: jax.Array, probe: jax.Array) -> tuple[jax.Array, jax.Array]:
    return y, jnp.sum(jnp.abs(y.astype(jnp.float32)), axis=tuple(range(y.ndim - 1)))


def _tap_bwd(magnitudes: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    return g, magnitudes


magnitude_tap.defvjp(_tap_fwd, _tap_bwd)


@jax.custom_vjp
def weighted_magnitude_tap(y: jax.Array, probe: jax.Array, weight: jax.Array) -> jax.Array:
    """Identity on `y` [..., F]; the "gradient" of `probe` [F] is sum |y| * weight over the leading positions
    (`weight` shaped like y's leading axes; positions of weight 0 add exactly nothing, whatever y holds there)."""
    return y


def _weighted_tap_fwd(y: jax.Array, probe: jax.Array, weight: jax.Array) -> tuple[jax.Array, tuple]:
    w = weight.astype(jnp.float32)[..., None]
    counted = jnp.where(w != 0, jnp.abs(y.astype(jnp.float32)) * w, 0.0)
    return y, (jnp.sum(counted, axis=tuple(range(y.ndim - 1))), weight)


def _weighted_tap_bwd(res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    magnitudes, weight = res
    return g, magnitudes, jnp.zeros_like(weight)  # the weights are data: no gradient


weighted_magnitude_tap.defvjp(_weighted_tap_fwd, _weighted_tap_bwd)


def _position_weight(capture: "_Capture | None", path: str, x: jax.Array) -> jax.Array | None:
    """The position weights of the sequence a tapped projection (input `x` [..., in]) reads (None: every
    position counts)."""
    if capture is None or capture.weights is None:
        return None
    sequence = _SEQUENCE.get()
    if sequence not in capture.weights:
        raise ValueError(f"projection {path!r} is tapped with position weights for {sorted(capture.weights)} but "
                         f"reads sequence {sequence!r}: its model must call it inside `layers.reading(...)`")
    weight = capture.weights[sequence]
    if tuple(weight.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"projection {path!r} reads sequence {sequence!r}: its input {tuple(x.shape)} does not "
                         f"match the sequence's position weights {tuple(weight.shape)}")
    return weight


def _tap(y: jax.Array, taps: dict | None, name: str, weight: jax.Array | None) -> jax.Array:
    probe = None if taps is None else taps.get(name)
    if probe is None:
        return y
    return magnitude_tap(y, probe) if weight is None else weighted_magnitude_tap(y, probe, weight)


class Dense(nnx.Module):
    """Projection x @ kernel ([in, out]) (+ bias); with LoRA, + dropout(x) @ lora_a @ lora_b * scale."""

    def __init__(self, in_features: int, out_features: int, *, std: float, path: str,
                 lora: LoRAConfig | None, dtype: Any, param_dtype: Any, keys: KeyStream,
                 use_bias: bool = False, axes: tuple[str | None, str | None] = (None, None)) -> None:
        self.path = path
        self.dtype = dtype
        # axes: logical names of (in, out); LoRA's A is [in, r], B [r, out].
        self.kernel = param(std * jax.random.normal(keys(), (in_features, out_features), param_dtype), axes)
        self.use_bias = use_bias
        if use_bias:
            self.bias = param(jnp.zeros((out_features,), param_dtype), (axes[1],))
        self.has_lora = lora is not None and lora.matches(path)
        if self.has_lora:
            # As peft: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
            # Adapters stay float32 whatever the base dtype, so their updates are not rounded away.
            bound = 1.0 / math.sqrt(in_features)
            self.lora_a = param(jax.random.uniform(keys(), (in_features, lora.rank), jnp.float32, -bound, bound),
                                (axes[0], "lora_rank"), LoRAParam)
            self.lora_b = param(jnp.zeros((lora.rank, out_features), jnp.float32), ("lora_rank", axes[1]), LoRAParam)
            self.lora_scale = lora.scale
            self.lora_dropout = float(lora.dropout)

    def __call__(self, x: jax.Array, *, deterministic: bool = True, rngs: RngsLike = None) -> jax.Array:
        capture = _OUTPUT_TAPS.get()  # a trace-time lookup: None outside the capture
        taps = None if capture is None else capture.taps.get(self.path)
        weight = None if taps is None else _position_weight(capture, self.path, x)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype))
        if self.use_bias:
            y = y + self.bias[...].astype(self.dtype)
        y = _tap(y, taps, "kernel", weight)
        if self.has_lora:
            h = dropout(x, self.lora_dropout, deterministic, rngs)
            h = _tap(jnp.dot(h, self.lora_a[...].astype(self.dtype)), taps, "lora_a", weight)
            h = _tap(jnp.dot(h, self.lora_b[...].astype(self.dtype)), taps, "lora_b", weight)
            y = y + h * jnp.asarray(self.lora_scale, self.dtype)
        return y


class Embed(nnx.Module):
    """A lookup table [num, features]; the shared one is also the v1.0 output head."""

    def __init__(self, num: int, features: int, *, std: float, dtype: Any, param_dtype: Any, keys: KeyStream,
                 axes: tuple[str | None, str | None] = ("vocab", "embed")) -> None:
        self.dtype = dtype
        self.embedding = param(std * jax.random.normal(keys(), (num, features), param_dtype), axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    """T5's layer norm: scale only, no mean subtraction, statistics in float32.

    With `unit_offset` (Gemma) the stored weight w is around 0 and the scale is 1 + w, applied in
    float32 before the cast to the compute dtype, as Gemma's reference does.
    """

    def __init__(self, features: int, *, eps: float, dtype: Any, param_dtype: Any, axis: str | None = "embed",
                 unit_offset: bool = False) -> None:
        self.eps = float(eps)
        self.dtype = dtype
        self.unit_offset = unit_offset
        init = jnp.zeros if unit_offset else jnp.ones
        self.scale = param(init((features,), param_dtype), (axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(self.dtype)
        return y.astype(self.dtype) * self.scale[...].astype(self.dtype)




def lora_modules(model: nnx.Module) -> list[str]:
    """Dotted paths of every projection that carries an adapter."""
    return [m.path for _, m in nnx.iter_graph(model) if isinstance(m, Dense) and m.has_lora]


def merged_kernels(model: nnx.Module) -> dict[str, jax.Array]:
    """path -> W + scale * A @ B (in W's dtype, summed in float32) for every adapted projection."""
    out = {}
    for _, m in nnx.iter_graph(model):
        if isinstance(m, Dense) and m.has_lora:
            w = m.kernel[...]
            delta = jnp.dot(m.lora_a[...].astype(jnp.float32), m.lora_b[...].astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST) * m.lora_scale
            out[m.path] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return out


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of `model` without adapters whose adapted kernels are W + (alpha / r) A @ B, for any family.

    The copy is built like the original (`type(model)(config, lora=None, dtype=..., param_dtype=...)`,
    the parameters' own dtype) and every non-LoRA value carried over.
    """
    merged = merged_kernels(model)
    values = {path: v[...] for path, v in nnx.to_flat_state(nnx.state(model, nnx.Not(LoRAParam)))}
    param_dtype = next(iter(values.values())).dtype  # every base parameter has the model's param dtype
    abstract = nnx.eval_shape(lambda: type(model)(model.config, lora=None, dtype=model.dtype, param_dtype=param_dtype,
                                                  rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    for path, w in merged.items():
        values[(*path_tuple(path), "kernel")] = w
    flat = [(path, var.replace(values[path])) for path, var in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def check_lora_targets(model: nnx.Module, lora: LoRAConfig | None, family: str) -> None:
    """Every target must match at least one projection of the model (a typo adapts nothing)."""
    if lora is None:
        return
    paths = [m.path for _, m in nnx.iter_graph(model) if isinstance(m, Dense)]
    for t in lora.targets:
        if not any(LoRAConfig(targets=(t,)).matches(p) for p in paths):
            raise ConfigError(f"LoRAConfig.targets: {t!r} matches no projection of this {family} "
                              f"(e.g. {paths[0]!r})")


def dotted(path: Iterable[Any]) -> str:
    """('a', 0, 'b') -> 'a.0.b'."""
    return ".".join(str(p) for p in path)


def path_tuple(path: str) -> tuple[str | int, ...]:
    """'a.0.b' -> ('a', 0, 'b')."""
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


def init_lora_state(lora_abstract: nnx.State, seed: int, stream: Iterable[int] = ()) -> nnx.State:
    """Adapters as peft initialises them: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0.

    Each A is drawn on the host from (seed, *stream, its path), so loading compiles nothing and an
    adapter's initial value does not depend on which other projections are adapted. `stream` tells
    apart several initialisations from one seed (O-LoRA's per-task branches pass the task index).
    """
    flat = []
    for path, var in nnx.to_flat_state(lora_abstract):
        shape = var.get_value().shape
        if path[-1] == "lora_a":
            rng = np.random.default_rng([seed, *stream, zlib.crc32(dotted(path).encode())])
            bound = 1.0 / np.sqrt(shape[0])
            value = rng.uniform(-bound, bound, shape).astype(np.float32)
        else:
            value = np.zeros(shape, np.float32)
        flat.append((path, var.replace(jnp.asarray(value))))
    return nnx.from_flat_state(flat)
