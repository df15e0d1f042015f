"""The task loop: for every method, train the tasks in order, evaluate, checkpoint, and report.

`train_and_evaluate(config, workdir)` validates the config and every data file first, so a mistake
costs seconds; then it loads the model once and runs the configured methods one after another,
each into `<workdir>/<method>/` (results.json, metrics.jsonl, accuracy_matrix.png, checkpoints/).
Starting again with the same workdir resumes each method from its latest checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import time
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

import kif_jax
from kif_jax import data as kdata
from kif_jax import metrics
from kif_jax.checkpointing import RunCheckpointer, config_fingerprint
from kif_jax.core import baselines
from kif_jax.config import SYNTHETIC_DATA, split_list, validate_config
from kif_jax.data import synthetic
from kif_jax.distributed import barrier, fetch, is_main
from kif_jax.data.batching import IGNORE_INDEX, BatchIterator, TokenizedDataset, collate, pad_batch, sample_batch
from kif_jax.errors import ConfigError, KifError, NonFiniteError
from kif_jax.evaluation import Evaluator
from kif_jax.models import family as models_family
from kif_jax.models.family import ModelFamily
from kif_jax.preemption import Preempted, PreemptionGuard
from kif_jax.reporting import MetricsWriter, save_heatmap, write_json
from kif_jax.report import fusion_record, leaf_layout, write_report
from kif_jax.memory_plan import activation_bytes, memory_plan, report_memory_plan
from kif_jax.models.layers import init_lora_state, set_remat
from kif_jax.sharding import config_mesh, shard_rows, shard_tree
from kif_jax.train.methods import MethodSpec, cycle_spec, method_spec
from kif_jax.train.progress import Progress, format_seconds, note
from kif_jax.train.steps import Programs, TrainState, init_state, make_task_key
from kif_jax.tracking import Trackers
from kif_jax.workdir import WorkdirLock

STATIC_IMPORTANCE_STREAM = 2**31 - 1  # numpy seed word for the -DIE estimate's memory batches
EWC_FISHER_STREAM = 2**31 - 2  # numpy seed word for the batches of EWC's Fisher estimate


@dataclasses.dataclass
class RunContext:
    """What every method of a run shares: data, tokenized splits, the model split, programs, evaluator."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    data_dir: pathlib.Path
    tasks: list[str]
    tokenizer: Any
    family: ModelFamily
    graphdef: nnx.GraphDef
    init_params: Any
    frozen: Any
    mesh: Any
    programs: Programs
    evaluator: Evaluator
    fingerprint: str
    _cache: dict = dataclasses.field(default_factory=dict)
    compiled: set = dataclasses.field(default_factory=set)  # (cycle spec, shape) pairs run once: compiled
    preemption: PreemptionGuard = dataclasses.field(default_factory=PreemptionGuard)  # polled at cycle boundaries
    activations: int = 0  # estimated activation bytes per device (memory plan)

    def tokenized(self, key: tuple, records_fn) -> TokenizedDataset:
        """Tokenize once per (split, tasks) and keep it in memory for every method and step."""
        if key not in self._cache:
            c = self.config.train
            self._cache[key] = self.family.tokenize(records_fn(), self.tokenizer, max_input_length=c.max_input_length,
                                                    max_target_length=c.max_target_length)
        return self._cache[key]

    def train_records(self, task: str) -> list[dict]:
        """A task's training file, or its seeded random subset of `train.max_examples_per_task` rows."""
        rows = kdata.load_split(self.data_dir, task, "train")
        cap = self.config.train.max_examples_per_task
        if not cap or cap >= len(rows):
            return rows
        pick = np.random.default_rng([self.config.seed, zlib.crc32(task.encode())]).choice(len(rows), cap,
                                                                                           replace=False)
        return [rows[i] for i in sorted(pick)]

    def train_set(self, tasks: Sequence[str]) -> TokenizedDataset:
        return self.tokenized(("train", tuple(tasks)), lambda: [r for t in tasks for r in self.train_records(t)])

    def eval_records(self, task: str) -> list[dict]:
        """The examples a task is evaluated on: the first `eval.max_examples_per_task` of its test file,
        or with `eval.split = "dev"` of its dev file, minus any dev input among those test examples."""
        cap = self.config.eval.max_examples_per_task
        test = kdata.load_split(self.data_dir, task, "test")
        test = test[:cap] if cap else test
        if self.config.eval.split == "test":
            return test
        seen = {r["input"] for r in test}
        dev = [r for r in kdata.load_split(self.data_dir, task, "dev") if r["input"] not in seen]
        if not dev:
            raise ConfigError(f"task {task}: every dev example is among the evaluated test examples; "
                              f"lower eval.max_examples_per_task or use eval.split=test")
        return dev[:cap] if cap else dev

    def test_set(self, task: str) -> TokenizedDataset:
        return self.tokenized((self.config.eval.split, task), lambda: self.eval_records(task))

    def accuracy(self, params: Any, task: str) -> float:
        """Test accuracy of `params` on `task` (generated text, or the best-scored label option)."""
        return self.evaluate(params, task)[0]

    def evaluate(self, params: Any, task: str) -> tuple[float, list[dict]]:
        """Accuracy of `params` on `task`'s evaluated examples, and one record per example, in order:
        `task`, `index` (its position among them), `id`, `prediction`, `label`, `correct`."""
        options = kdata.task_labels(self.data_dir, task) if self.evaluator.mode == "score" else None
        dataset = self.test_set(task)
        predictions = self.evaluator.predictions(params, self.frozen, dataset, options)
        ids = [r["id"] for r in self.eval_records(task)]
        records = [{"task": task, "index": i, "id": ids[i], "prediction": p, "label": label,
                    "correct": metrics.normalize_answer(p) == metrics.normalize_answer(label)}
                   for i, (p, label) in enumerate(zip(predictions, dataset.references))]
        return metrics.exact_match(predictions, dataset.references), records

    def memory(self, tasks: Sequence[str]) -> TokenizedDataset:
        c = self.config
        return self.tokenized(("memory", tuple(tasks)), lambda: kdata.memory_buffer(
            self.data_dir, list(tasks), ratio=c.kif.memory_ratio, seed=c.seed))

    def dev_set(self, tasks: Sequence[str]) -> TokenizedDataset:
        n = self.config.train.select_dev_examples
        return self.tokenized(("dev", tuple(tasks)), lambda: [
            r for t in tasks for r in kdata.load_split(self.data_dir, t, "dev")[:n]])


