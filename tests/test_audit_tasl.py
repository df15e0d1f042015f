"""TaSL against the authors' code (the audit table in docs/baselines.md; WoodScene/TaSL @ d7a0c4f): one optimizer step of the TaSL
program and the task-end consolidation, each worked by hand outside kif_jax's method code and compared with the
jitted programs. Every mutation of the hand computation (one item of the audit table changed) must NOT match, so
each item is pinned.

The step worked by hand is a task's second (step 1; the authors' `update_score` skips global_step 0):
  loss    mean over the A micro-batches of each one's mean target cross-entropy (the Trainer's accumulation)
  update  g_c = g * min(1, max_norm / |g|); Adam(0.9, 0.999, 1e-8) on g_c from given moments; + wd * theta;
          theta' = theta - lr * (...), lr = peak * step / warmup (Hugging Face's linear warm-up)
  import. s = |theta' * g_c| (theta AFTER the step, the CLIPPED gradient); I = b1 I + (1-b1) s;
          U = b2 U + (1-b2) |s - I_new|  (utils/lora_importance.py:81-87, trainer.py:1889-1919)
The task end (skill_consolidation.py:38-128): unit = one tensor (each LoRA A and B), score = mean(I * U);
min-max each of the current and accumulated scores, important = strictly above its own 80th percentile
(numpy, linear); both 0.3 cur + 0.7 prev, previous only prev, current only cur, neither 0.5 / 0.5;
accumulated = minmax(0.3 cur + 0.7 prev); task 1 kept as trained, its raw scores carried.
"""
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_config
from tiny_models import random_t5_batches
from kif_jax import models
from kif_jax.core.tree import tree_path_names
from kif_jax.methods.tasl import TaSL
from kif_jax.train import Programs, init_state
from kif_jax.train.steps import make_task_key

PEAK_LR, WARMUP, TOTAL, WD = 0.05, 4, 10, 0.01
STEP = 1  # a task's second optimizer step: the first one the importance sees
A = 2  # accumulated micro-batches
# Tolerances: relative to each element, plus `ATOL` times the tensor's largest |value| (float32 gradients of elements
# that cancel carry ~1e-7 of the tensor's scale, not of their own).
RTOL, ATOL = 1e-5, 1e-5


def _model() -> models.T5:
    # A 1-layer T5 whose LoRA factors differ in size (inner 8 != d_model 16), adapted on q, k, v, o as the
    # authors' LLaMA script (--lora_target_modules='[q_proj,k_proj,v_proj,o_proj]'): 24 units.
    config = models.T5Config(vocab_size=259, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1,
                             num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                             scale_decoder_outputs=False, dropout_rate=0.0)
    return models.T5(config, lora=models.LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q", "k", "v", "o")),
                     rngs=nnx.Rngs(3))


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min())


# --- one step by hand ------------------------------------------------------------------------------
def hand_step(h: SimpleNamespace, mutation: str | None = None, *, step: int = STEP) -> dict:
    """Loss, Adam moments, new parameters and importance of one TaSL step, from h's inputs (float64)."""
    loss, g = (h.loss_tokens, h.grads_tokens) if mutation == "loss_token_weighted" else (h.loss, h.grads)
    norm = math.sqrt(sum(float(np.sum(x * x)) for x in g))
    gc = [x * min(1.0, h.max_norm / norm) for x in g]
    g_adam = g if mutation == "adam_sees_the_unclipped_gradient" else gc
    lr = PEAK_LR if mutation == "lr_without_warmup" else PEAK_LR * step / WARMUP
    wd = 0.0 if mutation == "no_weight_decay" else WD
    m = [0.9 * m0 + 0.1 * x for m0, x in zip(h.mu0, g_adam)]
    v = [0.999 * v0 + 0.001 * x * x for v0, x in zip(h.nu0, g_adam)]
    t = h.count0 + 1
    new = [p - lr * ((mi / (1 - 0.9 ** t)) / (np.sqrt(vi / (1 - 0.999 ** t)) + 1e-8) + wd * p)
           for p, mi, vi in zip(h.params, m, v)]
    b1 = 0.9 if mutation == "beta1_0.9" else 0.85
    b2 = 0.9 if mutation == "beta2_0.9" else 0.85
    updates = (step >= 1) != (mutation == "importance_update_on_the_first_step")  # skipped at global_step 0
    updates = updates and mutation != "importance_not_updated"
    S, U = list(h.S0), list(h.U0)
    if updates:
        theta = h.params if mutation == "importance_from_theta_before_the_step" else new
        grad = g if mutation == "importance_from_the_unclipped_gradient" else gc
        S, U = [], []
        for s0, u0, p, gi in zip(h.S0, h.U0, theta, grad):
            s = np.abs(p * gi)
            s_new = b1 * s0 + (1 - b1) * s
            ref = s0 if mutation == "uncertainty_against_the_old_ema" else s_new
            S.append(s_new)
            U.append(b2 * u0 + (1 - b2) * np.abs(s - ref))
    return {"loss": [np.float64(loss)], "mu": m, "nu": v, "params": new, "sens": S, "unc": U}


