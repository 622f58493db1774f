"""Activation patching at every granularity (residual x position, attn/mlp outputs, heads, neurons, experts,
dictionary latents), denoising or noising, with mean- and resample-ablation variants.

Fast by construction: many patched runs share one forward (one batch row each), and each forward
computes only what its patches can change (see mechanic.model.reuse): positions from the patched
column on, layers from the lowest patched layer on, logits at the last position only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mechanic import memory
from mechanic.locate.parallel import data_parallel
from mechanic.locate.scores import Scores
from mechanic.model.interventions import replace
from mechanic.model.reuse import logit_columns, packed_logits, packing, packs, prefix, suffix_logits
from mechanic.tasks import metrics as M
from mechanic.tasks.task import Task, TaskBatch, TaskError

RESID_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
KINDS = RESID_KINDS + ("head", "neuron", "expert", "sae")


@dataclass(frozen=True)
class _Unit:
    """One patch: a site (one head, neuron, layer output...) at one column, or at every column (pos None)."""

    site: str
    layer: int
    row: int            # row of the output Scores
    pos: int | None


def _columns(positions, seq: int) -> list[int] | None:
    """The patched columns: every one ("all"), all at once (None), or the given indices (negative from the end)."""
    if positions == "all":
        return list(range(seq))
    if positions is None:
        return None
    return [p % seq for p in ([positions] if isinstance(positions, int) else positions)]


def _layer(name: str) -> int:
    return int(name.split(".")[0][1:])


def _units(names: list[str], cols: list[int] | None) -> list[_Unit]:
    """Every (site, column) patch of the units `names`."""
    return [_Unit(n, _layer(n), r, p) for r, n in enumerate(names) for p in (cols if cols is not None else [None])]


def _names(model, kind: str) -> list[str]:
    """The units of one granularity (for "sae": every latent, then the error node, of each attached dictionary)."""
    if kind not in KINDS:
        raise TaskError(f"Unknown patching granularity {kind!r}; choose one of {', '.join(KINDS)}.")
    if kind == "sae":
        if not model.dictionaries:
            raise TaskError("Patching dictionary latents needs a dictionary attached to the model; attach one with "
                            "mechanic.features.attach(model, dictionary) (one per site, any number of sites).")
        return [n for base, c in model.dictionaries.items()
                for n in [f"{base}.sae{f}" for f in range(c.width)] + [f"{base}.sae_error"]]
    names = [str(s) for s in model.sites(kind)]
    if not names:
        raise TaskError(f"This model has no {kind} sites (e.g. experts need a mixture-of-experts model).")
    return names


def _holder(name: str, kind: str) -> tuple[str, int | None]:
    """(the cached site that holds unit `name`, its index in the last dimension or None for the whole tensor)."""
    if kind == "sae":
        base, part = name.rsplit(".", 1)
        return (name, None) if part == "sae_error" else (f"{base}.sae", int(part[3:]))
    if kind in RESID_KINDS:       # resid-type units are whole layer tensors
        return name, None
    layer, unit = name.split(".")[:2]
    return f"{layer}.{kind}", int(unit[len(kind):])     # head{h}, neuron{j}, expert{e} index their layer's tensor


def _layer_sites(names: list[str], kind: str) -> list[str]:
    """The sites to cache (`L3.head`, `L3.resid_pre`, `L3.resid_post.sae`, ...) that hold the units `names`."""
    return sorted({_holder(n, kind)[0] for n in names})


def _unit_values(cache: dict[str, torch.Tensor], names: list[str], kind: str) -> dict[str, torch.Tensor]:
    """Each unit's value, [batch, pos, ...], sliced out of the layer-level caches."""
    out = {}
    for n in names:
        site, i = _holder(n, kind)
        out[n] = cache[site] if i is None else cache[site][:, :, i]
    return out


