"""Run a recipe: locate -> steer (-> control) -> evaluate -> report, each stage content-addressed and resumable.

A stage's key hashes the model fingerprint, the stage's settings, the task and the keys of the stages
it reads. Its files go to a temporary directory renamed to `stages/<stage>-<key>` only when it has
finished (done.json last), so a re-run reuses finished stages and an interrupted run resumes at the
first unfinished one without reading anything half written.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from mechanic.files import write_text
from mechanic.recipes.methods import StageOut, run_method
from mechanic.recipes.schema import Recipe, RecipeError, load_recipe


def key_of(*parts) -> str:
    """Content hash of JSON-able parts (sorted keys), 16 hex digits."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_task(spec):
    """The Task a TaskSpec names (a built-in suite or a file), cut to [start, start + n)."""
    from mechanic.tasks.builtin import load_task as builtin

    if spec is None:
        return None
    if (spec.name is None) == (spec.file is None):
        raise RecipeError("task: give exactly one of `name` (a built-in suite) or `file` (a .jsonl/.csv path).")
    task = builtin(spec.name or spec.file, metric=spec.metric).subset(spec.n, spec.start)
    if spec.side == "corrupted":
        if any(e.corrupted is None for e in task.examples):
            raise RecipeError(f"task.side: corrupted, but task {task.name!r} has examples without a corrupted prompt.")
        task.examples = [replace(e, prompt=e.corrupted, corrupted=e.prompt) for e in task.examples]
    if spec.answer is not None or spec.wrong is not None:
        task.examples = [replace(e, answer=spec.answer or e.answer, wrong=spec.wrong or e.wrong, meta={})
                         for e in task.examples]
    if spec.label:
        task.name = spec.label
    return task


def file_digest(spec) -> str | None:
    """sha256 of a task file's contents, so editing the file invalidates the stages that read it."""
    if spec is None or spec.file is None:
        return None
    return hashlib.sha256(Path(spec.file).read_bytes()).hexdigest()


def versions() -> dict:
    """Versions of everything that can change a number."""
    import numpy
    import torch
    import transformers

    import mechanic

    return {"mechanic": mechanic.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "platform": platform.platform()}


