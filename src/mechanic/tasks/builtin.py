"""The built-in task suites shipped as JSONL under mechanic/tasks/suites (see docs/TASKS.md)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from mechanic.tasks.io import from_jsonl, load_file
from mechanic.tasks.task import Task, TaskError

# name: (default metric, one-line description)
SUITES: dict[str, tuple[str, str]] = {
    "ioi": ("logit_diff", "Indirect object identification: 'When Mary and John went to the store, John gave a "
                          "drink to' -> ' Mary' vs ' John'; ABBA and BABA; corrupted = S2 replaced by a third name."),
    "facts": ("logit_diff", "Factual recall in CounterFact form: true target vs a counterfactual target, with "
                            "paraphrases and neighbourhood prompts in meta."),
    "facts_large": ("logit_diff", "Facts in CounterFact form for editing at scale: more relations and subjects "
                                  "than facts, paraphrases and neighbourhood prompts, no corrupted prompts."),
    "greater_than": ("prob_diff", "Greater-than: 'from the year 1732 to the year 173' -> a digit > 2 "
                                  "(probability mass above minus at-or-below), plus few-shot one-digit sums."),
    "gender": ("logit_diff", "Profession -> pronoun: logit(stereotyped pronoun) - logit(other); a bias score, "
                             "not an accuracy task."),
    "sentiment": ("logit_diff", "Positive review -> ' great' vs ' terrible'; corrupted = the negative version "
                                "with the same token length."),
    "icl_labels": ("logit_diff", "In-context label learning with arbitrary labels foo/bar; corrupted = label "
                                 "mapping swapped in the demonstrations."),
}

# Suites whose accuracy is a two-way choice: the answer is a label word the model rarely ranks first over the
# whole vocabulary (SmolLM2's top token after "... In short, it was" is " a"), so top-1 accuracy is 0 whatever
# a plan does, a protected row that can never move; whether the right label beats the wrong one can.
ACCURACY = {"sentiment": "pair_accuracy"}


def accuracy_metric(name: str) -> str:
    """The accuracy a TaskMeasure reports for a suite: top-1 ("accuracy"), or a two-way choice (see ACCURACY)."""
    return ACCURACY.get(name, "accuracy")


def list_tasks() -> list[str]:
    """Names of the built-in suites."""
    return list(SUITES)


def suite_path(name: str) -> Path:
    """The JSONL file of a built-in suite."""
    _check(name)
    return Path(str(resources.files("mechanic.tasks") / "suites" / f"{name}.jsonl"))


def load_task(name: str, n: int | None = None, metric: str | None = None, split=None) -> Task:
    """A built-in suite by name, or a task file (.jsonl/.csv) by path. `split` ("train", "validation", "test"
    or a list of them) keeps only those rows (Task.split; entity-disjoint for the built-in suites); then the
    first n rows if n is given. split=None: every row, in file order."""
    if name not in SUITES and Path(name).suffix.lower() in (".jsonl", ".json", ".ndjson", ".csv", ".tsv"):
        task = load_file(name, **({"metric": metric} if metric else {}))
        return _pick(task, n, split)
    _check(name)
    default, description = SUITES[name]
    path = suite_path(name)
    if not path.is_file():
        raise TaskError(f"The data file of the built-in task {name!r} is missing ({path}); the package was "
                        "installed without its suites/*.jsonl files. Reinstall mechanic, or rebuild them with "
                        "`python scripts/build_suites.py` in a source checkout.")
    task = from_jsonl(path, name=name, metric=metric or default, description=description)
    return _pick(task, n, split)


def _pick(task: Task, n: int | None, split) -> Task:
    task = task.split(split) if split is not None else task
    return task.subset(n) if n is not None else task


def _check(name: str) -> None:
    if name not in SUITES:
        raise TaskError(f"Unknown task {name!r}. Built-in tasks: {', '.join(SUITES)}. To use your own, pass a "
                        ".jsonl or .csv path, or load it with mechanic.tasks.from_jsonl / from_csv.")
