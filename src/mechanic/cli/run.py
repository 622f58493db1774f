"""Run commands: `run` a recipe, `eval` a saved plan, rebuild a `report`, and the `demo`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mechanic.cli.common import app, console, emit_json, user_errors


def _run(recipe: str, out: Path, size: Optional[str], model: Optional[str], reuse: bool, as_json: bool) -> dict:
    """Execute a recipe with a progress bar over its stages; print the verdict and where the report is."""
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from mechanic import distributed as D
    from mechanic.progress import reporting
    from mechanic.recipes import recipe_path
    from mechanic.recipes.runner import run
    from mechanic.report import build_report

    path = recipe_path(recipe)
    as_json = as_json or not D.is_main()      # torchrun: rank 0 alone shows progress
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, disable=as_json, transient=False) as bar:
        job = bar.add_task(f"{path.stem}: loading", total=5)
        inner = bar.add_task("", total=None, visible=False)     # the running loop inside a stage, with its ETA

        def loop(desc: str, done: int, total, info: dict) -> None:
            extra = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
            text = escape(f"  {desc}" + (f"  ({extra})" if extra else ""))
            if done == 0:      # a new loop: its own clock, so the ETA is this loop's
                bar.reset(inner, total=total, visible=True, description=text)
            else:
                bar.update(inner, completed=done, total=total, description=text)

        def log(msg: str) -> None:
            if msg.startswith("[") and (" ..." in msg or "reused" in msg or "done in" in msg):
                stage = msg[1:msg.index("]")]
                if "done in" in msg or "reused" in msg:
                    bar.advance(job)
                bar.update(job, description=f"{path.stem}: {msg[msg.index(']') + 2:]}" if " ..." in msg
                           else f"{path.stem}: {stage} finished")
            if not as_json:
                bar.console.print(f"[dim]{escape(msg)}[/]", highlight=False)

        with reporting(loop):
            results = run(path, out, size=size, model=model, reuse=reuse, log=log, report=build_report)
        bar.update(inner, visible=False)
        bar.update(job, completed=5, description=f"{path.stem}: done")
    return results


def _table(ev: dict):
    """The rich table of an evaluation read back from JSON."""
    import dataclasses

    from mechanic.improve.evaluate import Evaluation

    names = {f.name for f in dataclasses.fields(Evaluation)}
    return Evaluation(**{k: v for k, v in ev.items() if k in names}).table()


def _print_results(results: dict, out: Path) -> None:
    s = results["summary"]
    console.print(f"\n[bold]{s['title']}[/]")
    console.print(f"[bold]located:[/] {s['located']}", highlight=False)
    console.print(f"[bold]changed:[/] {s['changed']}", highlight=False)
    console.print(_table(results["evaluation"]))
    label = s.get("label") or ("helped" if s["helped"] else "did not clearly help")
    colour = {"helped": "green", "improved at a cost": "yellow"}.get(label, "red")
    badge = f"[{colour}]{label}[/]"
    console.print(f"{badge}: {s['verdict']}", highlight=False)
    console.print(f"\nreport: [bold]{out / 'report.html'}[/]  (one self-contained file; open it in a browser)")


@app.command("run")
@user_errors
def run_cmd(recipe: str = typer.Argument(None, help="A recipe .yaml file or a bundled recipe name (see --list)."),
            out: Path = typer.Option(None, "-o", "--out", help="Run directory (default: runs/<recipe name>)."),
            size: Optional[str] = typer.Option(None, help="A reduced size the recipe defines (e.g. ci)."),
            model: Optional[str] = typer.Option(None, help="Override the recipe's model."),
            reuse: bool = typer.Option(True, help="Reuse finished stages with the same inputs (resume)."),
            list_: bool = typer.Option(False, "--list", help="List the bundled recipes and exit."),
            as_json: bool = typer.Option(False, "--json", help="Print results.json instead of tables."),
            procs: int = typer.Option(1, "--procs", help="Split the work over this many processes (launches "
                                      "torchrun; see docs/SCALING.md). Results equal a 1-process run.")):
    """Run a recipe: locate -> steer -> evaluate, writing results.json, artifacts and report.html."""
    from mechanic import distributed as D
    from mechanic.recipes import list_recipes, recipe_path
    from mechanic.recipes.schema import load_recipe

    if list_:
        rows = [(n, load_recipe(recipe_path(n))[0].title) for n in list_recipes()]
        if as_json:
            emit_json([{"name": n, "title": t} for n, t in rows])
        else:
            for n, t in rows:
                console.print(f"[bold]{n}[/]  {t}", highlight=False)
        return
    if recipe is None:
        raise typer.BadParameter("give a recipe file or bundled name (mechanic run --list shows them)")
    out = out or Path("runs") / recipe_path(recipe).stem
    if procs > 1 and not D.init():
        return _launch(procs, ["run", recipe, "-o", str(out), *(["--size", size] if size else []),
                               *(["--model", model] if model else []), *([] if reuse else ["--no-reuse"]),
                               *(["--json"] if as_json else [])])
    D.init()
    results = _run(recipe, out, size, model, reuse, as_json)
    if not D.is_main():
        return
    if as_json:
        emit_json(results)
    else:
        _print_results(results, out)


def _launch(procs: int, argv: list[str]) -> None:
    """`mechanic ARGV` in `procs` processes on this machine with torchrun; a failure names the rank that failed."""
    import os
    import subprocess
    import sys

    from mechanic.cli.common import fail

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))   # no oversubscription
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
           "-m", "mechanic", *argv]
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        fail(f"The {procs}-process run failed (exit code {rc}). The error above names the rank that failed (a rank "
             "that raised: 'rank N raised ...'; a rank that died: torchrun's 'Root Cause' section gives its rank "
             "and exit code). Run the same command again to resume: finished stages are reused.")


@app.command("eval")
@user_errors
def eval_cmd(plan: Path = typer.Option(..., help="A plan.safetensors written by a steer command or a run."),
             task: str = typer.Option(..., help="Built-in suite or task file to measure the plan on."),
             n: Optional[int] = typer.Option(None, help="Use n examples of the task (from --start)."),
             start: int = typer.Option(0, help="First example to use (e.g. 77 for the facts the demo edits)."),
             target: str = typer.Option("task", help="Target measure: task (the task's metric) or edit (CounterFact + "
                                                     "EasyEdit scores of a facts task)."),
             side_effects: str = typer.Option("default", help="default (perplexity, KL, fluency, other suites) or none."),
             size: str = typer.Option("small", help="small or full side-effect sets."),
             model: str = typer.Option("smollm2", help="The model the plan was made for."),
             any_model: bool = typer.Option(False, "--any-model", help="Apply the plan even if it was made for "
                                            "another model (its fingerprint differs); sites and shapes are still checked."),
             seed: int = typer.Option(0), out: Optional[Path] = typer.Option(None, "-o", "--out",
                                                                         help="Write evaluation.json here (a directory)."),
             as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Evaluate a saved plan before/after: target metric and side effects with bootstrap CIs and paired tests."""
    import mechanic
    from mechanic.files import write_text
    from mechanic.improve.evaluate import evaluate
    from mechanic.recipes.measures import side_measures, target_measures
    from mechanic.recipes.schema import EvaluateSpec
    from mechanic.steer.plan import Plan, PlanError
    from mechanic.tasks.builtin import load_task

    m = mechanic.load(model)
    p = Plan.load(plan)
    if p.fingerprint and p.fingerprint != m.fingerprint and not any_model:
        raise PlanError(f"{plan} was made for a model with fingerprint {p.fingerprint}, but {model} has "
                        f"{m.fingerprint}. Pass --model with the model it was made for, or --any-model to apply it "
                        "anyway (its sites and weight shapes are still checked).")
    if any_model:
        p.fingerprint = None
    t = load_task(task).subset(n, start)
    spec = EvaluateSpec(target=[target], side_effects=side_effects, size=size)
    measures = target_measures(spec.target, m, t, None, size) + side_measures(spec, m, [t.name])
    ev = evaluate(m, p, measures, seed=seed).to_dict()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "evaluation.json", json.dumps(ev, indent=1))
    if as_json:
        emit_json(ev)
    else:
        console.print(_table(ev))


