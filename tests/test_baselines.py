"""The prior methods O-LoRA, TaSL, EWC and the +Adaptive ablation: their arithmetic on literal examples worked
by hand, every one end to end on the tiny T5 (O-LoRA also on a tiny decoder), exact resumption, config errors."""
import functools
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import kif_jax
import tiny_config
from helpers import read_metrics
from tiny_models import random_t5_batches, tiny_t5_lora
from kif_jax import cli, models
from kif_jax.config import validate_config
from kif_jax.errors import ConfigError
from kif_jax.methods import Program
from kif_jax.methods.base import INNER_STREAM
from kif_jax.methods.ewc import EwcState, FisherUpdate, ewc_penalty
from kif_jax.methods.o_lora import l2_loss, lora_concat, lora_zeros, o_lora_loss, orthogonality_loss
from kif_jax.methods.recurrent_kif import KifCycle, KifState, adaptive_weights
from kif_jax.methods.tasl import TaSL, TaslProgram, TaslState, ConsolidateSkills, minmax, tasl_merge, tasl_weights
from kif_jax.metrics import results_matrix as matrix
from kif_jax.train import Programs, ResumePosition, init_state, train_and_evaluate
from kif_jax.train.steps import make_task_key

BASELINE_METHODS = ("o_lora", "tasl", "ewc", "adaptive")
TASK_END = ResumePosition(phase=1).checkpoint_id  # the checkpoint of task 1's end


def training_records(workdir: pathlib.Path, method: str) -> list[dict]:
    """Every logged training cycle and task-end event, without the timing fields."""
    out = []
    for r in read_metrics(workdir / method / "metrics.jsonl"):
        if "loss" in r or r.get("event") in ("tasl_consolidation", "ewc_fisher", "task_end"):
            out.append({k: v for k, v in r.items() if k not in ("steps_per_s", "tokens_per_s", "resumed")})
    return out


# --- arithmetic, by hand ---------------------------------------------------------------------------
def f32(x):
    return jnp.asarray(x, jnp.float32)


def test_o_lora_branches_and_loss_by_hand():
    # Two adapted modules. kif_jax's A is [in, r] (peft's A^T), so peft's A_old A_new^T is A_old^T A_new here.
    old = {"m1": {"lora_a": f32([[1], [2]]), "lora_b": f32([[1, 0]])},            # r_old = 1
           "m2": {"lora_a": f32([[1, 0], [0, -1]]), "lora_b": f32([[1, 1, 1], [0, 0, 0]])}}  # r_old = 2
    new = {"m1": {"lora_a": f32([[3], [-1]]), "lora_b": f32([[3, 4]])},
           "m2": {"lora_a": f32([[2], [1]]), "lora_b": f32([[0, 0, 0]])}}
    # m1: A_old^T A_new = 1*3 + 2*(-1) = 1 -> 1;  m2: [[1*2 + 0*1], [0*2 - 1*1]] = [[2], [-1]] -> 3.  O = 4.
    assert float(orthogonality_loss(old, new)) == 4.0
    # L2: ||A1|| = sqrt(10), ||B1|| = 5, ||A2|| = sqrt(5), ||B2|| = 0 (Frobenius norms, not squared).
    np.testing.assert_allclose(float(l2_loss(new)), math.sqrt(10) + 5 + math.sqrt(5), rtol=1e-6)
    loss = o_lora_loss(old, new, lambda1=0.5, lambda2=0.1)
    np.testing.assert_allclose(float(loss), 0.5 * 4 + 0.1 * (math.sqrt(10) + 5 + math.sqrt(5)), rtol=1e-6)
    assert float(o_lora_loss((), new, lambda1=0.5, lambda2=0.0)) == 0.0  # task 1: no old branch
    # The norm of the all-zero B2 has gradient 0, not NaN; ||B1|| has B1 / ||B1|| = [0.6, 0.8].
    grads = jax.grad(lambda n: o_lora_loss(old, n, lambda1=0.5, lambda2=0.1))(new)
    np.testing.assert_array_equal(grads["m2"]["lora_b"], np.zeros((1, 3)))
    np.testing.assert_allclose(grads["m1"]["lora_b"], [[0.06, 0.08]], rtol=1e-6)
    # d/dA_new of 0.5 * |A_old^T A_new| for m1: 0.5 * sign(1) * A_old = [[0.5], [1]]; + 0.1 * A/||A||.
    np.testing.assert_allclose(grads["m1"]["lora_a"], [[0.5 + 0.3 / math.sqrt(10)], [1.0 - 0.1 / math.sqrt(10)]],
                               rtol=1e-6)

    # The layer sees both branches side by side: one matmul gives x A_old B_old + x A_new B_new.
    both = lora_concat(old, new)
    assert both["m1"]["lora_a"].shape == (2, 2) and both["m1"]["lora_b"].shape == (2, 2)
    assert both["m2"]["lora_a"].shape == (2, 3) and both["m2"]["lora_b"].shape == (3, 3)
    x = f32([[1, 1]])
    # m1: x A_old = 3 -> [3, 0]; x A_new = 2 -> [6, 8]; sum [9, 8].
    np.testing.assert_array_equal(x @ both["m1"]["lora_a"] @ both["m1"]["lora_b"], [[9, 8]])
    # m2: x A_old = [1, -1] -> [1, 1, 1]; x A_new = 3 -> B2 = 0 -> [0, 0, 0].
    np.testing.assert_array_equal(x @ both["m2"]["lora_a"] @ both["m2"]["lora_b"], [[1, 1, 1]])
    zeros = lora_zeros(new, 3)
    assert zeros["m1"]["lora_a"].shape == (2, 3) and zeros["m1"]["lora_b"].shape == (3, 2)