def check_run(config: ml_collections.ConfigDict) -> list[str]:
    """Validate the config and the task names, before anything is written; returns the tasks."""
    validate_config(config)
    tasks = kdata.resolve_tasks(benchmark=config.benchmark or None, order=config.order or None,
                                tasks=config.tasks or None)
    if config.data_dir == SYNTHETIC_DATA:
        unknown = [t for t in tasks if t not in synthetic.SYNTHETIC_TASKS]
        if unknown:
            raise ConfigError(f"config field 'tasks': {', '.join(unknown)} are not synthetic tasks "
                              f"({', '.join(synthetic.SYNTHETIC_TASKS)})")
    return tasks


def resolve_run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[pathlib.Path, list[str]]:
    """Validate the config and every data file of the run; generate synthetic data if asked."""
    tasks = check_run(config)
    if config.data_dir == SYNTHETIC_DATA:
        s = config.synthetic
        data_dir = workdir / "synthetic_data"
        if is_main():  # process 0 writes, the others read the same files
            synthetic.write_synthetic_benchmark(data_dir, tasks, n_train=s.n_train, n_dev=s.n_dev, n_test=s.n_test,
                                                seed=config.seed)
        barrier("kif_jax_synthetic_data")
    else:
        data_dir = pathlib.Path(config.data_dir)
    splits = ("train", "dev", "test") if config.train.select_best or config.eval.split == "dev" else ("train", "test")
    kdata.validate_tasks(data_dir, tasks, splits=splits)
    return pathlib.Path(data_dir), tasks


def build_model(config: ml_collections.ConfigDict, mesh: Any = None) -> tuple[Any, Any, ModelFamily]:
    """The backbone (with LoRA when only LoRA trains), its tokenizer and its family (loaded onto `mesh`)."""
    return models_family.build_model(config.model, seed=config.seed, mesh=mesh)


