"""The task loop: for every method, train the tasks in order, evaluate, checkpoint, and report.

`train_and_evaluate(config, workdir)` validates the config and every data file first, so a mistake
costs seconds; then it loads the model once and runs the configured methods one after another,
each into `<workdir>/<method>/` (results.json, metrics.jsonl, predictions.jsonl, accuracy_matrix.png,
checkpoints/). Starting again with the same workdir resumes each method from its latest checkpoint.

The loop composes what a method provides (kif_jax/methods/): its phases and data, its state, the
program of each cycle, its task-start and task-end work and its log fields. It never names a method.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from kif_jax import data as kdata
from kif_jax import metrics
from kif_jax.checkpointing import RunCheckpointer, config_fingerprint
from kif_jax.config import (SUPERNI_BENCHMARKS, SYNTHETIC_DATA, default_data_dir, split_list, validate_config,
                            with_method_sections, with_renamed_fields)
from kif_jax.data import synthetic
from kif_jax.data.batching import BatchIterator, collate
from kif_jax.distributed import barrier, fetch, is_main
from kif_jax.errors import ConfigError, DataError, KifError
from kif_jax.evaluation import Evaluator, evaluate_task
from kif_jax.memory_plan import activation_bytes, report_memory_plan
from kif_jax.methods import Method, method_class, unrelated_sections
from kif_jax.models import loading as models_loading
from kif_jax.models.family import ModelFamily
from kif_jax.models.layers import LoRAParam, set_remat
from kif_jax.preemption import Preempted, PreemptionGuard
from kif_jax.report import write_report
from kif_jax.run_files import MetricsWriter, save_heatmap, write_json
from kif_jax.sharding import config_mesh, shard_rows, shard_tree
from kif_jax.tasks import TaskFormat, run_format
from kif_jax.tracking import Trackers
from kif_jax.train.data import RunData, common_shape, stack_batches
from kif_jax.train.position import ResumePosition
from kif_jax.train.prefix import Prefix, adopt_prefix, plan_prefix, prefix_fingerprint
from kif_jax.train.progress import Progress, format_seconds, note
from kif_jax.train.records import batch_tokens, check_finite, cycle_record
from kif_jax.train.state import fresh_state, next_task_state, plan_method_memory
from kif_jax.train.steps import Programs, TrainState
from kif_jax.train.task import TaskContext
from kif_jax.workdir import WorkdirLock


@dataclasses.dataclass
class RunContext:
    """What every method of a run shares: the data, the model split, the programs, the evaluator."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    tasks: list[str]
    data: RunData
    graphdef: nnx.GraphDef
    init_params: Any
    frozen: Any
    mesh: Any
    programs: Programs
    evaluator: Evaluator
    compiled: set = dataclasses.field(default_factory=set)  # (program, shape) pairs run once: compiled
    preemption: PreemptionGuard = dataclasses.field(default_factory=PreemptionGuard)  # polled at cycle boundaries
    activations: int = 0  # estimated activation bytes per device (memory plan)

    def accuracy(self, params: Any, task: str) -> float:
        """The score of `params` on `task` (its entry of the score matrix: accuracy for classification)."""
        return self.evaluate(params, task)[0]

    def evaluate(self, params: Any, task: str) -> tuple[float, list[dict]]:
        """The score of `params` on `task`'s evaluated examples, as the task's format aggregates it, and one
        record per example, in order (kif_jax.evaluation.evaluate_task)."""
        data = self.data
        return evaluate_task(self.evaluator, data.format, params, self.frozen, data.test_set(task),
                             data.eval_records(task),
                             options=data.options(task) if self.evaluator.mode == "score" else None,
                             max_new_tokens=data.generation_length(task) if self.evaluator.mode == "generate" else None)


def check_run(config: ml_collections.ConfigDict) -> list[str]:
    """Validate the config (its task format included) and the task names, before anything is written; returns
    the tasks."""
    validate_config(config)
    tasks = kdata.resolve_tasks(benchmark=config.benchmark or None, order=config.order or None,
                                tasks=config.tasks or None)
    if config.data_dir == SYNTHETIC_DATA:
        if run_format(config).name != "classification":
            raise ConfigError(f"config field 'data_dir' is 'synthetic' (generated classification tasks), but the task "
                              f"format is '{run_format(config).name}'")
        unknown = [t for t in tasks if t not in synthetic.SYNTHETIC_TASKS]
        if unknown:
            raise ConfigError(f"config field 'tasks': {', '.join(unknown)} are not synthetic tasks "
                              f"({', '.join(synthetic.SYNTHETIC_TASKS)})")
    return tasks


