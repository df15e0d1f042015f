"""Scale-out on 8 CPU devices: fusion on explicit and auto meshes, the (data, fsdp, tensor) mesh from the
config, every training state in its parameters' sharding, FSDP / tensor-parallel runs that follow the
1-device run, the memory plan, and per-layer rematerialisation."""
import functools
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import kif_jax
import tiny_config
from helpers import kif_state, read_metrics
from tiny_models import random_t5_batches, tiny_t5_lora
from kif_jax import models, sharding
from kif_jax.config import validate_config
from kif_jax.errors import ConfigError
from kif_jax.models.loading import build_model
from kif_jax.models.layers import set_remat
from kif_jax.methods.recurrent_kif import KifCycle
from kif_jax.train import Programs, train_and_evaluate

# --------------------------------------------------------------------------------------------
# Knowledge identification and fusion on any mesh
# --------------------------------------------------------------------------------------------

_SPECS = {"lora_a": P("data", "model"), "lora_b": P(None, "data"), "bias": P()}
_SHAPES = {"lora_a": (16, 8), "lora_b": (6, 12), "bias": (5,)}


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
@pytest.mark.parametrize("method", ["exact", "bisect"])
def test_fuse_on_explicit_and_auto_meshes_keeps_shardings(axis_type, method):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2, devices=jax.devices()[:8])
    rng = np.random.default_rng(1)
    host = [{k: rng.standard_normal(s).astype(np.float32) for k, s in _SHAPES.items()} for _ in range(3)]
    host += [{k: rng.random(s).astype(np.float32) for k, s in _SHAPES.items()} for _ in range(2)]
    sharded = [{k: jax.device_put(v, NamedSharding(mesh, _SPECS[k])) for k, v in t.items()} for t in host]
    ref = kif_jax.fuse(*[jax.device_put(t, jax.devices()[0]) for t in host], method="exact")
    eager = lambda *a: kif_jax.fuse(*a, method=method)  # noqa: E731
    for fn in (eager, jax.jit(eager)):
        out = fn(*sharded)
        for k in _SHAPES:
            assert out[k].sharding.is_equivalent_to(sharded[0][k].sharding, len(_SHAPES[k])), k
            np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(ref[k]))
    masks = kif_jax.importance_masks(sharded[3], quantile=0.8, method=method)
    for k in _SHAPES:
        assert masks[k].sharding.is_equivalent_to(sharded[3][k].sharding, len(_SHAPES[k]))


# --------------------------------------------------------------------------------------------
# The mesh from the config, the rules table
# --------------------------------------------------------------------------------------------


def _sharding_config(num_devices=0, data=-1, fsdp=1, tensor=1):
    c = tiny_config.get_config().sharding
    c.num_devices, c.data_parallelism, c.fsdp_parallelism, c.tensor_parallelism = num_devices, data, fsdp, tensor
    return c


def test_mesh_from_config_and_errors_name_the_field():
    assert sharding.mesh_shape(_sharding_config()) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert sharding.mesh_shape(_sharding_config(fsdp=4)) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sharding.mesh_shape(_sharding_config(4, data=1, fsdp=-1, tensor=2)) == {"data": 1, "fsdp": 2, "tensor": 2}
    mesh = sharding.config_mesh(_sharding_config(data=2, tensor=4))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    with pytest.raises(ConfigError, match="'sharding.fsdp_parallelism' is -1"):
        sharding.mesh_shape(_sharding_config(data=3, fsdp=-1))
    with pytest.raises(ConfigError, match="must equal the 8 devices"):
        sharding.mesh_shape(_sharding_config(data=2, fsdp=2))
    with pytest.raises(ConfigError, match="'sharding.tensor_parallelism' must be a positive integer or -1"):
        sharding.mesh_shape(_sharding_config(tensor=0))
    config = tiny_config.get_config()
    config.sharding.data_parallelism, config.sharding.tensor_parallelism = -1, -1
    with pytest.raises(ConfigError, match="at most one may be -1"):
        validate_config(config)


def test_logical_specs_follow_the_rules_table():
    mesh = jax.make_mesh((1, 2, 4), sharding.MESH_AXES, devices=jax.devices()[:8])
    assert sharding.logical_spec(("embed", "mlp"), (16, 32), mesh) == P("fsdp", "tensor")
    assert sharding.logical_spec(("q_heads", "embed"), (16, 16), mesh) == P("tensor", "fsdp")
    assert sharding.logical_spec(("vocab", "embed"), (259, 16), mesh) == P(None, "fsdp")  # 4 does not divide 259
    fsdp_only = jax.make_mesh((2, 4, 1), sharding.MESH_AXES, devices=jax.devices()[:8])
    assert sharding.logical_spec(("lora_rank", "heads"), (8, 16), fsdp_only) == P(None, "fsdp")  # FSDP splits all
    assert sharding.logical_spec(("embed", "heads"), (16, 16), jax.make_mesh((8, 1, 1), sharding.MESH_AXES)) == P()


# --------------------------------------------------------------------------------------------
# Every state in its parameters' sharding through a jitted cycle
# --------------------------------------------------------------------------------------------


_tiny_t5 = tiny_t5_lora
_batches = functools.partial(random_t5_batches, micro=1, rows=8, length=16, target=4)


