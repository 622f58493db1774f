"""Path patching (Wang et al. 2022; Goldowsky-Dill et al. 2023): a sender's effect through chosen receivers only.

For each sender (a head `L{l}.head{h}`, all heads of a layer `L{l}.head`, `L{l}.attn_out` or
`L{l}.mlp_out`, or a set of them patched together):

(a) run the clean and the corrupted prompts and cache every component's output;
(b) run the clean prompt with the senders' outputs replaced by their corrupted values and every other
    component from the first sender's layer up to the last receiver frozen to its clean value; cache
    the receivers' inputs;
(c) run the clean prompt with only the receivers' inputs patched from (b) and measure the metric.

"Every other component" is every attention head and every MLP (`freeze="all"`: only the direct
paths sender -> residual stream -> receiver count) or only the heads (`freeze="heads"`, Wang et
al.'s IOI recipe: MLPs are recomputed, so paths through MLPs count too).

Receivers: a head's query/key/value input (`L{l}.head{h}.q`, `.k`, `.v`; `L{l}.head{h}` means all
three), a residual point (`L{l}.resid_pre`, `L{l}.resid_mid`), or `logits` (the final residual
stream; then (c) is (b) itself, since patching the final residual from (b) reproduces (b)'s logits).
Heads are frozen through the per-head sites (`L{l}.head`) at layers holding a sender head and through
`L{l}.attn_out` elsewhere (the same thing when every head is clean), so post-attention norms
(Gemma 2) see exactly the patched heads.

With grouped-query attention a key or value is shared by the query heads of its group, so patching
`L{l}.head{h}.k` (or `.v`) patches that group's key for all of them (the engine's k/v sites are per
KV group).

Many senders share one forward: rows are (sender, example), each sender patched on its own rows.
The score of a sender is mean(metric patched) - mean(metric clean) over the examples, optionally
divided by mean(metric clean) - mean(metric corrupted).
"""

from __future__ import annotations

from typing import Callable

import torch

from mechanic.locate.scores import Scores
from mechanic.locate.trace import last_logits
from mechanic.model.interventions import apply_fn, replace
from mechanic.model.sites import Site
from mechanic.tasks import metrics as M
from mechanic.tasks.task import Task, TaskBatch

FREEZE = ("all", "heads")


class PathError(ValueError):
    """Path-patching input that cannot be used as given (no corrupted prompt, a sender that is no component, ...)."""


# ---------------------------------------------------------------- inputs
def _batch(model, task) -> tuple[TaskBatch, str | None]:
    if isinstance(task, Task):
        if not task.examples or any(e.corrupted is None for e in task.examples):
            raise PathError(f"Path patching needs a corrupted prompt for every example, and task {task.name!r} "
                            "has examples without one. Give each Example a `corrupted` prompt of the same token "
                            "length as its clean prompt (e.g. the IOI prompt with other names), so the senders' "
                            "corrupted outputs can be patched position by position.")
        return task.tokenize(model), task.name
    if isinstance(task, TaskBatch):
        if task.corrupted is None:
            raise PathError("Path patching needs a corrupted prompt: this TaskBatch has `corrupted=None`. "
                            "Tokenize a Task whose examples have corrupted prompts, or build the TaskBatch with "
                            "corrupted inputs of the same shape as the clean ones.")
        if task.corrupted["input_ids"].shape != task.clean["input_ids"].shape:
            raise PathError(f"Clean and corrupted inputs must have the same shape (positions are patched column by "
                            f"column), got {list(task.clean['input_ids'].shape)} and "
                            f"{list(task.corrupted['input_ids'].shape)}.")
        return task, None
    raise PathError(f"Path patching takes a Task (with corrupted prompts) or a TaskBatch, got {type(task).__name__}.")


