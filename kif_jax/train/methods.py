"""What each method does, as static switches read by the jitted steps and by the task loop.

Readings of the ablations (the paper's text is not at hand; ALGORITHM.md gives only their names):
- `static_importance` (-DIE): the outer (old-task) importance is estimated once when a task starts
  (on `kif.static_batches` memory batches, at the parameters handed over from the previous task)
  and frozen; the outer learner still takes its replay steps but never updates that importance.
- `no_identification` (-KI): no masks: theta_{t+1} = theta_t + tau_in + tau_out.
- `global_merge` (+GM): the same inner and outer steps, but no recurrent fusion: tau_in and tau_out
  are summed over the whole task and fused once at its end, from the task's starting parameters.
- `no_share` (-Share): reference weights, except (0, 0) where both masks are on.
Baselines: `seq_lora` trains on each task in turn; `replay` adds the memory buffer to the current
task's training set; `mtl` trains once on the union of all tasks (an upper bound).
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


_SPECS = {
    "recurrent_kif": MethodSpec("recurrent_kif", kif=True),
    "seq_lora": MethodSpec("seq_lora"),
    "replay": MethodSpec("replay", replay_data=True),
    "mtl": MethodSpec("mtl", joint=True),
    "static_importance": MethodSpec("static_importance", kif=True, dynamic_outer_importance=False),
    "no_identification": MethodSpec("no_identification", kif=True, identify=False),
    "global_merge": MethodSpec("global_merge", kif=True, merge_at_task_end=True),
    "no_share": MethodSpec("no_share", kif=True, scheme="no_share"),
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


def cycle_spec(method: MethodSpec, kif: ml_collections.ConfigDict, *, inner_steps: int,
               with_outer: bool) -> CycleSpec:
    """The program of one cycle of `method` with the config's KIF switches; outer steps imply a fusion."""
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
        reset_inner=kif.reset_inner and not method.merge_at_task_end,
        reset_outer=kif.reset_outer,
        separate_outer_optimizer=kif.outer_optimizer == "separate",
        accumulate=with_outer and method.merge_at_task_end,
    )
