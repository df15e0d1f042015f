"""End-to-end training: every method, one fusion cycle against kif_jax.fuse, devices, errors, checkpoints."""
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from optax.tree import norm as optax_norm

import kif_jax
import tiny_config
from helpers import CORE_METHODS, kif_state, read_metrics, training_records
from kif_jax import models
from kif_jax.checkpointing import config_fingerprint
from kif_jax.config import base_config
from kif_jax.errors import CheckpointError, NonFiniteError
from kif_jax.methods import Learner, Program
from kif_jax.methods.recurrent_kif import KifCycle, RecurrentKIF
from kif_jax.metrics import results_matrix as matrix
from kif_jax.train import Programs, train_and_evaluate

METHODS = CORE_METHODS
KIF_FAMILY = ("recurrent_kif", "static_importance", "no_identification", "global_merge", "no_share")
WITH_MASKS = ("recurrent_kif", "static_importance", "global_merge", "no_share")


@pytest.fixture(scope="module")
def all_methods(every_method_run):
    _, workdir, results = every_method_run  # tests/conftest.py: every built-in method on the tiny config
    return workdir, results


def test_every_method_runs_end_to_end(all_methods):
    workdir, results = all_methods
    assert set(METHODS) <= set(results)
    for method in METHODS:
        result = results[method]
        assert json.loads((workdir / method / "results.json").read_text()) == json.loads(json.dumps(result))
        assert (workdir / method / "accuracy_matrix.png").stat().st_size > 1000
        R = matrix(result)
        assert R.shape == (2, 2)
        finite = R[np.isfinite(R)]
        assert np.all((finite >= 0) & (finite <= 1))
        if method == "mtl":  # one joint phase: only the last row exists, so no BWT
            assert np.isnan(R[0]).all() and np.isfinite(R[1]).all() and result["bwt"] is None
        else:
            assert np.isfinite(R[0, 0]) and np.isnan(R[0, 1]) and np.isfinite(R[1]).all()
            assert result["bwt"] == pytest.approx(R[1, 0] - R[0, 0])
        assert result["op"] == pytest.approx(np.mean(R[1]))
    assert "mtl" in (workdir / "comparison.md").read_text()


def test_methods_log_what_they_do(all_methods):
    workdir, _ = all_methods
    for method in METHODS:
        records = [r for r in read_metrics(workdir / method / "metrics.jsonl") if "loss" in r]
        second_task = [r for r in records if r["phase"] == 1]
        assert all(np.isfinite(r["loss"]) for r in records)
        has_outer = method in KIF_FAMILY
        assert all(("outer_loss" in r) == has_outer for r in second_task), method
        assert all("outer_loss" not in r for r in records if r["phase"] == 0), method  # task 1: plain LoRA
        if method in WITH_MASKS and method != "global_merge":
            for r in second_task:  # top 20%: n-1-floor(0.8(n-1)) of n entries lie strictly above the threshold
                assert 0.0 < r["mask_in_frac"] <= 0.201 and 0.0 < r["mask_out_frac"] <= 0.201
        if method == "no_identification":
            assert all("mask_in_frac" not in r for r in second_task)
    merges = [r for r in read_metrics(workdir / "global_merge" / "metrics.jsonl") if r.get("event") == "global_merge"]
    assert len(merges) == 1 and 0.0 < merges[0]["mask_in_frac"] <= 0.201
    replay_steps = [r["step"] for r in read_metrics(workdir / "replay" / "metrics.jsonl") if "loss" in r]
    seq_steps = [r["step"] for r in read_metrics(workdir / "seq_lora" / "metrics.jsonl") if "loss" in r]
    assert max(replay_steps) > max(seq_steps)  # the memory buffer joins task 2's training set


def _tiny_lora_model():
    config = models.T5Config(vocab_size=259, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                             num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                             scale_decoder_outputs=False, dropout_rate=0.0)
    lora = models.LoRAConfig(rank=4, alpha=8.0, dropout=0.0)
    return models.T5(config, lora=lora, rngs=nnx.Rngs(3))


def _random_batches(rng, n, micro=2, rows=4, length=16, target=4):
    ids = rng.integers(3, 259, size=(n, micro, rows, length)).astype(np.int32)
    labels = rng.integers(3, 259, size=(n, micro, rows, target)).astype(np.int32)
    dec = np.concatenate([np.zeros_like(labels[..., :1]), labels[..., :-1]], axis=-1)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "decoder_input_ids": dec, "labels": labels}