def jitted_step(state) -> dict:
    adam = state.opt_state[1]
    imp = state.method.importance
    return {"mu": _leaves(adam.mu), "nu": _leaves(adam.nu), "params": _leaves(state.params),
            "sens": _leaves(imp.sens), "unc": _leaves(imp.unc)}


# --- the task-end consolidation by hand ----------------------------------------------------------------
def hand_unit_scores(h: SimpleNamespace, S: list, U: list, mutation: str | None = None) -> tuple[np.ndarray, list]:
    """One score per unit and, per tensor, its unit's index."""
    elem = S if mutation == "score_is_the_sensitivity_only" else [s * u for s, u in zip(S, U)]
    if mutation == "unit_is_the_lora_module":  # A and B of a projection together
        modules = sorted(set(h.module_of))
        scores = [np.mean(np.concatenate([e.ravel() for e, mod in zip(elem, h.module_of) if mod == m]))
                  for m in modules]
        return np.array(scores), [modules.index(m) for m in h.module_of]
    reduce = np.sum if mutation == "unit_score_summed" else np.mean
    return np.array([reduce(e) for e in elem]), list(range(len(elem)))


def hand_merge(h: SimpleNamespace, S: list, U: list, params: list, mutation: str | None = None) -> dict:
    raw, unit_of = hand_unit_scores(h, S, U, mutation)
    cur = minmax(raw)
    previous = np.array([np.mean(h.previous_scores[np.equal(unit_of, u)]) for u in range(raw.size)])
    prev = minmax(previous)
    q = 50 if mutation == "quantile_0.5" else 80
    imp_cur, imp_prev = cur > np.percentile(cur, q), prev > np.percentile(prev, q)
    both = (0.7, 0.3) if mutation == "both_weights_swapped" else (0.3, 0.7)
    merged = []
    for i, (P, Q) in enumerate(zip(params, h.anchor)):  # P: the task's tensor, Q: the consolidated one
        u = unit_of[i]
        if imp_prev[u] and imp_cur[u]:
            merged.append(both[0] * P + both[1] * Q)
        elif imp_prev[u]:
            merged.append(P if mutation == "single_cases_swapped" else Q)
        elif imp_cur[u]:
            merged.append(Q if mutation == "single_cases_swapped" else P)
        else:
            merged.append(P if mutation == "neither_keeps_the_current" else 0.5 * P + 0.5 * Q)
    c = minmax(raw) if mutation != "accumulated_from_the_raw_current" else raw
    mix = 0.7 * c + 0.3 * prev if mutation == "accumulated_weights_swapped" else 0.3 * c + 0.7 * prev
    accumulated = mix if mutation == "accumulated_not_renormalised" else minmax(mix)
    return {"params": merged, "scores": [accumulated]}


def hand_first_task_end(h: SimpleNamespace, S: list, U: list, params: list, mutation: str | None = None) -> dict:
    raw, _ = hand_unit_scores(h, S, U)
    if mutation == "task1_merged_like_later_tasks":
        return hand_merge(h, S, U, params)
    return {"params": params, "scores": [raw]}


def _atol(b, atol: float) -> float:
    return atol * float(np.max(np.abs(b), initial=0.0))


def matches(got: list, want: list, rtol: float = RTOL, atol: float = ATOL) -> bool:
    return len(got) == len(want) and all(
        np.shape(a) == np.shape(b) and np.allclose(a, b, rtol=rtol, atol=_atol(b, atol)) for a, b in zip(got, want))


def assert_matches(got: list, want: list, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=_atol(b, atol), err_msg=f"{what}[{i}]")


# --- the fixture: inputs, the hand values' ingredients, the jitted results ----------------------------------
@pytest.fixture(scope="module")
def run():
    with jax.default_matmul_precision("float32"):
        return _run()


