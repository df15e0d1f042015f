"""MIGU: the masked gradient worked by hand on a two-layer toy, the layer magnitudes of both model families,
end to end on the tiny T5 and the tiny decoder, and exact resumption."""
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_config
from helpers import read_metrics
from kif_jax import models
from kif_jax.config import validate_config
from kif_jax.errors import ConfigError
from kif_jax.methods import Program
from kif_jax.methods.migu import MIGU, MaskedSteps, magnitude_mask
from kif_jax.metrics import results_matrix
from kif_jax.models.layers import DECODER, ENCODER, Dense, KeyStream, LoRAConfig, reading
from kif_jax.train import Programs, ResumePosition, train_and_evaluate

F32 = jnp.float32


class TwoLayers(nnx.Module):
    """x -> first (2 -> 3) -> second (3 -> 2), each with a rank-2 LoRA of scale 1."""

    def __init__(self) -> None:
        lora = LoRAConfig(rank=2, alpha=2.0, dropout=0.0, targets=("first", "second"))
        common = dict(std=1.0, lora=lora, dtype=F32, param_dtype=F32, keys=KeyStream(jax.random.key(0)))
        self.first = Dense(2, 3, path="first", **common)
        self.second = Dense(3, 2, path="second", **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        with reading(DECODER):  # the one sequence the projections read
            return self.second(self.first(x))


class SumOfOutputs:
    """A family whose loss is sum(y * weights), so every gradient is easy to write down; its position weights
    (which positions the magnitudes count) are the batch's "positions"."""

    def token_loss(self, model, batch, *, key):
        return jnp.sum(model(batch["x"]) * batch["weights"]), jnp.int32(1)

    def position_weights(self, batch):
        return {DECODER: batch["positions"]}


def _toy():
    model = TwoLayers()
    values = {
        ("first", "kernel"): [[1, 0, 1], [0, 1, 1]],
        ("first", "lora_a"): [[1, -1], [2, 0]],
        ("first", "lora_b"): [[1, 0, 1], [0, 1, 1]],
        ("second", "kernel"): [[1, 0], [0, 1], [1, 1]],
        ("second", "lora_a"): [[1, 0], [0, 0], [0, 2]],
        ("second", "lora_b"): [[1, 1], [0, -1]],
    }
    for (layer, name), value in values.items():
        getattr(getattr(model, layer), name)[...] = jnp.asarray(value, F32)
    return model, {k: np.asarray(v, np.float32) for k, v in values.items()}


def test_masked_gradient_of_a_two_layer_toy_by_hand():
    model, w = _toy()
    graphdef, params, frozen = nnx.split(model, models.LoRAParam, ...)
    x = np.array([[1, 0], [0, -2], [1, 1]], np.float32)  # 3 positions of 2 features
    weights = np.array([[1, 0], [0, 1], [1, -1]], np.float32)
    batch = {"input_ids": np.zeros((1, 3, 1), np.int32), "x": x[None], "weights": weights[None],
             "positions": np.ones((1, 3), np.float32)}  # one micro-batch, every position counted
    programs = Programs(graphdef, family=SumOfOutputs(), lr=1e-3, warmup_steps=0, max_grad_norm=1.0,
                        weight_decay=0.0, donate=False)
    program = MaskedSteps(inner_steps=1, threshold=0.5)
    loss, grads, magnitudes = programs.accumulated_grads(program, params, (), frozen, batch, None)

    # Layer 1: x A1 = [[1, -1], [-4, 0], [3, -1]]: |.| summed over positions [8, 2]; (x A1) B1 =
    # [[1, -1, 0], [-4, 0, -4], [3, -1, 2]]: [8, 2, 6]. Medians 5 and 6: masks [1, 0] and [1, 0, 1].
    np.testing.assert_array_equal(magnitudes["first"]["lora_a"], [8, 2])
    np.testing.assert_array_equal(magnitudes["first"]["lora_b"], [8, 2, 6])
    np.testing.assert_array_equal(magnitude_mask(magnitudes["first"]["lora_a"], 0.5), [1, 0])
    np.testing.assert_array_equal(magnitude_mask(magnitudes["first"]["lora_b"], 0.5), [1, 0, 1])
    # Layer 2 reads h = x W1 + (x A1) B1 = [[2, -1, 1], [-4, -2, -6], [4, 0, 4]]: h A2 = [[2, 2], [-4, -12],
    # [4, 8]] -> [10, 22]; (h A2) B2 = [[2, 0], [-4, 8], [4, -4]] -> [10, 12]. Masks [0, 1] and [0, 1].
    np.testing.assert_array_equal(magnitudes["second"]["lora_a"], [10, 22])
    np.testing.assert_array_equal(magnitudes["second"]["lora_b"], [10, 12])

    # The unmasked gradient of sum(y * weights), y = h W2 + (h A2) B2 with h as above:
    h = x @ w["first", "kernel"] + (x @ w["first", "lora_a"]) @ w["first", "lora_b"]
    dy = weights
    dh = dy @ w["second", "kernel"].T + dy @ w["second", "lora_b"].T @ w["second", "lora_a"].T
    raw = {"second": {"lora_a": h.T @ (dy @ w["second", "lora_b"].T), "lora_b": (h @ w["second", "lora_a"]).T @ dy},
           "first": {"lora_a": x.T @ (dh @ w["first", "lora_b"].T), "lora_b": (x @ w["first", "lora_a"]).T @ dh}}
    for layer in raw:
        for factor in raw[layer]:
            np.testing.assert_allclose(grads[layer][factor], raw[layer][factor], rtol=1e-6)
    assert float(loss) == pytest.approx(float(np.sum((h @ w["second", "kernel"] + h @ w["second", "lora_a"]
                                                      @ w["second", "lora_b"]) * weights)))

    masked = program.transform_grads(programs, None, grads, None, magnitudes)
    keep = {"first": {"lora_a": [1, 0], "lora_b": [1, 0, 1]}, "second": {"lora_a": [0, 1], "lora_b": [0, 1]}}
    for layer in raw:
        for factor in raw[layer]:
            want = raw[layer][factor] * np.asarray(keep[layer][factor], np.float32)  # whole columns zeroed
            np.testing.assert_allclose(masked[layer][factor], want, rtol=1e-6)
            assert np.all(np.asarray(masked[layer][factor])[:, np.asarray(keep[layer][factor]) == 0] == 0)


def test_position_weights_choose_the_positions_the_magnitudes_count():
    """The toy above with its second position weighted 0: the magnitudes leave it out, the gradient keeps it;
    `magnitude_positions="all"` counts it whatever the weights; a tapped projection outside `reading` is refused."""
    model, _ = _toy()
    graphdef, params, frozen = nnx.split(model, models.LoRAParam, ...)
    x = np.array([[1, 0], [0, -2], [1, 1]], np.float32)
    weights = np.array([[1, 0], [0, 1], [1, -1]], np.float32)
    batch = {"input_ids": np.zeros((1, 3, 1), np.int32), "x": x[None], "weights": weights[None],
             "positions": np.array([[1, 0, 1]], np.float32)}
    programs = Programs(graphdef, family=SumOfOutputs(), lr=1e-3, warmup_steps=0, max_grad_norm=1.0,
                        weight_decay=0.0, donate=False)
    _, grads, magnitudes = programs.accumulated_grads(MaskedSteps(inner_steps=1, threshold=0.5), params, (), frozen,
                                                      batch, None)
    # Positions 0 and 2 only: x A1 rows [1, -1], [3, -1] -> [4, 2]; (x A1) B1 rows [1, -1, 0], [3, -1, 2] -> [4, 2, 2];
    # h A2 rows [2, 2], [4, 8] -> [6, 10]; (h A2) B2 rows [2, 0], [4, -4] -> [6, 4].
    np.testing.assert_array_equal(magnitudes["first"]["lora_a"], [4, 2])
    np.testing.assert_array_equal(magnitudes["first"]["lora_b"], [4, 2, 2])
    np.testing.assert_array_equal(magnitudes["second"]["lora_a"], [6, 10])
    np.testing.assert_array_equal(magnitudes["second"]["lora_b"], [6, 4])
    _, all_grads, every = programs.accumulated_grads(MaskedSteps(inner_steps=1, threshold=0.5,
                                                                 magnitude_positions="all"), params, (), frozen,
                                                     batch, None)
    np.testing.assert_array_equal(every["first"]["lora_a"], [8, 2])  # the first test's numbers
    np.testing.assert_array_equal(every["second"]["lora_b"], [10, 12])
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(all_grads)):  # the weights change no gradient
        np.testing.assert_array_equal(g, h)

    class Unnamed(TwoLayers):
        def __call__(self, x):
            return self.second(self.first(x))

    graphdef = nnx.split(Unnamed(), models.LoRAParam, ...)[0]
    programs = Programs(graphdef, family=SumOfOutputs(), lr=1e-3, warmup_steps=0, max_grad_norm=1.0,
                        weight_decay=0.0, donate=False)
    with pytest.raises(ValueError, match="reads sequence None"):
        programs.accumulated_grads(MaskedSteps(inner_steps=1, threshold=0.5), params, (), frozen, batch, None)
    batch["positions"] = np.ones((1, 2), np.float32)  # not the projections' positions
    with pytest.raises(ValueError, match="does not match the sequence's position weights"):
        Programs(nnx.split(TwoLayers(), models.LoRAParam, ...)[0], family=SumOfOutputs(), lr=1e-3, warmup_steps=0,
                 max_grad_norm=1.0, weight_decay=0.0, donate=False).accumulated_grads(
            MaskedSteps(inner_steps=1, threshold=0.5), params, (), frozen, batch, None)


