"""O-LoRA against its authors' code (cmnfriend/O-LoRA @ 07117e1; the audit is the audit table in docs/baselines.md).

One optimizer step of task 3 on a tiny T5 (LoRA dropout on, an old branch of two earlier tasks, a running
AdamW state, clipping active) is worked by hand outside the method's code: plain `jax.grad` of the model's
token loss with the branches concatenated by numpy, the orthogonality and norm terms and their gradients in
numpy, clipping and AdamW from their formulas. It is compared with the jitted `Programs.step`. Each
parametrized mutation changes one item of the hand computation (a weight, the norm's form, where the
penalty acts, the old branch's dropout or scale, the schedule) and must NOT match, so every item is pinned.
The task boundary ([old | new], a fresh branch), inference (base + old + new) and the "authors" schedule
(DeepSpeed's WarmupLR) are checked the same way.
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
from kif_jax.core.tree import path_names
from kif_jax.methods import Program
from kif_jax.methods.base import INNER_STREAM
from kif_jax.methods.o_lora import OLoRA, OLoRAProgram
from kif_jax.train import Programs, init_state
from kif_jax.train.steps import make_task_key

RANK, ALPHA, DROPOUT = 4, 8.0, 0.1
SCALE = ALPHA / RANK
PHASE = 2  # task 3: the old branch holds two earlier tasks' factors, r_sum = 8 != r
LAMBDA1 = 0.5  # the authors' (scripts/order_1.sh:42)
LAMBDA2 = 0.1  # theirs is 0 (order_1.sh:43); non-zero here so that the norm term is pinned too
LR, WARMUP, MAX_NORM, B1, B2, EPS = 1e-2, 3, 1.0, 0.9, 0.999, 1e-8
STEP, TOTAL, ADAM_COUNT = 5, 20, 5  # a step after warm-up, with a running Adam state
N_MICRO = 2


def kind(path):
    return path_names(path)[-1]


def module(path):
    return tuple(path_names(path)[:-1])


def tiny_model():
    config = models.T5Config(vocab_size=259, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                             num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                             scale_decoder_outputs=False, dropout_rate=0.0)
    return models.T5(config, lora=models.LoRAConfig(rank=RANK, alpha=ALPHA, dropout=DROPOUT), rngs=nnx.Rngs(3))


def concat(old, new):
    """[A_old | A_new], [B_old ; B_new] by numpy (peft's torch.cat of lora_A rows / lora_B columns)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, o, n: jnp.asarray(np.concatenate([np.asarray(o), np.asarray(n)],
                                                   axis=1 if kind(p) == "lora_a" else 0)), old, new)