def _run() -> SimpleNamespace:
    graphdef, params, frozen = nnx.split(_model(), models.LoRAParam, ...)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32), params)
    batch = {k: v[0] for k, v in random_t5_batches(rng, 1, micro=A, rows=2, length=10, target=5).items()}
    batch["labels"][1, 0, 2:] = -100  # micro-batches with different target counts (5 + 5 vs 2 + 5 tokens)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def nll(p, a):  # summed NLL and token count of micro-batch a, written out (no kif_jax loss code)
        logits = nnx.merge(graphdef, p, frozen)(batch["input_ids"][a], batch["decoder_input_ids"][a],
                                                batch["attention_mask"][a], deterministic=True)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        labels = batch["labels"][a]
        valid = labels != -100
        picked = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(valid, picked, 0.0)), jnp.sum(valid)

    def loss_micro_mean(p):  # the Trainer: each micro-batch's mean, averaged over the accumulation steps
        return sum(s / n for s, n in (nll(p, a) for a in range(A))) / A

    def loss_token_mean(p):  # a mutation: one mean over all target tokens of the step
        sums, counts = zip(*(nll(p, a) for a in range(A)))
        return sum(sums) / sum(counts)

    loss, grads = jax.jit(jax.value_and_grad(loss_micro_mean))(params)
    loss_tokens, grads_tokens = jax.jit(jax.value_and_grad(loss_token_mean))(params)
    g = _leaves(grads)
    norm = math.sqrt(sum(float(np.sum(x * x)) for x in g))
    max_norm = norm / 3  # clipping acts

    names = [".".join(n) for n in tree_path_names(params)]
    shapes = [x.shape for x in jax.tree.leaves(params)]
    pos = lambda scale: [(scale * rng.uniform(0.2, 1.0, s)).astype(np.float32) for s in shapes]  # noqa: E731
    h = SimpleNamespace(
        params=_leaves(params), loss=float(loss), grads=g,
        loss_tokens=float(loss_tokens), grads_tokens=_leaves(grads_tokens),
        max_norm=max_norm, module_of=[n.rsplit(".", 1)[0] for n in names],
        mu0=[(0.01 * x * rng.standard_normal(x.shape)).astype(np.float32) for x in g],
        nu0=[(x * x * rng.uniform(0.5, 2.0, x.shape) + 1e-6).astype(np.float32) for x in g], count0=1,
        S0=pos(1e-3), U0=pos(1e-4),
        anchor=[(p + 0.2 * rng.standard_normal(p.shape)).astype(np.float32) for p in _leaves(params)])
    h.mu0, h.nu0, h.S0, h.U0, h.anchor = ([np.asarray(x, np.float64) for x in xs]
                                          for xs in (h.mu0, h.nu0, h.S0, h.U0, h.anchor))

    # The accumulated scores of the earlier tasks, chosen so that all four cases occur: with 24 units the 80th
    # percentile leaves 5 above it; previous top 5 = current ranks 0, 1 and 10-12 -> both: 2, current only: 3,
    # previous only: 3, neither: 16.
    want = hand_step(h)
    raw, _ = hand_unit_scores(h, want["sens"], want["unc"])
    order = np.argsort(-raw)
    previous = rng.uniform(0.0, 1.0, raw.size)
    previous[order[[0, 1, 10, 11, 12]]] += 2.0
    h.previous_scores = previous

    programs = Programs(graphdef, family=models.Seq2SeqFamily(), lr=PEAK_LR, warmup_steps=WARMUP,
                        max_grad_norm=max_norm, weight_decay=WD, donate=False)
    config = tiny_config.get_config()
    config.methods = "tasl"
    tasl = TaSL(config)
    program, extra = tasl.cycle(SimpleNamespace(phase=1), STEP, 1)
    assert extra == []
    treedef = jax.tree.structure(params)
    as_tree = lambda xs: jax.tree.unflatten(treedef, [jnp.asarray(x, jnp.float32) for x in xs])  # noqa: E731
    fresh = tasl.init_state(1, params, tx=programs.tx)
    method = fresh.replace(importance=fresh.importance._replace(sens=as_tree(h.S0), unc=as_tree(h.U0)),
                           anchor=as_tree(h.anchor), unit_scores=jnp.asarray(previous, jnp.float32))
    state = init_state(params, programs.tx, key=make_task_key(0, 1, "rbg"), total_steps=TOTAL, select_best=False,
                       method_state=method)
    clip_state, adam, decay_state = state.opt_state
    adam = adam._replace(count=jnp.int32(h.count0), mu=as_tree(h.mu0), nu=as_tree(h.nu0))
    state = state.replace(step=jnp.int32(STEP), opt_state=(clip_state, adam, decay_state))

    step = jax.jit(lambda s, b: programs.step(program, s, b, frozen))
    after, metrics = step(state, batch)
    first, _ = step(state.replace(step=jnp.int32(0)), batch)  # the same inputs as a task's first step

    def task_end(phase: int, s):
        records = []
        task = SimpleNamespace(phase=phase, run=lambda prog, st: programs.run_hook(st, frozen, program=prog),
                               write=records.append, head=lambda: {})
        return tasl.on_task_end(task, s), records

    later, later_records = task_end(1, after)
    task1, _ = task_end(0, after)
    return SimpleNamespace(h=h, after=after, metrics=metrics, first=first, later=later, later_records=later_records,
                           task1=task1, names=names)


