"""Memory plan: bytes per device of every state under its actual sharding, before anything compiles.

`<workdir>/<method>/memory.json` = {"mesh": {axis: size}, "per_device_bytes": {"frozen", "trainable",
"optimizer", "importance", "activations", "total"}}. State sizes are exact (shard shapes of the
arrays' shardings, from `kif_jax.sharding.tree_shardings`); activations are an estimate.

The same plan for a run that is not at hand (a pod, a 13B model), from shapes only, no weights read:

    python -m kif_jax.memory_plan --config=configs/llama2_13b_pod.py --devices=16 [--method=recurrent_kif]
        [--workdir=W (writes W/<method>/memory.json)] [--json] [--config.a.b=v ...]
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import jax
from absl import logging
from jax.sharding import Mesh

from kif_jax.sharding import BATCH_AXES, TENSOR_AXIS, batch_spec, per_device_bytes


def activation_bytes(model_config: Any, *, micro_batch_size: int, input_length: int, target_length: int,
                     itemsize: int, remat: str, mesh: Mesh) -> int:
    """Rough per-device bytes of what one micro-batch's backward pass keeps alive.

    Per layer and token (Korthikanti et al. 2022, without dropout masks): about 8 * d (norms, residual,
    q/k/v/o inputs) + 2 * d_ff (MLP) values, and 2 * heads * length attention scores and probabilities;
    split by the `tensor` axis where heads and MLP are. "full" remat keeps each layer's input and one
    layer's tensors; the other policies are counted like "none" (an upper bound). Plus the float32
    logits and their gradient.
    """
    g = lambda *names: next((getattr(model_config, n) for n in names if getattr(model_config, n, None)), 0)  # noqa: E731
    d, ff, heads, vocab = g("d_model", "hidden_size"), g("d_ff", "intermediate_size"), \
        g("num_heads", "num_attention_heads"), g("vocab_size")
    layers = g("num_hidden_layers") or g("num_layers") + g("num_decoder_layers")
    spec = batch_spec(mesh, micro_batch_size, 0)
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape) if len(spec) else 1
    rows = math.ceil(micro_batch_size / shards)
    length = input_length + target_length
    t = mesh.shape.get(TENSOR_AXIS, 1)
    per_layer = rows * length * itemsize * (8 * d + (2 * ff + 2 * heads * length) / t)
    kept = layers * rows * length * d * itemsize + per_layer if remat == "full" else layers * per_layer
    logits = 2 * rows * length * vocab * 4 / t
    return int(kept + logits)


def memory_plan(state: Any, frozen: Any, mesh: Mesh, *, activations: int) -> dict:
    """The plan of a TrainState (arrays or `jax.eval_shape` structs) and the frozen weights on `mesh`."""
    b = lambda tree: per_device_bytes(tree, mesh)  # noqa: E731
    parts = {"frozen": b(frozen), "trainable": b(state.params),
             "optimizer": b((state.opt_state, state.outer_opt_state)),
             "importance": b((state.imp_in, state.imp_out)), "activations": int(activations)}
    parts["total"] = sum(parts.values())
    return {"mesh": {k: int(v) for k, v in mesh.shape.items()}, "per_device_bytes": parts}


def report_memory_plan(plan: dict, path: pathlib.Path, name: str) -> None:
    """Write memory.json (process 0), log it, and warn in one line if it exceeds the device's memory."""
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan, indent=2) + "\n")
    gib = {k: f"{v / 2**30:.3f}" for k, v in plan["per_device_bytes"].items()}
    logging.info("%s: memory plan per device (GiB) on mesh %s: %s", name, plan["mesh"], gib)
    stats = jax.local_devices()[0].memory_stats()  # None on CPU
    limit = (stats or {}).get("bytes_limit")
    total = plan["per_device_bytes"]["total"]
    if limit and total > limit:
        logging.warning("%s: the memory plan needs %.2f GiB per device but %s has %.2f GiB; raise "
                        "sharding.fsdp_parallelism, lower train.micro_batch_size or set train.remat=full",
                        name, total / 2**30, jax.local_devices()[0].device_kind, limit / 2**30)


