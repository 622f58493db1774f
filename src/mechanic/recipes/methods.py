"""The registry of recipe methods: each locate / steer method has a settings model and a function.

A method takes a `Context` (model, task, settings, the stage's directory, what earlier stages found)
and returns a `StageOut`: a paragraph for the report, figures (docs/RUNS.md schema), JSON `data` the
next stage reads (a layer, sites, a coefficient) and artifact files written into the stage directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from mechanic.recipes.schema import RecipeError, Strict, describe

LOCATE: dict[str, tuple[type[Strict], Callable]] = {}
STEER: dict[str, tuple[type[Strict], Callable]] = {}


@dataclass
class StageOut:
    """What one stage hands to the report and to the stages after it."""

    text: str = ""
    figures: list[dict] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)   # name -> file name inside the stage directory

    def to_dict(self) -> dict:
        return {"text": self.text, "figures": self.figures, "data": self.data, "artifacts": self.artifacts}


@dataclass
class Context:
    """Everything a method may use: `task` is the train split, `validation` the split selections are made on;
    `found` is the locate stage's output and `found_dir` its directory."""

    model: object
    task: object
    settings: Strict
    dir: Path
    seed: int = 0
    validation: object = None
    found: StageOut | None = None
    found_dir: Path | None = None


def method(registry: dict, name: str, settings: type[Strict]):
    """Register `fn` under `name` with its settings model."""
    def deco(fn):
        registry[name] = (settings, fn)
        return fn
    return deco


def registry(stage: str) -> dict:
    return LOCATE if stage == "locate" else STEER


def _load_all() -> None:
    from mechanic.recipes import locate_methods, steer_methods  # noqa: F401  (they register themselves)


def settings_for(stage: str, spec, path: str = "<recipe>", root=None) -> Strict:
    """The validated settings of a stage's `method`; unknown methods and bad settings name the file and line."""
    _load_all()
    reg = registry(stage)
    key = "steer" if stage == "control" else stage
    if spec.method not in reg:
        from mechanic.recipes.schema import _node_line
        line = _node_line(root, (stage, "method")) if root is not None else None
        where = f"{path}:{line}" if line else path
        raise RecipeError(f"{where}: {stage}.method {spec.method!r} is not a {key} method; choose one of "
                          f"{', '.join(sorted(reg))}.")
    model, _ = reg[spec.method]
    try:
        return model.model_validate({k: v for k, v in spec.model_dump().items() if k != "method"})
    except ValidationError as e:
        raise RecipeError(f"{path}: settings of {stage} method {spec.method!r} are not valid:\n"
                          f"{describe(e, path, root, (stage,))}") from None



def run_method(stage: str, ctx_args: dict, spec) -> StageOut:
    """Validate the settings and call the method."""
    settings = settings_for(stage, spec)
    _, fn = registry(stage)[spec.method]
    return fn(Context(settings=settings, **ctx_args))


# ---------------------------------------------------------------- figures shared by methods
def scores_heatmap(scores, fid: str, title: str, xlabel: str = "position", ylabel: str = "layer",
                   colorbar: str = "") -> dict:
    """A heatmap figure of a Scores object (layer x position, or layer x head/neuron)."""
    import math

    from mechanic.locate.plot import grid

    g, rows, cols = grid(scores)
    z = [[None if math.isnan(v) else round(v, 6) for v in row] for row in g.tolist()]
    return {"kind": "heatmap", "id": fid, "title": title, "x": [str(c) for c in cols], "y": [str(r) for r in rows],
            "z": z, "xlabel": xlabel, "ylabel": ylabel, "zmid": 0, "colorbar": colorbar or scores.metric or ""}


def table(fid: str, title: str, columns: list[str], rows: list[list]) -> dict:
    """A table figure; floats rounded for reading."""
    fmt = lambda v: round(v, 5) if isinstance(v, float) else v  # noqa: E731
    return {"kind": "table", "id": fid, "title": title, "columns": columns, "rows": [[fmt(v) for v in r] for r in rows]}