def factors(tree):
    """{module path: (A, B)} as float64 numpy."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a, b = out.get(module(path), (None, None))
        x = np.asarray(x, np.float64)
        out[module(path)] = (x, b) if kind(path) == "lora_a" else (a, x)
    return out


def merged_frozen(frozen, branches):
    """The frozen weights with SCALE * A B of each branch added to its projection's kernel (no dropout)."""
    deltas = {}
    for tree in branches:
        for m, (a, b) in factors(tree).items():
            deltas[m] = deltas.get(m, 0.0) + SCALE * a @ b

    def merge(path, x):
        names = path_names(path)
        if names[-1] == "kernel" and tuple(names[:-1]) in deltas:
            return jnp.asarray(np.asarray(x, np.float64) + deltas[tuple(names[:-1])], x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(merge, frozen)


@pytest.fixture(scope="module")
def setup():
    with jax.default_matmul_precision("float32"):
        graphdef, init_params, frozen = nnx.split(tiny_model(), models.LoRAParam, ...)
        rng = np.random.default_rng(0)

        def draw(path, x, width, std_a, std_b):
            shape = list(x.shape)
            shape[1 if kind(path) == "lora_a" else 0] = width
            return jnp.asarray(rng.normal(0, std_a if kind(path) == "lora_a" else std_b, shape), jnp.float32)

        old = jax.tree_util.tree_map_with_path(lambda p, x: draw(p, x, PHASE * RANK, 0.3, 0.3), init_params)
        new = jax.tree_util.tree_map_with_path(lambda p, x: draw(p, x, RANK, 0.25, 0.1), init_params)
        programs = Programs(graphdef, family=models.Seq2SeqFamily(), lr=LR, warmup_steps=WARMUP,
                            max_grad_norm=MAX_NORM, weight_decay=0.0, donate=False)
        opt_state = programs.tx.init(new)
        mu0 = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.05, x.shape), jnp.float32), new)
        nu0 = jax.tree.map(lambda x: jnp.asarray(rng.uniform(1e-4, 1e-2, x.shape), jnp.float32), new)
        opt_state = (opt_state[0], opt_state[1]._replace(count=jnp.int32(ADAM_COUNT), mu=mu0, nu=nu0),
                     *opt_state[2:])
        state = init_state(new, programs.tx, key=make_task_key(7, PHASE, "rbg"), total_steps=TOTAL,
                           select_best=False, method_state=old)
        state = state.replace(step=jnp.int32(STEP), opt_state=opt_state)
        batch = jax.tree.map(lambda x: x[0], random_t5_batches(np.random.default_rng(1), 1, micro=N_MICRO,
                                                               rows=2, length=12, target=4))
        method = OLoRA(tiny_config.get_config())
        program = OLoRAProgram(inner_steps=1, lambda1=LAMBDA1, lambda2=LAMBDA2)  # lambda2 > 0: see above
        step = jax.jit(lambda prog, s: programs.step(prog, s, batch, frozen), static_argnums=0)
        got, metrics = step(program, state)
        family = models.Seq2SeqFamily()

        @jax.jit
        def ce_and_grad(new, old, frozen, step_index):
            """Mean over micro-batches of the token loss of the model with [old | new], its gradient in new."""
            key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl="rbg"),
                                                        INNER_STREAM), step_index)

            def loss(n):
                both = n if old is None else jax.tree.map(
                    lambda o, x, a: jnp.concatenate([o, x], axis=1 if a else 0), old, n, is_a)
                losses = [family.token_loss(nnx.merge(graphdef, both, frozen),
                                            jax.tree.map(lambda x: x[i], batch), key=jax.random.fold_in(key, i))[0]
                          for i in range(N_MICRO)]
                return sum(losses) / N_MICRO

            return jax.value_and_grad(loss)(new)

        is_a = jax.tree_util.tree_map_with_path(lambda p, x: kind(p) == "lora_a", new)
        return SimpleNamespace(graphdef=graphdef, init_params=init_params, frozen=frozen, old=old, new=new,
                               mu0=mu0, nu0=nu0, state=state, batch=batch, program=program, step=step, got=got,
                               metrics=metrics, ce_and_grad=ce_and_grad, method=method, programs=programs,
                               family=family)