def _senders(model, senders) -> list[list[Site]]:
    if isinstance(senders, (str, Site)):
        senders = [senders]
    groups = []
    for item in senders:
        group = [item] if isinstance(item, (str, Site)) else list(item)
        if not group:
            raise PathError("An empty sender set was given; every sender set needs at least one site.")
        sites = []
        for s in group:
            s = model.check(s)
            if not ((s.kind == "head" and s.part is None) or s.kind in ("attn_out", "mlp_out")):
                raise PathError(f"{s} cannot be a sender: senders are components that write to the residual "
                                "stream, i.e. one head 'L{l}.head{h}', all heads of a layer 'L{l}.head', "
                                "'L{l}.attn_out' or 'L{l}.mlp_out'.")
            sites.append(s)
        groups.append(sites)
    if not groups:
        raise PathError("No senders were given; pass a list of sites such as ['L0.head3', 'L1.mlp_out'] "
                        "(an inner list is a set of senders patched together).")
    return groups


def _receivers(model, receivers) -> list[Site]:
    if isinstance(receivers, (str, Site)):
        receivers = [receivers]
    out: list[Site] = []
    for r in receivers:
        s = model.check(r)
        if s.kind == "head" and s.part is None and s.index is not None:
            out += [Site("head", s.layer, s.index, p) for p in ("q", "k", "v")]
        elif (s.kind == "head" and s.part in ("q", "k", "v") and s.index is not None) \
                or s.kind in ("resid_pre", "resid_mid", "logits"):
            out.append(s)
        else:
            raise PathError(f"{s} cannot be a receiver: receivers are a head's inputs 'L{{l}}.head{{h}}.q' / '.k' / "
                            "'.v' (or 'L{l}.head{h}' for all three), a residual point 'L{l}.resid_pre' or "
                            "'L{l}.resid_mid', or 'logits' (the final residual stream).")
    if not out:
        raise PathError("No receivers were given; pass e.g. ['logits'] or ['L5.head1.q'].")
    if any(s.kind == "logits" for s in out) and len(out) > 1:
        raise PathError("'logits' cannot be combined with other receivers: patching the final residual from step "
                        "(b) overrides whatever the other receivers change. Run the two separately.")
    return list(dict.fromkeys(out))


def _metric(metric) -> tuple[Callable, str]:
    if callable(metric):
        return metric, getattr(metric, "__name__", "custom")
    return M.get(metric), metric


def _tile(inputs: dict, k: int) -> dict:
    return {name: v.repeat(k, *([1] * (v.dim() - 1))) for name, v in inputs.items()}


def _label(group: list[Site], model) -> str:
    layers = {s.layer for s in group}
    heads = {s.index for s in group if s.kind == "head"}
    if len(layers) == 1 and all(s.kind == "head" for s in group) and heads == set(range(model.dims.n_heads)):
        return f"L{group[0].layer}.head"
    return str(group[0])


