"""evaluate over torch.distributed ranks: each measure is collected (plan off, then on) by one rank, values gathered.

A measure's per-item values are computed whole by its owner rank, exactly as one process computes them, so
rows, CIs and p-values are identical to the single-process run (bit for bit). Owners go round-robin over
the measure list; collect_before stamps the owner into each measure's values (`_rank`) and a later
evaluate(before=...) gives a measure to that same rank, which alone holds its private payload (cached
log-probs, argmax tokens: large, never sent). Other ranks receive only the public per-item values and
generation samples.
"""

from __future__ import annotations

from mechanic import distributed as D

OWNER = "_rank"


def _public(values: dict, owner: int) -> dict:
    """What other ranks need of a measure's values: per-item metrics and samples, not private payload."""
    return {**{k: v for k, v in values.items() if not k.startswith("_") or k == "_samples"}, OWNER: owner}


def owners(measures, given: dict | None) -> list[int]:
    """The rank that collects each measure: the one that collected its `before` values, else round-robin."""
    out = []
    for i, m in enumerate(measures):
        stamped = (given or {}).get(m.name, {}).get(OWNER)
        out.append(stamped if stamped is not None and stamped < D.world() else i % D.world())
    return out


def spread(model, plan, measures, seed: int, given: dict | None, collect_all):
    """(before, after, seconds) as collect_all gives them for every measure, each collected by its owner rank."""
    own = owners(measures, given)
    r = D.rank()
    mine = [m for m, o in zip(measures, own) if o == r]
    local: dict = {}

    def work():
        b, a, sec = collect_all(model, plan, mine, seed, given)
        local.update(before=b, after=a)
        return {m.name: (_public(b[m.name], r), _public(a[m.name], r), sec[m.name]) for m in mine}

    parts = D.run(work)
    before, after, seconds = {}, {}, {}
    for m, o in zip(measures, own):
        pb, pa, sec = parts[o][m.name]
        if o == r:
            pb, pa = {**local["before"][m.name], OWNER: o}, {**local["after"][m.name], OWNER: o}
        before[m.name], after[m.name], seconds[m.name] = pb, pa, sec
    return before, after, seconds


def spread_before(model, measures, seed: int, collect) -> dict:
    """collect_before over the ranks: each measure's plan-off values, stamped with the rank that holds its payload."""
    own = owners(measures, None)
    r = D.rank()
    local = {}

    def work():
        for m, o in zip(measures, own):
            if o == r:
                local[m.name] = {**collect(model, m, None, seed), OWNER: r}
        return {k: _public(v, r) for k, v in local.items()}

    parts = D.run(work)
    return {m.name: local[m.name] if o == r else parts[o][m.name] for m, o in zip(measures, own)}


__all__ = ["owners", "spread", "spread_before"]