def test_tasl_minmax_and_four_case_merge_by_hand():
    np.testing.assert_allclose(minmax(f32([2, 4, 6])), [0, 0.5, 1])
    np.testing.assert_array_equal(minmax(f32([3, 3])), [0, 0])  # equal scores: zeros, not 0/0
    # 10 units. current -> [1, .9, 0, .1, .2, .3, .4, .5, .6, .7]; 80th percentile (linear) .74: units 0, 1.
    current = f32([10, 9, 0, 1, 2, 3, 4, 5, 6, 7])
    # previous -> [1, 0, 1, .5, 0, 0, 0, 0, 0, 0]; 80th percentile .6: units 0, 2.
    previous = f32([2, 1, 2, 1.5, 1, 1, 1, 1, 1, 1])
    w, accumulated = tasl_weights(current, previous, quantile=0.8)
    # unit 0 both -> 0.3 current; unit 1 current only -> 1; unit 2 previous only -> 0; the rest neither -> 0.5.
    np.testing.assert_allclose(w, [0.3, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    # 0.3 cur + 0.7 prev = [1, .27, .7, .38, .06, .09, .12, .15, .18, .21]; min-max over [.06, 1].
    mixed = np.array([1, .27, .7, .38, .06, .09, .12, .15, .18, .21])
    np.testing.assert_allclose(accumulated, (mixed - 0.06) / 0.94, rtol=1e-5, atol=1e-6)

    prev_params = {f"u{i}": jnp.full((2, 3), 10.0) for i in range(10)}
    cur_params = {f"u{i}": jnp.full((2, 3), 20.0) for i in range(10)}
    merged = tasl_merge(prev_params, cur_params, w)
    want = [13.0, 20.0, 10.0] + [15.0] * 7  # 0.3*20 + 0.7*10; current; previous; 0.5*20 + 0.5*10
    for i in range(10):
        np.testing.assert_allclose(merged[f"u{i}"], np.full((2, 3), want[i]), rtol=1e-6)

    # The same through the jitted task-end program, with unit scores from the importance state
    # (mean of I_bar * U_bar per tensor: I_bar = current_u everywhere, U_bar = 1).
    programs = Programs(None, family=None, lr=1e-3, warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
                        donate=False)
    imp = kif_jax.ImportanceState({f"u{i}": jnp.full((2, 3), current[i]) for i in range(10)},
                                  {f"u{i}": jnp.ones((2, 3)) for i in range(10)}, jnp.int32(5))
    state = init_state(cur_params, programs.tx, key=make_task_key(0, 1, "rbg"), total_steps=1, select_best=False,
                       method_state=TaslState(importance=imp, anchor=prev_params, unit_scores=previous))
    first, _ = programs.run_hook(state, None, program=ConsolidateSkills(first=True, quantile=0.8))  # task 1: kept
    np.testing.assert_array_equal(first.method.unit_scores, current)
    assert all(np.all(first.params[f"u{i}"] == 20.0) for i in range(10))
    later, stats = programs.run_hook(state, None, program=ConsolidateSkills(first=False, quantile=0.8))
    for i in range(10):
        np.testing.assert_allclose(later.params[f"u{i}"], np.full((2, 3), want[i]), rtol=1e-6)
    np.testing.assert_allclose(later.method.unit_scores, (mixed - 0.06) / 0.94, rtol=1e-5, atol=1e-6)
    assert (int(stats["units_both"]), int(stats["units_current_only"]), int(stats["units_previous_only"])) == (1, 1, 1)


def test_ewc_penalty_by_hand():
    params = {"a": f32([1, 2]), "b": f32([[3]])}
    star = {"a": f32([0, 2]), "b": f32([[1]])}
    fisher = {"a": f32([2, 5]), "b": f32([[0.5]])}
    # (4 / 2) * (2 * 1^2 + 5 * 0^2 + 0.5 * 2^2) = 2 * 4 = 8
    assert float(ewc_penalty(params, star, fisher, lam=4.0)) == 8.0
    grads = jax.grad(lambda p: ewc_penalty(p, star, fisher, lam=4.0))(params)  # lam * F * (p - p*)
    np.testing.assert_array_equal(grads["a"], [8.0, 0.0])
    np.testing.assert_array_equal(grads["b"], [[4.0]])


_tiny_lora_model = tiny_t5_lora
_random_batches = functools.partial(random_t5_batches, micro=2, rows=2, length=12, target=4)


def test_ewc_fisher_is_the_mean_squared_batch_gradient_and_sums_over_tasks():
    graphdef, params, frozen = nnx.split(_tiny_lora_model(), models.LoRAParam, ...)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)
    programs = Programs(graphdef, family=models.Seq2SeqFamily(), lr=1e-3, warmup_steps=0, max_grad_norm=1.0,
                        weight_decay=0.0, donate=False)
    batches = _random_batches(np.random.default_rng(0), 3)  # K = 3 batches of 2 micro-batches
    earlier = jax.tree.map(lambda p: jnp.full(p.shape, 0.25, jnp.float32), params)  # an earlier task's Fisher
    state = init_state(params, programs.tx, key=make_task_key(0, 1, "rbg"), total_steps=1, select_best=False,
                       method_state=EwcState(fisher=earlier, star=jax.tree.map(jnp.zeros_like, params)))
    new, stats = programs.run_hook(state, frozen, batches, program=FisherUpdate())
    grad = jax.jit(lambda b: programs.accumulated_grads(Program(inner_steps=0), params, (), frozen, b, None)[1])
    squares = [jax.tree.map(jnp.square, grad(jax.tree.map(lambda x: x[k], batches))) for k in range(3)]
    for got, e, *sq in zip(jax.tree.leaves(new.method.fisher), jax.tree.leaves(earlier),
                           *map(jax.tree.leaves, squares)):
        np.testing.assert_allclose(got, e + sum(sq) / 3, rtol=1e-5, atol=1e-12)
    assert int(stats["fisher_batches"]) == 3 and float(stats["fisher_mean"]) > 0.25
    for got, want in zip(jax.tree.leaves(new.method.star), jax.tree.leaves(params)):  # theta* = the parameters now
        np.testing.assert_array_equal(got, want)


def test_tasl_importance_uses_the_clipped_gradient_from_the_second_step():
    """As the reference's Trainer: no update on a task's first step; then I = |theta_after * clip(g)|."""
    graphdef, params, frozen = nnx.split(_tiny_lora_model(), models.LoRAParam, ...)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)
    programs = Programs(graphdef, family=models.Seq2SeqFamily(), lr=1e-3, warmup_steps=0, max_grad_norm=0.01,
                        weight_decay=0.0, donate=False)
    tasl = TaSL(tiny_config.get_config())
    program, extra = tasl.cycle(SimpleNamespace(phase=1), 0, 2)
    assert isinstance(program, TaslProgram) and (program.beta1, program.beta2) == (0.85, 0.85) and extra == []
    state = init_state(params, programs.tx, key=make_task_key(0, 1, "rbg"), total_steps=10, select_best=False,
                       method_state=tasl.init_state(1, params, tx=programs.tx))
    batches = _random_batches(np.random.default_rng(1), 2)
    step = jax.jit(lambda s, b: programs.step(program, s, b, frozen)[0])
    s1 = step(state, jax.tree.map(lambda x: x[0], batches))
    imp1 = s1.method.importance
    assert int(imp1.count) == 0 and all(float(jnp.max(x)) == 0 for x in jax.tree.leaves(imp1.sens))
    second = jax.tree.map(lambda x: x[1], batches)
    s2 = step(s1, second)
    _, g, _ = jax.jit(lambda p, b, k: programs.accumulated_grads(Program(inner_steps=0), p, (), frozen, b, k))(
        s1.params, second, programs.key(s1, INNER_STREAM, s1.step))
    norm = float(optax.tree.norm(g))
    assert norm > 0.01  # clipping matters here
    imp2 = s2.method.importance
    for sens, unc, p, gi in zip(*map(jax.tree.leaves, (imp2.sens, imp2.unc, s2.params, g))):
        sensitivity = np.abs(np.asarray(p) * np.asarray(gi) * (0.01 / norm))
        np.testing.assert_allclose(sens, 0.15 * sensitivity, rtol=2e-4, atol=1e-12)
        np.testing.assert_allclose(unc, 0.15 * 0.85 * sensitivity, rtol=2e-4, atol=1e-12)
    assert int(imp2.count) == 1