def test_each_family_weighs_positions_up_to_the_longest_real_row():
    """T5: the inputs up to the longest input, the decoder up to the longest target; a decoder LM: prompt + target
    up to the longest; filler rows (no labels: one EOS, kif_jax/data/batching.py) weigh nothing."""
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]], np.int32)  # 2 rows, a filler row
    labels = np.full((3, 5), -100, np.int32)
    labels[0, :2], labels[1, :1] = 7, 8
    weights = models.Seq2SeqFamily().position_weights({"attention_mask": mask, "labels": labels})
    np.testing.assert_array_equal(weights[ENCODER], [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [0] * 6])
    np.testing.assert_array_equal(weights[DECODER], [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0] * 5])
    causal = np.full((3, 6), -100, np.int32)
    causal[0, 1:3], causal[1, 2:4] = 7, 8
    weights = models.CausalFamily().position_weights({"attention_mask": mask, "labels": causal})
    assert set(weights) == {DECODER}
    np.testing.assert_array_equal(weights[DECODER], [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [0] * 6])


def test_first_task_is_plain_and_the_threshold_is_checked():
    method = MIGU(tiny_config.get_config())
    assert method.cycle(SimpleNamespace(phase=0), 0, 2) == (Program(inner_steps=2), [])
    program, extra = method.cycle(SimpleNamespace(phase=1), 0, 2)
    assert program == MaskedSteps(inner_steps=2, threshold=0.7, magnitude_positions="authors") and extra == []
    config = tiny_config.get_config()
    config.migu.magnitude_positions = "all"
    assert MIGU(config).cycle(SimpleNamespace(phase=1), 0, 2)[0].magnitude_positions == "all"
    config.migu.threshold = 1.0
    with pytest.raises(ConfigError, match="migu.threshold"):
        validate_config(config)
    config = tiny_config.get_config()
    config.migu.magnitude_positions = "padding"
    with pytest.raises(ConfigError, match="migu.magnitude_positions"):
        validate_config(config)