def test_importance_from_clipped_gradients_scales_by_the_clip_factor():
    """kif.importance_grads = "clipped": one step's sensitivity and uncertainty are the raw ones times
    max_norm / |g| (first order, from a zero state: S = (1-b1)|p g|, U = (1-b2) b1 |p g|, both linear in g)."""
    graphdef, params, frozen = nnx.split(_tiny_lora_model(), models.LoRAParam, ...)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)
    max_norm = 1e-3  # far below the gradient norm, so the clip is active
    programs = Programs(graphdef, family=models.Seq2SeqFamily(), lr=5e-3, warmup_steps=0, max_grad_norm=max_norm,
                        weight_decay=0.0, donate=False)
    state = kif_state(programs, params)
    batch = jax.tree.map(lambda x: x[0], _random_batches(np.random.default_rng(0), 1))
    steps = {}
    for clipped in (False, True):
        program = KifCycle(inner_steps=1, outer_steps=1, importance_clipped_grads=clipped)
        steps[clipped] = programs.step(program, state, batch, frozen, Learner(False, jnp.int32(0)))
    (raw, raw_metrics), (clip, _) = steps[False], steps[True]
    factor = max_norm / float(raw_metrics["grad_norm"])
    assert factor < 1e-2
    for part in ("sens", "unc"):
        for got, want in zip(jax.tree.leaves(getattr(clip.method.imp_in, part)),
                             jax.tree.leaves(getattr(raw.method.imp_in, part))):
            np.testing.assert_allclose(got, factor * np.asarray(want), rtol=1e-5, atol=1e-12)
            assert float(np.abs(want).max()) > 0.0
    for got, want in zip(jax.tree.leaves(clip.params), jax.tree.leaves(raw.params)):
        np.testing.assert_array_equal(got, want)  # the switch changes only what importance reads


@pytest.mark.parametrize("outer_micro", [2, 1], ids=["one_scan", "two_scans"])
def test_one_fusion_cycle_equals_fuse_by_hand(outer_micro):
    graphdef, params, frozen = nnx.split(_tiny_lora_model(), models.LoRAParam, ...)
    # Non-zero B factors, so that both factors have gradients and importance.
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)
    programs = Programs(graphdef, family=models.Seq2SeqFamily(),
                        lr=5e-3, warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, donate=False)
    state = kif_state(programs, params)
    rng = np.random.default_rng(0)
    inner, outer = _random_batches(rng, 3), _random_batches(rng, 2, micro=outer_micro)
    program = KifCycle(inner_steps=3, outer_steps=2, importance_clipped_grads=False, outer_loss_scale=1.0)
    fused_state, out = programs.run_cycle(state, frozen, inner, outer, program=program)

    # By hand: the same inner steps, then the outer steps one by one, then kif_jax.fuse.
    inner_steps = jax.jit(lambda s: programs.scan_steps(program, s, frozen, inner, Learner(False, jnp.int32(0))))
    after_inner, _ = inner_steps(state)
    theta_k = after_inner.params
    s = after_inner
    for m in range(2):
        s, _ = programs.step(program, s, jax.tree.map(lambda x: x[m], outer), frozen, Learner(True, jnp.int32(m)))
    tau_in = kif_jax.task_vector(theta_k, state.params)
    tau_out = kif_jax.task_vector(s.params, theta_k)
    expected = kif_jax.fuse(state.params, tau_in, tau_out, kif_jax.importance_scores(s.method.imp_in),
                            kif_jax.importance_scores(s.method.imp_out), quantile=0.8, scope="global",
                            scheme="reference")
    for got, want, end in zip(jax.tree.leaves(fused_state.params), jax.tree.leaves(expected),
                              jax.tree.leaves(s.params)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
        assert not np.allclose(got, end)  # fusion really changed the end-of-cycle parameters
    # Reference resets: inner importance cleared, outer importance kept.
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(fused_state.method.imp_in.sens))
    for got, want in zip(jax.tree.leaves(fused_state.method.imp_out), jax.tree.leaves(s.method.imp_out)):
        # Two compiled programs round differently in the last bits; |s - S| amplifies that near zero.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))
    assert int(fused_state.step) == 3 and out["inner_loss"].shape == (3,) and out["outer_loss"].shape == (2,)