# --------------------------------------------------------------------------------------------
# Planning a run without its weights: python -m kif_jax.memory_plan --config=... --devices=N
# --------------------------------------------------------------------------------------------

#: HBM per chip of the TPU generations the plan is compared with.
CHIP_HBM_BYTES = {"v4": 32 * 2**30, "v5e": 16 * 2**30}


def model_architecture(name: str) -> tuple[Any, str]:
    """(DecoderConfig or T5Config of model `name`, where it came from), without reading any weights.

    In order: a local checkpoint directory's (or `.gguf` file's) config; the hub cache's config.json;
    the built-in sizes of a preset (`decoder.PRESET_CONFIGS`, `t5.PRESETS`); config.json fetched from
    the hub. Errors are `ConfigError`s.
    """
    import os

    from kif_jax.errors import ConfigError, KifError
    from kif_jax.models import decoder, decoder_hf, t5
    from kif_jax.models.family import resolve_model_source
    from kif_jax.models.hf_files import SafetensorsReader, read_config, weight_files
    from kif_jax.models.loading import DECODER_TYPES, T5_TYPES

    source = resolve_model_source(name)
    try:
        if source.endswith(".gguf"):
            from kif_jax.models.gguf import GGUFCheckpoint

            if not os.path.isfile(source):
                raise ConfigError(f"config field 'model.name': GGUF file {source} does not exist")
            checkpoint = GGUFCheckpoint(source)
            return decoder_hf._untie_if_separate_head(decoder_hf._config(checkpoint.config, source), checkpoint), source
        reader = None
        if os.path.isdir(source):
            hf, origin = read_config(source), os.path.join(source, "config.json")
            try:
                reader = SafetensorsReader(weight_files(source))  # headers only: a tied head stored apart
            except KifError:
                pass
        else:
            hf, origin = None, source
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(source, "config.json")
            except Exception:  # noqa: BLE001 - not a valid hub id: no cache entry
                cached = None
            if isinstance(cached, str):
                hf, origin = json.loads(pathlib.Path(cached).read_text()), cached
            elif name in decoder.PRESET_CONFIGS:
                return decoder.PRESET_CONFIGS[name], "kif_jax.models.decoder.PRESET_CONFIGS (published config.json)"
            elif name in t5.PRESETS:
                return t5.PRESETS[name][1], "kif_jax.models.t5.PRESETS"
            else:
                import logging as std_logging

                hub_log = std_logging.getLogger("huggingface_hub")
                level = hub_log.level
                hub_log.setLevel(std_logging.ERROR)  # its retries' warnings: the failure is one line below
                try:
                    from huggingface_hub import hf_hub_download

                    path = hf_hub_download(source, "config.json")
                except Exception as e:  # noqa: BLE001 - every hub failure is one message
                    raise ConfigError(f"config field 'model.name': no architecture for {name!r}: not a local "
                                      f"checkpoint, not in the hub cache, no built-in sizes, and its config.json "
                                      f"cannot be fetched ({type(e).__name__})") from None
                finally:
                    hub_log.setLevel(level)
                hf, origin = json.loads(pathlib.Path(path).read_text()), path
        model_type = hf.get("model_type", "t5")
        if model_type in T5_TYPES:
            return t5.T5Config.from_hf(hf), origin
        if model_type not in DECODER_TYPES:
            raise ConfigError(f"{origin}: model_type {model_type!r} is not supported; "
                              f"known: {', '.join(T5_TYPES + DECODER_TYPES)}")
        config = decoder.DecoderConfig.from_hf(hf)
        return (config if reader is None else decoder_hf._untie_if_separate_head(config, reader)), origin
    except KifError as e:
        raise ConfigError(str(e)) from None


