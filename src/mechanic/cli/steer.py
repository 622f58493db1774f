"""`mechanic steer ...`: make a plan (vector, ablation, weight edit, merge), write it, and show before/after."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from mechanic.cli.common import app, console, emit_json, user_errors
from mechanic.cli.locate import FIRST_N, JSON, MODEL, load_task_spec
from mechanic.files import write_text

steer_app = typer.Typer(help="Change what was located: every command writes a plan (plan.safetensors) and a summary.",
                        no_args_is_help=True)
app.add_typer(steer_app, name="steer")
OUT = typer.Option(..., "-o", "--out", help="Output directory (plan.safetensors, summary.json, ...).")


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected comma-separated integers like '10,12'.")


def task_metric(model, task, plan=None) -> dict:
    """The task's metric (mean over examples) on clean and, when present, corrupted prompts, with `plan` applied."""
    from contextlib import nullcontext

    from mechanic.tasks import metrics as M

    batch = task.tokenize(model)
    fn = M.get(task.metric)
    out = {}
    with model.applied(plan) if plan is not None else nullcontext():
        for side in ("clean", "corrupted"):
            inputs = getattr(batch, side)
            if inputs is not None:
                logits = model.run(inputs, last_only=True).logits[:, -1]
                out[side] = float(fn(logits, batch).mean())
    return out


def finish(out: Path, plan, summary: dict, as_json: bool, rows: list[tuple] | None = None) -> None:
    """Write plan.safetensors and summary.json, then print a before/after table (or JSON)."""
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / "plan.safetensors")
    summary = {"method": plan.method, "plan": str(out / "plan.safetensors"), **summary}
    write_text(out / "summary.json", json.dumps(summary, indent=1, default=str))
    if as_json:
        emit_json(summary)
        return
    console.print(repr(plan))
    if rows:
        table = Table(title="before / after")
        for col in ("measure", "before", "after"):
            table.add_column(col)
        for name, before, after in rows:
            table.add_row(name, f"{before:+.3f}", f"{after:+.3f}")
        console.print(table)
    console.print(f"wrote {out}/plan.safetensors, summary.json" + (f", {summary['model_dir']}" if
                                                                   summary.get("model_dir") else ""))


def _before_after(before: dict, after: dict, metric: str) -> list[tuple]:
    return [(f"{metric} ({side} prompts)", before[side], after[side]) for side in before]


@steer_app.command()
@user_errors
def vector(task: str = typer.Option(..., help="Task whose (prompt, corrupted) pairs define the direction."),
           model: str = MODEL,
           method: str = typer.Option("caa", help="caa, pca_diff or pca_center."),
           layers: str = typer.Option("12", help="Comma-separated layers to read and steer."),
           coefficient: float = typer.Option(4.0, help="Multiple of the vector added at every token."),
           sweep: str = typer.Option(None, help="Coefficients to sweep over --layers, e.g. '0,2,4,8': the plan "
                                                 "takes the strongest cell whose KL on neutral text <= --max-kl."),
           max_kl: float = typer.Option(0.1, help="KL bound (nats per token) for choosing a swept cell."),
           n: int = FIRST_N, out: Path = OUT, as_json: bool = JSON):
    """A steering vector from contrastive pairs, as a plan that adds it; also written as a llama.cpp control vector."""
    import mechanic
    from mechanic.locate.plot import heatmap
    from mechanic.steer.plan import Plan, PlanError
    from mechanic.steer.sweep import sweep as run_sweep
    from mechanic.steer.vectors import VectorError, extract, pairs_from_task

    m = mechanic.load(model)
    t = load_task_spec(task, n)
    v = extract(m, pairs_from_task(t), method, layers=_ints(layers))
    out.mkdir(parents=True, exist_ok=True)
    chosen = {"layers": v.layers, "coefficient": coefficient}
    if sweep:
        grid = run_sweep(m, v, t, v.layers, [float(c) for c in sweep.split(",")], side="corrupted")
        for name, sc in (("target", grid.target), ("kl", grid.kl), ("ppl", grid.ppl)):
            sc.save(out / f"sweep_{name}.json")
            heatmap(sc, out / f"sweep_{name}.html", title=f"sweep: {name}")
        best = grid.best(max_kl)
        if best is None:
            raise PlanError(f"No swept cell keeps the KL on neutral text under {max_kl}; lower the coefficients or "
                            "raise --max-kl (see sweep_kl.json).")
        chosen = {"layers": [best[0]], "coefficient": best[1]}
    plan = Plan(v.interventions(chosen["coefficient"], layers=chosen["layers"]), method=f"vector/{method}",
                fingerprint=m.fingerprint, settings={"task": t.name, **chosen, "norms": v.norms(),
                                                     "swept": sweep is not None})
    v.save(out / "vector.safetensors")
    files = ["vector.safetensors"]
    try:
        v.save(out / "vector.gguf")
        files.append("vector.gguf")
    except VectorError as e:  # e.g. layer 0 has no llama.cpp slot
        console.print(f"[yellow]no llama.cpp file:[/] {e}")
    before, after = task_metric(m, t), task_metric(m, t, plan)
    finish(out, plan, {"task": t.name, "metric": t.metric, **chosen, "before": before, "after": after,
                       "files": files}, as_json, _before_after(before, after, t.metric))