# --- the tests ---------------------------------------------------------------------------------------
def test_tasl_defaults_are_the_authors():
    c = TaSL.default_config()
    # finetune_continualDST.py:77-78 (beta1 = beta2 = 0.85); skill_consolidation.py:38-40 (top 20%).
    assert (c.beta1, c.beta2, c.quantile) == (0.85, 0.85, 0.8)


def test_one_step_by_hand_equals_the_jitted_step(run):
    want, got = hand_step(run.h), jitted_step(run.after)
    np.testing.assert_allclose(float(run.metrics["loss"]), want["loss"][0], rtol=RTOL)
    np.testing.assert_allclose(float(run.metrics["lr"]), PEAK_LR * STEP / WARMUP, rtol=1e-6)
    for key in ("mu", "nu", "params", "sens", "unc"):
        assert_matches(got[key], want[key], key)
    assert int(run.after.opt_state[1].count) == run.h.count0 + 1 and int(run.after.step) == STEP + 1


def test_a_tasks_first_step_updates_adam_but_not_the_importance(run):
    want, got = hand_step(run.h, step=0), jitted_step(run.first)
    for key in ("mu", "nu", "params", "sens", "unc"):  # lr = 0 at step 0: the parameters stay
        assert_matches(got[key], want[key], key)
    assert matches(got["params"], run.h.params, rtol=0, atol=0)
    assert not matches(got["sens"], hand_step(run.h, "importance_update_on_the_first_step", step=0)["sens"])


STEP_MUTATIONS = ["loss_token_weighted", "adam_sees_the_unclipped_gradient", "lr_without_warmup", "no_weight_decay",
                  "beta1_0.9", "beta2_0.9", "importance_not_updated", "importance_from_theta_before_the_step",
                  "importance_from_the_unclipped_gradient", "uncertainty_against_the_old_ema"]


@pytest.mark.parametrize("mutation", STEP_MUTATIONS)
def test_each_step_item_is_pinned(run, mutation):
    want, got = hand_step(run.h, mutation), jitted_step(run.after)
    got["loss"] = [np.float64(run.metrics["loss"])]
    assert not all(matches(got[k], want[k]) for k in want), f"{mutation} still matches the jitted step"


def test_task_end_merge_by_hand_equals_the_jitted_consolidation(run):
    step = jitted_step(run.after)  # the consolidation reads the jitted step's state; the hand uses the same
    want = hand_merge(run.h, step["sens"], step["unc"], step["params"])
    assert_matches(_leaves(run.later.params), want["params"], "merged", rtol=1e-6, atol=1e-7)
    assert_matches([np.asarray(run.later.method.unit_scores)], want["scores"], "accumulated", rtol=1e-5, atol=1e-6)
    (record,) = run.later_records
    assert record["event"] == "tasl_consolidation"
    assert (record["units"], record["units_both"], record["units_current_only"],
            record["units_previous_only"]) == (24, 2, 3, 3)
    # The merge is of the LoRA factors themselves (adapter_model.bin), one weight per tensor.
    assert all(np.shape(a) == np.shape(b) for a, b in zip(_leaves(run.later.params), step["params"]))


def test_task_one_is_kept_and_its_raw_scores_carried(run):
    step = jitted_step(run.after)
    want = hand_first_task_end(run.h, step["sens"], step["unc"], step["params"])
    assert_matches(_leaves(run.task1.params), want["params"], "task 1 params", rtol=0, atol=0)
    assert_matches([np.asarray(run.task1.method.unit_scores)], want["scores"], "task 1 scores", rtol=1e-5, atol=1e-12)
    mutated = hand_first_task_end(run.h, step["sens"], step["unc"], step["params"], "task1_merged_like_later_tasks")
    assert not matches(_leaves(run.task1.params), mutated["params"], rtol=1e-6, atol=1e-7)


MERGE_MUTATIONS = {  # mutation: the part of the task-end result it must break
    "both_weights_swapped": "params", "single_cases_swapped": "params", "neither_keeps_the_current": "params",
    "quantile_0.5": "params", "unit_is_the_lora_module": "params", "unit_score_summed": "params",
    "score_is_the_sensitivity_only": "params", "accumulated_weights_swapped": "scores",
    "accumulated_not_renormalised": "scores", "accumulated_from_the_raw_current": "scores"}


@pytest.mark.parametrize("mutation", list(MERGE_MUTATIONS))
def test_each_merge_item_is_pinned(run, mutation):
    step = jitted_step(run.after)
    want = hand_merge(run.h, step["sens"], step["unc"], step["params"], mutation)
    got = {"params": _leaves(run.later.params), "scores": [np.asarray(run.later.method.unit_scores, np.float64)]}
    part = MERGE_MUTATIONS[mutation]
    assert not matches(got[part], want[part], rtol=1e-6, atol=1e-7), f"{mutation} still matches the jitted merge"