def test_eight_devices_equal_one_device(tmp_path):
    results, losses = {}, {}
    for devices in (1, 8):
        config = tiny_config.get_config()
        config.sharding.num_devices = devices
        config.train.micro_batch_size = 8  # 8 rows: one per device
        config.model.lora.dropout = 0.0  # rbg dropout bits are not guaranteed identical across meshes
        results[devices] = train_and_evaluate(config, tmp_path / str(devices))["recurrent_kif"]
        losses[devices] = training_records(tmp_path / str(devices), "recurrent_kif")
    assert len(losses[1]) == len(losses[8]) >= 4
    for a, b in zip(losses[1], losses[8]):
        assert a[:2] == b[:2]
        np.testing.assert_allclose([x for x in a[2:] if x is not None], [x for x in b[2:] if x is not None],
                                   rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(matrix(results[1]), matrix(results[8]))


def test_non_finite_loss_stops_with_task_and_step_or_is_skipped(tmp_path):
    config = tiny_config.get_config()
    config.methods = "seq_lora"
    config.train.lr = 1e38  # the first update takes the LoRA factors near float32 max; the next loss is NaN
    with pytest.raises(NonFiniteError, match=r"task topic \(#1\), step \d+"):
        train_and_evaluate(config, tmp_path / "stop")
    assert not (tmp_path / "stop" / "seq_lora" / "results.json").exists()
    config.train.on_nonfinite = "skip"
    train_and_evaluate(config, tmp_path / "skip")
    skipped = sum(r.get("skipped_steps", 0) for r in read_metrics(tmp_path / "skip" / "seq_lora" / "metrics.jsonl"))
    assert skipped > 0


def test_finished_run_resumes_to_same_result_and_refuses_other_config(tmp_path):
    config = tiny_config.get_config()
    config.methods = "seq_lora"
    first = train_and_evaluate(config, tmp_path)["seq_lora"]
    again = train_and_evaluate(config, tmp_path)["seq_lora"]  # restored from the last checkpoint
    assert again["accuracy_matrix"] == first["accuracy_matrix"]
    config.ewc.lambda_ *= 2  # another method's setting: SeqLoRA's run stands
    assert train_and_evaluate(config, tmp_path)["seq_lora"]["accuracy_matrix"] == first["accuracy_matrix"]
    # Checkpoints an earlier kif_jax wrote carry the whole config's fingerprint: resumable under that config.
    for metadata in (tmp_path / "seq_lora" / "checkpoints").glob("*/meta/metadata"):
        meta = json.loads(metadata.read_text())
        metadata.write_text(json.dumps(dict(meta, config_fingerprint=config_fingerprint(config))))
    assert train_and_evaluate(config, tmp_path)["seq_lora"]["accuracy_matrix"] == first["accuracy_matrix"]
    config.train.lr = 5e-3
    with pytest.raises(CheckpointError, match="different config"):
        train_and_evaluate(config, tmp_path)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    """With no intact checkpoint left (a corrupt latest one alone falls back: tests/test_preemption.py)."""
    config = tiny_config.get_config()
    config.methods = "seq_lora"
    train_and_evaluate(config, tmp_path)
    checkpoints = tmp_path / "seq_lora" / "checkpoints"
    every = [p for p in checkpoints.iterdir() if p.name.isdigit()]
    assert len(every) == 2  # checkpoint.keep
    for f in (f for ckpt in every for f in (ckpt / "state").rglob("*")):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        train_and_evaluate(config, tmp_path)


def test_non_default_switches_run(tmp_path):
    """The paper's readings and the other switches: each changes the program, all must train cleanly."""
    config = tiny_config.get_config()
    config.synthetic.n_train = 40  # 5 steps per task: a partial cycle of 1 step after two of Q = 2
    config.kif.outer_optimizer = "separate"
    config.kif.fuse_partial_cycle = True
    config.kif.scope = "per_factor"
    config.kif.method = "bisect"
    config.kif.scheme = "binary"
    config.kif.score = "sens"
    config.kif.order = "mix"
    config.kif.beta1 = config.kif.beta2 = 0.55
    config.kif.importance_params = "current"
    config.kif.importance_grads = "clipped"
    config.kif.reset_outer = True
    config.train.reset_at_task_boundary = False
    config.train.select_best = True
    config.train.select_every_steps = 2
    result = train_and_evaluate(config, tmp_path)["recurrent_kif"]
    assert np.isfinite(matrix(result)[1]).all()
    records = read_metrics(tmp_path / "recurrent_kif" / "metrics.jsonl")
    fused = [r for r in records if r.get("phase") == 1 and "mask_in_frac" in r]
    assert [r["step"] for r in fused] == [2, 4, 5]  # the partial last cycle is fused too
    assert all(0.0 < r["mask_in_frac"] <= 0.3 for r in fused)  # per-factor thresholds: 20% of each factor
    dev = [r for r in records if r.get("event") == "dev_loss"]
    assert [(r["phase"], r["step"]) for r in dev] == [(0, 2), (0, 4), (1, 2), (1, 4)]
    assert all(np.isfinite(r["dev_loss"]) for r in dev)


def test_trains_lora_on_a_hugging_face_checkpoint_in_bf16(tmp_path):
    """The users' path: from_pretrained on an HF-format directory, bf16 backbone, float32 LoRA factors."""
    config = tiny_config.get_config()
    config.model.name = str(pathlib.Path(__file__).parent / "fixtures" / "t5_v1_1")
    config.model.dtype = "bfloat16"
    result = train_and_evaluate(config, tmp_path)["recurrent_kif"]
    assert np.isfinite(matrix(result)[1]).all()
    records = [r for r in read_metrics(tmp_path / "recurrent_kif" / "metrics.jsonl") if "loss" in r]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert all(0.0 < r["mask_in_frac"] <= 0.201 for r in records if r["phase"] == 1)


def test_reference_defaults_one_inner_and_one_outer_step_by_hand():
    """The reference's defaults (clipped importance, outer loss x 0.25 through the shared AdamW), worked by
    hand with optax's formulas: clip, Adam step, then |p * g| from the clipped gradient, for both learners."""
    config = base_config()
    kif = config.kif
    assert kif.importance_grads == "clipped" and kif.outer_loss_scale == 0.25 and kif.outer_optimizer == "shared"
    graphdef, params, frozen = nnx.split(_tiny_lora_model(), models.LoRAParam, ...)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)
    rng = np.random.default_rng(1)
    inner, outer = _random_batches(rng, 1), _random_batches(rng, 1)
    probe = Programs(graphdef, family=models.Seq2SeqFamily(), lr=5e-3, warmup_steps=0, max_grad_norm=1.0,
                     weight_decay=0.0, donate=False)
    norm = lambda t: float(optax_norm(t))
    plain = Program(inner_steps=0)
    g_in0 = probe.accumulated_grads(plain, params, (), frozen, jax.tree.map(lambda x: x[0], inner), None)[1]
    g_out0 = probe.accumulated_grads(plain, params, (), frozen, jax.tree.map(lambda x: x[0], outer), None)[1]
    # A clip norm between the scaled outer gradient's norm and the inner one's: the inner gradient is
    # clipped, the outer one is not, so the 0.25 shows in the update (a clipped gradient would hide it).
    assert 0.25 * norm(g_out0) < 0.5 * norm(g_in0)
    max_norm = 0.5 * norm(g_in0)
    lr, total, b1, b2, eps, beta = 5e-3, 100, 0.9, 0.999, 1e-8, 0.85
    programs = Programs(graphdef, family=models.Seq2SeqFamily(), lr=lr, warmup_steps=0, max_grad_norm=max_norm,
                        weight_decay=0.0, donate=False)
    state = kif_state(programs, params, total_steps=total)
    program = RecurrentKIF(config).cycle_program(1)
    program = dataclasses.replace(program, outer_steps=1, fuse=False)  # the two steps alone, no fusion
    got, out = programs.run_cycle(state, frozen, inner, outer, program=program)

    def clip(g):
        n = norm(g)
        return jax.tree.map(lambda x: x * min(1.0, max_norm / n), g)

    def importance(p, g):  # one EMA update from a zero state: S = (1-b) s, U = (1-b) |s - S|
        s = jax.tree.map(lambda p, g: jnp.abs(p * g), p, g)
        sens = jax.tree.map(lambda s: (1 - beta) * s, s)
        return sens, jax.tree.map(lambda s, S: (1 - beta) * jnp.abs(s - S), s, sens)

    c_in = clip(g_in0)
    m = jax.tree.map(lambda g: (1 - b1) * g, c_in)
    v = jax.tree.map(lambda g: (1 - b2) * g * g, c_in)
    p1 = jax.tree.map(lambda p, m, v: p - lr * (m / (1 - b1)) / (jnp.sqrt(v / (1 - b2)) + eps), params, m, v)
    g_out = jax.tree.map(lambda g: 0.25 * g, programs.accumulated_grads(plain, p1, (), frozen,
                                                                        jax.tree.map(lambda x: x[0], outer), None)[1])
    c_out = clip(g_out)
    assert norm(c_out) == pytest.approx(norm(g_out))  # not clipped
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, c_out)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, c_out)
    lr1 = lr * (total - 1) / total  # the schedule at the inner step count (1): outer steps do not advance it
    p2 = jax.tree.map(lambda p, m, v: p - lr1 * (m / (1 - b1**2)) / (jnp.sqrt(v / (1 - b2**2)) + eps), p1, m, v)
    want = {"params": p2, "in": importance(p1, c_in), "out": importance(p2, c_out)}
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # lr 5e-3 steps: a 0.25 vs 1 scale moves 1e-4+
    for name, imp in (("in", got.method.imp_in), ("out", got.method.imp_out)):
        for part, expected in zip(("sens", "unc"), want[name]):
            for a, b in zip(jax.tree.leaves(getattr(imp, part)), jax.tree.leaves(expected)):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))
    assert float(out["outer_loss"][0]) > 0 and int(got.step) == 1
