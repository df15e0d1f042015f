"""MIGU against the authors' code (the audit table in docs/baselines.md; wenyudu/MIGU @ 3f3b9f0): optimizer steps of a later task
worked by hand outside kif_jax/methods/migu.py on a 1-layer T5 and a 1-layer decoder LM, compared with the jitted
step. Every mutation of the hand computation (one item of the audit table changed) must NOT match, so each item is
pinned.

By hand, for one step on a batch of A accumulated micro-batches:
  loss     mean over the micro-batches of the plain model loss; gradient: the mean of their `jax.grad`s (the
           Trainer's accumulation)
  magn.    the authors' forward hooks (uie_trainer_lora.py:444-462): for every hooked module, sum |output| over every
           position of every micro-batch of the step as their collator pads it (padding="longest",
           uie_collator.py:103-126, 132-196), reset at each step. Here a micro-batch is padded further (a length
           bucket) and holds a filler row, so the positions counted are, per sequence a projection reads, those below
           the micro-batch's longest real row, in its real rows: T5's encoder (its projections and the cross-attention's
           k and v) up to the longest input, its decoder (and lm_head) up to the longest target; the decoder LM's one
           sequence up to the longest prompt + target. The sequence of a call is read from its path here, the lengths
           from the batch with numpy. LoRA A's output is dropout(x) A, B's is (dropout(x) A) B before the scale
           alpha / r; with full fine-tuning, each projection's x W. The projections' inputs are recorded by wrapping
           `Dense.__call__` and the LoRA dropout.
  mask     m >= torch.quantile(m, 0.7) (accelerate_local.py:21-29), torch's formula written out in float32 (linear
           interpolation); it multiplies the gradient of each output feature (torch's rows, kif_jax's last axis)
  update   mask, then g * min(1, max_norm / |g|), then AdamW (0.9, 0.999, 1e-8, no decay) from non-zero moments,
           theta' = theta - lr * (...), lr = peak * (total - step) / total (kif_jax's shared schedule, no warm-up)
The first task is a plain step. The L1 normalisation of the paper and the LoRA scale multiply a layer's magnitudes by
one positive number, so they change no mask and are not mutations here.
"""
import contextlib
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_config
from kif_jax import models
from kif_jax.core.tree import tree_path_names
from kif_jax.methods import Program
from kif_jax.methods.base import INNER_STREAM
from kif_jax.methods.migu import MIGU, MaskedSteps, migu_config
from kif_jax.models import layers
from kif_jax.train import Programs, init_state
from kif_jax.train.steps import make_task_key

THRESHOLD = 0.7  # the authors' ini_threshold (scripts/standard_benchmark_lora.sh:1)
B1, B2, EPS = 0.9, 0.999, 1e-8
PEAK_LR, TOTAL, STEP, COUNT = 0.01, 10, 3, 3  # a later step of the task: Adam has moments, count 3
A_MICRO, ROWS, S, T, L = 2, 3, 8, 6, 9  # micro-batches, rows each; T5's input and target lengths; the LM's length
# Real lengths per micro-batch (0: a filler row, as kif_jax/data/batching.py completes an epoch's last batch). Every
# micro-batch's longest row is shorter than the padded length, in every sequence: padding the authors never see.
IN_LENGTHS, TARGET_LENGTHS = [[6, 4, 5], [5, 3, 0]], [[4, 2, 3], [5, 2, 0]]  # T5
PROMPT_LENGTHS, ANSWER_LENGTHS = [[4, 3, 4], [5, 2, 0]], [[3, 2, 2], [3, 2, 0]]  # decoder LM: 7/5/6, 8/4/filler
EOS = 1
RTOL, ATOL = 1e-5, 1e-6  # relative to each element, plus ATOL times the tensor's largest |value|