def manifest(model, recipe: Recipe, size: str | None, timings: dict) -> dict:
    """What a reader needs to reproduce the run: model, tokenizer, dtype, padding, versions, seeds, timings."""
    import torch

    tok = model.tokenizer
    p = next(model.hf.parameters())
    return {"model": {"name": model.name, "fingerprint": model.fingerprint, "class": type(model.hf).__name__,
                      "dtype": str(p.dtype).replace("torch.", ""), "device": str(p.device)},
            "tokenizer": {"class": type(tok).__name__, "vocab_size": len(tok), "padding_side": "left (mechanic inputs)",
                          "pad_token_id": tok.pad_token_id, "chat_template": bool(getattr(tok, "chat_template", None))},
            "seeds": {"recipe": recipe.seed, "torch_threads": torch.get_num_threads()},
            "size": size, "versions": versions(), "timings": timings,
            "command": " ".join(sys.argv), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class Runner:
    """One run directory: stages that reuse finished work, then results.json and report.html."""

    def __init__(self, recipe: Recipe, out: Path, size: str | None, log: Callable[[str], None] = print,
                 reuse: bool = True):
        self.recipe, self.out, self.size, self.log, self.reuse = recipe, Path(out), size, log, reuse
        self.timings: dict = {}
        self.stages: list[dict] = []

    def stage(self, name: str, key: str, title: str, fn: Callable[[Path], StageOut]) -> tuple[StageOut, Path]:
        """Run `fn(tmp_dir)` unless stages/<name>-<key> is finished; return its output and final directory."""
        final = self.out / "stages" / f"{name}-{key}"
        done = final / "done.json"
        if self.reuse and done.is_file():
            d = json.loads(done.read_text())
            out = StageOut(d["text"], d["figures"], d["data"], d["artifacts"])
            self.log(f"[{name}] reused {final.relative_to(self.out)} (finished earlier, same inputs)")
            return self._record(name, title, key, out, final, d["seconds"], reused=True)
        tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.log(f"[{name}] {title} ...")
        t0 = time.perf_counter()
        try:
            out = fn(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)   # an interrupted stage leaves nothing behind; a re-run redoes it
            raise
        seconds = time.perf_counter() - t0
        write_text(tmp / "done.json", json.dumps({**out.to_dict(), "seconds": seconds, "key": key}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self.log(f"[{name}] done in {seconds:.1f} s")
        return self._record(name, title, key, out, final, seconds, reused=False)

    def _record(self, name, title, key, out: StageOut, final: Path, seconds: float, reused: bool):
        """Note a finished stage for results.json (a reused stage costs 0 s in this run's timings)."""
        self.timings[name] = 0.0 if reused else seconds
        self.stages.append({"name": name, "title": title, "key": key, "seconds": seconds, "reused": reused,
                            **out.to_dict(), "dir": str(final.relative_to(self.out))})
        return out, final


def run(recipe_path, out: str | os.PathLike, *, size: str | None = None, model: str | None = None,
        reuse: bool = True, log: Callable[[str], None] = print, report: bool = True) -> dict:
    """Execute a recipe into `out` and return results (also written to out/results.json)."""
    import torch

    import mechanic
    from mechanic.improve.evaluate import evaluate
    from mechanic.recipes.measures import side_measures, target_measures
    from mechanic.steer.plan import Plan

    recipe, _ = load_recipe(recipe_path, size)
    if model:
        recipe = recipe.model_copy(update={"model": model})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "recipe.yaml", Path(recipe_path).read_text())
    torch.manual_seed(recipe.seed)
    t0 = time.perf_counter()
    m = mechanic.load(recipe.model)
    task = load_task(recipe.task)
    eval_task = load_task(recipe.evaluate.task) if recipe.evaluate.task else task
    R = Runner(recipe, out, size, log, reuse)
    R.timings["load"] = time.perf_counter() - t0
    base = {"fingerprint": m.fingerprint, "task": recipe.task.model_dump() if recipe.task else None,
            "task_file": file_digest(recipe.task), "seed": recipe.seed, "version": mechanic.__version__}
    ctx = {"model": m, "task": task, "seed": recipe.seed}

    lkey = key_of(base, "locate", recipe.locate.model_dump())
    found, found_dir = R.stage("locate", lkey, f"Locate: {recipe.locate.method}",
                               lambda d: run_method("locate", {**ctx, "dir": d}, recipe.locate))
    steered = {**ctx, "found": found, "found_dir": found_dir}
    skey = key_of(base, "steer", recipe.steer.model_dump(), lkey)
    _, steer_dir = R.stage("steer", skey, f"Steer: {recipe.steer.method}",
                           lambda d: run_method("steer", {**steered, "dir": d}, recipe.steer))
    ckey = control_dir = None
    if recipe.control is not None:
        ckey = key_of(base, "control", recipe.control.model_dump(), lkey)
        _, control_dir = R.stage("control", ckey, f"Control: {recipe.control.method}",
                                 lambda d: run_method("control", {**steered, "dir": d}, recipe.control))

    def evaluation(d: Path) -> StageOut:
        spec = recipe.evaluate
        targets = target_measures(spec.target, m, eval_task, spec.better, spec.size, spec.contrast)
        exclude = [eval_task.name] if eval_task is not None else []   # the suite measured as the target
        measures = targets + side_measures(spec, m, exclude)
        plan = Plan.load(steer_dir / "plan.safetensors")
        ev = evaluate(m, plan, measures, seed=recipe.seed, n_boot=spec.n_boot, level=spec.level)
        data = {"evaluation": ev.to_dict()}
        figs = ev.figures()
        if control_dir is not None:
            cplan = Plan.load(control_dir / "plan.safetensors")
            cev = evaluate(m, cplan, target_measures(spec.target, m, eval_task, spec.better, spec.size, spec.contrast),
                           seed=recipe.seed, n_boot=spec.n_boot, level=spec.level)
            data["control"] = cev.to_dict()
        write_text(d / "evaluation.json", json.dumps(data, indent=1))
        return StageOut(verdict(data["evaluation"], data.get("control")), figs, data, {"evaluation": "evaluation.json"})

    ekey = key_of(base, "evaluate", recipe.evaluate.model_dump(), file_digest(recipe.evaluate.task), skey, ckey)
    ev_out, _ = R.stage("evaluate", ekey, "Improve: before / after evaluation", evaluation)
    results = {"mechanic": mechanic.__version__, "recipe": recipe.model_dump(mode="json"),
               "manifest": manifest(m, recipe, size, R.timings),
               "summary": summary(recipe, R.stages, ev_out.data["evaluation"], ev_out.data.get("control")),
               "stages": [s for s in R.stages if s["name"] != "evaluate"],
               "evaluation": ev_out.data["evaluation"]}
    if "control" in ev_out.data:
        results["control"] = ev_out.data["control"]
    write_text(out / "manifest.json", json.dumps(results["manifest"], indent=1))
    write_text(out / "results.json", json.dumps(results, indent=1))
    if report:
        from mechanic.report import build_report
        build_report(results, out / "report.html")
        log(f"report: {out / 'report.html'}")
    return results


ALPHA = 0.05


def _significant(row: dict) -> bool:
    """The change goes the `better` way, its CI excludes 0 and the paired test gives p < ALPHA."""
    d = row["delta"]
    if row["p"] >= ALPHA:
        return False
    if row["better"] == "higher":
        return d["lo"] > 0
    if row["better"] == "lower":
        return d["hi"] < 0
    return False


def _flipped(row: dict) -> dict:
    """The row with `better` reversed: significant means significantly worse."""
    return {**row, "better": {"higher": "lower", "lower": "higher"}.get(row["better"], "none")}


def _fmt(row: dict) -> str:
    b, a, d = row["before"], row["after"], row["delta"]
    return (f"{row['id']} {b['mean']:.3g} -> {a['mean']:.3g} (delta {d['mean']:+.3g}, "
            f"CI [{d['lo']:+.3g}, {d['hi']:+.3g}], p={row['p']:.2g})")


def verdict(ev: dict, control: dict | None = None) -> str:
    """One paragraph: which target metrics moved the right way, and the worst side effect."""
    targets = [r for r in ev["rows"] if r["kind"] == "target" and r["better"] != "none"]
    good = [r for r in targets if _significant(r)]
    bad = [r for r in targets if _significant(_flipped(r))]
    parts = [f"{len(good)} of {len(targets)} target metrics improved significantly and {len(bad)} got significantly "
             f"worse (significant: the CI of the change excludes 0 and paired p < {ALPHA}): "
             + "; ".join(_fmt(r) for r in targets) + "."]
    side = [r for r in ev["rows"] if r["kind"] == "side" and r["better"] != "none"]
    worse = [r for r in side if _significant(_flipped(r))]
    parts.append(f"Side effects: {len(worse)} of {len(side)} got significantly worse"
                 + (": " + "; ".join(_fmt(r) for r in worse) if worse else "") + ".")
    if control:
        ct = [r for r in control["rows"] if r["kind"] == "target" and r["better"] != "none"]
        parts.append("Control: " + "; ".join(_fmt(r) for r in ct) + ".")
    return " ".join(parts)


def summary(recipe: Recipe, stages: list[dict], ev: dict, control: dict | None) -> dict:
    """The report's opening card: what was located, what was changed, whether it helped, key numbers."""
    by = {s["name"]: s for s in stages}
    targets = [r for r in ev["rows"] if r["kind"] == "target" and r["better"] != "none"]
    helped = any(_significant(r) for r in targets) and not any(_significant(_flipped(r)) for r in targets)
    keys = []
    for r in targets:
        keys.append({"id": f"{r['id']}.before", "label": f"{r['id']} before", "value": r["before"]["mean"]})
        keys.append({"id": f"{r['id']}.after", "label": f"{r['id']} after", "value": r["after"]["mean"]})
    for r in ev["rows"]:
        if r["kind"] == "side" and r["metric"] in ("ppl", "kl"):
            keys.append({"id": f"{r['id']}.after", "label": f"{r['id']} after (before {r['before']['mean']:.3g})",
                         "value": r["after"]["mean"]})
    return {"title": recipe.title, "description": recipe.description, "located": by["locate"]["text"],
            "changed": by["steer"]["text"], "verdict": by["evaluate"]["text"], "helped": helped, "key_numbers": keys}