def resolve_run(config: ml_collections.ConfigDict, workdir: pathlib.Path, *,
                generate: bool = True) -> tuple[pathlib.Path, list[str]]:
    """Validate the config and every data file of the run (read by its task format); generate synthetic data
    if asked (`generate` False: read what the run generated)."""
    tasks = check_run(config)
    if config.data_dir == SYNTHETIC_DATA:
        s = config.synthetic
        data_dir = workdir / "synthetic_data"
        if generate and is_main():  # process 0 writes, the others read the same files
            synthetic.write_synthetic_benchmark(data_dir, tasks, n_train=s.n_train, n_dev=s.n_dev, n_test=s.n_test,
                                                seed=config.seed)
        barrier("kif_jax_synthetic_data")
    else:
        data_dir = pathlib.Path(config.data_dir)
    task_format = run_format(config)
    reads_dev = (config.train.select_best or config.eval.split == "dev") and task_format.has_dev_split
    splits = ("train", "dev", "test") if reads_dev else ("train", "test")
    try:
        kdata.validate_tasks(data_dir, tasks, splits=splits, task_format=task_format)
    except DataError as err:
        if config.benchmark in SUPERNI_BENCHMARKS and not kdata.split_path(data_dir, tasks[0], "train").is_file():
            raise DataError(f"{err}; benchmark '{config.benchmark}' reads the SuperNI task files: "
                            f"--config.data_dir={default_data_dir(config.benchmark)}") from None
        raise
    return pathlib.Path(data_dir), tasks


def build_model(config: ml_collections.ConfigDict, mesh: Any = None) -> tuple[Any, Any, ModelFamily]:
    """The backbone (with LoRA when only LoRA trains), its tokenizer and its family (loaded onto `mesh`)."""
    return models_loading.build_model(config.model, seed=config.seed, mesh=mesh)