@steer_app.command()
@user_errors
def ablate(task: str = typer.Option(..., help="Task to measure (and to take mean/resample values from)."),
           model: str = MODEL,
           scores: Path = typer.Option(None, help="A scores.json from `mechanic locate ...` (its top k sites)."),
           sites: str = typer.Option(None, help="Or comma-separated sites, e.g. 'L3.head1,L5.neuron7,L2'."),
           k: int = typer.Option(5, help="How many top sites of --scores."),
           how: str = typer.Option("zero", help="zero, mean, resample or scale."),
           factor: float = typer.Option(None, help="Scale factor (with --how scale)."),
           expert_mode: str = typer.Option("zero", help="Experts: zero (output) or router_mask (out of routing)."),
           n: int = FIRST_N, out: Path = OUT, as_json: bool = JSON):
    """Ablate or scale located components; shows the task metric before and after."""
    import mechanic
    from mechanic.locate.scores import Scores
    from mechanic.steer.ablate import ablate as make
    from mechanic.steer.plan import PlanError

    if (scores is None) == (sites is None):
        raise PlanError("Give exactly one of --scores (a scores.json from mechanic locate) or --sites.")
    m = mechanic.load(model)
    t = load_task_spec(task, n)
    what = Scores.load(scores) if scores is not None else [s.strip() for s in sites.split(",") if s.strip()]
    plan = make(m, what, how, factor=factor, k=k, reference=t, expert_mode=expert_mode)
    before, after = task_metric(m, t), task_metric(m, t, plan)
    finish(out, plan, {"task": t.name, "metric": t.metric, "sites": plan.settings["sites"], "before": before,
                       "after": after}, as_json, _before_after(before, after, t.metric))


