"""Locate methods split over torch.distributed ranks: each rank scores a shard of the examples, the means are combined.

patch, atp, eap (and EAP-IG) and neuron_attribution score sites by a mean over the task's examples of a
per-example quantity, so the mean over all examples is the example-weighted mean of the shard means
(sum_i n_i mean_i / N, in float64, in rank order): equal to one process up to the order of the sums
(~1e-7 relative). The task is tokenized once, whole, on every rank and then cut (TaskBatch.select), so
every shard has the same padding and positions as the single-process batch. Settings that are means
(metric_clean, ...) are combined the same way, counts are summed, per-example lists are concatenated,
and everything else comes from rank 0. Patching normalises after combining (its normaliser is itself a
mean over examples). Settings that need every example at once (mean or resample ablation, `latents=N`
chosen over the whole task) run the whole task on every rank: the same result, no speed-up.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field, replace
from typing import Callable

from mechanic import distributed as D
from mechanic.locate.scores import Scores
from mechanic.tasks.task import Task, TaskBatch

MEANS = ("metric_clean", "metric_corrupted")
COUNTS = ("examples", "n_examples", "runs_computed", "runs_unchanged")
CONCAT = ("target_ids",)


@dataclass(frozen=True)
class Split:
    """How one method's work splits: keyword changes for a shard, when it cannot split, and a last step."""

    shard_kwargs: Callable[[dict], dict] = lambda kw: kw
    whole: Callable[[dict], bool] = lambda kw: False          # True: every rank runs the whole task
    finish: Callable[[Scores, TaskBatch, dict], Scores] = lambda s, b, kw: s
    metric_arg: bool = True                                  # the method takes metric=
    extra: dict = field(default_factory=dict)


def _patch_finish(s: Scores, batch: TaskBatch, kw: dict) -> Scores:
    from mechanic.tasks import metrics as M
    import torch

    if kw.get("normalise", True):
        st = s.settings
        s.values = M.normalise(s.values.double(), torch.tensor(st["metric_clean"], dtype=torch.float64),
                               torch.tensor(st["metric_corrupted"], dtype=torch.float64)).float()
    s.settings["normalise"] = kw.get("normalise", True)
    return s


def _atp_finish(s: Scores, batch: TaskBatch, kw: dict) -> Scores:
    from mechanic.locate.gradient import position_labels

    if s.positions is not None:       # labels read the whole batch's padding and first prompt
        s.positions = position_labels(batch)
    return s


SPLITS = {
    "patch": Split(shard_kwargs=lambda kw: {**kw, "normalise": False}, finish=_patch_finish,
                   whole=lambda kw: kw.get("ablation") is not None or isinstance(kw.get("latents"), int)),
    "atp": Split(finish=_atp_finish),
    "eap": Split(whole=lambda kw: isinstance(kw.get("latents"), int)),
    "neuron_attribution": Split(metric_arg=False),
}


def combine(parts: list[Scores], counts: list[int]) -> Scores:
    """One Scores from per-shard Scores of the same sites: example-weighted mean of values and mean settings."""
    used = [(p, n) for p, n in zip(parts, counts) if n]
    first = used[0][0]
    values = D.weighted_mean([p.values for p, _ in used], [n for _, n in used]).float()
    settings = dict(first.settings)
    for k in MEANS:
        if k in settings:
            settings[k] = float(D.weighted_mean([_t(p.settings[k]) for p, _ in used], [n for _, n in used]))
    for k in COUNTS:
        if k in settings:
            settings[k] = sum(p.settings[k] for p, _ in used)
    for k in CONCAT:
        if k in settings:
            settings[k] = [x for p, _ in used for x in p.settings[k]]
    return replace(first, values=values, settings=settings)


def _t(x):
    import torch

    return torch.tensor(float(x), dtype=torch.float64)


def parallel(method, model, task: Task | TaskBatch, *args, **kwargs):
    """method(model, task, ...) with the examples split over the ranks; the same Scores (or dict) as one process.

    Outside a process group (or inside a shard) this is just the call.
    """
    if not D.active():
        return method(model, task, *args, **kwargs)
    sig = inspect.signature(method)
    kwargs = dict(sig.bind_partial(model, task, *args, **kwargs).arguments)   # positional settings by name
    kwargs.pop(next(iter(sig.parameters))), kwargs.pop(list(sig.parameters)[1])
    args = ()
    name = method.__name__
    if name not in SPLITS:
        raise ValueError(f"{name} has no data-parallel split; run it in one process (known: {', '.join(SPLITS)}).")
    how = SPLITS[name]
    if how.whole(kwargs):
        with D.local():
            return method(model, task, *args, **kwargs)
    if isinstance(task, Task):
        batch, task_name = task.tokenize(model), task.name
        if how.metric_arg and kwargs.get("metric") is None:
            kwargs = {**kwargs, "metric": task.metric}
    else:
        batch, task_name = task, None
    part = D.shard(batch)
    shard_kw = how.shard_kwargs(kwargs)
    if D.rank() != 0 and "progress" in sig.parameters:
        shard_kw["progress"] = False

    def mine():
        if part.n == 0:
            return None
        with D.local():
            return method(model, part, *args, **shard_kw)

    parts = D.run(mine)
    counts = [D.bounds(batch.n, r)[1] - D.bounds(batch.n, r)[0] for r in range(D.world())]
    first = parts[0]
    if isinstance(first, dict):
        out = {k: how.finish(combine([p[k] if p else None for p in parts], counts), batch, kwargs) for k in first}
        for s in out.values():
            s.task = task_name if task_name is not None else s.task
        return out
    out = how.finish(combine(parts, counts), batch, kwargs)
    out.task = task_name if task_name is not None else out.task
    return out


def data_parallel(method):
    """Decorate a locate entry point so that under torchrun it splits its examples by itself (see `parallel`)."""
    @functools.wraps(method)
    def wrapper(model, task, *args, **kwargs):
        if D.active():
            return parallel(wrapper, model, task, *args, **kwargs)
        return method(model, task, *args, **kwargs)
    return wrapper


__all__ = ["SPLITS", "Split", "combine", "data_parallel", "parallel"]