class MethodRun:
    """One method over the task sequence, resumable at cycle granularity."""

    def __init__(self, ctx: RunContext, method: Method, prefix: Prefix | None = None) -> None:
        self.ctx = ctx
        self.method = method
        self.name = method.name
        self.config = ctx.config
        self.dir = ctx.workdir / method.name
        self.phases: list[list[str]] = method.phases(ctx.tasks)
        self.R = np.full((len(ctx.tasks), len(ctx.tasks)), np.nan)
        self.zero_shot: list[float] | None = None
        self.timing = {"train_s": 0.0, "eval_s": 0.0}
        self.steps_before = self.global_step = 0  # optimizer steps of the finished phases; the trackers' x axis
        self.wandb_id: str | None = None  # kept in the checkpoints: a resumed run continues the same W&B run
        self.trackers: Trackers | None = None
        leave_out = unrelated_sections(self.config, type(method))
        self.fingerprint = config_fingerprint(self.config, leave_out=leave_out)
        self.prefix_fingerprint = prefix_fingerprint(self.config, leave_out)  # recorded for `checkpoint.prefix_from`
        self.prefix = prefix  # the finished tasks of another order's run this one starts from, or None

    # --- state --------------------------------------------------------------------------------
    def fresh_state(self, phase: int, params: Any, total_steps: int) -> TrainState:
        """A fresh state of task `phase` (also the template a checkpoint of that task is restored into)."""
        return fresh_state(self.method, phase, params, init_params=self.ctx.init_params, tx=self.ctx.programs.tx,
                           total_steps=total_steps)

    def task_context(self, phase: int, writer: MetricsWriter, **fields: Any) -> TaskContext:
        ctx = self.ctx
        return TaskContext(method=self.name, phase=phase, phases=self.phases, config=self.config, data=ctx.data,
                           programs=ctx.programs, frozen=ctx.frozen, init_params=ctx.init_params, mesh=ctx.mesh,
                           writer=writer, **fields)

    def stack(self, batches: list[dict], input_len: int, target_len: int) -> dict:
        """Pad to one shape, split rows into [A, mb] micro-batches, stack to [n, A, mb, L], shard rows."""
        return stack_batches(batches, input_len, target_len, micro_batch_size=self.config.train.micro_batch_size,
                             mesh=self.ctx.mesh)

    # --- the run ------------------------------------------------------------------------------
    def plan_memory(self) -> None:
        """memory.json from the shardings of the method's largest state, before anything compiles."""
        ctx = self.ctx
        plan = plan_method_memory(self.method, ctx.init_params, ctx.frozen, ctx.mesh, num_phases=len(self.phases),
                                  tx=ctx.programs.tx, activations=ctx.activations)
        report_memory_plan(plan, self.dir / "memory.json", self.name)

    def run(self) -> dict:
        c = self.config
        self.plan_memory()
        ckpt = RunCheckpointer(self.dir / "checkpoints", keep=c.checkpoint.keep, fingerprint=self.fingerprint,
                               also_accept=[config_fingerprint(c)], keep_task_ends=c.checkpoint.keep_task_ends)
        try:
            if self.prefix is not None and ckpt.latest_step() is None:  # a checkpoint of its own comes first
                adopt_prefix(self.prefix, tasks=self.ctx.tasks, run_dir=self.dir, ckpt=ckpt,
                             like_fn=lambda phase: shard_tree(self.fresh_state(phase, self.ctx.init_params, 0),
                                                              self.ctx.mesh))
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
            logging.info("%s: resumed from checkpoint %d (task %d)", self.name, latest, start_phase + 1)
            if start_phase == len(self.phases):
                results = self.dir / "results.json"
                when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(results.stat().st_mtime))
                        if results.exists() else "unknown")
                note(f"{self.name}: nothing to run: finished; its results are from {when}")
        if ctx.preemption.should_stop():
            raise Preempted(method=self.name, task=start_phase + 1, step=resumed_step, saved=False)
        if is_main() and (c.logging.tensorboard or c.logging.wandb_project):
            self.trackers = Trackers(self.dir, method=self.name, tensorboard=c.logging.tensorboard,
                                     wandb_project=c.logging.wandb_project, wandb_id=self.wandb_id,
                                     config=c.to_dict(), tasks=ctx.tasks)
            self.wandb_id = self.trackers.wandb_id
        writer = MetricsWriter(self.dir / "metrics.jsonl", resume_offset=offset,
                               listener=None if self.trackers is None else self._track)
        # One record per evaluated example and evaluation; a phase's records are written together once
        # all its tasks are evaluated, so a resumed run leaves exactly the records of an uninterrupted one.
        self.predictions = MetricsWriter(self.dir / "predictions.jsonl", resume_offset=predictions_offset)

        # Zero-shot accuracies (for FWT), unless the first phase already trains every task.
        if self.zero_shot is None and c.eval.all_tasks and len(self.phases[0]) < len(ctx.tasks):
            t0 = time.perf_counter()
            zero_shot, records = [], []
            for t in ctx.tasks:
                if ctx.preemption.should_stop():
                    raise Preempted(method=self.name, task=1, step=0, saved=False)
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
            self.evaluate_phase(phase, self.method.eval_params(state),
                                preempted=lambda: self._save_trained_and_stop(ckpt, state, phase, writer))
            self.timing["eval_s"] += time.perf_counter() - t0
            writer.write({"event": "task_end", "method": self.name, "phase": phase,
                          "tasks": self.phases[phase], "accuracy": self.R[self._row(phase)].tolist(),
                          "resumed": resuming})
            self.save(ckpt, state, ResumePosition(phase + 1), iterator=None, writer=writer)
            logging.info("%s: after %s: %s", self.name, ",".join(self.phases[phase]),
                         metrics.accuracy_table(self.R, ctx.tasks, method=self.name).splitlines()[-1])

        fmt = ctx.data.format
        result = metrics.make_results(self.name, ctx.tasks, self.R, zero_shot=self.zero_shot,
                                      config=c.to_dict(), timing=self.timing, metric=fmt.metric,
                                      also=self.also_matrices(fmt) if is_main() else None)
        if is_main():
            write_json(self.dir / "results.json", result)
            save_heatmap(self.dir / "accuracy_matrix.png", self.R, ctx.tasks, title=self.name, metric=fmt.metric)
        if self.trackers is not None:
            self.trackers.log_results(result, self.R, ctx.tasks, self.steps_before)
        return result

    def also_matrices(self, fmt: TaskFormat) -> dict[str, np.ndarray] | None:
        """The matrices of the format's other per-example scores (`TaskFormat.also`), aggregated as the score is,
        from predictions.jsonl (which a resumed run keeps exactly); None for a format without any."""
        if not fmt.also:
            return None
        column = {t: j for j, t in enumerate(self.ctx.tasks)}
        cells: dict[str, dict[tuple[int, int], list[float]]] = {name: {} for name in fmt.also}
        with open(self.dir / "predictions.jsonl", encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if record["after_task"] < 0:  # zero-shot
                    continue
                key = (self._row(record["after_task"]), column[record["task"]])
                for name in fmt.also:
                    cells[name].setdefault(key, []).append(float(record[name]))
        out = {}
        for name, by_cell in cells.items():
            matrix = np.full(self.R.shape, np.nan)
            for (i, j), scores in by_cell.items():
                matrix[i, j] = fmt.aggregate(scores)
            out[name] = matrix
        return out

    def _track(self, record: dict) -> None:
        """Every metrics.jsonl record to the trackers, at the method's step over the whole sequence."""
        if "step" in record and "loss" in record:
            self.global_step = self.steps_before + int(record["step"])
        self.trackers.log(record, self.global_step)

    def _row(self, phase: int) -> int:
        """The row of the accuracy matrix a phase fills: that of the last task it trains."""
        return sum(len(p) for p in self.phases[:phase + 1]) - 1

    def save(self, ckpt: RunCheckpointer, state: TrainState, position: ResumePosition, *, iterator: dict | None,
             writer: MetricsWriter) -> None:
        if ckpt.has(position.checkpoint_id):
            return  # this very position is saved already (a periodic save, or an earlier preemption)
        meta = {"phase": position.phase, "mid_phase": position.mid_phase, "iterator": iterator, "step": int(state.step),
                "R": [[None if math.isnan(v) else float(v) for v in row] for row in self.R],
                "zero_shot": self.zero_shot, "timing": self.timing, "metrics_offset": writer.offset(),
                "predictions_offset": self.predictions.offset(), "steps_before_phase": self.steps_before,
                "wandb_id": self.wandb_id, "method": self.name, "trained": position.trained,
                "tasks": self.ctx.tasks, "prefix_fingerprint": self.prefix_fingerprint}
        ckpt.save(position.checkpoint_id, state, meta)

    def _save_trained_and_stop(self, ckpt: RunCheckpointer, state: TrainState, phase: int,
                               writer: MetricsWriter) -> None:
        """Preempted while evaluating: save the trained state (the phase's evaluation is redone on resume)."""
        self.save(ckpt, state, ResumePosition(phase, int(state.step), trained=True), iterator=None, writer=writer)
        raise Preempted(method=self.name, task=phase + 1, step=int(state.step), saved=True)

    def evaluate_phase(self, phase: int, params: Any, preempted: Callable[[], None] | None = None) -> None:
        """Fill row `phase` of R; before each task, a preemption request calls `preempted` (which raises)."""
        ctx = self.ctx
        row = self._row(phase)
        columns = self.eval_columns(phase)
        records: list[dict] = []
        t0 = time.perf_counter()
        note(f"{self.name}: evaluating after task {phase + 1}/{len(self.phases)} on {len(columns)} task(s)")
        for j in columns:
            if preempted is not None and ctx.preemption.should_stop():
                preempted()
            self.R[row, j], task_records = ctx.evaluate(params, ctx.tasks[j])
            records += [{"after_task": phase, **r} for r in task_records]
        self.predictions.write_many(records)
        note(f"{self.name}: evaluated in {format_seconds(time.perf_counter() - t0)}: "
             + ", ".join(f"{ctx.tasks[j]} {100 * self.R[row, j]:.1f}" for j in columns))

    def eval_columns(self, phase: int) -> list[int]:
        return eval_columns(self.config, self.phases, phase)

    def train_phase(self, phase: int, state: TrainState | None, params: Any, iterator_state: dict | None,
                    writer: MetricsWriter, ckpt: RunCheckpointer) -> TrainState:
        c, ctx, method = self.config, self.ctx, self.method
        programs, mesh, frozen = ctx.programs, ctx.mesh, ctx.frozen
        train_set = method.train_data(ctx.data, phase, self.phases)
        iterator = BatchIterator(train_set, c.train.batch_size, seed=c.seed * 1000 + phase)
        total = c.train.epochs * iterator.steps_per_epoch
        task = self.task_context(phase, writer, train_set=train_set, steps=total)

        if iterator_state is not None:
            iterator.restore(iterator_state)
        else:
            state = shard_tree(next_task_state(method, state, phase, params, init_params=ctx.init_params,
                                               tx=programs.tx, total_steps=total), mesh)
            state = method.on_task_start(task, state)
        dev = self._dev_batches(phase) if c.train.select_best else None

        q_full = method.steps_per_program()
        name = f"{self.name} {phase + 1}/{len(self.phases)} {','.join(self.phases[phase])}"[:60]
        every = c.logging.progress_every_steps or max(q_full, total // 10)
        bar = Progress(name, total=total, initial=int(state.step), every=every)
        step = int(state.step)
        last_saved = step
        while step < total:
            q = min(q_full, total - step)
            program, extra = method.cycle(task, step, q)
            inner = [iterator.next() for _ in range(q)]
            shape = common_shape(inner + extra)
            tokens = batch_tokens(inner + extra)
            if (program, shape) not in ctx.compiled:
                ctx.compiled.add((program, shape))
                note(f"{self.name}: compiling a training cycle of {q} steps{program.label} "
                     f"(inputs {shape[0]} + {shape[1]} tokens)")
            t0 = time.perf_counter()
            state, out = programs.run_cycle(state, frozen, self.stack(inner, *shape),
                                            self.stack(extra, *shape) if extra else None, program=program)
            out = fetch(out)
            elapsed = time.perf_counter() - t0
            self.timing["train_s"] += elapsed
            where = f"method {self.name}, task {','.join(self.phases[phase])} (#{phase + 1})"
            check_finite(out, where=where, step=step, on_nonfinite=c.train.on_nonfinite)
            step += q
            fields, records = method.log_cycle(task, out, step, q)
            bar.update(step, q, float(np.mean(out["inner_loss"])), q / elapsed)
            writer.write(cycle_record(method=self.name, phase=phase, tasks=self.phases[phase], step=step, steps=q,
                                      tokens=tokens, elapsed=elapsed, out=out, method_fields=fields))
            for record in records:
                writer.write(record)
            if dev is not None and step // c.train.select_every_steps > (step - q) // c.train.select_every_steps:
                loss = programs.dev_loss(method.eval_params(state), frozen, dev)
                writer.write({"event": "dev_loss", "method": self.name, "phase": phase, "step": step,
                              "dev_loss": float(loss)})
                better = loss < state.best_loss
                state = state.replace(best_loss=jnp.where(better, loss, state.best_loss),
                                      best_params=jax.tree.map(lambda a, b: jnp.where(better, a, b),
                                                               state.params, state.best_params))
            every = c.checkpoint.every_steps
            if every and step < total and step // every > last_saved // every:
                self.save(ckpt, state, ResumePosition(phase, step), iterator=iterator.state(), writer=writer)
                last_saved = step
            if ctx.preemption.should_stop():  # SIGTERM / SIGINT: save this position and stop
                bar.close()
                self.save(ckpt, state, ResumePosition(phase, step), iterator=iterator.state(), writer=writer)
                raise Preempted(method=self.name, task=phase + 1, step=step, saved=True)
        bar.close()
        if c.train.select_best:
            state = state.replace(params=state.best_params)
        return method.on_task_end(task, state)

    def _dev_batches(self, phase: int) -> dict:
        tasks = [t for p in self.phases[:phase + 1] for t in p]
        dev = self.ctx.data.dev_set(tasks)
        mb = self.config.train.micro_batch_size
        n = math.ceil(len(dev) / mb) * mb
        batch = collate(dev, range(len(dev)), batch_size=n)  # filler rows add nothing to the loss
        stacked = {k: v.reshape(-1, mb, v.shape[-1]) for k, v in batch.items()}
        return shard_rows(stacked, self.ctx.mesh, row_axis=1)


def eval_columns(config: ml_collections.ConfigDict, phases: list[list[str]], phase: int) -> list[int]:
    """The tasks (indices in the run's order) evaluated after `phase` (`eval.schedule`): "full", every task seen
    so far (every task with `eval.all_tasks`); "diagonal", the phase's own tasks, and every task after the last."""
    seen = sum(len(p) for p in phases[:phase + 1])
    if config.eval.all_tasks:
        return list(range(sum(len(p) for p in phases)))
    if config.eval.schedule == "diagonal" and phase < len(phases) - 1:
        return list(range(seen - len(phases[phase]), seen))
    return list(range(seen))


def method_prefix(config: ml_collections.ConfigDict, method: Method, tasks: list[str],
                  workdir: pathlib.Path) -> Prefix | None:
    """The finished tasks `method`'s run takes from `checkpoint.prefix_from` (kif_jax/train/prefix.py), or None."""
    return plan_prefix(config, method_name=method.name, tasks=tasks, phases=method.phases(tasks),
                       phases_of=method.phases, run_dir=workdir / method.name,
                       fingerprint=prefix_fingerprint(config, unrelated_sections(config, type(method))))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, dict]:
    """Run every configured method; returns {method: results.json contents}."""
    workdir = pathlib.Path(workdir)
    config = with_method_sections(with_renamed_fields(config))
    check_run(config)
    # One run per workdir, checked writable before any model loads (process 0 holds the lock).
    with WorkdirLock(workdir) if is_main() else contextlib.nullcontext():
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, dict]:
    data_dir, tasks = resolve_run(config, workdir)
    methods = [method_class(name)(config) for name in split_list(config.methods)]
    prefixes = {m.name: method_prefix(config, m, tasks, workdir) for m in methods}  # refused before the model loads
    ctx = build_context(config, workdir, data_dir, tasks)
    results: dict[str, dict] = {}
    with ctx.preemption:  # SIGTERM / SIGINT from here on: save at the next cycle boundary, raise Preempted
        for method in methods:
            t0 = time.perf_counter()
            results[method.name] = MethodRun(ctx, method, prefixes[method.name]).run()
            logging.info("%s finished in %.1f s", method.name, time.perf_counter() - t0)
    table = metrics.comparison_table(results)
    if is_main():
        (workdir / "comparison.md").write_text(table + "\n")
    if jax.process_index() == 0:
        try:  # the results are written: a report that cannot be built costs a warning, not the run
            logging.info("comparison report in %s", write_report(workdir, skip_unfinished=True))
        except KifError as err:
            logging.warning("no comparison report (%s); rebuild it with: python -m kif_jax.report %s", err, workdir)
    return results