@steer_app.command()
@user_errors
def edit(model: str = MODEL,
         prompt: str = typer.Option(None, help="Prompt containing the subject, e.g. 'The Eiffel Tower is in'."),
         subject: str = typer.Option(None, help="The subject, a substring of the prompt."),
         target: str = typer.Option(None, help="The new answer, with its leading space, e.g. ' Rome'."),
         task: str = typer.Option(None, help="Or a CounterFact-style task (e.g. facts) with --n facts."),
         n: int = FIRST_N,
         method: str = typer.Option("rome", help="rome (one fact) or memit (many)."),
         layers: str = typer.Option(None, help="Layer(s) to edit (default: from causal tracing)."),
         save_model: bool = typer.Option(True, help="Also write the edited model to OUT/model."),
         stats_tokens: int = typer.Option(32768, help="Tokens of shipped text for the key statistics (cached)."),
         prompt_key: bool = typer.Option(False, help="Also hold the edit at the bare prompt's own key (helps models "
                                         "without BOS, e.g. SmolLM2, where the prompt's key differs from the "
                                         "prefixed ones)."),
         out: Path = OUT, as_json: bool = JSON):
    """ROME or MEMIT: write new facts into the weights; shows log p(new) vs log p(true) before and after."""
    import mechanic
    from mechanic.improve.edit_metrics import target_logprobs
    from mechanic.steer.edit import Fact, facts_from_task, memit, rome
    from mechanic.steer.plan import PlanError

    m = mechanic.load(model)
    if task is not None:
        facts = facts_from_task(load_task_spec(task, n))
    elif None not in (prompt, subject, target):
        facts = [Fact(prompt, subject, target)]
    else:
        raise PlanError("Give --prompt, --subject and --target for one fact, or --task (e.g. facts) with --n.")
    if method not in ("rome", "memit"):
        raise PlanError(f"Unknown edit method {method!r}; choose rome or memit.")
    if method == "rome" and len(facts) != 1:
        raise PlanError(f"ROME edits one fact; this request has {len(facts)}. Use --method memit or --n 1.")
    chosen = _ints(layers)
    plan = (rome(m, facts[0], chosen[0] if chosen else None, stats_tokens=stats_tokens, prompt_key=prompt_key)
            if method == "rome" else memit(m, facts, chosen, stats_tokens=stats_tokens, prompt_key=prompt_key))
    for f in facts:  # the old answer: what the model says now, if the fact does not name it
        if f.target_true is None:
            import dataclasses

            top = int(m.run(f.prompt, last_only=True).logits[0, -1].argmax())
            facts[facts.index(f)] = dataclasses.replace(f, target_true=m.tokenizer.decode([top]))
    def logprobs():  # (log p(new), log p(true)) per fact, full targets, as the CounterFact scores read them
        lp = target_logprobs(m, [f.prompt for f in facts for _ in (0, 1)],
                             [t for f in facts for t in (f.target_new, f.target_true)])
        return [tuple(x) for x in lp.view(-1, 2).tolist()]
    before = logprobs()
    with m.applied(plan):
        after = logprobs()
        model_dir = str(m.save(out / "model")) if save_model else None
    rows = []
    for f, b, a in zip(facts, before, after):
        rows += [(f"{f.subject}: log p({f.target_new.strip()})", b[0], a[0]),
                 (f"{f.subject}: log p({f.target_true.strip()})", b[1], a[1])]
    summary = {"facts": [f.__dict__ for f in facts], "model_dir": model_dir,
               "logp_new_true_before": before, "logp_new_true_after": after,
               "efficacy": sum(a[0] > a[1] for a in after) / len(after)}
    finish(out, plan, summary, as_json, rows)


@steer_app.command()
@user_errors
def merge(base: str = typer.Option(..., help="The base model (directory, .gguf, Hub id or smollm2)."),
          tuned: str = typer.Option(..., help="The fine-tuned model of the same architecture."),
          keep: float = typer.Option(0.1, help="Fraction (< 1) or count (>= 1) of neurons per layer kept tuned."),
          coefficient: float = typer.Option(0.0, help="How far the other neurons stay toward tuned (0 = base)."),
          save_model: bool = typer.Option(True, help="Also write the merged model to OUT/model."),
          out: Path = OUT, as_json: bool = JSON):
    """Neuron-level merge: keep the neurons the fine-tune moved most, pull the rest back to the base."""
    import mechanic
    from mechanic.steer.merge import merge as make
    from mechanic.steer.merge import neuron_shifts

    b, t = mechanic.load(base), mechanic.load(tuned)
    shifts = neuron_shifts(b, t)
    plan = make(b, t, keep=int(keep) if keep >= 1 else keep, coefficient=coefficient, shifts=shifts)
    out.mkdir(parents=True, exist_ok=True)
    shifts.save(out / "shifts.json")
    model_dir = None
    if save_model:
        with t.applied(plan):
            model_dir = str(t.save(out / "model"))
    kept = {g: f"{len(v['units'])} of {v['of']}" for g, v in plan.settings["kept"].items()}
    finish(out, plan, {"base": base, "tuned": tuned, "keep": keep, "coefficient": coefficient,
                       "model_dir": model_dir, "kept_per_group": kept}, as_json)