def _model(kind: str):
    # LoRA rank 8 (A: 0.7 * 7 = 4.9, the interpolation matters) and 3 heads of 7 (B and q/v kernels: 21 outputs,
    # 0.7 * 20 = 14, the quantile is a magnitude itself and the comparison decides it); the authors' targets q, v.
    if kind == "decoder":  # RoPE needs an even head_dim: 11 heads of 2 (22 outputs, 0.7 * 21 = 14.7: B keeps 7)
        config = models.DecoderConfig(
            model_type="llama", vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=11, num_key_value_heads=11, head_dim=2, tie_word_embeddings=True, bos_token_id=None,
            eos_token_id=EOS, pad_token_id=0)
        lora = models.LoRAConfig(rank=8, alpha=16.0, dropout=0.25, targets=("q_proj", "v_proj"))
        return models.DecoderLM(config, lora=lora, rngs=nnx.Rngs(3))
    config = models.T5Config(vocab_size=259, d_model=16, d_kv=7, d_ff=32, num_layers=1, num_decoder_layers=1,
                             num_heads=3, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                             scale_decoder_outputs=False, dropout_rate=0.0)
    lora = models.LoRAConfig(rank=8, alpha=16.0, dropout=0.25, targets=("q", "v")) if kind == "lora" else None
    return models.T5(config, lora=lora, rngs=nnx.Rngs(3))


def _batch(kind: str, seed: int) -> dict:
    """[A, rows, length] as kif_jax's collate lays it out: right-padded rows, a filler row (one EOS, no label)."""
    rng = np.random.default_rng(seed)
    filler = np.array(IN_LENGTHS) == 0
    if kind == "decoder":
        prompt, answer = np.array(PROMPT_LENGTHS)[..., None], np.array(ANSWER_LENGTHS)[..., None]
        real = np.arange(L) < prompt + answer
        ids = np.where(real, rng.integers(3, 259, size=(A_MICRO, ROWS, L)), 0)
        labels = np.where(real & (np.arange(L) >= prompt), ids, -100)
        ids[filler, 0], real[filler, 0] = EOS, True
        return {"input_ids": ids.astype(np.int32), "attention_mask": real.astype(np.int32),
                "labels": labels.astype(np.int32)}
    real_in = np.arange(S) < np.array(IN_LENGTHS)[..., None]
    real_out = np.arange(T) < np.array(TARGET_LENGTHS)[..., None]
    ids = np.where(real_in, rng.integers(3, 259, size=(A_MICRO, ROWS, S)), 0)
    ids[filler, 0], real_in[filler, 0] = EOS, True
    labels = np.where(real_out, rng.integers(3, 259, size=(A_MICRO, ROWS, T)), -100)
    dec = np.concatenate([np.zeros_like(labels[..., :1]), np.maximum(labels[..., :-1], 0)], axis=-1)
    return {"input_ids": ids.astype(np.int32), "attention_mask": real_in.astype(np.int32),
            "decoder_input_ids": dec.astype(np.int32), "labels": labels.astype(np.int32)}


def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree.leaves(tree)
    return {".".join(names): np.asarray(x, np.float64) for names, x in zip(tree_path_names(tree), leaves)}


def _unflat(like, flat: dict[str, np.ndarray]):
    names = [".".join(n) for n in tree_path_names(like)]
    return jax.tree.unflatten(jax.tree.structure(like), [jnp.asarray(flat[n], jnp.float32) for n in names])


@contextlib.contextmanager
def _recording():
    """Every `Dense` call's [path, input, LoRA-dropped input or None], in call order (eager calls only)."""
    calls: list[list] = []
    call, dropout = layers.Dense.__call__, layers.dropout

    def recorded_call(self, x, **kwargs):
        calls.append([self.path, np.asarray(x, np.float64), None])
        return call(self, x, **kwargs)

    def recorded_dropout(x, *args, **kwargs):  # only the LoRA branch of `Dense.__call__` reads `layers.dropout`
        out = dropout(x, *args, **kwargs)
        calls[-1][2] = np.asarray(out, np.float64)
        return out

    layers.Dense.__call__, layers.dropout = recorded_call, recorded_dropout
    try:
        yield calls
    finally:
        layers.Dense.__call__, layers.dropout = call, dropout


