"""What each method does, as static switches read by the jitted steps and by the task loop.

Readings of the ablations (the paper's ablation table gives only their names; docs/algorithm.md):
- `static_importance` (-DIE): the outer (old-task) importance is estimated once when a task starts
  (on `kif.static_batches` memory batches, at the parameters handed over from the previous task)
  and frozen; the outer learner still takes its replay steps but never updates that importance.
- `no_identification` (-KI): no masks: theta_{t+1} = theta_t + tau_in + tau_out.
- `global_merge` (+GM): the same inner and outer steps, but no recurrent fusion: tau_in and tau_out
  are summed over the whole task and fused once at its end, from the task's starting parameters.
- `no_share` (-Share): reference weights, except (0, 0) where both masks are on.
Baselines: `seq_lora` trains on each task in turn; `replay` adds the memory buffer to the current
task's training set; `mtl` trains once on the union of all tasks (an upper bound).

Prior methods (facts of the authors' code, docs/baselines.md; arithmetic in kif_jax/core/baselines.py):
- `o_lora` (O-LoRA, cmnfriend/O-LoRA @ 07117e1): every adapted projection has a frozen "old" branch (all
  earlier tasks' factors side by side: A [in, r_sum], B [r_sum, out]; peft's A rows are our A columns) and
  a trained "new" branch (rank r). The layer is given their concatenation, so it computes
  W x + s B_old A_old x + s B_new A_new x with one dropout mask and one scale s = alpha / r (also over r_sum).
  Loss = CE + o_lora.lambda1 * sum over modules of sum |A_old A_new^T| + o_lora.lambda2 * sum of the
  Frobenius norms (not squared) of the new A and B tensors (defaults 0.5 and 0, the code's). At each task
  end new joins old; the next task starts a fresh new branch. Inference: base + old + new. LoRA only.
  Ours: task 1's new branch is the model's own LoRA initialisation (as every method's task 1); later
  branches draw A ~ U(-1/sqrt(in), 1/sqrt(in)) (peft's kaiming-uniform, a = sqrt(5)) from
  (config.seed, task index, the projection's path), B = 0; the norm's gradient at 0 is 0 (B starts at
  0; PyTorch's convention); the logged `loss` is the cross-entropy, the penalty is logged as `penalty`.
- `tasl` (TaSL, WoodScene/TaSL @ d7a0c4f): AdaLoRA importance per element, I = |theta * grad|, with
  I_bar, U_bar EMAs (tasl.beta1 = tasl.beta2 = 0.85), theta after the step and grad the step's gradient
  clipped to train.max_grad_norm, after every optimizer step but a task's first (its patched Trainer
  clips p.grad in place, steps, then calls update_score(global_step), which updates only for
  0 < global_step < max_steps, global_step counting from 0). A skill unit is one trainable tensor (each
  LoRA A and B), scored by the mean of I_bar * U_bar. At each task end (task 1 is kept as trained; its
  scores become the accumulated ones): min-max normalise the current and the accumulated unit scores,
  threshold each at its own tasl.quantile (0.8; numpy's linear percentile; important = strictly
  above), merge per unit with the consolidated weights the task started from (both: 0.3 cur + 0.7 prev;
  only prev: prev; only cur: cur; neither: 0.5 / 0.5), and accumulate minmax(0.3 cur + 0.7 prev). The
  importance restarts at every task (the reference runs each task in a new process). Ours: min-max of
  equal scores gives zeros (the reference divides 0 by 0); with model.trainable = "all" every
  parameter tensor is a unit (as in the reference's T5 script, which fine-tunes all of T5).
- `ewc` (EWC, standard form; none of the three codebases implements it): at each task end, F = the mean
  over ewc.fisher_batches (8) batches of train.batch_size examples of that task's training set, drawn
  with a numpy rng seeded (config.seed, task, EWC stream), of the squared gradient of the batch's mean
  token loss (no dropout; micro-batches averaged as in a training step; a non-finite batch is left
  out). F is summed over tasks and theta* is the parameters at the latest task end; every later task
  adds (ewc.lambda_ / 2) * sum F (theta - theta*)^2 to its loss (`lambda_`: `lambda` is a Python keyword,
  which ml_collections cannot parse in a --config override). ewc.lambda_ = 5000 is our choice, neither
  tuned nor measured on the benchmark: by our estimate, batch-mean gradients make F of order 1e-8..1e-6
  per LoRA element, so lambda in the thousands is what lets the penalty reach the order of the
  cross-entropy for the drifts a task causes (1e-3..1e-2 per element).
- `adaptive` (+Adaptive ablation, docs/algorithm.md; our reading): Recurrent-KIF whose fusion uses
  w_in = S_in / (S_in + S_out), w_out = 1 - w_in per element instead of masks, with each learner's
  scores min-max normalised over all of its elements (0/0 -> 0.5 / 0.5), through
  `kif_jax.fuse_with_weights`.
"""
from __future__ import annotations

import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """Switches of one method; tasks >= 2 of a KIF-family method run fusion cycles."""

    name: str
    kif: bool = False  # outer replay steps and importance-based fusion from task 2 on
    replay_data: bool = False  # memory buffer joins the current task's training set
    joint: bool = False  # one phase on the union of every task (multi-task learning)
    dynamic_outer_importance: bool = True  # outer importance updated at every outer step
    identify: bool = True  # masks from importance; False fuses with all-true binary masks
    merge_at_task_end: bool = False  # fuse once per task instead of every cycle
    scheme: str | None = None  # overrides kif.scheme when set
    adaptive_fusion: bool = False  # +Adaptive: fusion weights from normalised scores instead of masks
    lora_branches: bool = False  # O-LoRA: frozen old branch + trained new branch, orthogonality loss
    skill_consolidation: bool = False  # TaSL: unit importance every step, unit-wise merge at task end
    fisher_penalty: bool = False  # EWC: diagonal Fisher at task end, quadratic penalty on later tasks