@pytest.mark.parametrize("shape", [(2, 4, 1), (2, 1, 4)], ids=["fsdp4", "tensor4"])
def test_cycle_keeps_every_state_in_its_parameters_sharding(shape):
    mesh = jax.make_mesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=jax.devices()[:8])
    graphdef, params, frozen = nnx.split(_tiny_t5(), models.LoRAParam, ...)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)
    programs = Programs(graphdef, family=models.Seq2SeqFamily(), lr=5e-3, warmup_steps=0, max_grad_norm=1.0,
                        weight_decay=0.0, mesh=mesh)
    fresh = functools.partial(kif_state, programs)
    rng = np.random.default_rng(0)
    inner, outer = _batches(rng, 2), _batches(rng, 1)
    program = KifCycle(inner_steps=2, outer_steps=1, importance_clipped_grads=False, outer_loss_scale=1.0)
    ref_state, ref_out = Programs(graphdef, family=models.Seq2SeqFamily(), lr=5e-3, warmup_steps=0,
                                  max_grad_norm=1.0, weight_decay=0.0).run_cycle(
        fresh(params), frozen, inner, outer, program=program)

    frozen_s = sharding.shard_tree(frozen, mesh)
    state = sharding.shard_tree(fresh(sharding.shard_tree(params, mesh)), mesh)
    rows = lambda b: sharding.shard_rows(b, mesh, row_axis=2)  # noqa: E731
    state, out = programs.run_cycle(state, frozen_s, rows(inner), rows(outer), program=program)

    fsdp = shape[1] > 1  # else tensor parallelism
    q = ("encoder", "blocks", 0, "self_attention", "q")
    lora_a, lora_b = (*q, "lora_a"), (*q, "lora_b")
    expect = {lora_a: P("fsdp") if fsdp else P(), lora_b: P(None, "fsdp") if fsdp else P(None, "tensor")}
    adam = state.opt_state[1]
    for path, want in expect.items():
        for tree in (state.params, adam.mu, adam.nu, state.method.imp_in.sens, state.method.imp_out.unc):
            assert dict(nnx.to_flat_state(tree))[path].get_value().sharding.spec == want, (path, want)
    kernels = {(*q, "kernel"): P("fsdp") if fsdp else P(None, "tensor"),
               ("encoder", "blocks", 0, "ff", "wo", "kernel"): P(None, "fsdp") if fsdp else P("tensor"),
               ("shared", "embedding"): P(None, "fsdp") if fsdp else P()}
    flat = dict(nnx.to_flat_state(frozen_s))
    for path, want in kernels.items():
        assert flat[path].get_value().sharding.spec == want, (path, want)
    np.testing.assert_allclose(out["inner_loss"], ref_out["inner_loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# End to end: data 2 x fsdp 4 and data 2 x tensor 4 follow the 1-device run; memory.json
# --------------------------------------------------------------------------------------------


def _run(tmp_path, data, fsdp, tensor):
    config = tiny_config.get_config()
    config.sharding.num_devices = data * fsdp * tensor
    config.sharding.data_parallelism = data
    config.sharding.fsdp_parallelism = fsdp
    config.sharding.tensor_parallelism = tensor
    config.train.micro_batch_size = 8  # 8 rows: one per (data, fsdp) device
    config.model.lora.dropout = 0.0
    workdir = tmp_path / f"{data}x{fsdp}x{tensor}"
    train_and_evaluate(config, workdir)
    records = read_metrics(workdir / "recurrent_kif" / "metrics.jsonl")
    losses = [r[k] for r in records if "loss" in r for k in ("loss", "outer_loss") if r.get(k) is not None]
    return losses, json.loads((workdir / "recurrent_kif" / "memory.json").read_text())


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("one"), 1, 1, 1)


@pytest.mark.parametrize("shape", [(2, 4, 1), (2, 1, 4)], ids=["data2_fsdp4", "data2_tensor4"])
def test_sharded_runs_follow_one_device(tmp_path, one_device, shape):
    losses, plan = _run(tmp_path, *shape)
    ref_losses, ref_plan = one_device
    assert len(losses) == len(ref_losses) >= 6
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-3)
    assert plan["mesh"] == dict(zip(("data", "fsdp", "tensor"), shape))
    mine, ref = plan["per_device_bytes"], ref_plan["per_device_bytes"]
    assert mine["total"] == sum(v for k, v in mine.items() if k != "total")
    if shape[1] == 4:  # FSDP over 4 devices: a quarter of every state per device (+ replicated counters)
        for part in ("frozen", "trainable", "optimizer", "importance"):
            assert math.isclose(mine[part], ref[part] / 4, rel_tol=0.01), (part, mine[part], ref[part])
    else:  # Megatron: heads and MLP split, LoRA's A (hidden-size rows) and the 259-row vocabulary whole
        assert ref["frozen"] / 4 < mine["frozen"] < ref["frozen"]


# --------------------------------------------------------------------------------------------
# Rematerialisation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["tiny", "tiny-decoder"])
def test_remat_gives_the_same_loss_and_gradients(family):
    config = tiny_config.get_config()
    config.model.name = family
    config.model.lora.targets = "q,v" if family == "tiny" else "q_proj,v_proj"
    model, _, fam = build_model(config.model, seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 259, size=(2, 12)).astype(np.int32)
    labels = np.where(np.arange(12) < 8, -100, ids).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels,
             "decoder_input_ids": np.zeros_like(ids)}
    results = []
    for policy in ("none", "full", "dots"):
        set_remat(model, policy)
        graphdef, params, frozen = nnx.split(model, models.LoRAParam, ...)
        loss = lambda p: fam.token_loss(nnx.merge(graphdef, p, frozen), batch, key=jax.random.key(0))[0]  # noqa: E731
        results.append(jax.jit(jax.value_and_grad(loss))(params))
    for loss, grads in results[1:]:
        np.testing.assert_allclose(loss, results[0][0], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(results[0][1])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