# --- the hand computation --------------------------------------------------------------------------
def torch_quantile(m: np.ndarray, q: float, interpolation: str = "linear") -> np.float32:
    """torch.quantile(m, q) on a float32 vector: sorted values, rank q * (n - 1) in float32, torch.lerp."""
    s = np.sort(m.astype(np.float32))
    rank = np.float32(q) * np.float32(len(s) - 1)
    lo = int(np.floor(rank))
    hi = min(lo + 1, len(s) - 1)
    w = np.float32(rank - np.float32(lo))
    if interpolation == "lower":
        return s[lo]
    return s[lo] + w * (s[hi] - s[lo]) if w < 0.5 else s[hi] - (s[hi] - s[lo]) * (np.float32(1) - w)


def keep(m: np.ndarray, *, q: float = THRESHOLD, compare: str = ">=", interpolation: str = "linear",
         topk: bool = False) -> np.ndarray:
    m = m.astype(np.float32)
    if topk:
        return (m >= np.sort(m)[-int(len(m) * (1 - q))]).astype(np.float64)
    t = torch_quantile(m, q, interpolation)
    return ((m > t) if compare == ">" else (m >= t)).astype(np.float64)


def sequence_of(path: str, kind: str) -> str:
    """The sequence a projection reads: T5's encoder and its cross-attention's k and v read the input."""
    if kind != "decoder" and (path.startswith("encoder.") or re.search(r"cross_attention\.[kv]$", path)):
        return "input"
    return "target" if kind != "decoder" else "sequence"


def position_weights(micro: dict, kind: str, positions: str = "authors") -> dict[str, np.ndarray]:
    """{sequence: [rows, length]} weights of one micro-batch's positions in the magnitudes. "authors": below the
    longest real row, in real rows (a row with a label; a filler row has none); mutations: "all" every position of
    the padded batch; "real" each real row's own real positions (no padding at all); "fillers" the authors' length,
    filler rows included."""
    examples = np.any(micro["labels"] != -100, axis=-1)
    if kind == "decoder":
        sequences = {"sequence": micro["attention_mask"] != 0}
    else:
        sequences = {"input": micro["attention_mask"] != 0, "target": micro["labels"] != -100}
    out = {}
    for name, real in sequences.items():
        longest = max(np.flatnonzero(row).max() + 1 for row, example in zip(real, examples) if example)
        below = np.arange(real.shape[-1]) < longest
        w = {"all": np.ones(real.shape, bool), "real": real & examples[:, None],
             "authors": below[None, :] & examples[:, None], "fillers": np.broadcast_to(below, real.shape)}[positions]
        out[name] = w.astype(np.float64)
    return out


def magnitudes(calls_per_micro: list, params: dict, batch: dict, kind: str, *, dropped: bool = True,
               positions: str = "authors", micros: tuple | None = None) -> dict[str, np.ndarray]:
    """{trainable tensor name: sum |output| per output feature} of every hooked module over the step."""
    mags: dict[str, np.ndarray] = {}

    def add(name: str, out: np.ndarray, weight: np.ndarray) -> None:
        mags[name] = mags.get(name, 0.0) + np.sum(np.abs(out) * weight[..., None], axis=(0, 1))

    for a, calls in enumerate(calls_per_micro):
        if micros is not None and a not in micros:
            continue
        weights = position_weights({k: v[a] for k, v in batch.items()}, kind, positions)
        for path, x, dropped_x in calls:
            weight = weights[sequence_of(path, kind)]
            assert weight.shape == x.shape[:2], path
            if f"{path}.kernel" in params:  # full fine-tuning: the projection's output (no bias in T5)
                add(f"{path}.kernel", x @ params[f"{path}.kernel"], weight)
            if dropped_x is not None and f"{path}.lora_a" in params:
                xa = (dropped_x if dropped else x) @ params[f"{path}.lora_a"]
                add(f"{path}.lora_a", xa, weight)
                add(f"{path}.lora_b", xa @ params[f"{path}.lora_b"], weight)  # before the scale alpha / r
    return mags