def hand_step(s, *, lambda1=LAMBDA1, lambda2=LAMBDA2, squared_l2=False, squared_orth=False,
              penalty_after_clip=False, penalty_per_micro=False, old_without_dropout=False, old_scale=1.0,
              no_old=False, lr=None, step_index=STEP):
    """(CE, penalty, new parameters) of one step, by hand; the keywords are the mutations."""
    old, frozen = s.old, s.frozen
    if old_without_dropout:  # the old branch merged into the kernels: no dropout on it
        frozen, old = merged_frozen(frozen, [old]), None
    elif no_old:
        old = None
    elif old_scale != 1.0:
        old = jax.tree_util.tree_map_with_path(lambda p, x: x * old_scale if kind(p) == "lora_a" else x, old)
    with jax.default_matmul_precision("float32"):
        ce, ce_grads = s.ce_and_grad(s.new, old, frozen, jnp.int32(step_index))
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(s.new)[0]]
    treedef = jax.tree.structure(s.new)
    new = [np.asarray(x, np.float64) for x in jax.tree.leaves(s.new)]
    g_ce = [np.asarray(x, np.float64) for x in jax.tree.leaves(ce_grads)]
    old_a = {module(p): np.asarray(x, np.float64) for p, x in jax.tree_util.tree_flatten_with_path(s.old)[0]
             if kind(p) == "lora_a"}

    # The penalty: lambda1 sum_modules sum |A_old^T A_new| + lambda2 sum_tensors ||x||_F, and its gradient.
    penalty, g_pen = 0.0, []
    for path, x in zip(paths, new):
        g = np.zeros_like(x)
        if kind(path) == "lora_a":
            prod = old_a[module(path)].T @ x  # peft's lora_A @ loranew_A^T, [r_sum, r]
            if squared_orth:
                penalty += lambda1 * np.sum(prod ** 2)
                g += lambda1 * 2 * old_a[module(path)] @ prod
            else:
                penalty += lambda1 * np.sum(np.abs(prod))
                g += lambda1 * old_a[module(path)] @ np.sign(prod)
        norm = np.sqrt(np.sum(x ** 2))
        if squared_l2:
            penalty += lambda2 * norm ** 2
            g += lambda2 * 2 * x
        else:
            penalty += lambda2 * norm
            g += lambda2 * (x / norm if norm > 0 else 0.0)
        g_pen.append(g * (N_MICRO if penalty_per_micro else 1))

    def clip(gs):
        norm = math.sqrt(sum(np.sum(g ** 2) for g in gs))
        return [g * min(1.0, MAX_NORM / norm) for g in gs], norm

    if penalty_after_clip:
        clipped, norm = clip(g_ce)
        grads = [a + b for a, b in zip(clipped, g_pen)]
    else:
        grads, norm = clip([a + b for a, b in zip(g_ce, g_pen)])
    assert norm > MAX_NORM  # clipping acts on this step

    if lr is None:  # kif_jax's shared schedule: linear warm-up, then linear decay to 0 at TOTAL
        lr = LR * step_index / WARMUP if step_index < WARMUP else LR * (TOTAL - step_index) / (TOTAL - WARMUP)
    t = ADAM_COUNT + 1
    out = []
    for x, g, m0, v0 in zip(new, grads, jax.tree.leaves(s.mu0), jax.tree.leaves(s.nu0)):
        m = B1 * np.asarray(m0, np.float64) + (1 - B1) * g
        v = B2 * np.asarray(v0, np.float64) + (1 - B2) * g ** 2
        update = (m / (1 - B1 ** t)) / (np.sqrt(v / (1 - B2 ** t)) + EPS)
        out.append(x - lr * update)  # weight decay 0 (the authors' and kif_jax's)
    return float(ce), penalty, jax.tree.unflatten(treedef, out)


def matches(got, metrics, hand):
    ce, penalty, params = hand
    ok = np.isclose(float(metrics["loss"]), ce, rtol=1e-5, atol=1e-7)
    ok &= np.isclose(float(metrics["penalty"]), penalty, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(params)):
        ok &= np.allclose(np.asarray(a, np.float64), b, rtol=1e-5, atol=5e-7)
    return bool(ok)