def _pick_latents(names: list[str], src: dict, tgt: dict, cols: list[int] | None, latents) -> list[str]:
    """The dictionary units to patch: every latent (latents None), the N per dictionary whose patched value
    differs most from the target run's (sum of |source - target| over examples and patched columns), or
    the latents listed per base site ({"L6.resid_post": [3, 17]}, or a list when one dictionary is attached).
    Error nodes are always kept."""
    if latents is None:
        return names
    bases = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))
    if isinstance(latents, dict):
        unknown = set(latents) - set(bases)
        if unknown:
            raise TaskError(f"latents names {', '.join(sorted(unknown))}, where no dictionary is attached "
                            f"(attached: {', '.join(bases)}).")
        listed = {b: set(int(f) for f in latents.get(b, ())) for b in bases}
    elif isinstance(latents, int) and not isinstance(latents, bool):
        if latents < 0:
            raise TaskError(f"latents must be a number of latents >= 0 per dictionary, got {latents}.")
        listed = {}
        for b in bases:
            mine = [n for n in names if n.startswith(b + ".sae") and not n.endswith(".sae_error")]
            cells = slice(None) if cols is None else cols
            size = torch.stack([(src[n][:, cells] - tgt[n][:, cells]).abs().sum() for n in mine]) if mine \
                else torch.zeros(0)
            top = size.argsort(descending=True, stable=True)[:latents].tolist()
            listed[b] = {int(mine[i].rsplit("sae", 1)[1]) for i in top}
    else:
        if len(bases) != 1:
            raise TaskError("latents as a list names latents of one dictionary, but several are attached; give a "
                            "dict base site -> latents, e.g. {'L6.resid_post': [3, 17]}.")
        listed = {bases[0]: set(int(f) for f in latents)}
    keep = []
    for n in names:
        b, part = n.rsplit(".", 1)
        if part == "sae_error" or int(part[3:]) in listed[b]:
            keep.append(n)
    return keep