def masks(mags: dict, params: dict, *, masked: bool = True, skip: str | None = None, b_rows_by_a: bool = False,
          **select) -> dict[str, np.ndarray]:
    out = {}
    for name, p in params.items():
        if not masked or name not in mags or (skip and skip in name):
            out[name] = np.ones(p.shape[-1:])
        elif b_rows_by_a and name.endswith("lora_b"):
            out[name] = keep(mags[name[:-1] + "a"], **select)[:, None]  # over B's r rows, by A's features
        else:
            out[name] = keep(mags[name], **select)
    return out


def clip(g: dict, max_norm: float) -> dict:
    norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
    return g if norm < max_norm else {k: x / norm * max_norm for k, x in g.items()}


def hand_step(case: dict, params: dict, mu: dict, nu: dict, count: int, step: int, batch: dict, *,
              carried: dict | None = None, order: str = "mask-clip", **mutation) -> dict:
    """One optimizer step by hand: {loss, grad_norm, params, mu, nu, mags} (mutation: one item changed)."""
    grads, calls, losses = case["grads_and_calls"](params, step, batch)
    mag_args = {k: mutation.pop(k) for k in ("dropped", "positions", "micros") if k in mutation}
    mags = magnitudes(calls, params, batch, case["kind"], **mag_args)
    used = mags if carried is None else {k: carried[k] + v for k, v in mags.items()}  # not reset between steps
    mask = masks(used, params, **mutation)
    if order == "mask-clip":
        g = clip({k: grads[k] * mask[k] for k in grads}, case["max_norm"])
    else:  # "clip-mask": masked after clipping; "update": the gradient unmasked, the update masked
        g = clip(grads, case["max_norm"])
        if order == "clip-mask":
            g = {k: g[k] * mask[k] for k in g}
    norm = np.sqrt(sum(np.sum((grads[k] * mask[k]) ** 2) for k in grads))  # the step's grad_norm: the masked gradient
    lr = PEAK_LR * (TOTAL - step) / TOTAL
    new_mu = {k: B1 * mu[k] + (1 - B1) * g[k] for k in g}
    new_nu = {k: B2 * nu[k] + (1 - B2) * g[k] ** 2 for k in g}
    new = {}
    for k in g:
        u = (new_mu[k] / (1 - B1 ** (count + 1))) / (np.sqrt(new_nu[k] / (1 - B2 ** (count + 1))) + EPS)
        new[k] = params[k] - lr * (u * mask[k] if order == "update" else u)
    return {"loss": float(np.mean(losses)), "grad_norm": norm, "params": new, "mu": new_mu, "nu": new_nu, "mags": mags}


def _close(got: dict, want: dict) -> bool:
    return all(np.allclose(got[k], want[k], rtol=RTOL, atol=ATOL * max(np.abs(want[k]).max(), 1e-30)) for k in want)


def _assert_close(got: dict, want: dict) -> None:
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL * max(np.abs(want[k]).max(), 1e-30), err_msg=k)