@pytest.mark.parametrize("family", ["tiny", "tiny-decoder"])
def test_both_families_report_every_lora_factor(family):
    """The models tap each adapted projection: every LoRA factor gets a magnitude per feature, and the mask
    keeps the top 30% of each (ties aside) in the step the trainer runs."""
    config = tiny_config.get_config()
    config.model.name = family
    config.model.lora.targets = "q,v" if family == "tiny" else "q_proj,v_proj"
    model, _, fam = models.loading.build_model(config.model, seed=0)
    graphdef, params, frozen = nnx.split(model, models.LoRAParam, ...)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 259, size=(2, 4, 12)).astype(np.int32)  # 2 micro-batches of 4 rows
    labels = np.where(np.arange(12) < 8, -100, ids).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels,
             "decoder_input_ids": np.zeros_like(ids)}
    programs = Programs(graphdef, family=fam, lr=1e-3, warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
                        donate=False)
    program = MaskedSteps(inner_steps=1, threshold=0.7)
    loss, grads, magnitudes = jax.jit(lambda p: programs.accumulated_grads(program, p, (), frozen, batch, None))(params)
    plain_loss, plain_grads, none = programs.accumulated_grads(Program(inner_steps=1), params, (), frozen, batch, None)
    assert none is None and float(loss) == pytest.approx(float(plain_loss), rel=1e-6)
    scale = max(float(np.abs(p).max()) for p in jax.tree.leaves(plain_grads))
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):  # the taps change no gradient
        np.testing.assert_allclose(g, p, rtol=1e-5, atol=1e-5 * scale)  # (jitted vs eager: rounding only)
    flat = jax.tree_util.tree_flatten_with_path(magnitudes)[0]
    assert len(flat) == (6 if family == "tiny" else 2) * 2
    masked = program.transform_grads(programs, None, grads, None, magnitudes)
    for (path, m), g in zip(flat, jax.tree.leaves(masked)):
        m = np.asarray(m)
        assert m.shape == (g.shape[-1],) and np.all(m > 0), path  # every feature of every factor is seen
        kept = np.any(np.asarray(g) != 0, axis=tuple(range(g.ndim - 1)))
        assert kept.sum() == np.sum(m >= np.quantile(m, 0.7)) < len(m), path


