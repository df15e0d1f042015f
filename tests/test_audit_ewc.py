"""Audit of EWC (the audit table in docs/baselines.md): two optimizer steps worked by hand on a tiny T5 with LoRA dropout, against
the jitted program that `EWC.cycle` builds, for the first task and for a later one; then every item of the
hand computation changed in turn, each of which must no longer match.

The reference is TRACE's EWC (BeyonderXX/TRACE @ 462e39f, model/Regular/EWC.py): after every step
F += g^2 / (steps per epoch), g the step's gradient before clipping, with dropout (kif_jax: of the cross-entropy
by default; of cross-entropy + penalty, as TRACE's hook, with ewc.fisher_penalty_grad); from the second task,
loss += (lambda / 2) sum F (theta - theta*)^2 with the live F; theta* = the latest task end. The optimizer is
kif_jax's shared one, written out here: global-norm clipping, Adam, decoupled weight decay, linear decay of
the learning rate.
"""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_config
from tiny_models import random_t5_batches
from kif_jax import models
from kif_jax.methods import Program
from kif_jax.methods.base import INNER_STREAM
from kif_jax.methods.ewc import EWC, EwcProgram, EwcState
from kif_jax.train import Programs, init_state, make_task_key

LR, MAX_NORM, WD, TOTAL = 1e-2, 1.0, 0.01, 8  # TOTAL: the task's optimizer steps (lr decays linearly over them)
EPOCHS = 2  # so 1 / (steps per epoch) = EPOCHS / TOTAL = 0.25 differs from 1 / TOTAL
LAM = 2.0
B1, B2, EPS = 0.9, 0.999, 1e-8
A = 2  # micro-batches per step


def ewc_config(*, literal=False):
    c = tiny_config.get_config()
    c.methods = "ewc"
    c.train.epochs = EPOCHS
    c.ewc.lambda_ = LAM
    c.ewc.fisher_penalty_grad = literal
    return c


RUNS = {"first": (0, False), "later": (1, False), "later_literal": (1, True)}  # name: (phase, fisher_penalty_grad)


@pytest.fixture(scope="module")
def setup():
    with jax.default_matmul_precision("float32"):
        config = models.T5Config(vocab_size=259, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                                 num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                 scale_decoder_outputs=False, dropout_rate=0.0)
        model = models.T5(config, lora=models.LoRAConfig(rank=4, alpha=8.0, dropout=0.3), rngs=nnx.Rngs(3))
        graphdef, params, frozen = nnx.split(model, models.LoRAParam, ...)
        params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)
        family = models.Seq2SeqFamily()
        programs = Programs(graphdef, family=family, lr=LR, warmup_steps=0, max_grad_norm=MAX_NORM,
                            weight_decay=WD, donate=False)
        batches = random_t5_batches(np.random.default_rng(5), 2, micro=A, rows=2, length=10, target=4)
        rng = np.random.default_rng(11)
        fisher0 = jax.tree.map(lambda p: jnp.asarray(rng.uniform(0.5, 2.0, p.shape), jnp.float32), params)
        star0 = jax.tree.map(lambda p: p - jnp.asarray(rng.normal(0, 0.05, p.shape), jnp.float32), params)
        method = EWC(ewc_config())
        runs = {}
        for name, (phase, literal) in RUNS.items():
            program, extra = EWC(ewc_config(literal=literal)).cycle(SimpleNamespace(phase=phase, steps=TOTAL), 0, 2)
            assert extra == []
            start = EwcState(fisher=fisher0, star=star0) if phase else method.init_state(0, params, tx=programs.tx)
            state = init_state(params, programs.tx, key=make_task_key(7, phase, "rbg"), total_steps=TOTAL,
                               select_best=False, method_state=start)
            new, metrics = programs.run_cycle(state, frozen, batches, program=program)
            runs[name] = dict(program=program, state=state, new=new, metrics=jax.device_get(metrics))

        grad_fn = jax.jit(jax.value_and_grad(
            lambda p, micro, key: family.token_loss(nnx.merge(graphdef, p, frozen), micro, key=key)[0]))
    return SimpleNamespace(params=params, batches=batches, runs=runs, grad_fn=grad_fn, programs=programs,
                           frozen=frozen, method=method)


def leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def hand_steps(s, name, mutation=None):
    """Two steps by hand; returns (losses, penalties, params, fisher, star) as lists of float64 leaves."""
    phase, literal = RUNS[name]
    run = s.runs[name]
    state = run["state"]
    theta = leaves(state.params)
    fisher, star = leaves(state.method.fisher), leaves(state.method.star)
    fisher_earlier = [f.copy() for f in fisher]
    treedef = jax.tree.structure(state.params)
    lam = 0.0 if phase == 0 else LAM
    if mutation == "penalty_on_first_task":
        lam = LAM
    half = 1.0 if mutation == "penalty_weight_lambda" else 0.5  # Avalanche's lambda vs Kirkpatrick / TRACE lambda / 2
    scale = EPOCHS / TOTAL  # 1 / (steps per epoch)
    if mutation == "fisher_over_all_steps":
        scale = 1 / TOTAL
    if mutation == "fisher_not_normalised":
        scale = 1.0
    b2 = 0.95 if mutation == "adam_beta2_0.95" else B2
    wd = 0.0 if mutation == "no_weight_decay" else WD
    m = [np.zeros_like(t) for t in theta]
    v = [np.zeros_like(t) for t in theta]
    key = jax.random.wrap_key_data(state.rng, impl="rbg")
    losses, penalties = [], []
    for t in range(2):
        step_key = jax.random.fold_in(jax.random.fold_in(key, INNER_STREAM), t)
        p_tree = jax.tree.unflatten(treedef, [jnp.asarray(x, jnp.float32) for x in theta])
        ce, g_micro, g_nodrop = [], [], []
        for i in range(A):
            micro = {k: jnp.asarray(b[t, i]) for k, b in s.batches.items()}
            value, g = s.grad_fn(p_tree, micro, jax.random.fold_in(step_key, i))
            ce.append(float(value))
            g_micro.append(leaves(g))
            g_nodrop.append(leaves(s.grad_fn(p_tree, micro, None)[1]))
        g_ce = [sum(gs) / A for gs in zip(*g_micro)]
        anchor_fisher = fisher_earlier if (mutation == "penalty_uses_only_earlier_fisher") else fisher
        penalty = half * lam * sum(np.sum(f * (x - a) ** 2) for f, x, a in zip(anchor_fisher, theta, star))
        g_pen = [2 * half * lam * f * (x - a) for f, x, a in zip(anchor_fisher, theta, star)]
        g = [c + p for c, p in zip(g_ce, g_pen)]
        norm = np.sqrt(sum(np.sum(x ** 2) for x in g))
        clip = lambda tree, n: [x if n < MAX_NORM else x / n * MAX_NORM for x in tree]  # noqa: E731  optax's rule
        if mutation == "penalty_after_clipping":
            g_opt = [c + p for c, p in zip(clip(g_ce, np.sqrt(sum(np.sum(x ** 2) for x in g_ce))), g_pen)]
        else:
            g_opt = clip(g, norm)
        lr = LR if mutation == "constant_lr" else LR * max(0.0, (TOTAL - t) / TOTAL)
        m = [B1 * a + (1 - B1) * x for a, x in zip(m, g_opt)]
        v = [b2 * a + (1 - b2) * x ** 2 for a, x in zip(v, g_opt)]
        update = [(a / (1 - B1 ** (t + 1))) / (np.sqrt(b / (1 - b2 ** (t + 1))) + EPS) + wd * x
                  for a, b, x in zip(m, v, theta)]
        new_theta = [x - lr * u for x, u in zip(theta, update)]
        # The Fisher: the step's gradient before clipping, penalty included, with the step's dropout.
        if mutation == "no_fisher_during_training":
            sq = [np.zeros_like(x) for x in g]
        elif mutation == "fisher_with_penalty_gradient" or (literal and mutation != "fisher_without_penalty_gradient"):
            sq = [x ** 2 for x in g]
        elif mutation == "fisher_from_clipped_gradient":
            sq = [x ** 2 for x in clip(g, norm)]
        elif mutation == "fisher_without_dropout":
            sq = [(sum(gs) / A) ** 2 for gs in zip(*g_nodrop)]
        elif mutation == "fisher_per_micro_batch_deepspeed":  # TRACE: each micro-batch's gradient / A, squared
            sq = [sum((gi / A) ** 2 for gi in gs) / A for gs in zip(*g_micro)]
        else:
            sq = [x ** 2 for x in g_ce]
        fisher = [f + scale * x for f, x in zip(fisher, sq)]
        if mutation == "anchor_moves_every_step":
            star = [x.copy() for x in new_theta]
        theta = new_theta
        losses.append(sum(ce) / A)
        penalties.append(penalty)
    return losses, penalties, theta, fisher, star