def build_context(config: ml_collections.ConfigDict, workdir: pathlib.Path, data_dir: pathlib.Path,
                  tasks: list[str]) -> RunContext:
    """The model (loaded once), its split, the programs, the evaluator and the data every method of a run shares."""
    c = config
    mesh = config_mesh(c.sharding)
    model, tokenizer, family = build_model(config, mesh)
    set_remat(model, c.train.remat)
    trainable = LoRAParam if c.model.trainable == "lora" else nnx.Param
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    programs = Programs(graphdef, family=family, lr=c.train.lr, warmup_steps=c.train.warmup_steps,
                        max_grad_norm=c.train.max_grad_norm, weight_decay=c.train.weight_decay,
                        prng_impl=c.train.prng_impl, mesh=mesh)
    activations = activation_bytes(model, micro_batch_size=c.train.micro_batch_size,
                                   input_length=c.train.max_input_length, target_length=c.train.max_target_length,
                                   itemsize=2 if c.model.dtype == "bfloat16" else 4, remat=c.train.remat, mesh=mesh)
    evaluator = Evaluator(graphdef, family, tokenizer, batch_size=c.eval.batch_size, max_new_tokens=c.eval.max_new_tokens,
                          mesh=mesh, mode=c.eval.mode, max_target_length=c.train.max_target_length)
    return RunContext(config=c, workdir=workdir, tasks=tasks, data=RunData(c, data_dir, family, tokenizer, run_format(c)),
                      graphdef=graphdef, init_params=shard_tree(params, mesh), frozen=shard_tree(frozen, mesh),
                      mesh=mesh, programs=programs, evaluator=evaluator,
                      activations=activations, preemption=PreemptionGuard())
