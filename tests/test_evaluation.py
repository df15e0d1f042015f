"""Evaluation modes: option scoring ("score") against greedy decoding ("generate") on trained tiny models."""
import pytest
from flax import nnx

import tiny_config
from kif_jax import data as kdata
from kif_jax.evaluation import Evaluator
from kif_jax.sharding import data_mesh
from kif_jax.train import loop


def _trained(tmp_path, family: str):
    """A tiny model trained (all parameters) on two synthetic tasks, and its test sets."""
    config = tiny_config.get_config()
    config.methods = "mtl"
    config.tasks = "topic,sentiment"
    config.synthetic.n_train = 160
    config.synthetic.n_test = 48
    config.model.trainable = "all"
    config.model.name = "tiny" if family == "t5" else "tiny-decoder"
    config.model.tiny.d_model = 32
    config.model.tiny.d_ff = 64
    config.model.tiny.num_layers = 2
    config.train.epochs = 6
    config.train.lr = 3e-3
    data_dir, tasks = loop.resolve_run(config, tmp_path)
    model, tokenizer, fam = loop.build_model(config)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    from kif_jax.methods import Program
    from kif_jax.train.steps import Programs, init_state, make_task_key

    records = [r for t in tasks for r in kdata.load_split(data_dir, t, "train")]
    train = fam.tokenize(records, tokenizer, max_input_length=64, max_target_length=8)
    programs = Programs(graphdef, family=fam, lr=3e-3, warmup_steps=2, max_grad_norm=1.0, weight_decay=0.0,
                        donate=False)
    batches = kdata.BatchIterator(train, 16, seed=0)
    steps = config.train.epochs * batches.steps_per_epoch
    state = init_state(params, programs.tx, key=make_task_key(0, 0, "rbg"), total_steps=steps, select_best=False)
    program = Program(inner_steps=4)
    for _ in range(steps // 4):
        stacked = kdata.stack_batches([batches.next() for _ in range(4)])
        stacked = {k: v[:, None] for k, v in stacked.items()}  # one micro-batch per step
        state, _ = programs.run_cycle(state, frozen, stacked, None, program=program)
    tests = {t: fam.tokenize(kdata.load_split(data_dir, t, "test"), tokenizer, max_input_length=64,
                             max_target_length=8) for t in tasks}
    return graphdef, fam, tokenizer, state.params, frozen, tests, data_dir


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_score_agrees_with_greedy_wherever_greedy_is_a_valid_option(tmp_path, family):
    graphdef, fam, tokenizer, params, frozen, tests, data_dir = _trained(tmp_path, family)
    mesh = data_mesh(1)
    kw = dict(batch_size=16, max_new_tokens=8, mesh=mesh, max_target_length=8)
    generate = Evaluator(graphdef, fam, tokenizer, mode="generate", **kw)
    score = Evaluator(graphdef, fam, tokenizer, mode="score", **kw)
    valid = agree = 0
    for task, dataset in tests.items():
        options = kdata.task_labels(data_dir, task)
        greedy = generate.predictions(params, frozen, dataset)
        ranked = score.predictions(params, frozen, dataset, options)
        assert set(ranked) <= set(options)  # scoring never produces an invalid label
        for g, s in zip(greedy, ranked):
            if g.strip() in options:
                valid += 1
                agree += g.strip() == s
    assert valid >= 48  # the model learned the label format: at least half the answers are options
    assert agree == valid
