"""The recipe's select stage: try a grid of steer settings on validation rows, keep the one the Pareto rule prefers.

Each candidate (one combination of the `select.grid` values, merged over the steer settings) is built
like the steer stage and evaluated on what a selection may read: the validation split of the
evaluation task, the validation rows of every side-effect suite, calibration prose (perplexity, KL)
and the validation openings (fluency). Each gets the verdict the test split will get (improve.verdict,
same margins). The choice: the largest target improvement among candidates judged "helped"; if none
is, the fewest protected rows outside their margins, then the largest target improvement. The test
split is never read here (the runner's split guard enforces it).
"""

from __future__ import annotations

import itertools
from pathlib import Path

from mechanic.recipes.methods import StageOut, run_method, table
from mechanic.recipes.schema import Recipe, RecipeError


def candidates(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, in the order the grid lists them."""
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def gain(row: dict | None) -> float:
    """A target row's change in its better direction (positive = improved; no target row: 0)."""
    if row is None:
        return 0.0
    return row["delta"]["mean"] * (1.0 if row["better"] == "higher" else -1.0)


def choose(tried: list[dict]) -> int:
    """Index of the preferred candidate: helped first, then fewest costs, then the largest target gain."""
    return max(range(len(tried)), key=lambda i: (tried[i]["label"] == "helped", -len(tried[i]["costs"]),
                                                 tried[i]["gain"]))


def run_selection(recipe: Recipe, m, steered: dict, measures: list, d: Path) -> StageOut:
    """Build and judge every candidate plan on the selection measures; data["choice"] holds the settings kept."""
    from mechanic.improve.evaluate import collect_before, evaluate
    from mechanic.improve.verdict import judge, resolve_margins
    from mechanic.steer.plan import Plan

    spec, ev_spec = recipe.select, recipe.evaluate
    kw = {"seed": recipe.seed, "n_boot": ev_spec.n_boot, "level": ev_spec.level}
    declared = {k: v.model_dump() for k, v in ev_spec.protect.items()}
    before = collect_before(m, measures, recipe.seed)
    tried = []
    for i, cand in enumerate(candidates(spec.grid)):
        sub = d / f"candidate-{i}"
        sub.mkdir()
        run_method("steer", {**steered, "dir": sub}, recipe.steer.model_copy(update=cand))
        ev = evaluate(m, Plan.load(sub / "plan.safetensors"), measures, before=before, **kw)
        v = judge(ev.rows, resolve_margins(declared, ev.rows))
        target = next((r for r in ev.rows if v["targets"] and r["id"] == v["targets"][0]), None)   # the primary one
        tried.append({"settings": cand, "label": v["label"], "costs": v["costs"], "gain": gain(target),
                      "target": None if target is None else {"id": target["id"], **target["delta"]},
                      "verdict": v["text"]})
    if not tried:
        raise RecipeError("select.grid gives no candidate: give each setting a non-empty list of values.")
    best = choose(tried)
    pick = tried[best]
    helped = sum(t["label"] == "helped" for t in tried)
    why = (f"the largest target improvement of the {helped} judged helped" if pick["label"] == "helped" else
           "no candidate kept every protected capability within its margin, so the one with the fewest costs "
           f"({len(pick['costs'])}: {', '.join(pick['costs']) or 'none'}), then the largest target improvement")
    text = (f"Tried {len(tried)} settings of {recipe.steer.method} on validation rows (the test split unread); "
            f"kept {pick['settings']}: {why}. Its validation verdict: {pick['label']}.")
    rows = [[str(t["settings"]), t["target"]["id"] if t["target"] else "-",
             t["target"]["mean"] if t["target"] else float("nan"), t["label"], ", ".join(t["costs"]) or "none",
             i == best] for i, t in enumerate(tried)]
    fig = table("selection", "Candidates on validation rows", ["settings", "target row", "change", "verdict",
                                                                "costs", "kept"], rows)
    return StageOut(text, [fig], {"choice": pick["settings"], "candidates": tried}, {})
