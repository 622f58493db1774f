"""Activation patching at every granularity (residual x position, attn/mlp outputs, heads, neurons, experts),
denoising or noising, with mean- and resample-ablation variants.

Fast by construction: many patched runs share one forward (one batch row each), and each forward
computes only what its patches can change (see mechanic.model.reuse): positions from the patched
column on, layers from the lowest patched layer on, logits at the last position only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mechanic.locate.scores import Scores
from mechanic.model.interventions import replace
from mechanic.model.reuse import prefix, suffix_logits
from mechanic.tasks import metrics as M
from mechanic.tasks.task import Task, TaskBatch, TaskError

RESID_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
KINDS = RESID_KINDS + ("head", "neuron", "expert")


@dataclass(frozen=True)
class _Unit:
    """One patch: a site (one head, neuron, layer output...) at one column, or at every column (pos None)."""

    site: str
    layer: int
    row: int            # row of the output Scores
    pos: int | None


def _units(model, kind: str, positions, seq: int) -> tuple[list[_Unit], list[str], list[int] | None]:
    """Every (site, column) patch of one granularity, the Scores row names, and the columns (None = all at once)."""
    if kind not in KINDS:
        raise TaskError(f"Unknown patching granularity {kind!r}; choose one of {', '.join(KINDS)}.")
    names = [str(s) for s in model.sites(kind)]
    if not names:
        raise TaskError(f"This model has no {kind} sites (e.g. experts need a mixture-of-experts model).")
    if positions == "all":
        cols = list(range(seq))
    elif positions is None:
        cols = None
    else:
        cols = [p % seq for p in ([positions] if isinstance(positions, int) else positions)]
    layer = lambda n: int(n.split(".")[0][1:])  # noqa: E731
    units = []
    for r, n in enumerate(names):
        for p in (cols if cols is not None else [None]):
            units.append(_Unit(n, layer(n), r, p))
    return units, names, cols


def _layer_sites(names: list[str], kind: str) -> list[str]:
    """The layer-level sites (`L3.head`, `L3.resid_pre`, ...) that hold the units `names`."""
    return sorted({n.split(".")[0] + "." + kind for n in names})


def _unit_values(cache: dict[str, torch.Tensor], names: list[str], kind: str) -> dict[str, torch.Tensor]:
    """Each unit's value, [batch, pos, ...], sliced out of the layer-level caches."""
    out = {}
    for n in names:
        full = cache[n.split(".")[0] + "." + kind]
        # resid-type units are whole layer tensors; head{h}, neuron{j}, expert{e} index them
        out[n] = full if kind in RESID_KINDS else full[:, :, int(n.split(".")[1][len(kind):])]
    return out