def compare(s, name, hand, *, rtol=1e-5, atol=1e-6):
    """Whether the hand result matches the jitted one (losses, penalties, parameters, Fisher, theta*), to float32
    round-off: parameters move by about LR per step and F by 0.25 g^2, so every changed item lies far outside."""
    run = s.runs[name]
    losses, penalties, theta, fisher, star = hand
    new, metrics = run["new"], run["metrics"]
    checks = [np.allclose(metrics["inner_loss"], losses, rtol=rtol, atol=0)]
    if "inner_penalty" in metrics:
        checks.append(np.allclose(metrics["inner_penalty"], penalties, rtol=rtol, atol=0))
    else:
        checks.append(all(p == 0 for p in penalties))
    for got, want in ((new.params, theta), (new.method.fisher, fisher), (new.method.star, star)):
        checks += [np.allclose(a, b, rtol=rtol, atol=atol) for a, b in zip(leaves(got), want)]
    return all(checks)


def test_the_programs_that_ewc_cycle_builds():
    method = EWC(ewc_config())
    first, extra = method.cycle(SimpleNamespace(phase=0, steps=TOTAL), 0, 2)
    later, _ = method.cycle(SimpleNamespace(phase=1, steps=TOTAL), 0, 2)
    assert extra == []
    assert first == EwcProgram(inner_steps=2, lam=0.0, fisher_scale=EPOCHS / TOTAL) and not first.penalised
    assert later == EwcProgram(inner_steps=2, lam=LAM, fisher_scale=EPOCHS / TOTAL) and later.penalised
    literal, _ = EWC(ewc_config(literal=True)).cycle(SimpleNamespace(phase=1, steps=TOTAL), 0, 2)
    assert literal == EwcProgram(inner_steps=2, lam=LAM, fisher_scale=EPOCHS / TOTAL, fisher_penalty_grad=True)
    config = ewc_config()
    config.ewc.fisher = "task_end"  # the classic form: nothing accumulated during training
    method = EWC(config)
    assert method.cycle(SimpleNamespace(phase=0, steps=TOTAL), 0, 2)[0] == Program(inner_steps=2)
    assert method.cycle(SimpleNamespace(phase=1, steps=TOTAL), 0, 2)[0] == EwcProgram(inner_steps=2, lam=LAM)


@pytest.mark.parametrize("name", list(RUNS))
def test_two_steps_by_hand_equal_the_jitted_program(setup, name):
    s = setup
    phase = RUNS[name][0]
    with jax.default_matmul_precision("float32"):
        hand = hand_steps(s, name)
    metrics = s.runs[name]["metrics"]
    assert ("inner_penalty" in metrics) == (phase == 1)
    if phase == 1:
        assert min(hand[1]) > 0.1  # theta starts away from theta*: the penalty is a real part of the loss
    assert np.all(metrics["inner_grad_norm"] > MAX_NORM)  # clipping acts in both steps
    assert compare(s, name, hand)


LATER = ["penalty_weight_lambda", "penalty_after_clipping", "penalty_uses_only_earlier_fisher",
         "fisher_with_penalty_gradient", "fisher_from_clipped_gradient", "fisher_without_dropout",
         "fisher_per_micro_batch_deepspeed", "fisher_over_all_steps", "fisher_not_normalised",
         "no_fisher_during_training", "anchor_moves_every_step", "adam_beta2_0.95", "no_weight_decay", "constant_lr"]
FIRST = ["penalty_on_first_task", "no_fisher_during_training", "fisher_from_clipped_gradient",
         "fisher_without_dropout", "fisher_over_all_steps"]


@pytest.mark.parametrize("name,mutation", [("later", m) for m in LATER] + [("first", m) for m in FIRST]
                         + [("later_literal", "fisher_without_penalty_gradient")])
def test_a_changed_item_no_longer_matches(setup, name, mutation):
    with jax.default_matmul_precision("float32"):
        hand = hand_steps(setup, name, mutation)
    assert not compare(setup, name, hand), mutation


def test_task_end_sets_theta_star_and_keeps_the_fisher(setup):
    s = setup
    state = s.runs["later"]["new"]
    records = []
    task = SimpleNamespace(phase=1, steps=TOTAL, head=lambda: {"method": "ewc", "phase": 1}, write=records.append,
                           run=lambda program, st, *a: s.programs.run_hook(st, s.frozen, *a, program=program))
    end = s.method.on_task_end(task, state)
    for got, want in zip(leaves(end.method.star), leaves(state.params)):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(leaves(end.method.fisher), leaves(state.method.fisher)):
        np.testing.assert_array_equal(got, want)
    mean = np.mean(np.concatenate([f.ravel() for f in leaves(state.method.fisher)]))
    assert records == [{"event": "ewc_fisher", "method": "ewc", "phase": 1, "fisher": "trace",
                        "fisher_steps": TOTAL, "fisher_mean": pytest.approx(mean, rel=1e-5)}]
    # The next task carries F and theta* as they are.
    assert s.method.carry_state(end, None, reset=True) is end.method