@pytest.mark.parametrize("family", ["tiny", "tiny-decoder"])
def test_migu_end_to_end(family, tmp_path):
    config = tiny_config.get_config()
    config.model.name = family
    config.model.lora.targets = "q,v" if family == "tiny" else "q_proj,v_proj"
    config.methods = "seq_lora,migu"
    results = train_and_evaluate(config, tmp_path)
    R = results_matrix(results["migu"])
    assert np.isfinite(R[1]).all() and np.all((R[1] >= 0) & (R[1] <= 1))
    mine = [r for r in read_metrics(tmp_path / "migu" / "metrics.jsonl") if "loss" in r]
    seq = [r for r in read_metrics(tmp_path / "seq_lora" / "metrics.jsonl") if "loss" in r]
    assert [(r["phase"], r["step"]) for r in mine] == [(0, 2), (0, 4), (1, 2), (1, 4)]
    assert all(np.isfinite(r["loss"]) and r["skipped_steps"] == 0 for r in mine)
    # The first task is SeqLoRA's program, bit for bit; on the second the masks change the updates.
    assert [r["loss"] for r in mine if r["phase"] == 0] == [r["loss"] for r in seq if r["phase"] == 0]
    assert mine[-1]["loss"] != seq[-1]["loss"] and mine[-1]["grad_norm"] < seq[-1]["grad_norm"]


def test_migu_resumes_exactly(tmp_path):
    config = tiny_config.get_config()
    config.methods = "migu"
    config.checkpoint.every_steps = 2
    config.checkpoint.keep = 4
    reference = train_and_evaluate(config, tmp_path / "reference")["migu"]
    want = read_metrics(tmp_path / "reference" / "migu" / "metrics.jsonl")
    shutil.copytree(tmp_path / "reference", tmp_path / "resumed")
    checkpoints = tmp_path / "resumed" / "migu" / "checkpoints"
    shutil.rmtree(checkpoints / str(ResumePosition(2).checkpoint_id))  # resume in the middle of task 2
    assert (checkpoints / str(ResumePosition(1, step=2).checkpoint_id)).exists()
    again = train_and_evaluate(config, tmp_path / "resumed")["migu"]
    assert again["accuracy_matrix"] == reference["accuracy_matrix"]
    strip = lambda records: [{k: v for k, v in r.items() if k not in ("steps_per_s", "tokens_per_s", "resumed")}
                             for r in records]  # noqa: E731
    assert strip(read_metrics(tmp_path / "resumed" / "migu" / "metrics.jsonl")) == strip(want)