# --- the jitted steps and the unmutated hand steps, shared by the tests -------------------------------
def _case(kind: str) -> dict:
    """kind: "lora" or "all" (T5, LoRA or full fine-tuning), "decoder" (the decoder LM with LoRA)."""
    model = _model(kind)
    graphdef, params, frozen = nnx.split(model, nnx.Param if kind == "all" else models.LoRAParam, ...)
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)  # B != 0
    family = models.CausalFamily() if kind == "decoder" else models.Seq2SeqFamily()
    task_key = make_task_key(0, 1, "rbg")  # task 2 (phase 1)

    def loss(p, micro, key):
        return family.token_loss(nnx.merge(graphdef, p, frozen), micro, key=key)[0]

    def grads_and_calls(flat_params: dict, step: int, batch: dict):
        p = _unflat(params, flat_params)
        base = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(task_key, impl="rbg"), INNER_STREAM),
                                  step)
        grads, calls, losses = [], [], []
        for a in range(A_MICRO):
            micro = {k: jnp.asarray(v[a]) for k, v in batch.items()}
            key = jax.random.fold_in(base, a)  # the accumulation's key of micro-batch a
            value, g = jax.value_and_grad(loss)(p, micro, key)
            with _recording() as recorded:  # an eager forward with the same key: the same dropout masks
                loss(p, micro, key)
            grads.append(_flat(g))
            calls.append(recorded)
            losses.append(float(value))
        return {k: np.mean([g[k] for g in grads], axis=0) for k in grads[0]}, calls, losses

    case = {"grads_and_calls": grads_and_calls, "max_norm": np.inf, "kind": kind}
    flat = _flat(params)
    batches = [_batch(kind, 11), _batch(kind, 12)]
    # The clipping bound: half the first step's masked gradient norm, so that clipping acts (and acts differently
    # on the unmasked gradient); moments of the clipped gradient's per-element size.
    max_norm = 0.5 * hand_step(case, flat, {k: 0 * v for k, v in flat.items()}, {k: 0 * v + 1 for k, v in flat.items()},
                               COUNT, STEP, batches[0])["grad_norm"]
    case["max_norm"] = max_norm
    rng = np.random.default_rng(5)
    size = max_norm / np.sqrt(sum(v.size for v in flat.values()))
    mu = {k: size * rng.normal(size=v.shape) for k, v in flat.items()}
    nu = {k: size ** 2 * rng.uniform(0.5, 2.0, size=v.shape) for k, v in flat.items()}

    programs = Programs(graphdef, family=family, lr=PEAK_LR, warmup_steps=0, max_grad_norm=float(max_norm),
                        weight_decay=0.0, donate=False)
    state = init_state(params, programs.tx, key=task_key, total_steps=TOTAL, select_best=False)
    clip_state, adam, decay = state.opt_state
    adam = adam._replace(count=jnp.asarray(COUNT, jnp.int32), mu=_unflat(params, mu), nu=_unflat(params, nu))
    state = state.replace(step=jnp.asarray(STEP, jnp.int32), opt_state=(clip_state, adam, decay))
    program = MIGU(tiny_config.get_config()).cycle(SimpleNamespace(phase=1), 0, 1)[0]
    assert program == MaskedSteps(inner_steps=1, threshold=THRESHOLD, magnitude_positions="authors")
    step = jax.jit(lambda s, b, prog: programs.step(prog, s, b, frozen), static_argnums=2)
    new, metrics = step(state, jax.tree.map(jnp.asarray, batches[0]), program)
    case.update(programs=programs, frozen=frozen, state=state, flat=flat, mu=mu, nu=nu, batches=batches, step=step,
                new=new, metrics=metrics, hand=hand_step(case, flat, mu, nu, COUNT, STEP, batches[0]))
    return case


@pytest.fixture(scope="module")
def lora_case():
    with jax.default_matmul_precision("float32"):
        yield _case("lora")


@pytest.fixture(scope="module")
def full_case():
    with jax.default_matmul_precision("float32"):
        yield _case("all")


@pytest.fixture(scope="module")
def decoder_case():
    with jax.default_matmul_precision("float32"):
        yield _case("decoder")


@pytest.fixture(params=["lora", "decoder"])
def either_lora_case(request):
    """The T5 LoRA case or the decoder LM's."""
    return request.getfixturevalue(f"{request.param}_case")


def _check_step(case: dict) -> None:
    hand, metrics = case["hand"], case["metrics"]
    assert bool(metrics["finite"]) and "penalty" not in metrics  # no loss term besides the cross-entropy
    assert float(metrics["loss"]) == pytest.approx(hand["loss"], rel=RTOL)
    assert float(metrics["grad_norm"]) == pytest.approx(hand["grad_norm"], rel=RTOL)  # the masked gradient's norm
    assert hand["grad_norm"] > case["max_norm"]  # clipping acts
    assert int(case["new"].step) == STEP + 1
    _assert_close(_flat(case["new"].params), hand["params"])
    adam = case["new"].opt_state[1]
    _assert_close(_flat(adam.mu), hand["mu"])
    _assert_close(_flat(adam.nu), hand["nu"])


