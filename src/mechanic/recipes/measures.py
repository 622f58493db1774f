"""Measures a recipe's `evaluate` block can name, built for the model and the evaluation task."""

from __future__ import annotations

from mechanic.recipes.schema import RecipeError

TARGETS = ("task", "edit", "perplexity", "refusal_harmful", "refusal_harmless")
SIDE = ("perplexity", "kl", "fluency", "suites")


def _refusal(name: str, kind: str, size: str, split: str):
    from mechanic.improve.refusal import RefusalMeasure, instructions

    which = name.split("_", 1)[1]
    rows = instructions(which, split=split)               # test: 32 per set, 4 per category
    m = RefusalMeasure(rows[::2] if size == "small" else rows, kind=kind, name=name)
    way = "higher" if which == "harmful" else "lower"
    m.better = {**m.better, "refusal": way, "declined": way}
    return m


def target_measures(names: list[str], model, task, better: str | None, size: str, contrast: bool = False,
                    split: str = "test") -> list:
    """The measures of the behaviour the plan should change (`split`: the refusal sets' rows to read)."""
    from mechanic.improve.evaluate import EditMeasure, TaskMeasure
    from mechanic.steer.edit import facts_from_task

    out = []
    for name in names:
        if name == "task":
            if task is None:
                raise RecipeError("evaluate.target names 'task' but the recipe has no task; add `task:`.")
            same = len({e.answer for e in task.examples}) == 1      # one answer for all: accuracy says nothing
            m = TaskMeasure(task, [task.metric] if same else None, kind="target", contrast=contrast)
            if better:
                m.better = {k: better if "accuracy" not in k or better == "higher" else "none" for k in m.better}
            out.append(m)
        elif name == "edit":
            out.append(EditMeasure(facts_from_task(task), kind="target"))
        elif name == "perplexity":
            from mechanic.improve.evaluate import PerplexityMeasure
            m = PerplexityMeasure()
            m.kind = "target"
            out.append(m)
        elif name.startswith("refusal_"):
            out.append(_refusal(name, "target", size, split))
        else:
            raise RecipeError(f"evaluate.target {name!r} is not a measure; choose from {', '.join(TARGETS)}.")
    return out


def side_measures(spec, model, exclude: list[str], selection: bool = False) -> list:
    """Side effects: the default set (perplexity, KL, fluency, other suites) or the named ones.

    `selection=True` gives what a selection may read (validation rows, calibration prose), else what
    the evaluation reads (see improve.evaluate.default_side_effects).
    """
    from mechanic.improve.evaluate import default_side_effects
    from mechanic.tasks.builtin import list_tasks

    exclude = [x for x in exclude if x in list_tasks()]   # a user's task file is not among the built-in suites
    if spec.side_effects == "none":
        return []
    every = default_side_effects(model, exclude=exclude, size=spec.size, selection=selection)
    if spec.side_effects == "default":
        return every
    out = []
    for name in spec.side_effects:
        if name in ("perplexity", "kl", "fluency"):
            out += [m for m in every if m.name == name]
        elif name == "suites":
            out += [m for m in every if m.name not in ("perplexity", "kl", "fluency")]
        else:
            raise RecipeError(f"evaluate.side_effects {name!r} is not a measure; choose 'default', 'none' or a "
                              f"list of {', '.join(SIDE)}.")
    return out


def recipe_measures(spec, model, task, selection: bool = False) -> list:
    """An evaluate block's targets on `task` and its side effects (the target's suite excluded): what the
    evaluation reads, or with `selection=True` what a selection may read (validation rows)."""
    exclude = [task.name] if task is not None else []
    split = "validation" if selection else "test"
    return (target_measures(spec.target, model, task, spec.better, spec.size, spec.contrast, split=split)
            + side_measures(spec, model, exclude, selection=selection))