def test_adaptive_weights_by_hand():
    s_in = {"a": f32([0, 2]), "b": f32([4, 1])}  # min-max over the learner: a [0, .5], b [1, .25]
    s_out = {"a": f32([1, 1]), "b": f32([3, 2])}  # a [0, 0], b [1, .5]
    w_in, w_out = adaptive_weights(s_in, s_out)
    np.testing.assert_allclose(w_in["a"], [0.5, 1.0])  # 0/0 -> 0.5; .5 / (.5 + 0) = 1
    np.testing.assert_allclose(w_in["b"], [0.5, 1 / 3], rtol=1e-6)  # 1 / 2; .25 / .75
    np.testing.assert_allclose(w_out["b"], [0.5, 2 / 3], rtol=1e-6)
    equal = adaptive_weights({"a": f32([7, 7])}, {"a": f32([2, 2])})[0]  # constant scores: all 0.5
    np.testing.assert_array_equal(equal["a"], [0.5, 0.5])

    # The training program's fusion with KifCycle(adaptive=True): theta + w_in tau_in + w_out tau_out,
    # scores S * U of each learner's importance state (U = 1 here).
    programs = Programs(None, family=None, lr=1e-3, warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
                        donate=False)
    base = {"a": f32([0, 0]), "b": f32([0, 0])}
    ones = {"a": f32([1, 1]), "b": f32([1, 1])}
    kif = KifState(imp_in=kif_jax.ImportanceState(s_in, ones, jnp.int32(1)),
                   imp_out=kif_jax.ImportanceState(s_out, ones, jnp.int32(1)))
    tau_in, tau_out = ones, jax.tree.map(lambda x: 10 * x, ones)
    fused, stats, _ = KifCycle(inner_steps=1, adaptive=True).fuse_vectors(programs, base, tau_in, tau_out, kif)
    np.testing.assert_allclose(fused["a"], [0.5 + 5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(fused["b"], [0.5 + 5, 1 / 3 + 20 / 3], rtol=1e-6)
    np.testing.assert_allclose(float(stats["w_in_mean"]), (0.5 + 1 + 0.5 + 1 / 3) / 4, rtol=1e-6)


# --- config errors ---------------------------------------------------------------------------------
def test_o_lora_with_full_fine_tuning_is_one_line_and_exit_2(tmp_path, capsys):
    config = tiny_config.get_config()
    config.methods = "seq_lora,o_lora"
    config.model.trainable = "all"
    with pytest.raises(ConfigError, match=r"method 'o_lora'.*model\.trainable"):
        validate_config(config)
    assert cli.run(config, str(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "o_lora" in err[0] and "'all'" in err[0]
    assert not any(tmp_path.iterdir())
    config.model.trainable = "lora"
    config.ewc.lambda_ = -1.0
    with pytest.raises(ConfigError, match="ewc.lambda_"):
        validate_config(config)


# --- end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baseline_runs(every_method_run):
    return every_method_run  # tests/conftest.py: every built-in method, mid-task checkpoints every 2 steps


def test_every_baseline_runs_end_to_end(baseline_runs):
    _, workdir, results = baseline_runs
    assert set(BASELINE_METHODS) <= set(results)
    for method in BASELINE_METHODS:
        result = results[method]
        R = matrix(result)
        assert R.shape == (2, 2) and np.isfinite(R[0, 0]) and np.isnan(R[0, 1]) and np.isfinite(R[1]).all(), method
        assert np.all((R[1] >= 0) & (R[1] <= 1)) and result["bwt"] == pytest.approx(R[1, 0] - R[0, 0])
        records = [r for r in read_metrics(workdir / method / "metrics.jsonl") if "loss" in r]
        assert [(r["phase"], r["step"]) for r in records] == [(0, 2), (0, 4), (1, 2), (1, 4)], method
        assert all(np.isfinite(r["loss"]) and r["skipped_steps"] == 0 for r in records), method
    assert all(m in (workdir / "comparison.md").read_text() for m in BASELINE_METHODS)


def test_baselines_do_what_they_say(baseline_runs):
    _, workdir, _ = baseline_runs
    log = {m: read_metrics(workdir / m / "metrics.jsonl") for m in BASELINE_METHODS}
    cycles = {m: [r for r in rs if "loss" in r] for m, rs in log.items()}
    # O-LoRA: lambda2 = 0, so task 1 has no penalty; from task 2 the orthogonality term is on (> 0).
    assert all("penalty" not in r for r in cycles["o_lora"] if r["phase"] == 0)
    assert all(r["penalty"] > 0 for r in cycles["o_lora"] if r["phase"] == 1)
    # TaSL: 12 units (q and v of encoder self-, decoder self- and cross-attention: 3 x 2 modules x (A, B)),
    # 20% important per score vector; task 1 kept as trained.
    events = [r for r in log["tasl"] if r.get("event") == "tasl_consolidation"]
    assert [(r["phase"], r["units"]) for r in events] == [(0, 12), (1, 12)] and "units_both" not in events[0]
    # 3 units of 12 lie above each 80th percentile (12 - 1 - floor(0.8 * 11)), for each score vector
    assert events[1]["units_both"] + events[1]["units_current_only"] == 3
    assert events[1]["units_both"] + events[1]["units_previous_only"] == 3
    # EWC: the Fisher accumulated over every step of each task (TRACE's form); the penalty is 0 at theta* and grows
    # as task 2 moves away.
    fisher = [r for r in log["ewc"] if r.get("event") == "ewc_fisher"]
    assert [(r["phase"], r["fisher"], r["fisher_steps"]) for r in fisher] == [(0, "trace", 4), (1, "trace", 4)]
    assert 0 < fisher[0]["fisher_mean"] < fisher[1]["fisher_mean"]  # summed over tasks
    assert all("penalty" not in r for r in cycles["ewc"] if r["phase"] == 0)
    task2 = [r["penalty"] for r in cycles["ewc"] if r["phase"] == 1]
    assert 0 <= task2[0] < task2[1]
    # +Adaptive: outer steps and weighted fusion from task 2 on, no masks.
    for r in cycles["adaptive"]:
        assert ("outer_loss" in r) == (r["phase"] == 1) and "mask_in_frac" not in r
        if r["phase"] == 1:
            assert 0.0 < r["w_in_mean"] < 1.0
    # Task 1 of TaSL, EWC and +Adaptive is plain LoRA training: identical losses.
    first = {m: [r["loss"] for r in cycles[m] if r["phase"] == 0] for m in ("tasl", "ewc", "adaptive")}
    assert first["tasl"] == first["ewc"] == first["adaptive"]


def test_o_lora_resumes_exactly_although_its_rank_grows(baseline_runs, tmp_path):
    """Resume from the finished run (template of task 2: old branch of rank r), from task 2's mid-task
    checkpoint (same template, training goes on), and from task 1's end (no old branch yet; it is built)."""
    config, workdir, results = baseline_runs
    config = config.copy_and_resolve_references()
    config.methods = "o_lora"
    want_records = training_records(workdir, "o_lora")
    shutil.copytree(workdir / "o_lora", tmp_path / "o_lora")
    checkpoints = tmp_path / "o_lora" / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [
        2, TASK_END, TASK_END + 2, 2 * TASK_END]
    for drop in ([], [2 * TASK_END], [2 * TASK_END, TASK_END + 2]):
        for step in drop:
            shutil.rmtree(checkpoints / str(step))
        again = train_and_evaluate(config, tmp_path)["o_lora"]
        assert (checkpoints / str(2 * TASK_END)).exists()  # task 2 was (re)trained and saved again
        assert again["accuracy_matrix"] == results["o_lora"]["accuracy_matrix"], drop
        assert training_records(tmp_path, "o_lora") == want_records, drop
    # The task-2 checkpoint holds the old branch (task 1's factors, rank r) beside the new one (rank r).
    tree = ocp.StandardCheckpointer().metadata(str(checkpoints / str(2 * TASK_END) / "state")).item_metadata
    r = config.model.lora.rank
    for part in ("method", "params"):  # the old branch is O-LoRA's state
        shapes = [(jax.tree_util.keystr(k), tuple(v.shape)) for k, v in jax.tree_util.tree_flatten_with_path(
            tree[part], is_leaf=lambda x: hasattr(x, "shape"))[0]]
        assert len(shapes) == 12, part
        assert all(s[1] == r if "lora_a" in k else s[0] == r for k, s in shapes), (part, shapes)


def kill_in_second_task_and_resume(tmp_path: pathlib.Path, method: str) -> None:
    """As test_main.kill_mid_method_and_resume, for one method, SIGKILLed in the middle of task 2: the resumed
    run must reproduce the uninterrupted run's accuracy matrix and every training record."""
    from test_main import main_command, run_main

    # After main_command's own --config.methods, this one wins; 8 steps per task widen the window to kill in.
    flags = (f"--config.methods={method}", "--config.synthetic.n_train=64")
    reference = run_main(tmp_path / "reference", *flags)
    assert reference.returncode == 0, reference.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(main_command(killed, *flags), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=pathlib.Path(__file__).resolve().parent.parent)
    checkpoints = killed / method / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if checkpoints.exists() and any(p.name.isdigit() and int(p.name) > TASK_END for p in checkpoints.iterdir()):
            break  # a checkpoint in the middle of task 2: the task-1 consolidation state must come back with it
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / method / "results.json").exists()
    resumed = run_main(killed, *flags)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want = json.loads((tmp_path / "reference" / method / "results.json").read_text())
    got = json.loads((killed / method / "results.json").read_text())
    assert got["accuracy_matrix"] == want["accuracy_matrix"]
    assert training_records(killed, method) == training_records(tmp_path / "reference", method)
    ends = [r for r in read_metrics(killed / method / "metrics.jsonl") if r.get("event") == "task_end"]
    assert [r["resumed"] for r in ends] == [False, True]  # task 2 went on from its mid-task checkpoint


def test_sigkilled_tasl_run_resumes_to_the_identical_result(tmp_path):
    kill_in_second_task_and_resume(tmp_path, "tasl")


@pytest.fixture(scope="module")
def decoder_checkpoint(tmp_path_factory) -> pathlib.Path:
    from kif_jax.models.decoder import hf as decoder_hf
    from kif_jax.models.decoder import DecoderLM
    from test_causal_training import TINY

    directory = tmp_path_factory.mktemp("tiny_decoder_o_lora")
    decoder_hf.save_pretrained(DecoderLM(TINY, rngs=nnx.Rngs(11)), str(directory))
    return directory


def test_o_lora_trains_a_decoder(decoder_checkpoint, tmp_path):
    config = tiny_config.get_config()
    config.model.name = str(decoder_checkpoint)
    config.model.lora.targets = "q_proj,v_proj"
    config.methods = "o_lora"
    config.o_lora.lambda2 = 0.1  # exercise the norm term on task 1 too (B = 0 at the start: gradient 0)
    R = matrix(train_and_evaluate(config, tmp_path)["o_lora"])
    assert np.isfinite(R[1]).all() and np.all((R[1] >= 0) & (R[1] <= 1))
    cycles = [r for r in read_metrics(tmp_path / "o_lora" / "metrics.jsonl") if "loss" in r]
    assert len(cycles) == 4 and all(np.isfinite(r["loss"]) and r["skipped_steps"] == 0 for r in cycles)
    # Task 1: the norm term only (small); task 2 adds the orthogonality term of the 2 modules' A factors.
    assert all(0 < r["penalty"] for r in cycles)
    assert min(r["penalty"] for r in cycles if r["phase"] == 1) > max(r["penalty"] for r in cycles if r["phase"] == 0)