def test_lora_step_by_hand(either_lora_case):
    c = either_lora_case
    hand = c["hand"]
    _check_step(c)
    names = sorted(hand["mags"])  # every LoRA factor of q and v (T5: in the encoder, decoder and cross-attention)
    assert len(names) == (4 if c["kind"] == "decoder" else 12)
    assert all(n.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for n in names)
    kept = {n: keep(hand["mags"][n]) for n in names}
    for n in names:  # A: 3 of 8 (above 4.9 of 7 ranks); B: 7 of 21 (>= the 15th value itself)
        assert kept[n].sum() == (3 if n.endswith("lora_a") else 7), n
        # A masked feature's column gets no gradient, yet moves by Adam's momentum, as torch's AdamW moves it
        p0, p1 = c["flat"][n], hand["params"][n]
        assert np.all(p1[..., kept[n] == 0] != p0[..., kept[n] == 0])


def test_the_batch_has_padding_the_authors_do_not_see(either_lora_case):
    """Each micro-batch is padded beyond its longest row in every sequence, and micro-batch 1 ends with a filler row
    (one EOS, no label), so the positions mutations below count positions the authors' hooks never see."""
    c = either_lora_case
    batch = c["batches"][0]
    assert np.all(batch["labels"][1, -1] == -100) and batch["attention_mask"][1, -1].tolist()[:2] == [1, 0]
    for a in range(A_MICRO):
        for name, w in position_weights({k: v[a] for k, v in batch.items()}, c["kind"]).items():
            assert w.any() and not w[:, -1].any(), (a, name)  # the last position lies beyond the longest row
            assert not w[-1].any() if a == 1 else w[-1].any(), (a, name)  # the filler row counts nothing


POSITION_MUTATIONS = {
    "every position of kif_jax's padded batch counted (migu.magnitude_positions='all')": dict(positions="all"),
    "padding positions left out of the magnitudes": dict(positions="real"),
    "filler rows counted up to the longest row": dict(positions="fillers"),
}


@pytest.mark.parametrize("mutation", POSITION_MUTATIONS)
def test_lora_step_fails_when_other_positions_count(either_lora_case, mutation):
    c = either_lora_case
    mutated = hand_step(c, c["flat"], c["mu"], c["nu"], COUNT, STEP, c["batches"][0], **POSITION_MUTATIONS[mutation])
    assert not _close(_flat(c["new"].params), mutated["params"]), mutation


def test_all_positions_is_the_switch_to_every_position(either_lora_case):
    """`migu.magnitude_positions = "all"` is the count before the audit: every position of the padded batch."""
    c = either_lora_case
    config = tiny_config.get_config()
    config.migu.magnitude_positions = "all"
    program = MIGU(config).cycle(SimpleNamespace(phase=1), 0, 1)[0]
    new, _ = c["step"](c["state"], jax.tree.map(jnp.asarray, c["batches"][0]), program)
    every = hand_step(c, c["flat"], c["mu"], c["nu"], COUNT, STEP, c["batches"][0], positions="all")
    _assert_close(_flat(new.params), every["params"])
    assert not _close(_flat(new.params), c["hand"]["params"])


LORA_MUTATIONS = {
    "no mask (the first task's step)": dict(masked=False),
    "threshold 0.5": dict(q=0.5),
    "strict > instead of >=": dict(compare=">"),
    "quantile 'lower' instead of torch's linear interpolation": dict(interpolation="lower"),
    "keep int(0.3 n) features (top-k) instead of the quantile": dict(topk=True),
    "A not masked": dict(skip="lora_a"),
    "B not masked": dict(skip="lora_b"),
    "B's rows masked by A's features (torch's [out, in] read as kif_jax's [in, out])": dict(b_rows_by_a=True),
    "magnitudes of A's and B's outputs before the LoRA dropout": dict(dropped=False),
    "magnitudes of the last micro-batch only": dict(micros=(A_MICRO - 1,)),
    "mask after clipping": dict(order="clip-mask"),
    "mask on the optimizer's update instead of the gradient": dict(order="update"),
}