# ---------------------------------------------------------------- path patching
def path_patch(model, task, senders, receivers="logits", metric="logit_diff", *, freeze: str = "all",
               pos=None, normalise: bool = False, batch_size: int = 64) -> Scores:
    """Effect of each sender's corrupted output on the metric through the receivers only (Wang et al. path patching).

    task: a Task or TaskBatch with corrupted prompts; senders: sites ('L0.head3', 'L2.mlp_out', ...)
    or inner lists of sites patched together; receivers: head inputs ('L3.head1.q', 'L3.head1'),
    'L{l}.resid_pre' / 'L{l}.resid_mid', or 'logits'; metric: a name from mechanic.tasks.metrics or
    fn(last_logits [n, vocab], batch) -> [n]. freeze: 'all' (heads and MLPs) or 'heads'. pos: the
    receiver positions patched in (c) (None = every position). `batch_size` = forward rows per call.
    Returns Scores over senders: mean metric(patched) - mean metric(clean), normalised by
    clean - corrupted if `normalise`.
    """
    if freeze not in FREEZE:
        raise PathError(f"freeze={freeze!r}: choose 'all' (freeze every head and MLP between senders and receivers: "
                        "direct paths only) or 'heads' (freeze heads, recompute MLPs, as in Wang et al.).")
    if batch_size < 1:
        raise PathError(f"batch_size must be at least 1, got {batch_size}.")
    batch, task_name = _batch(model, task)
    groups = _senders(model, senders)
    recv = _receivers(model, receivers)
    metric_fn, metric_name = _metric(metric)
    n, L = batch.n, model.dims.n_layers
    to_logits = recv[0].kind == "logits"
    top = L - 1 if to_logits else max(s.layer for s in recv)
    low = min(s.layer for g in groups for s in g)
    span = range(low, top + 1)
    head_layers = {s.layer for g in groups for s in g if s.kind == "head"}

    # (a) clean and corrupted runs
    clean_sites = [f"L{l}.attn_out" for l in span if l not in head_layers] + [f"L{l}.head" for l in head_layers]
    if freeze == "all":
        clean_sites += [f"L{l}.mlp_out" for l in span]
    corr_sites = sorted({f"L{s.layer}.head" if s.kind == "head" else str(s) for g in groups for s in g})
    clean = model.run(batch.clean, cache=clean_sites)
    corr = model.run(batch.corrupted, cache=corr_sites)
    m_clean = metric_fn(clean.logits[:, -1], batch).float()
    m_corr = metric_fn(corr.logits[:, -1], batch).float()

    def frozen(value: torch.Tensor, k: int):
        return lambda x: value.repeat(k, *([1] * (value.dim() - 1)))

    def corrupted(s: Site) -> torch.Tensor:
        if s.kind == "head":
            v = corr[f"L{s.layer}.head"]
            return v if s.index is None else v[:, :, s.index]
        return corr[str(s)]

    per = max(1, batch_size // n)
    results: list[float] = []
    for c in range(0, len(groups), per):
        chunk = groups[c:c + per]
        k = len(chunk)
        inputs = _tile(batch.clean, k)
        # (b) senders corrupted, everything else between senders and receivers frozen clean
        ivs = []
        for l in span:
            if l in head_layers:
                ivs.append(apply_fn(f"L{l}.head", frozen(clean[f"L{l}.head"], k)))
            else:
                ivs.append(apply_fn(f"L{l}.attn_out", frozen(clean[f"L{l}.attn_out"], k)))
            if freeze == "all":
                ivs.append(apply_fn(f"L{l}.mlp_out", frozen(clean[f"L{l}.mlp_out"], k)))
        for g, group in enumerate(chunk):
            rows = list(range(g * n, (g + 1) * n))
            for s in group:  # after the freezes: interventions at one hook point apply in order
                ivs.append(replace(s, corrupted(s), rows=rows))
        if to_logits:
            logits = last_logits(model, inputs, ivs)
        else:
            b = model.run(inputs, cache=[str(s) for s in recv], interventions=ivs, pos=pos, stop_at=top)
            # (c) only the receivers' inputs patched
            logits = last_logits(model, inputs, [replace(s, b[str(s)], pos=pos) for s in recv])
        for g in range(k):
            m = metric_fn(logits[g * n:(g + 1) * n], batch).float()
            results.append(float(m.mean() - m_clean.mean()))

    values = torch.tensor(results)
    gap = float(m_clean.mean() - m_corr.mean())
    if normalise:
        values = values / gap
    settings = {
        "senders": [[str(s) for s in g] for g in groups], "receivers": [str(s) for s in recv],
        "freeze": freeze, "pos": pos if pos is None or isinstance(pos, int) else list(pos),
        "normalise": normalise, "n_examples": n,
        "metric_clean": float(m_clean.mean()), "metric_corrupted": float(m_corr.mean()),
        "values": "mean metric(path patched) - mean metric(clean)" + (" over (clean - corrupted)" if normalise else ""),
    }
    return Scores(values=values, sites=[_label(g, model) for g in groups], method=f"path_patch/{freeze}",
                  task=task_name, metric=metric_name, model=model.name, fingerprint=model.fingerprint,
                  settings=settings)