def abstract_model(model_config: Any, *, seed: int) -> tuple[Any, Any, str]:
    """(abstract model as `build_model` would build it, its architecture config, its source): shapes only."""
    import jax.numpy as jnp
    from flax import nnx

    from kif_jax.models.decoder import DecoderConfig, DecoderLM
    from kif_jax.models.family import TINY_DECODER, TINY_T5, _tiny_model
    from kif_jax.models.layers import LoRAConfig
    from kif_jax.models.t5 import T5

    m = model_config
    dtype = jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32
    lora = None
    if m.trainable == "lora":  # as kif_jax.models.family.build_model
        lora = LoRAConfig(rank=m.lora.rank, alpha=float(m.lora.alpha), dropout=float(m.lora.dropout),
                          targets=tuple(t.strip() for t in str(m.lora.targets).split(",") if t.strip()))
    if m.name in (TINY_T5, TINY_DECODER):
        model = nnx.eval_shape(lambda: _tiny_model(m.name, m.tiny, lora=lora, dtype=dtype, seed=seed))
        return model, model.config, f"model.tiny ({m.name})"
    arch, origin = model_architecture(m.name)
    cls = DecoderLM if isinstance(arch, DecoderConfig) else T5
    model = nnx.eval_shape(lambda: cls(arch, lora=lora, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed)))
    return model, arch, origin


def plan_config(config: Any, num_devices: int, method: str) -> dict:
    """The memory.json plan of `method` under `config` on `num_devices` devices (see `plan_abstract`)."""
    return plan_abstract(config, num_devices, method)[0]


def plan_abstract(config: Any, num_devices: int, method: str) -> tuple[dict, str]:
    """(The memory.json plan of `method` under `config` on a mesh of `num_devices` devices, from shapes only.

    The model is built abstractly (`nnx.eval_shape`), the mesh is a `jax.sharding.AbstractMesh` of the
    config's `sharding` sizes, and the state is the one `MethodRun.plan_memory` sizes (its method's
    largest fresh TrainState); no device, weight or data file is touched. Also returns where the
    architecture came from. Errors are `KifError`s.
    """
    import copy
    import types

    from flax import nnx
    from jax.sharding import AbstractMesh, AxisType

    from kif_jax import data as kdata
    from kif_jax.config import ALL_METHODS, SYNTHETIC_DATA, validate_config
    from kif_jax.errors import ConfigError
    from kif_jax.models.layers import LoRAParam
    from kif_jax.sharding import MESH_AXES, mesh_shape
    from kif_jax.train.loop import MethodRun, RunContext
    from kif_jax.train.methods import method_spec
    from kif_jax.train.steps import adam_transform

    if method not in ALL_METHODS:
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(ALL_METHODS)}")
    c = copy.deepcopy(config)
    c.methods = method
    c.data_dir = SYNTHETIC_DATA  # the plan reads no data: only the task count matters
    validate_config(c)
    if num_devices < 1:
        raise ConfigError(f"the number of devices must be a positive integer, got {num_devices}")
    sizes = mesh_shape(c.sharding, device_count=num_devices)
    mesh = AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    tasks = kdata.resolve_tasks(benchmark=c.benchmark or None, order=c.order or None, tasks=c.tasks or None)
    model, arch, origin = abstract_model(c.model, seed=c.seed)
    trainable = LoRAParam if c.model.trainable == "lora" else nnx.Param
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    activations = activation_bytes(arch, micro_batch_size=c.train.micro_batch_size,
                                   input_length=c.train.max_input_length, target_length=c.train.max_target_length,
                                   itemsize=2 if c.model.dtype == "bfloat16" else 4, remat=c.train.remat, mesh=mesh)
    ctx = RunContext(config=c, workdir=pathlib.Path("."), data_dir=pathlib.Path(c.data_dir), tasks=tasks,
                     tokenizer=None, family=None, graphdef=graphdef, init_params=params, frozen=frozen, mesh=mesh,
                     programs=types.SimpleNamespace(tx=adam_transform(c.train.max_grad_norm, c.train.weight_decay)),
                     evaluator=None, fingerprint="", activations=activations)
    run = MethodRun(ctx, method_spec(method))
    # The phase that MethodRun.plan_memory sizes: the method's largest state.
    phase = 1 if run.method.kif and len(run.phases) > 1 else 0
    if run.method.lora_branches:
        phase = len(run.phases) - 1

    def fresh(p: Any) -> Any:
        ctx.init_params = p  # O-LoRA's later branches are drawn from the initial parameters
        return run.fresh_state(phase, p, 1)

    state = jax.eval_shape(fresh, params)
    return memory_plan(state, frozen, mesh, activations=activations), origin


