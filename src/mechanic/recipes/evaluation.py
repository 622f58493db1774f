"""The recipe's improve stage: the plan, its control and its baselines, each judged by the same Pareto verdict.

Every evaluation reads the same test split and the same side effects, against one shared plan-off
pass: the plan (verdict in improve.verdict), the recipe's control, the prompting baseline (the
recipe's prefix before every prompt, no plan) and `draws` random-component plans (the steer method's
random variant, seeds 0..draws-1) scored on the target rows, with the plan's percentile among them.
"""

from __future__ import annotations

from mechanic.recipes.methods import StageOut
from mechanic.recipes.schema import Recipe


def _targets(ev: dict) -> list[dict]:
    return [r for r in ev["rows"] if r["kind"] == "target" and r["better"] != "none"]


def percentile(located: float, draws: list[float], better: str) -> float:
    """Percent of random draws the located plan beats (strictly better change; ties count half)."""
    if not draws:
        return float("nan")
    sign = 1.0 if better == "higher" else -1.0
    wins = sum(1.0 if sign * (located - d) > 0 else 0.5 if located == d else 0.0 for d in draws)
    return 100.0 * wins / len(draws)


def random_summary(ev: dict, draws: list[dict]) -> dict:
    """Per target row: the random draws' changes (mean of each draw) and the located plan's percentile among them."""
    out = {}
    for r in _targets(ev):
        ds = [next(x["delta"]["mean"] for x in d["rows"] if x["id"] == r["id"]) for d in draws]
        s = sorted(ds)
        out[r["id"]] = {"located": r["delta"]["mean"], "draws": ds, "min": s[0], "median": s[len(s) // 2],
                        "max": s[-1], "percentile": percentile(r["delta"]["mean"], ds, r["better"])}
    return out


def run_evaluation(recipe: Recipe, m, measures: list, plan, control_plan, random_plans, method_plans=()) -> StageOut:
    """Evaluate the plan, control, prompt baseline, random draws and other methods' plans ((name, settings, plan)
    each); the StageOut holds every evaluation and verdict."""
    from mechanic.improve.evaluate import Prompt, collect_before, evaluate
    from mechanic.improve.verdict import judge, resolve_margins

    spec = recipe.evaluate
    kw = {"seed": recipe.seed, "n_boot": spec.n_boot, "level": spec.level}
    before = collect_before(m, measures, recipe.seed)
    ev = evaluate(m, plan, measures, before=before, **kw)
    data: dict = {"evaluation": ev.to_dict()}
    margins = resolve_margins({k: v.model_dump() for k, v in spec.protect.items()}, ev.rows)
    data["verdict"] = judge(ev.rows, margins)
    figs = ev.figures()
    if control_plan is not None:
        cev = evaluate(m, control_plan, measures, before=before, **kw).to_dict()
        data["control"] = cev
        data["control_verdict"] = judge(cev["rows"], margins)
    base: dict = {}
    if recipe.baselines.prompt is not None:
        pev = evaluate(m, Prompt(recipe.baselines.prompt), measures, before=before, **kw).to_dict()
        base["prompt"] = {"prefix": recipe.baselines.prompt, "evaluation": pev, "verdict": judge(pev["rows"], margins)}
    if random_plans:
        targets = [x for x in measures if x.kind == "target"]
        draws = [evaluate(m, p, targets, before=before, **kw).to_dict() for p in random_plans()]
        base["random"] = {"method": recipe.baselines.random.method, "draws": len(draws),
                          "rows": random_summary(data["evaluation"], draws)}
    for name, settings, mplan in method_plans:
        mev = evaluate(m, mplan, measures, before=before, **kw).to_dict()
        base.setdefault("methods", []).append({"method": name, "settings": settings, "evaluation": mev,
                                               "verdict": judge(mev["rows"], margins)})
    if base:
        data["baselines"] = base
    return StageOut(verdict_text(data), figs, data, {"evaluation": "evaluation.json"})


def _change(r: dict) -> str:
    d = r["delta"]
    return f"{r['id']} {r['before']['mean']:.3g} -> {r['after']['mean']:.3g} (CI [{d['lo']:+.3g}, {d['hi']:+.3g}])"


def verdict_text(data: dict) -> str:
    """The stage paragraph: the plan's verdict, then the control and each baseline in one sentence each."""
    parts = [data["verdict"]["text"]]
    if "control" in data:
        parts.append(f"Control: {data['control_verdict']['label']}; " +
                     "; ".join(_change(r) for r in _targets(data["control"])) + ".")
    b = data.get("baselines", {})
    if "prompt" in b:
        parts.append(f"Prompting baseline ({b['prompt']['prefix']!r}): {b['prompt']['verdict']['label']}; " +
                     "; ".join(_change(r) for r in _targets(b["prompt"]["evaluation"])) + ".")
    for x in b.get("methods", []):
        parts.append(f"Method {x['method']}: {x['verdict']['label']}; " +
                     "; ".join(_change(r) for r in _targets(x["evaluation"])) + ".")
    if "random" in b:
        parts.append(f"Random components ({b['random']['draws']} draws of {b['random']['method']}): " + "; ".join(
            f"{k} change {v['located']:+.3g} beats {v['percentile']:.0f}% of draws (their median {v['median']:+.3g}, "
            f"range [{v['min']:+.3g}, {v['max']:+.3g}])" for k, v in b["random"]["rows"].items()) + ".")
    return " ".join(parts)


def baseline_figures(data: dict) -> list[dict]:
    """One bar chart per target row: the plan's change beside the control, the prompt and the random draws' median."""
    figs = []
    b = data.get("baselines", {})
    for r in _targets(data["evaluation"]):
        labels, mean, lo, hi = ["plan"], [r["delta"]["mean"]], [r["delta"]["lo"]], [r["delta"]["hi"]]
        others = [("control", data.get("control")), ("prompt", b.get("prompt", {}).get("evaluation")),
                  *((x["method"], x["evaluation"]) for x in b.get("methods", []))]
        for name, ev in others:
            row = next((x for x in (ev or {}).get("rows", []) if x["id"] == r["id"]), None)
            if row is not None:
                labels.append(name)
                mean.append(row["delta"]["mean"])
                lo.append(row["delta"]["lo"])
                hi.append(row["delta"]["hi"])
        rnd = b.get("random", {}).get("rows", {}).get(r["id"])
        if rnd:
            labels.append(f"random x{len(rnd['draws'])} (median, range)")
            mean.append(rnd["median"])
            lo.append(rnd["min"])
            hi.append(rnd["max"])
        if len(labels) > 1:
            figs.append({"kind": "bars", "id": f"baselines-{r['id']}", "title": f"Change of {r['id']}: plan vs baselines",
                         "caption": "Plan, control, prompt and other methods: change with its 95% CI; random draws: "
                                    "median change with the range over draws.", "labels": labels, "ylabel": "change (after - before)",
                         "series": [{"name": "change", "mean": mean, "lo": lo, "hi": hi}]})
    return figs


def summary(recipe: Recipe, stages: list[dict], data: dict) -> dict:
    """The report's opening card: what was located and changed, the verdict label and paragraph, key numbers."""
    by = {s["name"]: s for s in stages}
    ev, v = data["evaluation"], data["verdict"]
    keys = []
    for r in _targets(ev):
        keys.append({"id": f"{r['id']}.before", "label": f"{r['id']} before", "value": r["before"]["mean"]})
        keys.append({"id": f"{r['id']}.after", "label": f"{r['id']} after", "value": r["after"]["mean"]})
    for r in ev["rows"]:
        if r["kind"] == "side" and r["metric"] in ("ppl", "kl"):
            keys.append({"id": f"{r['id']}.after", "label": f"{r['id']} after (before {r['before']['mean']:.3g})",
                         "value": r["after"]["mean"]})
    return {"title": recipe.title, "description": recipe.description, "located": by["locate"]["text"],
            "changed": by["steer"]["text"], "verdict": by["evaluate"]["text"], "label": v["label"],
            "helped": v["label"] == "helped", "costs": v["costs"], "key_numbers": keys}
