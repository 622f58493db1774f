"""Run a recipe: locate -> steer (-> control) -> evaluate -> report, each stage content-addressed and resumable.

A recipe with a sparse dictionary also has a `dictionary` stage (training it) and a `features` stage (pages of
its steered and located latents for the report, recipes.feature_pages).

A stage's key hashes the model fingerprint, the stage's settings, the task and the keys of the stages
it reads. Its files go to a temporary directory renamed to `stages/<stage>-<key>` only when it has
finished (done.json last), so a re-run reuses finished stages and an interrupted run resumes at the
first unfinished one without reading anything half written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from mechanic import distributed as D
from mechanic.files import locks_run_dir, partial_name, write_text
from mechanic.recipes.measures import recipe_measures
from mechanic.recipes.methods import StageOut, run_method
from mechanic.recipes.schema import Recipe, RecipeError, load_recipe


def key_of(*parts) -> str:
    """Content hash of JSON-able parts (sorted keys), 16 hex digits."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_task(spec):
    """The Task a TaskSpec names (a built-in suite or a file): its `split`, cut to [start, start + n)."""
    from mechanic.tasks.builtin import load_task as builtin

    if spec is None:
        return None
    if (spec.name is None) == (spec.file is None):
        raise RecipeError("task: give exactly one of `name` (a built-in suite) or `file` (a .jsonl/.csv path).")
    task = builtin(spec.name or spec.file, metric=spec.metric)
    if spec.split is not None:
        task = task.split(spec.split)
    task = task.subset(spec.n, spec.start)
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
        self.reads: list[dict] = []   # split reads (mechanic.tasks.guard); a reused stage restores its own

    def stage(self, name: str, key: str, title: str, fn: Callable[[Path], StageOut]) -> tuple[StageOut, Path]:
        """Run `fn(tmp_dir)` unless stages/<name>-<key> is finished; return its output and final directory."""
        final = self.out / "stages" / f"{name}-{key}"
        done = final / "done.json"
        if self.reuse and D.decide(done.is_file()):    # rank 0's view: every rank reuses, or none
            d = json.loads(done.read_text())
            out = StageOut(d["text"], d["figures"], d["data"], d["artifacts"])
            self.log(f"[{name}] reused {final.relative_to(self.out)} (finished earlier, same inputs)")
            if (final / "reads.json").is_file():   # a resumed run records the same reads as an uninterrupted one
                self.reads.extend(r for r in json.loads((final / "reads.json").read_text()) if r not in self.reads)
            return self._record(name, title, key, out, final, d["seconds"], reused=True)
        if D.is_main():
            tmp = final.with_name(f"{partial_name(final)}{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        else:                    # torchrun: the other ranks compute the same stage into scratch; rank 0 writes
            tmp = Path(tempfile.mkdtemp(prefix=f"mechanic-{name}-rank{D.rank()}-"))
        self.log(f"[{name}] {title} ...")
        t0 = time.perf_counter()
        n_reads = len(self.reads)
        try:
            out = D.run(fn, tmp)[D.rank()]     # a failed rank is named on every rank
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)   # an interrupted stage leaves nothing behind; a re-run redoes it
            raise
        seconds = time.perf_counter() - t0
        if D.is_main():
            write_text(tmp / "reads.json", json.dumps(self.reads[n_reads:], indent=1))
            write_text(tmp / "done.json", json.dumps({**out.to_dict(), "seconds": seconds, "key": key}, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        D.barrier()                           # later stages read rank 0's finished directory
        self.log(f"[{name}] done in {seconds:.1f} s")
        return self._record(name, title, key, out, final, seconds, reused=False)

    def _record(self, name, title, key, out: StageOut, final: Path, seconds: float, reused: bool):
        """Note a finished stage for results.json (a reused stage costs 0 s in this run's timings)."""
        self.timings[name] = 0.0 if reused else seconds
        self.stages.append({"name": name, "title": title, "key": key, "seconds": seconds, "reused": reused,
                            **out.to_dict(), "dir": str(final.relative_to(self.out))})
        return out, final


def _one_writer(fn):
    """locks_run_dir on rank 0 only: under torchrun the other ranks never write into the run directory."""
    locked = locks_run_dir(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return locked(*args, **kwargs) if D.is_main() else fn(*args, **kwargs)
    return wrapper


@_one_writer   # one writer per run directory; a killed run's half-written files are removed first
def run(recipe_path, out: str | os.PathLike, *, size: str | None = None, model: str | None = None,
        reuse: bool = True, log: Callable[[str], None] = print,
        report: Callable[[dict, Path], object] | None = None) -> dict:
    """Execute a recipe into `out` and return results (also written to out/results.json).

    `report(results, path)` writes out/report.html last, e.g. `mechanic.report.build_report` (the report
    layer sits above the recipes, so the caller hands it in; the CLI always does).

    locate, steer and control read the train split of the recipe's task (selections, the select stage
    included: validation splits); only the evaluation reads the test split (mechanic.tasks.guard enforces it and records reads).
    """
    import torch

    import mechanic
    from mechanic.recipes.evaluation import baseline_figures, run_evaluation, summary
    from mechanic.recipes.schema import random_method
    from mechanic.steer.plan import Plan
    from mechanic.tasks.guard import reading

    recipe, _ = load_recipe(recipe_path, size)
    if model:
        recipe = recipe.model_copy(update={"model": model})
    out = Path(out)
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "recipe.yaml", Path(recipe_path).read_text())
    torch.manual_seed(recipe.seed)
    t0 = time.perf_counter()
    m = mechanic.load(recipe.model)
    task, validation, eval_task = split_tasks(recipe)
    R = Runner(recipe, out, size, log, reuse)
    R.timings["load"] = time.perf_counter() - t0
    base = {"fingerprint": m.fingerprint, "task": recipe.task.model_dump() if recipe.task else None,
            "task_file": file_digest(recipe.task), "seed": recipe.seed, "version": mechanic.__version__,
            "splits": split_hashes(task, validation, eval_task)}
    reads: list[dict] = R.reads
    held_in = ("train", "validation")
    ctx = {"model": m, "task": task, "validation": validation, "seed": recipe.seed}

    def guarded(stage: str, allowed, fn):
        def inner(d: Path) -> StageOut:
            with reading(stage, allowed, reads):
                return fn(d)
        return inner

    locate_spec, dkey = dictionary_stage(R, recipe, m, base)
    lkey = key_of(base, "locate", recipe.locate.model_dump(), *([dkey] if dkey else []))   # old keys unchanged
    found, found_dir = R.stage("locate", lkey, f"Locate: {recipe.locate.method}", guarded(
        "locate", held_in, lambda d: run_method("locate", {**ctx, "dir": d}, locate_spec)))
    if "dictionary" in found.data:     # feature plans act inside the dictionaries: attached for steer and evaluation
        from mechanic.recipes.dictionaries import attach_dir, paths
        for path in paths(found.data["dictionary"]):
            attach_dir(m, path)
    steered = {**ctx, "found": found, "found_dir": found_dir}
    if recipe.steer.method in EDIT_METHODS:      # an edit's requests are its input; their evaluation prompts are not
        steered["task"] = edit_requests(eval_task)
    steer_spec, random_spec, choice_key = recipe.steer, recipe.baselines.random, None
    if recipe.select is not None:
        choice_key = key_of(base, "select", recipe.select.model_dump(), recipe.steer.model_dump(),
                            recipe.evaluate.model_dump(), lkey)
        chosen, _ = R.stage("select", choice_key, f"Select: {recipe.steer.method} settings on validation rows",
                            guarded("select", (*held_in, "request"), lambda d: select(recipe, m, steered, d)))
        steer_spec = recipe.steer.model_copy(update=chosen.data["choice"])
        if random_spec is not None:      # the random draws take the same count and strength as the plan
            random_spec = random_spec.model_copy(update=chosen.data["choice"])
    skey = key_of(base, "steer", steer_spec.model_dump(), lkey, choice_key)
    steer_out, steer_dir = R.stage("steer", skey, f"Steer: {recipe.steer.method}", guarded(
        "steer", (*held_in, "request"), lambda d: run_method("steer", {**steered, "dir": d}, steer_spec)))
    pages = feature_pages_stage(R, recipe, m, base, found, steer_out, lkey, skey, guarded)
    ckey = control_dir = None
    if recipe.control is not None:
        ckey = key_of(base, "control", recipe.control.model_dump(), lkey)
        _, control_dir = R.stage("control", ckey, f"Control: {recipe.control.method}", guarded(
            "control", (*held_in, "request"), lambda d: run_method("control", {**steered, "dir": d}, recipe.control)))

    def random_plans(d: Path):
        """The random baseline's plans, one per seed, built like the steer stage (held-in rows only)."""
        spec = random_method(random_spec)
        for i in range(random_spec.draws):
            sub = d / f"random-{i}"
            sub.mkdir()
            with reading("baselines", (*held_in, "request"), reads):
                run_method("control", {**steered, "seed": i, "dir": sub}, spec)
            yield Plan.load(sub / "plan.safetensors")

    method_dirs, mkeys = [], []
    for spec in recipe.baselines.methods:       # other methods on the same inputs, each its own cached stage
        mkey = key_of(base, "method", spec.model_dump(), lkey)
        _, mdir = R.stage(f"baseline-{spec.method}", mkey, f"Baseline method: {spec.method}", guarded(
            "baselines", (*held_in, "request"), lambda d, spec=spec: run_method("steer", {**steered, "dir": d}, spec)))
        method_dirs.append((spec, mdir))
        mkeys.append(mkey)

    def evaluation(d: Path) -> StageOut:
        plan = Plan.load(steer_dir / "plan.safetensors")
        cplan = Plan.load(control_dir / "plan.safetensors") if control_dir is not None else None
        others = [(spec.method, spec.model_dump(exclude={"method"}), Plan.load(mdir / "plan.safetensors"))
                  for spec, mdir in method_dirs]
        with reading("evaluate", None, reads):      # measures load their rows here (refusal: the test split)
            res = run_evaluation(recipe, m, recipe_measures(recipe.evaluate, m, eval_task), plan, cplan,
                                 (lambda: random_plans(d)) if random_spec else None, others)
        write_text(d / "evaluation.json", json.dumps(res.data, indent=1))
        return res

    baselines = recipe.baselines.model_dump(exclude=set() if recipe.baselines.methods else {"methods"})  # old keys kept
    ekey = key_of(base, "evaluate", recipe.evaluate.model_dump(), baselines, file_digest(recipe.evaluate.task), skey,
                  ckey, None if random_spec is None else random_spec.model_dump(), *mkeys)
    ev_out, _ = R.stage("evaluate", ekey, "Improve: before / after evaluation with baselines", evaluation)
    data = ev_out.data
    results = {"mechanic": mechanic.__version__, "recipe": recipe.model_dump(mode="json"),
               "manifest": {**manifest(m, recipe, size, R.timings), "splits": base["splits"], "reads": reads},
               "summary": summary(recipe, R.stages, data),
               "stages": [s for s in R.stages if s["name"] not in ("evaluate", "features")],
               "evaluation": data["evaluation"], "verdict": data["verdict"], "verdict_figures": baseline_figures(data)}
    for k in ("control", "control_verdict", "baselines"):
        if k in data:
            results[k] = data[k]
    if pages is not None:
        results["feature_pages"] = pages
    if not D.is_main():                   # torchrun: rank 0 writes results, manifest and report
        return results
    # results.json first: it holds the manifest too, so a failed write (a full disk) leaves the previous pair
    write_text(out / "results.json", json.dumps(results, indent=1))
    write_text(out / "manifest.json", json.dumps(results["manifest"], indent=1))
    if report is not None:
        report(results, out / "report.html")
        log(f"report: {out / 'report.html'}")
    return results


EDIT_METHODS = ("rome", "memit", "alphaedit", "ft", "lora")


def dictionary_stage(R: Runner, recipe: Recipe, m, base: dict):
    """(locate spec, key): a `dictionary: {train: ...}` is trained in its own cached stage and replaced by the
    trained directory; a `dictionary: PATH` (or graph_features' `transcoders: DIR`) keys on its files' digest
    (recipes.dictionaries)."""
    from mechanic.recipes.dictionaries import digest, train_spec, train_stage

    given = recipe.locate.model_dump().get("dictionary")
    if given is None:
        transcoders = recipe.locate.model_dump().get("transcoders")
        return recipe.locate, (digest(transcoders, "transcoders") if transcoders is not None else None)
    spec = train_spec(recipe.locate)
    if spec is None:
        return recipe.locate, digest(given)
    dkey = key_of(base["fingerprint"], base["seed"], base["version"], "dictionary", spec.model_dump())
    out, d = R.stage("dictionary", dkey, f"Train a {spec.arch} dictionary on {spec.site}",
                     lambda tmp: train_stage(m, spec, tmp, recipe.seed))
    return recipe.locate.model_copy(update={"dictionary": str(d / out.data["path"])}), dkey


def feature_pages_stage(R: Runner, recipe: Recipe, m, base: dict, found: StageOut, steer_out: StageOut,
                        lkey: str, skey: str, guarded) -> dict | None:
    """The `features` stage when the plan acts on dictionary latents (or locate ranked them): pages of the steered
    and top located latents on held-out prose (recipes.feature_pages); None otherwise. Its result goes to
    results["feature_pages"] (not `stages`), with the stage's key, time and paragraph under "stage"."""
    from mechanic.recipes.dictionaries import train_spec
    from mechanic.recipes.feature_pages import page_tokens, pages_stage, text_source, wanted

    want = wanted(found, steer_out)
    if want is None:
        return None
    spec = train_spec(recipe.locate)
    tokens = page_tokens(None if spec is None else spec.tokens)
    where = {k: v for k, v in want.items() if k != "dictionary"}     # lkey names the dictionary, not its path
    key = key_of(base, "features", where, tokens, text_source()[1], lkey, skey)
    out, _ = R.stage("features", key, "Features: pages of the steered and located latents", guarded(
        "features", ("train", "validation"), lambda tmp: pages_stage(m, want, tokens, tmp)))
    st = R.stages[-1]
    return {**out.data, "stage": {k: st[k] for k in ("key", "seconds", "reused", "dir", "text")}}


def select(recipe: Recipe, m, steered: dict, d: Path) -> StageOut:
    """The select stage: candidates judged on the evaluation task's validation split and the side suites'
    validation rows (recipes.selection)."""
    from mechanic.recipes.selection import run_selection

    ev = evaluation_spec(recipe)
    task = None if ev is None else load_task(ev.model_copy(update={"split": "validation"}))
    return run_selection(recipe, m, steered, recipe_measures(recipe.evaluate, m, task, selection=True), d)


def evaluation_spec(recipe: Recipe):
    """The evaluation task's spec: evaluate.task, default the whole of the recipe's task (its n/start cut train only)."""
    if recipe.evaluate.task is not None or recipe.task is None:
        return recipe.evaluate.task
    return recipe.task.model_copy(update={"n": None, "start": 0, "split": None})


def split_tasks(recipe: Recipe):
    """(train task, validation task, test task) of a recipe: `task` defaults to its train split, the
    validation task is the same suite's validation split, and evaluate.task (default: the same suite)
    its test split; `n`/`start` of `task` cut the train split only."""
    ev = evaluation_spec(recipe)
    test = None if ev is None else load_task(_with_split(ev, "test"))
    if recipe.task is None:
        return None, None, test
    whole = recipe.task.model_copy(update={"n": None, "start": 0, "split": None})
    return load_task(_with_split(recipe.task, "train")), load_task(_with_split(whole, "validation")), test


def _with_split(spec, default: str):
    return spec.model_copy(update={"split": spec.split or default})


def edit_requests(task):
    """The rows an editing method may read: prompt, subject and new target, without the evaluation prompts."""
    from mechanic.tasks.task import Task

    drop = ("paraphrases", "neighborhood")
    ex = [replace(e, split="request", meta={k: v for k, v in e.meta.items() if k not in drop}) for e in task.examples]
    return Task(task.name, ex, task.metric, task.description)


def split_hashes(*tasks) -> dict:
    """sha256 of each task's rows (prompt, answers, corrupted prompt, split), keyed by name and split."""
    out = {}
    for t in tasks:
        if t is None:
            continue
        rows = [[e.prompt, e.answer, e.wrong, e.corrupted, e.split] for e in t.examples]
        split = sorted({str(r[-1]) for r in rows})
        out[f"{t.name}:{'+'.join(split)}"] = {"rows": len(rows), "sha256": hashlib.sha256(
            json.dumps(rows, sort_keys=True).encode()).hexdigest()}
    return out