def chip_fit(plan: dict) -> dict:
    """{chip: {"hbm_bytes", "fraction" (the plan's total per device / the chip's HBM), "fits"}}."""
    total = plan["per_device_bytes"]["total"]
    return {chip: {"hbm_bytes": hbm, "fraction": total / hbm, "fits": total <= hbm}
            for chip, hbm in CHIP_HBM_BYTES.items()}


def format_plan(plan: dict, *, method: str, origin: str) -> str:
    """The plan as a table of bytes and GiB per device, and its share of each chip's HBM."""
    mesh = " x ".join(f"{a} {s}" for a, s in plan["mesh"].items())
    lines = [f"{method}: memory per device on the mesh {mesh} ({math.prod(plan['mesh'].values())} devices); "
             f"architecture from {origin}"]
    for part, value in plan["per_device_bytes"].items():
        lines.append(f"  {part:<12}{value:>18,} bytes {value / 2**30:>10.3f} GiB")
    for chip, fit in chip_fit(plan).items():
        lines.append(f"  {chip} chip ({fit['hbm_bytes'] / 2**30:.0f} GiB HBM): {fit['fraction']:.1%} of one chip's "
                     f"memory per device, {'fits' if fit['fits'] else 'does NOT fit'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m kif_jax.memory_plan --config=configs/x.py --devices=N [--method=M] [--workdir=W] [--json]`.

    Prints the memory.json plan of each method (the config's `methods`, or `--method`) on N devices,
    and writes `<workdir>/<method>/memory.json` with `--workdir`. A user error is one line and exit 2.
    """
    import sys

    from absl import flags
    from ml_collections import config_flags

    from kif_jax.errors import KifError

    argv = sys.argv if argv is None else argv
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py); fields overridable as "
                                             "--config.a.b=v.", flag_values=fv, lock_config=True)
    flags.DEFINE_integer("devices", None, "Number of devices of the mesh to plan for.", flag_values=fv)
    flags.DEFINE_string("method", None, "Method to plan (default: each of the config's `methods`).", flag_values=fv)
    flags.DEFINE_string("workdir", None, "If set, write <workdir>/<method>/memory.json.", flag_values=fv)
    flags.DEFINE_bool("json", False, "Print the plans as JSON (one object per method) instead of a table.",
                      flag_values=fv)

    def fail(message: str) -> int:
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2

    try:
        rest = fv(argv)
    except flags.Error as err:
        return fail(str(err).splitlines()[0])
    except (KeyError, AttributeError) as err:  # ml_collections: an override of a field that does not exist
        bad = next((a for a in argv if a.startswith("--config.") and str(err).strip("'\"") in a), str(err))
        return fail(f"unknown config field in {bad}")
    if len(rest) > 1:
        return fail(f"unexpected arguments: {' '.join(rest[1:])}")
    if fv["config"].value is None:
        return fail("--config is required")
    if fv["devices"].value is None:
        return fail("--devices (the number of devices to plan for) is required")
    if fv["devices"].value < 1:
        return fail(f"--devices must be a positive integer, got {fv['devices'].value}")
    try:
        config = holder.value
        config.keys()
    except OSError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return fail(f"cannot load config file {fv['config'].config_filename}: {lines[-1]}")
    from kif_jax.config import split_list

    methods = [fv["method"].value] if fv["method"].value else split_list(config.methods)
    try:
        for method in methods:
            plan, origin = plan_abstract(config, fv["devices"].value, method)
            if fv["workdir"].value:
                report_memory_plan(plan, pathlib.Path(fv["workdir"].value) / method / "memory.json", method)
            if fv["json"].value:
                gib = {k: round(v / 2**30, 4) for k, v in plan["per_device_bytes"].items()}
                print(json.dumps({"method": method, **plan, "per_device_gib": gib, "chips": chip_fit(plan)}))
            else:
                print(format_plan(plan, method=method, origin=origin))
    except KifError as err:
        return fail(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