class MethodRun:
    """One method over the task sequence, resumable at cycle granularity."""

    def __init__(self, ctx: RunContext, method: MethodSpec) -> None:
        self.ctx = ctx
        self.method = method
        self.config = ctx.config
        self.dir = ctx.workdir / method.name
        tasks = ctx.tasks
        self.phases: list[list[str]] = [list(tasks)] if method.joint else [[t] for t in tasks]
        self.R = np.full((len(tasks), len(tasks)), np.nan)
        self.zero_shot: list[float] | None = None
        self.timing = {"train_s": 0.0, "eval_s": 0.0}
        self.steps_before = self.global_step = 0  # optimizer steps of the finished phases; the trackers' x axis
        self.wandb_id: str | None = None  # kept in the checkpoints: a resumed run continues the same W&B run
        self.trackers: Trackers | None = None

    # --- state --------------------------------------------------------------------------------
    def _uses_importance(self, phase: int) -> bool:
        return self.method.kif and phase >= 1

    def fresh_state(self, phase: int, params: Any, total_steps: int) -> TrainState:
        """A fresh state of task `phase` (also the template a checkpoint of that task is restored into)."""
        c, method = self.config, self.method
        if method.lora_branches and phase >= 1:  # O-LoRA: every task after the first trains a fresh branch
            params = init_lora_state(self.ctx.init_params, c.seed, stream=(phase,))
        state = init_state(
            params, self.ctx.programs.tx, key=make_task_key(c.seed, phase, c.train.prng_impl), total_steps=total_steps,
            importance=self._uses_importance(phase),
            separate_outer=self._uses_importance(phase) and c.kif.outer_optimizer == "separate",
            merge_accumulators=self._uses_importance(phase) and self.method.merge_at_task_end,
            select_best=c.train.select_best)
        # The prior methods' parts, shaped as in task `phase` (their values come from `next_phase_state`).
        if method.lora_branches and phase >= 1:
            state = state.replace(old_lora=baselines.lora_zeros(state.params, phase))
        if method.skill_consolidation:
            state = state.replace(imp_in=kif_jax.init_importance(state.params), anchor=jax.tree.map(jnp.copy, params),
                                  unit_scores=jnp.zeros((len(jax.tree.leaves(params)),), jnp.float32))
        if method.fisher_penalty:
            state = state.replace(fisher=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
                                  star=jax.tree.map(jnp.copy, params))
        return state

    def model_params(self, state: TrainState) -> Any:
        """The LoRA (or trainable) tree the model runs with: O-LoRA's old and new branches side by side."""
        return baselines.lora_concat(state.old_lora, state.params)

    def next_phase_state(self, prev: TrainState | None, phase: int, params: Any, total_steps: int) -> TrainState:
        """Reset at the task boundary (reference), or carry optimizer and importance states over."""
        state = self.fresh_state(phase, params, total_steps)
        if prev is not None:  # the prior methods' state between tasks, whatever the reset switch says
            if self.method.lora_branches:  # the finished task's branch joins the old one
                state = state.replace(old_lora=baselines.lora_concat(prev.old_lora, prev.params))
            if self.method.skill_consolidation:
                state = state.replace(unit_scores=prev.unit_scores)
            if self.method.fisher_penalty:
                state = state.replace(fisher=prev.fisher, star=prev.star)
        if prev is not None and jax.tree.structure(prev.prev_masks) == jax.tree.structure(state.prev_masks):
            state = state.replace(prev_masks=prev.prev_masks)  # logged only: mask overlap across the task boundary
        if prev is None or self.config.train.reset_at_task_boundary:
            return state
        carried = {"opt_state": prev.opt_state}
        for name in ("imp_in", "imp_out", "outer_opt_state"):
            if jax.tree.structure(getattr(prev, name)) == jax.tree.structure(getattr(state, name)):
                carried[name] = getattr(prev, name)
        return state.replace(**carried)

    # --- data ---------------------------------------------------------------------------------
    def phase_train_set(self, phase: int) -> TokenizedDataset:
        tasks = self.phases[phase]
        if self.method.replay_data and phase >= 1:
            prev = [t for p in self.phases[:phase] for t in p]
            key = ("replay", tuple(tasks), tuple(prev))
            return self.ctx.tokenized(key, lambda: [
                r for t in tasks for r in self.ctx.train_records(t)
            ] + kdata.memory_buffer(self.ctx.data_dir, prev, ratio=self.config.kif.memory_ratio,
                                    seed=self.config.seed))
        return self.ctx.train_set(tasks)

    def stack(self, batches: list[dict], input_len: int, target_len: int) -> dict:
        """Pad to one shape, split rows into [A, mb] micro-batches, stack to [n, A, mb, L], shard rows."""
        mb = self.config.train.micro_batch_size
        padded = [pad_batch(b, input_len, target_len) for b in batches]
        stacked = {k: np.stack([b[k].reshape(-1, mb, b[k].shape[-1]) for b in padded]) for k in padded[0]}
        return shard_rows(stacked, self.ctx.mesh, row_axis=2)

    # --- training -----------------------------------------------------------------------------
    def plan_memory(self) -> None:
        """memory.json from the shardings of the method's largest state, before anything compiles."""
        phase = 1 if self.method.kif and len(self.phases) > 1 else 0
        if self.method.lora_branches:  # the old branch grows with every task
            phase = len(self.phases) - 1
        state = jax.eval_shape(lambda: self.fresh_state(phase, self.ctx.init_params, 1))
        plan = memory_plan(state, self.ctx.frozen, self.ctx.mesh, activations=self.ctx.activations)
        report_memory_plan(plan, self.dir / "memory.json", self.method.name)

    def run(self) -> dict:
        c = self.config
        self.plan_memory()
        ckpt = RunCheckpointer(self.dir / "checkpoints", keep=c.checkpoint.keep, fingerprint=self.ctx.fingerprint)
        try:
            return self._run(ckpt)
        finally:
            ckpt.close()
            if self.trackers is not None:
                self.trackers.finish()

    def _run(self, ckpt: RunCheckpointer) -> dict:
        c, ctx = self.config, self.ctx
        start_phase, state, iterator_state, offset, predictions_offset = 0, None, None, None, None
        params = ctx.init_params
        trained, resumed_step = False, 0  # trained: preempted while evaluating, the phase's training is done
        # The newest intact checkpoint; its state has the structure of a fresh state of its phase.
        restored = ckpt.restore_latest(lambda meta: shard_tree(self.fresh_state(
            meta["phase"] if meta["mid_phase"] else meta["phase"] - 1, params, 0), ctx.mesh))
        if restored is not None:
            latest, meta, state = restored
            start_phase = meta["phase"]
            self.R = np.array([[np.nan if v is None else v for v in row] for row in meta["R"]])
            self.zero_shot = meta["zero_shot"]
            self.timing = meta["timing"]
            offset = meta["metrics_offset"]
            predictions_offset = meta["predictions_offset"]
            self.steps_before, self.wandb_id = meta["steps_before_phase"], meta["wandb_id"]
            self.global_step = self.steps_before
            params = state.params
            iterator_state = meta["iterator"] if meta["mid_phase"] else None
            trained = meta.get("trained", False)
            resumed_step = meta["step"] if meta["mid_phase"] else 0
            logging.info("%s: resumed from checkpoint %d (task %d)", self.method.name, latest, start_phase + 1)
            if start_phase == len(self.phases):
                results = self.dir / "results.json"
                when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(results.stat().st_mtime))
                        if results.exists() else "unknown")
                note(f"{self.method.name}: nothing to run: finished; its results are from {when}")
        if ctx.preemption.should_stop():
            raise Preempted(method=self.method.name, task=start_phase + 1, step=resumed_step, saved=False)
        if is_main() and (c.logging.tensorboard or c.logging.wandb_project):
            self.trackers = Trackers(self.dir, method=self.method.name, tensorboard=c.logging.tensorboard,
                                     wandb_project=c.logging.wandb_project, wandb_id=self.wandb_id,
                                     config=c.to_dict(), tasks=ctx.tasks)
            self.wandb_id = self.trackers.wandb_id
        writer = MetricsWriter(self.dir / "metrics.jsonl", resume_offset=offset,
                               listener=None if self.trackers is None else self._track)
        # One record per evaluated example and evaluation; a phase's records are written together once
        # all its tasks are evaluated, so a resumed run leaves exactly the records of an uninterrupted one.
        self.predictions = MetricsWriter(self.dir / "predictions.jsonl", resume_offset=predictions_offset)

        if self.zero_shot is None and c.eval.all_tasks and not self.method.joint:
            t0 = time.perf_counter()
            zero_shot, records = [], []
            for t in ctx.tasks:
                if ctx.preemption.should_stop():
                    raise Preempted(method=self.method.name, task=1, step=0, saved=False)
                accuracy, task_records = ctx.evaluate(params, t)
                zero_shot.append(accuracy)
                records += [{"after_task": -1, **r} for r in task_records]  # -1: before any training
            self.predictions.write_many(records)
            self.zero_shot = zero_shot
            self.timing["eval_s"] += time.perf_counter() - t0

        for phase in range(start_phase, len(self.phases)):
            resuming = iterator_state is not None or trained
            if not trained:
                state = self.train_phase(phase, state, params, iterator_state, writer, ckpt)
                self.steps_before += int(state.step)
                self.global_step = self.steps_before
            iterator_state, trained = None, False
            params = state.params
            t0 = time.perf_counter()
            self.evaluate_phase(phase, self.model_params(state),
                                preempted=lambda: self._save_trained_and_stop(ckpt, state, phase, writer))
            self.timing["eval_s"] += time.perf_counter() - t0
            writer.write({"event": "task_end", "method": self.method.name, "phase": phase,
                          "tasks": self.phases[phase], "accuracy": self.R[self._row(phase)].tolist(),
                          "resumed": resuming})
            self.save(ckpt, state, phase=phase + 1, mid_phase=False, iterator=None, writer=writer)
            logging.info("%s: after %s: %s", self.method.name, ",".join(self.phases[phase]),
                         metrics.accuracy_table(self.R, ctx.tasks, method=self.method.name).splitlines()[-1])

        result = metrics.make_results(self.method.name, ctx.tasks, self.R, zero_shot=self.zero_shot,
                                      config=c.to_dict(), timing=self.timing)
        if is_main():
            write_json(self.dir / "results.json", result)
            save_heatmap(self.dir / "accuracy_matrix.png", self.R, ctx.tasks, title=self.method.name)
        if self.trackers is not None:
            self.trackers.log_results(result, self.R, ctx.tasks, self.steps_before)
        return result

    def _track(self, record: dict) -> None:
        """Every metrics.jsonl record to the trackers, at the method's step over the whole sequence."""
        if "step" in record and "loss" in record:
            self.global_step = self.steps_before + int(record["step"])
        self.trackers.log(record, self.global_step)

    def _row(self, phase: int) -> int:
        return len(self.ctx.tasks) - 1 if self.method.joint else phase

    def save(self, ckpt: RunCheckpointer, state: TrainState, *, phase: int, mid_phase: bool,
             iterator: dict | None, writer: MetricsWriter, trained: bool = False) -> None:
        steps_done = int(state.step)
        # Checkpoint ids grow through the run: phase-major, then steps within the phase; a phase trained
        # to its end but not yet evaluated (preempted while evaluating) is one id after its last step.
        ckpt_id = phase * 10_000_000 + (steps_done + int(trained) if mid_phase else 0)
        if ckpt.has(ckpt_id):
            return  # this very position is saved already (a periodic save, or an earlier preemption)
        meta = {"phase": phase, "mid_phase": mid_phase, "iterator": iterator, "step": steps_done,
                "R": [[None if math.isnan(v) else float(v) for v in row] for row in self.R],
                "zero_shot": self.zero_shot, "timing": self.timing, "metrics_offset": writer.offset(),
                "predictions_offset": self.predictions.offset(), "steps_before_phase": self.steps_before,
                "wandb_id": self.wandb_id,
                "method": self.method.name, "trained": trained}
        ckpt.save(ckpt_id, state, meta)

    def _save_trained_and_stop(self, ckpt: RunCheckpointer, state: TrainState, phase: int,
                               writer: MetricsWriter) -> None:
        """Preempted while evaluating: save the trained state (the phase's evaluation is redone on resume)."""
        self.save(ckpt, state, phase=phase, mid_phase=True, iterator=None, writer=writer, trained=True)
        raise Preempted(method=self.method.name, task=phase + 1, step=int(state.step), saved=True)

    def evaluate_phase(self, phase: int, params: Any, preempted: Callable[[], None] | None = None) -> None:
        """Fill row `phase` of R; before each task, a preemption request calls `preempted` (which raises)."""
        ctx = self.ctx
        row = self._row(phase)
        seen = len(ctx.tasks) if self.method.joint else phase + 1
        columns = range(len(ctx.tasks)) if self.config.eval.all_tasks else range(seen)
        records: list[dict] = []
        t0 = time.perf_counter()
        note(f"{self.method.name}: evaluating after task {phase + 1}/{len(self.phases)} on {len(columns)} task(s)")
        for j in columns:
            if preempted is not None and ctx.preemption.should_stop():
                preempted()
            self.R[row, j], task_records = ctx.evaluate(params, ctx.tasks[j])
            records += [{"after_task": phase, **r} for r in task_records]
        self.predictions.write_many(records)
        note(f"{self.method.name}: evaluated in {format_seconds(time.perf_counter() - t0)}: "
             + ", ".join(f"{ctx.tasks[j]} {100 * self.R[row, j]:.1f}" for j in columns))

    def train_phase(self, phase: int, state: TrainState | None, params: Any, iterator_state: dict | None,
                    writer: MetricsWriter, ckpt: RunCheckpointer) -> TrainState:
        c, ctx, method = self.config, self.ctx, self.method
        programs, mesh, frozen = ctx.programs, ctx.mesh, ctx.frozen
        kif = method.kif and phase >= 1
        train_set = self.phase_train_set(phase)
        batch_size = c.train.batch_size
        iterator = BatchIterator(train_set, batch_size, seed=c.seed * 1000 + phase)
        total = c.train.epochs * iterator.steps_per_epoch
        memory = ctx.memory([t for p in self.phases[:phase] for t in p]) if kif else None

        if iterator_state is not None:
            iterator.restore(iterator_state)
        else:
            state = shard_tree(self.next_phase_state(state, phase, params, total), mesh)
            if kif and not method.dynamic_outer_importance:
                rng = np.random.default_rng([c.seed, phase, STATIC_IMPORTANCE_STREAM])
                draws = [sample_batch(memory, c.kif.outer_batch_size, rng) for _ in range(c.kif.static_batches)]
                spec = cycle_spec(method, c.kif, inner_steps=0, with_outer=True, config=c, phase=phase)
                shape = self._common_shape(draws)
                state = programs.estimate_outer_importance(state, frozen, self.stack(draws, *shape), spec=spec)
        dev = self._dev_batches(phase) if c.train.select_best else None

        q_full = c.kif.inner_steps
        name = f"{method.name} {phase + 1}/{len(self.phases)} {','.join(self.phases[phase])}"[:60]
        every = c.logging.progress_every_steps or max(q_full, total // 10)
        bar = Progress(name, total=total, initial=int(state.step), every=every)
        step = int(state.step)
        last_saved = step
        while step < total:
            q = min(q_full, total - step)
            with_outer = kif and (q == q_full or c.kif.fuse_partial_cycle)
            spec = cycle_spec(method, c.kif, inner_steps=q, with_outer=with_outer, config=c, phase=phase)
            inner = [iterator.next() for _ in range(q)]
            outer: list[dict] = []
            if with_outer:
                rng = np.random.default_rng([c.seed, phase, step])
                outer = [sample_batch(memory, c.kif.outer_batch_size, rng) for _ in range(spec.outer_steps)]
            shape = self._common_shape(inner + outer)
            tokens = sum(int(b["attention_mask"].sum() + (b["labels"] != IGNORE_INDEX).sum()) for b in inner + outer)
            if (spec, shape) not in ctx.compiled:
                ctx.compiled.add((spec, shape))
                note(f"{method.name}: compiling a training cycle of {q} steps{' with fusion' if with_outer else ''} "
                     f"(inputs {shape[0]} + {shape[1]} tokens)")
            t0 = time.perf_counter()
            state, out = programs.run_cycle(state, frozen, self.stack(inner, *shape),
                                            self.stack(outer, *shape) if outer else None, spec=spec)
            out = fetch(out)
            elapsed = time.perf_counter() - t0
            self.timing["train_s"] += elapsed
            self._check_finite(out, phase, step)
            step += q
            self._log_cycle(writer, bar, out, phase, step, q, tokens, elapsed)
            if dev is not None and step // c.train.select_every_steps > (step - q) // c.train.select_every_steps:
                loss = programs.dev_loss(self.model_params(state), frozen, dev)
                writer.write({"event": "dev_loss", "method": method.name, "phase": phase, "step": step,
                              "dev_loss": float(loss)})
                better = loss < state.best_loss
                state = state.replace(best_loss=jnp.where(better, loss, state.best_loss),
                                      best_params=jax.tree.map(lambda a, b: jnp.where(better, a, b),
                                                               state.params, state.best_params))
            every = c.checkpoint.every_steps
            if every and step < total and step // every > last_saved // every:
                self.save(ckpt, state, phase=phase, mid_phase=True, iterator=iterator.state(), writer=writer)
                last_saved = step
            if ctx.preemption.should_stop():  # SIGTERM / SIGINT: save this position and stop
                bar.close()
                self.save(ckpt, state, phase=phase, mid_phase=True, iterator=iterator.state(), writer=writer)
                raise Preempted(method=method.name, task=phase + 1, step=step, saved=True)
        bar.close()
        if kif and method.merge_at_task_end:
            spec = cycle_spec(method, c.kif, inner_steps=q_full, with_outer=True, config=c, phase=phase)
            state, stats = programs.merge_task(state, spec=spec)
            stats = fetch(stats)
            fusion = stats.pop("fusion", None)
            writer.write({"event": "global_merge", "method": method.name, "phase": phase, **stats})
            if fusion is not None:
                self._log_fusion(writer, fusion, phase, step, first=True)
        if c.train.select_best:
            state = state.replace(params=state.best_params)
        return self._end_task(phase, state, train_set, writer)

    def _end_task(self, phase: int, state: TrainState, train_set: TokenizedDataset,
                  writer: MetricsWriter) -> TrainState:
        """The prior methods' work at a task end, before its evaluation and its checkpoint."""
        c, method, programs = self.config, self.method, self.ctx.programs
        head = {"method": method.name, "phase": phase}
        if method.skill_consolidation:  # TaSL: unit scores; from task 2 on, the unit-wise merge
            state, stats = programs.consolidate_skills(state, first=phase == 0, quantile=float(c.tasl.quantile))
            writer.write({"event": "tasl_consolidation", **head, **{k: int(v) for k, v in fetch(stats).items()}})
        if method.fisher_penalty:  # EWC: this task's Fisher joins the sum; theta* = the parameters now
            rng = np.random.default_rng([c.seed, phase, EWC_FISHER_STREAM])
            draws = [sample_batch(train_set, c.train.batch_size, rng) for _ in range(c.ewc.fisher_batches)]
            state, stats = programs.update_fisher(state, self.ctx.frozen, self.stack(draws, *self._common_shape(draws)))
            stats = fetch(stats)
            writer.write({"event": "ewc_fisher", **head, "fisher_batches": int(stats["fisher_batches"]),
                          "fisher_mean": float(stats["fisher_mean"])})
        return state

    def _common_shape(self, batches: list[dict]) -> tuple[int, int]:
        return (max(b["input_ids"].shape[1] for b in batches), max(b["labels"].shape[1] for b in batches))

    def _dev_batches(self, phase: int) -> dict:
        tasks = [t for p in self.phases[:phase + 1] for t in p]
        dev = self.ctx.dev_set(tasks)
        mb = self.config.train.micro_batch_size
        n = math.ceil(len(dev) / mb) * mb
        batch = collate(dev, range(len(dev)), batch_size=n)  # filler rows add nothing to the loss
        stacked = {k: v.reshape(-1, mb, v.shape[-1]) for k, v in batch.items()}
        return shard_rows(stacked, self.ctx.mesh, row_axis=1)

    def _check_finite(self, out: dict, phase: int, step: int) -> None:
        inner_ok = np.asarray(out["inner_finite"])
        outer_ok = np.asarray(out.get("outer_finite", [True]))
        if inner_ok.all() and outer_ok.all():
            return
        # 1-based step of the first bad inner step; a bad outer step belongs to the cycle's last step.
        bad = step + (int(np.argmin(inner_ok)) if not inner_ok.all() else len(inner_ok) - 1) + 1
        where = f"method {self.method.name}, task {','.join(self.phases[phase])} (#{phase + 1}), step {bad}"
        if self.config.train.on_nonfinite == "stop":
            raise NonFiniteError(f"non-finite loss or gradient in {where}; the last checkpoint is kept")
        logging.warning("skipped a non-finite step in %s", where)

    def _log_cycle(self, writer: MetricsWriter, bar: Progress, out: dict, phase: int, step: int, q: int,
                   tokens: int, elapsed: float) -> None:
        loss = float(np.mean(out["inner_loss"]))
        bar.update(step, q, loss, q / elapsed)
        record = {"method": self.method.name, "phase": phase, "task": ",".join(self.phases[phase]), "step": step,
                  "loss": loss, "lr": float(out["inner_lr"][-1]), "grad_norm": float(np.mean(out["inner_grad_norm"])),
                  "steps_per_s": q / elapsed, "tokens_per_s": tokens / elapsed,  # input + target tokens
                  "skipped_steps": int(q - np.sum(out["inner_finite"]))}
        if "outer_loss" in out:
            record["outer_loss"] = float(np.mean(out["outer_loss"]))
        for key in ("mask_in_frac", "mask_out_frac", "mask_both_frac", "w_in_mean"):
            if key in out:
                record[key] = float(out[key])
        if "inner_penalty" in out:  # O-LoRA / EWC: the loss term besides the cross-entropy (`loss`)
            record["penalty"] = float(np.mean(out["inner_penalty"]))
        writer.write(record)
        if "fusion" in out:
            self._log_fusion(writer, out["fusion"], phase, step, first=step == q)

    def _log_fusion(self, writer: MetricsWriter, stats: dict, phase: int, step: int, *, first: bool) -> None:
        """A "fusion_stats" record (kif_jax/report.py); a task's first one follows a "fusion_leaves" record."""
        head = {"method": self.method.name, "phase": phase}
        if first:
            writer.write({"event": "fusion_leaves", **head, **leaf_layout(self.ctx.init_params)})
        writer.write({"event": "fusion_stats", **head, "task": ",".join(self.phases[phase]), "step": step,
                      **fusion_record(stats)})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, dict]:
    """Run every configured method; returns {method: results.json contents}."""
    workdir = pathlib.Path(workdir)
    check_run(config)
    # One run per workdir, checked writable before any model loads (process 0 holds the lock).
    with WorkdirLock(workdir) if is_main() else contextlib.nullcontext():
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, dict]:
    data_dir, tasks = resolve_run(config, workdir)
    c = config
    mesh = config_mesh(c.sharding)
    model, tokenizer, family = build_model(config, mesh)
    from kif_jax.models import LoRAParam

    set_remat(model, c.train.remat)
    trainable = LoRAParam if c.model.trainable == "lora" else nnx.Param
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    programs = Programs(graphdef, family=family, lr=c.train.lr, warmup_steps=c.train.warmup_steps,
                        max_grad_norm=c.train.max_grad_norm, weight_decay=c.train.weight_decay,
                        outer_lr=c.kif.outer_lr, prng_impl=c.train.prng_impl, mesh=mesh)
    activations = activation_bytes(model.config, micro_batch_size=c.train.micro_batch_size,
                                   input_length=c.train.max_input_length, target_length=c.train.max_target_length,
                                   itemsize=2 if c.model.dtype == "bfloat16" else 4, remat=c.train.remat, mesh=mesh)
    evaluator = Evaluator(graphdef, family, tokenizer, batch_size=c.eval.batch_size, max_new_tokens=c.eval.max_new_tokens,
                          mesh=mesh, mode=c.eval.mode, max_target_length=c.train.max_target_length)
    ctx = RunContext(config=c, workdir=workdir, data_dir=data_dir, tasks=tasks, tokenizer=tokenizer, family=family,
                     graphdef=graphdef, init_params=shard_tree(params, mesh), frozen=shard_tree(frozen, mesh),
                     mesh=mesh, programs=programs, evaluator=evaluator, fingerprint=config_fingerprint(c),
                     activations=activations, preemption=PreemptionGuard())
    results: dict[str, dict] = {}
    with ctx.preemption:  # SIGTERM / SIGINT from here on: save at the next cycle boundary, raise Preempted
        for name in split_list(c.methods):
            t0 = time.perf_counter()
            results[name] = MethodRun(ctx, method_spec(name)).run()
            logging.info("%s finished in %.1f s", name, time.perf_counter() - t0)
    table = metrics.comparison_table(results)
    if is_main():
        (workdir / "comparison.md").write_text(table + "\n")
    if jax.process_index() == 0:
        try:  # the results are written: a report that cannot be built costs a warning, not the run
            logging.info("comparison report in %s", write_report(workdir, skip_unfinished=True))
        except KifError as err:
            logging.warning("no comparison report (%s); rebuild it with: python -m kif_jax.report %s", err, workdir)
    return results
