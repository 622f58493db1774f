"""Pareto verdicts: a change "helped" only if the target improved AND every protected capability held.

A target row improved when its change goes the `better` way, its two-sided CI excludes 0 and the
paired permutation p < ALPHA. A protected row (a capability the change must not cost) is judged by
non-inferiority: the one-sided (1 - ALPHA) bootstrap bound of its change in the harmful direction
must lie inside the row's margin (an absolute amount, or a fraction of the before value). Rows that
cannot be shown non-inferior, because they got worse or because too few items make the bound wide,
are named as costs. The verdict is one of:

- "helped": the target improved and every protected row is non-inferior;
- "improved at a cost": the target improved and at least one protected row is not non-inferior;
- "no effect": no target row improved significantly (and none got significantly worse);
- "made worse": a target row got significantly worse.

    margins = resolve_margins({"*.accuracy": {"max_worse": 0.02}}, rows)
    v = judge(ev["rows"], margins)       # {"label", "targets", "costs", "protected", "text"}
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

ALPHA = 0.05

LABELS = ("helped", "improved at a cost", "no effect", "made worse")


@dataclass(frozen=True)
class Margin:
    """How much worse a protected row may get: `max_worse` in the row's units, or as a fraction of |before|."""

    max_worse: float
    relative: bool = False

    def limit(self, before: float) -> float:
        return self.max_worse * abs(before) if self.relative else self.max_worse

    def describe(self, row: dict) -> str:
        way = "rise" if row["better"] == "lower" else "drop"
        amount = f"{self.max_worse:.0%}" if self.relative else f"{self.max_worse:g}"
        return f"may {way} by at most {amount}"


# The protected capabilities every recipe inherits (a recipe may override or add patterns):
# each built-in suite's accuracy drops at most 2 points, perplexity rises at most 2%, mean KL on
# neutral text stays under 0.1 nats per token, and fluency (n-gram entropy) drops at most 5%.
DEFAULT_MARGINS: dict[str, Margin] = {
    "*.accuracy": Margin(0.02),
    "*.pair_accuracy": Margin(0.02),
    "perplexity.ppl": Margin(0.02, relative=True),
    "kl.kl": Margin(0.1),
    "fluency.entropy": Margin(0.05, relative=True),
}


def resolve_margins(declared: dict | None, rows: list[dict], defaults: bool = True) -> dict[str, Margin]:
    """Row id -> Margin for every protected row: declared patterns (fnmatch on row ids) over the defaults.

    Default patterns apply to side-effect rows only; a declared pattern may also protect a target
    measure's row (e.g. "edit.neighborhood"), which then counts as protected, not as a target.
    """
    pats = {**(DEFAULT_MARGINS if defaults else {}),
            **{k: (v if isinstance(v, Margin) else Margin(**v)) for k, v in (declared or {}).items()}}
    out: dict[str, Margin] = {}
    for r in rows:
        if r["better"] == "none":
            continue
        for pat, m in pats.items():
            declared_here = declared is not None and pat in declared
            if fnmatch.fnmatchcase(r["id"], pat) and (declared_here or r["kind"] == "side"):
                out[r["id"]] = m      # later (declared) patterns win
    return out


def significant(row: dict, worse: bool = False) -> bool:
    """The change goes the `better` way (or the other way when worse=True) with CI excluding 0 and p < ALPHA."""
    d, better = row["delta"], row["better"]
    if better == "none" or row["p"] >= ALPHA:
        return False
    up = d["lo"] > 0
    down = d["hi"] < 0
    return (down if better == "higher" else up) if worse else (up if better == "higher" else down)


def worst_bound(row: dict) -> float:
    """The one-sided (1 - ALPHA) bound of the change in the harmful direction, as an amount of harm (>= 0 is worse)."""
    b = row.get("bound") or {"lo": row["delta"]["lo"], "hi": row["delta"]["hi"]}   # old rows: the two-sided CI
    return -b["lo"] if row["better"] == "higher" else b["hi"]


def non_inferior(row: dict, margin: Margin) -> bool:
    """True when the one-sided bound of the harm lies inside the margin."""
    return worst_bound(row) <= margin.limit(row["before"]["mean"])


def _fmt(row: dict) -> str:
    b, a, d = row["before"], row["after"], row["delta"]
    return (f"{row['id']} {b['mean']:.3g} -> {a['mean']:.3g} (change {d['mean']:+.3g}, "
            f"CI [{d['lo']:+.3g}, {d['hi']:+.3g}], p={row['p']:.2g})")


def judge(rows: list[dict], margins: dict[str, Margin]) -> dict:
    """The verdict of one evaluation: label, the target rows, each protected row's test, the costs, one paragraph."""
    targets = [r for r in rows if r["kind"] == "target" and r["better"] != "none" and r["id"] not in margins]
    improved = [r for r in targets if significant(r)]
    worse = [r for r in targets if significant(r, worse=True)]
    protected = []
    for r in rows:
        if r["id"] in margins:
            m = margins[r["id"]]
            protected.append({"id": r["id"], "margin": asdict(m), "limit": m.limit(r["before"]["mean"]),
                              "worst": worst_bound(r), "ok": non_inferior(r, m), "rule": m.describe(r)})
    costs = [p for p in protected if not p["ok"]]
    if worse:
        label = "made worse"
    elif not improved:
        label = "no effect"
    else:
        label = "improved at a cost" if costs else "helped"
    by = {r["id"]: r for r in rows}
    text = [f"Verdict: {label}. {len(improved)} of {len(targets)} target rows improved significantly and "
            f"{len(worse)} got significantly worse (significant: the change's {1 - ALPHA:.0%} CI excludes 0 and "
            f"paired p < {ALPHA}): " + "; ".join(_fmt(r) for r in targets) + "."]
    text.append(f"Protected: {len(protected) - len(costs)} of {len(protected)} rows shown non-inferior (the one-sided "
                f"{1 - ALPHA:.0%} bound of the harm inside the margin)"
                + (": costs " + "; ".join(f"{_fmt(by[c['id']])}, harm bound {c['worst']:+.3g} vs allowed "
                                            f"{c['limit']:.3g}" for c in costs) if costs else "") + ".")
    return {"label": label, "targets": [r["id"] for r in targets], "improved": [r["id"] for r in improved],
            "worse": [r["id"] for r in worse], "protected": protected, "costs": [c["id"] for c in costs],
            "alpha": ALPHA, "text": " ".join(text)}