@app.command("report")
@user_errors
def report_cmd(run_dir: Path = typer.Argument(..., help="A run directory (it holds results.json)."),
               as_json: bool = typer.Option(False, "--json", help="Print the report path as JSON.")):
    """Rebuild RUN_DIR/report.html from RUN_DIR/results.json (no model needed)."""
    from mechanic.report import rebuild

    if not (run_dir / "results.json").is_file():
        raise FileNotFoundError(f"{run_dir} has no results.json; give a directory written by `mechanic run`.")
    path = rebuild(run_dir)
    if as_json:
        emit_json({"report": str(path)})
    else:
        console.print(f"report: [bold]{path}[/]")


@app.command()
@user_errors
def demo(model: Optional[str] = typer.Option(None, help="Run the demo on another model."),
         out: Path = typer.Option(Path("runs/demo"), "-o", "--out", help="Run directory."),
         size: Optional[str] = typer.Option(None, help="ci: a reduced size (about a minute)."),
         as_json: bool = typer.Option(False, "--json", help="Print results.json instead of tables.")):
    """The flagship loop on the default model: causal tracing -> ROME -> CounterFact metrics -> report."""
    results = _run("fact-editing", out, size, model, True, as_json)
    if as_json:
        emit_json(results)
    else:
        _print_results(results, out)