def test_one_step_by_hand_equals_the_jitted_step(setup):
    s = setup
    ce, penalty, params = hand_step(s)
    np.testing.assert_allclose(float(s.metrics["loss"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(s.metrics["penalty"]), penalty, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s.got.params), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=1e-5, atol=5e-7)
    assert matches(s.got, s.metrics, (ce, penalty, params))
    # The old branch is frozen: exactly as it was; the step counts.
    for a, b in zip(jax.tree.leaves(s.got.method), jax.tree.leaves(s.old)):
        np.testing.assert_array_equal(a, b)
    assert int(s.got.step) == STEP + 1 and bool(s.metrics["finite"])


MUTATIONS = {
    "lambda1 doubled": dict(lambda1=2 * LAMBDA1),
    "lambda2 doubled": dict(lambda2=2 * LAMBDA2),
    "norm term squared": dict(squared_l2=True),
    "orthogonality squared (the paper's form)": dict(squared_orth=True),
    "penalty added after clipping": dict(penalty_after_clip=True),
    "penalty once per micro-batch": dict(penalty_per_micro=True),
    "old branch without dropout": dict(old_without_dropout=True),
    "old branch scaled alpha / r_sum": dict(old_scale=RANK / (PHASE * RANK)),
    "old branch left out of the forward": dict(no_old=True),
    "constant learning rate": dict(lr=LR),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_changed_item_does_not_match(setup, mutation):
    s = setup
    assert not matches(s.got, s.metrics, hand_step(s, **MUTATIONS[mutation])), mutation


def test_task_boundary_fresh_branch_and_inference_by_hand(setup):
    s = setup
    method = s.method
    # Defaults and programs: the authors' lambdas; no orthogonality term on task 1; the shared schedule.
    o = method.config.o_lora
    assert (o.lambda1, o.lambda2, o.lr_schedule) == (0.5, 0.0, "shared")
    first, _ = method.cycle(SimpleNamespace(phase=0), 0, 4)
    assert type(first) is Program  # task 1 with lambda2 = 0: plain steps (no old branch, no term)
    later, _ = method.cycle(SimpleNamespace(phase=PHASE), 0, 4)
    assert later == OLoRAProgram(inner_steps=4, lambda1=0.5, lambda2=0.0)

    # Task end: the finished branch joins the old one after it, [A_old | A_new], [B_old ; B_new].
    carried = method.carry_state(s.got, None, reset=True)
    want = {m: (np.concatenate([oa, na], 1), np.concatenate([ob, nb], 0))
            for (m, (oa, ob)), (_, (na, nb)) in zip(factors(s.old).items(), factors(s.got.params).items())}
    swapped = {m: (np.concatenate([na, oa], 1), np.concatenate([nb, ob], 0))
               for (m, (oa, ob)), (_, (na, nb)) in zip(factors(s.old).items(), factors(s.got.params).items())}
    for m, (a, b) in factors(carried).items():
        np.testing.assert_array_equal(a, want[m][0])
        np.testing.assert_array_equal(b, want[m][1])
    assert not all(np.array_equal(a, swapped[m][0]) for m, (a, _) in factors(carried).items())
    # The next task's old-branch template has that shape.
    template = method.init_state(PHASE + 1, s.new, tx=None)
    assert jax.tree.map(jnp.shape, template) == jax.tree.map(jnp.shape, carried)

    # The next task's new branch: A ~ U(-1/sqrt(in), 1/sqrt(in)) (peft's kaiming_uniform, a = sqrt(5)), B = 0,
    # a draw of its own (not the previous task's, not the initial one).
    fresh = method.task_params(PHASE + 1, s.got.params, s.init_params)
    before = method.task_params(PHASE, s.got.params, s.init_params)
    for (m, (a, b)), (_, (a0, _)), (_, (ai, _)) in zip(factors(fresh).items(), factors(before).items(),
                                                        factors(s.init_params).items()):
        bound = 1 / math.sqrt(a.shape[0])
        assert a.shape == (16, RANK) and np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.5 * bound
        assert not np.array_equal(a, a0) and not np.array_equal(a, ai)
        np.testing.assert_array_equal(b, np.zeros_like(b))

    # Inference: base + old + new at one scale alpha / r, no dropout: equals the base with both branches
    # merged into its kernels by hand (and differs without the old branch).
    with jax.default_matmul_precision("float32"):
        zero = jax.tree.map(jnp.zeros_like, s.new)  # a LoRA that adds nothing
        micro = jax.tree.map(lambda x: x[0], s.batch)
        run = jax.jit(lambda p, f: s.family.token_loss(nnx.merge(s.graphdef, p, f), micro, key=None)[0])
        got = float(run(method.eval_params(s.got), s.frozen))
        want = float(run(zero, merged_frozen(s.frozen, [s.old, s.got.params])))
        without_old = float(run(zero, merged_frozen(s.frozen, [s.got.params])))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert not np.isclose(got, without_old, rtol=1e-5)


def test_the_authors_schedule_is_deepspeeds_warmup_lr(setup):
    """o_lora.lr_schedule = "authors": DeepSpeed 0.10 WarmupLR (min 0, max lr, max(2, warm-up) log steps) after a
    first step at the optimizer's own lr. With WARMUP = 3: steps 0, 1, 2, 3+ run at lr, 0, lr log2/log3, lr."""
    s = setup
    program = OLoRAProgram(inner_steps=1, lambda1=LAMBDA1, lambda2=LAMBDA2, authors_schedule=True)
    rates = {0: LR, 1: 0.0, 2: LR * math.log(2) / math.log(3), 3: LR, STEP: LR}
    for index, lr in rates.items():
        got, metrics = s.step(program, s.state.replace(step=jnp.int32(index)))
        np.testing.assert_allclose(float(metrics["lr"]), lr, rtol=1e-6, atol=0)
        hand = hand_step(s, lr=lr, step_index=index)
        assert matches(got, metrics, hand), index
        if index in (1, 2):  # the shared schedule's rate at this step gives other parameters
            assert not matches(got, metrics, hand_step(s, step_index=index)), index
        if lr == 0.0:  # no move, but Adam's moments advance
            for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(s.new)):
                np.testing.assert_array_equal(a, b)
            assert int(got.opt_state[1].count) == ADAM_COUNT + 1