_SPECS = {
    "recurrent_kif": MethodSpec("recurrent_kif", kif=True),
    "seq_lora": MethodSpec("seq_lora"),
    "replay": MethodSpec("replay", replay_data=True),
    "mtl": MethodSpec("mtl", joint=True),
    "static_importance": MethodSpec("static_importance", kif=True, dynamic_outer_importance=False),
    "no_identification": MethodSpec("no_identification", kif=True, identify=False),
    "global_merge": MethodSpec("global_merge", kif=True, merge_at_task_end=True),
    "no_share": MethodSpec("no_share", kif=True, scheme="no_share"),
    "o_lora": MethodSpec("o_lora", lora_branches=True),
    "tasl": MethodSpec("tasl", skill_consolidation=True),
    "ewc": MethodSpec("ewc", fisher_penalty=True),
    "adaptive": MethodSpec("adaptive", kif=True, adaptive_fusion=True),
}


def method_spec(name: str) -> MethodSpec:
    """The switches of a method named in `config.methods` (validated beforehand)."""
    return _SPECS[name]


@dataclasses.dataclass(frozen=True)
class CycleSpec:
    """Static shape of one jitted training program: Q inner steps, then optionally M outer steps and fusion."""

    inner_steps: int
    outer_steps: int = 0  # 0: no outer learner in this program
    fuse: bool = False  # fuse at the end of the program (else, with outer steps, accumulate for global merge)
    track_importance: bool = False  # update the inner importance state at every inner step
    update_outer_importance: bool = True
    identify: bool = True
    quantile: float = 0.8
    scope: str = "global"
    threshold_method: str = "exact"
    scheme: str = "reference"
    order: str = "first"
    score: str = "sens_x_unc"
    beta1: float = 0.85
    beta2: float = 0.85
    importance_at_updated_params: bool = True
    reset_inner: bool = True
    reset_outer: bool = False
    separate_outer_optimizer: bool = False
    accumulate: bool = False  # global merge: add tau_in / tau_out to the task accumulators
    adaptive: bool = False  # +Adaptive: fuse with weights from min-max normalised scores (no masks)
    importance_clipped_grads: bool = False  # importance from the gradient clipped at max_grad_norm (TaSL; a KIF switch)
    outer_loss_scale: float = 1.0  # the outer learner's loss (so its gradient) is multiplied by this
    importance_first_step: int = 0  # TaSL: inner importance only from this (0-based) step of the task on
    orth_lambda: float = 0.0  # O-LoRA lambda1 (applies when the state holds an old branch)
    l2_lambda: float = 0.0  # O-LoRA lambda2
    ewc_lambda: float = 0.0  # EWC lambda (0: no penalty)

    @property
    def penalised(self) -> bool:
        """Whether the loss has a term besides the cross-entropy."""
        return bool(self.orth_lambda or self.l2_lambda or self.ewc_lambda)


def cycle_spec(method: MethodSpec, kif: ml_collections.ConfigDict, *, inner_steps: int,
               with_outer: bool, config: ml_collections.ConfigDict | None = None, phase: int = 0) -> CycleSpec:
    """The program of one cycle of `method` (task `phase`) with the config's KIF switches; outer steps
    imply a fusion. The prior methods read their sections of the whole `config`."""
    spec = _kif_cycle_spec(method, kif, inner_steps=inner_steps, with_outer=with_outer)
    if config is None:
        return spec
    if method.lora_branches:
        spec = dataclasses.replace(spec, orth_lambda=float(config.o_lora.lambda1) if phase >= 1 else 0.0,
                                   l2_lambda=float(config.o_lora.lambda2))
    if method.fisher_penalty and phase >= 1:
        spec = dataclasses.replace(spec, ewc_lambda=float(config.ewc.lambda_))
    if method.skill_consolidation:
        spec = dataclasses.replace(spec, track_importance=True, beta1=float(config.tasl.beta1),
                                   beta2=float(config.tasl.beta2), order="first", importance_at_updated_params=True,
                                   importance_clipped_grads=True, importance_first_step=1)
    return spec


def _kif_cycle_spec(method: MethodSpec, kif: ml_collections.ConfigDict, *, inner_steps: int,
                    with_outer: bool) -> CycleSpec:
    return CycleSpec(
        inner_steps=inner_steps,
        outer_steps=kif.outer_steps if with_outer else 0,
        fuse=with_outer and not method.merge_at_task_end,
        track_importance=with_outer,
        update_outer_importance=method.dynamic_outer_importance,
        identify=method.identify,
        quantile=float(kif.quantile),
        scope=kif.scope,
        threshold_method=kif.method,
        scheme=method.scheme or kif.scheme,
        order=kif.order,
        score=kif.score,
        beta1=float(kif.beta1),
        beta2=float(kif.beta2),
        importance_at_updated_params=kif.importance_params == "updated",
        importance_clipped_grads=kif.importance_grads == "clipped",
        outer_loss_scale=float(kif.outer_loss_scale),
        reset_inner=kif.reset_inner and not method.merge_at_task_end,
        reset_outer=kif.reset_outer,
        separate_outer_optimizer=kif.outer_optimizer == "separate",
        accumulate=with_outer and method.merge_at_task_end,
        adaptive=method.adaptive_fusion,
    )