def patch(model, task: Task | TaskBatch, kind: str = "resid_pre", positions="all", direction: str = "denoise",
          metric: str | None = None, ablation: str | None = None, normalise: bool = True, batch_size: int = 64,
          layer_span: int | None = None, seed: int = 0, skip_unchanged: bool = True, progress: bool = True) -> Scores:
    """Patch every site of one granularity and score the metric at the last position.

    direction: "denoise" patches clean values into the corrupted run (how much does this site restore?),
    "noise" patches corrupted values into the clean run (how much does it break?).
    ablation: "mean" (mean over the task's clean prompts) or "resample" (another prompt's value), into the
    clean run; no corrupted prompts needed.
    positions: "all" (layer x position grid), None (all positions at once), or column indices.
    Scores are the mean over examples, normalised to (m - m_corrupted) / (m_clean - m_corrupted).
    skip_unchanged: a patch whose value equals, bit for bit, the value already in the target run (e.g. every
    column before the first token where clean and corrupted differ) is that run's own metric, not recomputed.
    """
    batch = task.tokenize(model) if isinstance(task, Task) else task
    name = task.name if isinstance(task, Task) else None
    metric = metric or (task.metric if isinstance(task, Task) else "logit_diff")
    fn = M.get(metric)
    if ablation is None and batch.corrupted is None:
        raise TaskError("Patching needs a corrupted prompt for every example (or use ablation='mean'/'resample').")
    if direction not in ("denoise", "noise"):
        raise TaskError(f"direction must be 'denoise' or 'noise', not {direction!r}.")
    if ablation not in (None, "mean", "resample"):
        raise TaskError(f"ablation must be None, 'mean' or 'resample', not {ablation!r}.")
    units, names, cols = _units(model, kind, positions, batch.seq)
    # the source of the patched values is one of the two runs every patch needs anyway
    source_is_clean = ablation is not None or direction == "denoise"
    needed = _layer_sites(names, kind)
    clean_base = prefix(model, batch.clean, cache=needed)
    corr_base = prefix(model, batch.corrupted, cache=needed) if batch.corrupted is not None else None
    m_clean = fn(clean_base.logits, batch).mean()
    m_corr = fn(corr_base.logits, batch).mean() if corr_base is not None else torch.tensor(0.0)
    target = corr_base if (ablation is None and direction == "denoise") else clean_base
    src = _unit_values((clean_base if source_is_clean else corr_base).cache, names, kind)
    if ablation == "mean":
        real = batch.clean["attention_mask"].bool()
        w = real.float() / real.float().sum(0).clamp(min=1)
        src = {k: (v * w.view(*w.shape, *([1] * (v.dim() - 2)))).sum(0, keepdim=True).expand_as(v)
               for k, v in src.items()}
    elif ablation == "resample":
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(batch.n, generator=g)   # one random cycle: every example a donor exactly once,
        donor = torch.empty_like(order)                  # never its own
        donor[order] = order.roll(-1)
        src = {k: v[donor] for k, v in src.items()}
    totals = torch.zeros(len(names), len(cols) if cols is not None else 1)
    pairs, same = [(u, e) for u in units for e in range(batch.n)], []
    if skip_unchanged:
        base_metric = fn(target.logits, batch)
        pairs, same = _changed(pairs, src, _unit_values(target.cache, names, kind))
        for u, e in same:
            totals[u.row, 0 if u.pos is None else cols.index(u.pos)] += float(base_metric[e])
    # Chunks start at their lowest layer; at SmolLM2 size, fewer and larger forwards beat finer layer
    # chunks (small matmuls run far below peak), so by default only batch_size splits the layers.
    span = layer_span or model.dims.n_layers
    plan = _plan(pairs, batch_size, span)
    for start_pos, chunk in tqdm(plan, desc=f"patch {kind}", disable=not progress, leave=False):
        start_layer = torch.tensor([u.layer for u, _ in chunk])
        rows = torch.tensor([e for _, e in chunk])
        ivs = []
        by_site: dict[str, list[int]] = {}
        for i, (u, _) in enumerate(chunk):
            by_site.setdefault(u.site, []).append(i)
        for site, idx in by_site.items():
            u0 = chunk[idx[0]][0]
            ex = rows[idx]
            if u0.pos is None:
                ivs.append(replace(site, src[site][ex], pos=None, rows=idx))
            else:
                ivs.append(replace(site, src[site][ex, u0.pos], pos=u0.pos - start_pos, rows=idx))
        logits = suffix_logits(model, target, rows, start_pos, start_layer, ivs)
        vals = fn(logits, batch.select(rows))
        for (u, _), v in zip(chunk, vals):
            totals[u.row, 0 if u.pos is None else cols.index(u.pos)] += float(v)
    mean = totals / batch.n
    if normalise:
        mean = M.normalise(mean, m_clean, m_corr)
    values = mean if cols is not None else mean[:, 0]
    labels = [batch.tokens[0][c] for c in cols] if cols is not None else None
    return Scores(values, names, f"patch/{kind}", positions=labels, task=name, metric=metric,
                  model=model.name, fingerprint=model.fingerprint,
                  settings={"direction": direction, "ablation": ablation, "normalise": normalise,
                            "metric_clean": float(m_clean), "metric_corrupted": float(m_corr),
                            "examples": batch.n, "columns": cols, "seed": seed,
                            "runs_computed": len(pairs), "runs_unchanged": len(same)})


def _changed(pairs: list[tuple[_Unit, int]], src: dict, tgt: dict):
    """Split (unit, example) pairs into those whose patched value differs from the target run's and those
    whose value is already there (bit for bit), so patching them changes nothing."""
    same_cell = {}
    for name in src:
        eq = src[name] == tgt[name]
        eq = eq.flatten(2).all(-1) if eq.dim() > 2 else eq  # [batch, pos]
        same_cell[name] = eq, eq.all(-1)
    todo, same = [], []
    for u, e in pairs:
        cells, whole = same_cell[u.site]
        (same if bool(whole[e] if u.pos is None else cells[e, u.pos]) else todo).append((u, e))
    return todo, same


def _plan(pairs: list[tuple[_Unit, int]], batch_size: int, span: int):
    """Group (unit, example) rows into forwards: one start column each, a few layers wide, at most batch_size."""
    by_col: dict[int, list] = {}
    for u, e in pairs:
        by_col.setdefault(u.pos or 0, []).append((u, e))
    plan = []
    for col in sorted(by_col):
        us = sorted(by_col[col], key=lambda ue: ue[0].layer)
        chunk: list[tuple[_Unit, int]] = []
        low = None
        for u, e in us:
            if chunk and (len(chunk) >= batch_size or u.layer - low >= span):
                plan.append((col, chunk))
                chunk = []
            if not chunk:
                low = u.layer
            chunk.append((u, e))
        if chunk:
            plan.append((col, chunk))
    return plan