@data_parallel   # under torchrun: examples split over the ranks (locate.parallel)
def patch(model, task: Task | TaskBatch, kind: str = "resid_pre", positions="all", direction: str = "denoise",
          metric: str | None = None, ablation: str | None = None, normalise: bool = True, batch_size: int | None = 64,
          layer_span: int | None = None, seed: int = 0, skip_unchanged: bool = True, progress: bool = True,
          latents=None) -> Scores:
    """Patch every site of one granularity and score the metric at the last position.

    kind: resid_pre, resid_mid, resid_post, attn_out, mlp_out, head, neuron, expert, or "sae": each latent
    `<base>.sae<f>` and the error node `<base>.sae_error` of every attached dictionary (mechanic.features.attach),
    one at a time; a patched latent reaches the model through the decoder (x + (a'_f - a_f) W_dec[f]).
    latents (kind "sae" only): None patches every latent; an int N only the N per dictionary whose patched value
    differs most from the value in the target run (sum of |source - target| over the examples and patched
    columns; a latent equal in both runs patches to a no-op); or the latents to patch, {base site: [indices]}
    (a plain list when one dictionary is attached). Error nodes are always patched. A 9,216-latent dictionary
    at every column of a 20-token prompt is 184k patched runs per example, hence the option.

    direction: "denoise" patches clean values into the corrupted run (how much does this site restore?),
    "noise" patches corrupted values into the clean run (how much does it break?).
    ablation: "mean" (mean over the task's clean prompts) or "resample" (another prompt's value), into the
    clean run; no corrupted prompts needed.
    positions: "all" (layer x position grid), None (all positions at once), or column indices.
    Scores are the mean over examples, normalised to (m - m_corrupted) / (m_clean - m_corrupted).
    batch_size: patched runs per forward; None: the largest that fits the memory budget (mechanic.memory).
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
    if latents is not None and kind != "sae":
        raise TaskError(f"latents= chooses dictionary latents; it applies to kind='sae', not {kind!r}.")
    names, cols = _names(model, kind), _columns(positions, batch.seq)
    # the source of the patched values is one of the two runs every patch needs anyway
    source_is_clean = ablation is not None or direction == "denoise"
    needed = _layer_sites(names, kind)
    if batch_size is None:
        est = memory.patching(model, batch.n, batch.seq, needed, corrupted=batch.corrupted is not None)
        batch_size = memory.plan_batch(est, device=model.device,
                                       hints="fewer examples per call (every example's unpatched runs are held), "
                                             "shorter prompts")
    clean_base = prefix(model, batch.clean, cache=needed, last_only=True)
    corr_base = prefix(model, batch.corrupted, cache=needed, last_only=True) if batch.corrupted is not None else None
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
    tgt = _unit_values(target.cache, names, kind)
    if kind == "sae":
        names = _pick_latents(names, src, tgt, cols, latents)
        src, tgt = {n: src[n] for n in names}, {n: tgt[n] for n in names}
    units = _units(names, cols)
    totals = torch.zeros(len(names), len(cols) if cols is not None else 1)
    pairs, same = [(u, e) for u in units for e in range(batch.n)], []
    if skip_unchanged:
        base_metric = fn(target.logits, batch)
        pairs, same = _changed(pairs, src, tgt)
        for u, e in same:
            totals[u.row, 0 if u.pos is None else cols.index(u.pos)] += float(base_metric[e])
    # Chunks start at their lowest layer; at SmolLM2 size, fewer and larger forwards beat finer layer
    # chunks (small matmuls run far below peak), so by default only batch_size splits the layers.
    span = layer_span or model.dims.n_layers
    packed = packs(model, target)   # runs from different columns share one forward (model.reuse)
    read = M.columns(metric, batch)   # a logit difference needs two columns of the unembedding, not all
    with logit_columns(model, read) as narrowed:
        scored = M.on_columns(batch, read) if narrowed else batch
        for start_pos, chunk in tqdm(_plan(pairs, batch_size, span, by_column=not packed), desc=f"patch {kind}",
                                     disable=not progress, leave=False):
            rows = torch.tensor([e for _, e in chunk])
            layers = torch.tensor([u.layer for u, _ in chunk])
            by_site: dict[str, list[int]] = {}
            for i, (u, _) in enumerate(chunk):
                by_site.setdefault(u.site, []).append(i)
            if packed:
                starts = torch.tensor([u.pos or 0 for u, _ in chunk])
                pk = packing(target, rows, starts, layers, model.dims.n_layers)
                logits = packed_logits(model, target, pk, [_packed_patch(site, src[site], chunk, idx, rows, pk)
                                                           for site, idx in by_site.items()])
            else:
                ivs = []
                for site, idx in by_site.items():
                    u0 = chunk[idx[0]][0]
                    ex = rows[idx]
                    if u0.pos is None:
                        ivs.append(replace(site, src[site][ex], pos=None, rows=idx))
                    else:
                        ivs.append(replace(site, src[site][ex, u0.pos], pos=u0.pos - start_pos, rows=idx))
                logits = suffix_logits(model, target, rows, start_pos, layers, ivs)
            vals = fn(logits, scored.select(rows))
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
                            "runs_computed": len(pairs), "runs_unchanged": len(same),
                            **({"latents": latents if not isinstance(latents, dict) else
                                {k: sorted(int(f) for f in v) for k, v in latents.items()}}
                               if kind == "sae" else {})})


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


def _packed_patch(site: str, values: torch.Tensor, chunk, idx: list[int], rows: torch.Tensor, pk):
    """The patch of the runs `idx` at one site, at packed positions: a run's start column, or all its columns."""
    ex = rows[idx]
    first = pk.first[idx]
    if chunk[idx[0]][0].pos is None:      # every column at once (such runs start at column 0)
        seq = values.shape[1]
        pos = (first[:, None] + torch.arange(seq)).flatten()
        return replace(site, values[ex].flatten(0, 1), pos=pos.tolist())
    cols = torch.tensor([chunk[i][0].pos for i in idx])
    return replace(site, values[ex, cols], pos=first.tolist())


def _plan(pairs: list[tuple[_Unit, int]], batch_size: int, span: int, by_column: bool = True):
    """Group (unit, example) rows into forwards: at most batch_size, a few layers wide, and one start column
    each unless the forward is packed (then every column at once, ordered by layer)."""
    by_col: dict[int, list] = {}
    for u, e in pairs:
        by_col.setdefault((u.pos or 0) if by_column else 0, []).append((u, e))
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