@pytest.mark.parametrize("mutation", LORA_MUTATIONS)
def test_lora_step_fails_when_an_item_changes(lora_case, mutation):
    c = lora_case
    mutated = hand_step(c, c["flat"], c["mu"], c["nu"], COUNT, STEP, c["batches"][0], **LORA_MUTATIONS[mutation])
    assert not _close(_flat(c["new"].params), mutated["params"]), mutation


def test_the_first_task_is_unmasked(lora_case):
    c = lora_case
    program = MIGU(tiny_config.get_config()).cycle(SimpleNamespace(phase=0), 0, 1)[0]
    assert program == Program(inner_steps=1)
    new, _ = c["step"](c["state"], jax.tree.map(jnp.asarray, c["batches"][0]), program)
    plain = hand_step(c, c["flat"], c["mu"], c["nu"], COUNT, STEP, c["batches"][0], masked=False)
    _assert_close(_flat(new.params), plain["params"])
    assert not _close(_flat(new.params), c["hand"]["params"])  # a first task masked like the later ones


def test_magnitudes_are_reset_at_every_step(lora_case):
    """Two steps in one program: the second step's mask reads only the second step's outputs (the authors empty
    `temporal_activation_sum` after each optimizer step, uie_trainer_lora.py:594-596)."""
    c = lora_case
    both = {k: jnp.asarray(np.stack([b[k] for b in c["batches"]])) for k in c["batches"][0]}
    program = MaskedSteps(inner_steps=2, threshold=THRESHOLD)
    new, metrics = jax.jit(lambda s, b: c["programs"].scan_steps(program, s, c["frozen"], b))(c["state"], both)
    first = c["hand"]
    second = hand_step(c, first["params"], first["mu"], first["nu"], COUNT + 1, STEP + 1, c["batches"][1])
    assert float(metrics["loss"][1]) == pytest.approx(second["loss"], rel=RTOL)
    _assert_close(_flat(new.params), second["params"])
    carried = hand_step(c, first["params"], first["mu"], first["nu"], COUNT + 1, STEP + 1, c["batches"][1],
                        carried=first["mags"])
    assert not _close(_flat(new.params), carried["params"])


def test_full_fine_tuning_step_by_hand(full_case):
    """`model.trainable = "all"` (the authors' run_uie_ft.py): every projection's kernel masked by its outputs, the
    untied lm_head's by the logits; embeddings, norms and the relative-position bias unmasked."""
    _check_step(full_case)
    hand = full_case["hand"]
    masked = {n for n in hand["mags"]}
    assert "lm_head.kernel" in masked and all(n.endswith(".kernel") for n in masked)
    assert len(masked) == 4 + 4 + 4 + 3 + 3 + 1  # enc/dec self-attn q k v o, cross q k v o, 2 gated FFs, the head
    unmasked = set(full_case["flat"]) - masked
    assert unmasked and not any(n.endswith(".kernel") for n in unmasked)


FULL_MUTATIONS = {
    "no mask": dict(masked=False),
    "threshold 0.5": dict(q=0.5),
    "lm_head not masked": dict(skip="lm_head"),
    "every position of kif_jax's padded batch counted": dict(positions="all"),
    "padding positions left out of the magnitudes": dict(positions="real"),
    "magnitudes of the last micro-batch only": dict(micros=(A_MICRO - 1,)),
    "mask after clipping": dict(order="clip-mask"),
}


@pytest.mark.parametrize("mutation", FULL_MUTATIONS)
def test_full_fine_tuning_step_fails_when_an_item_changes(full_case, mutation):
    c = full_case
    mutated = hand_step(c, c["flat"], c["mu"], c["nu"], COUNT, STEP, c["batches"][0], **FULL_MUTATIONS[mutation])
    assert not _close(_flat(c["new"].params), mutated["params"]), mutation


def test_the_threshold_is_the_authors():
    assert migu_config().threshold == THRESHOLD  # scripts/standard_benchmark_lora.sh:1, ini_thresholds=(0.7)
