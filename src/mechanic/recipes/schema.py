"""The YAML recipe format, validated with pydantic; a mistake names the file, the line and what was expected.

A recipe is one locate -> steer -> improve loop:

    name: fact-editing
    title: "Fact editing: causal tracing -> ROME -> CounterFact"
    model: smollm2
    seed: 0
    task: {name: facts, n: 8}
    locate: {method: causal_trace, samples: 5}
    steer: {method: rome}
    evaluate: {target: [edit], side_effects: default}
    sizes:
      ci: {task: {n: 2}}          # `mechanic run --size ci` merges this over the recipe

`locate` and `steer` take `method` plus that method's settings (checked against the method's own
model in mechanic.recipes.methods); `control`, when given, is a second steer evaluated the same way
(a baseline the result should beat, e.g. ablating random heads).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class RecipeError(ValueError):
    """A recipe that cannot be run as written: the message says where and what was expected."""


class Strict(BaseModel):
    """Unknown keys are mistakes (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


class TaskSpec(Strict):
    """A built-in suite by name or a JSONL/CSV file, optionally the first n examples from `start`."""

    name: str | None = None
    file: str | None = None
    n: int | None = Field(None, ge=1)
    start: int = Field(0, ge=0)
    metric: str | None = None
    side: Literal["clean", "corrupted"] = "clean"   # corrupted: score the corrupted prompts (e.g. negative reviews)
    answer: str | None = None      # the same answer for every example (e.g. " bar": logit_diff becomes a label bias)
    wrong: str | None = None       # the same wrong answer for every example
    label: str | None = None       # a name for the task so changed (kept apart from the built-in suite's name)
    split: Literal["train", "validation", "test"] | None = None   # default: train for `task`, test for evaluate.task


class MethodSpec(BaseModel):
    """`method` plus the method's settings (validated by the method's own settings model)."""

    model_config = ConfigDict(extra="allow")
    method: str


class MarginSpec(Strict):
    """How much worse a protected row may get: max_worse in its units, or as a fraction of its before value."""

    max_worse: float = Field(ge=0)
    relative: bool = False


class EvaluateSpec(Strict):
    """Which measures are targets, which side effects run, and how the statistics are computed."""

    target: list[str] = ["task"]
    task: TaskSpec | None = None          # held-out examples to evaluate on (default: the recipe's task)
    side_effects: Literal["default", "none"] | list[str] = "default"
    size: Literal["small", "full"] = "small"
    better: Literal["higher", "lower"] | None = None   # override for the task measure's direction
    contrast: bool = False         # score the task as metric(clean) - metric(corrupted) per example (bias suites)
    n_boot: int = Field(2000, ge=100)
    level: float = Field(0.95, gt=0, lt=1)
    protect: dict[str, MarginSpec] = {}   # row-id pattern -> margin, over mechanic.improve.verdict.DEFAULT_MARGINS


class RandomSpec(MethodSpec):
    """The random-components baseline: a steer method (its random variant) run `draws` times with seeds 0..draws-1."""

    draws: int = Field(20, ge=1)


class BaselinesSpec(Strict):
    """Baselines evaluated beside the plan on the same test split: a prompt prefix, random components, and other
    steer methods on the same inputs (e.g. MEMIT, ROME, FT-L and LoRA beside AlphaEdit), each with its own verdict."""

    prompt: str | None = None       # an instruction or few-shot prefix asking for the target behaviour
    random: RandomSpec | None = None
    methods: list[MethodSpec] = []


class SelectSpec(Strict):
    """Steer settings to choose on validation rows: every combination of `grid` values is one candidate."""

    grid: dict[str, list] = Field(min_length=1)   # steer setting -> values to try, e.g. {count: [1, 3, 10]}


class Recipe(Strict):
    """One locate -> steer -> improve loop on one model and task."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    title: str
    description: str = ""
    model: str = "smollm2"
    seed: int = 0
    task: TaskSpec | None = None
    locate: MethodSpec
    steer: MethodSpec
    select: SelectSpec | None = None      # steer settings chosen on validation rows (recipes.selection)
    control: MethodSpec | None = None
    baselines: BaselinesSpec = BaselinesSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    sizes: dict[str, dict] = {}


def merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base`, dict by dict (lists and scalars are replaced)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _node_line(node, loc: tuple) -> int | None:
    """1-based line of the YAML node at pydantic location `loc` (the deepest one that exists)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == str(key)), None)
            if nxt is None:
                key_node = next((k for k, _ in node.value if k.value == str(key)), None)
                return key_node.start_mark.line + 1 if key_node is not None else line
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        line = node.start_mark.line + 1
    return line


def describe(e: ValidationError, path: str, root=None, prefix: tuple = ()) -> str:
    """One paragraph per mistake: file:line, the key path, what pydantic expected and what was given."""
    out = []
    for err in e.errors():
        loc = prefix + tuple(x for x in err["loc"] if not (isinstance(x, str) and "[" in x))
        line = _node_line(root, loc) if root is not None else None
        where = f"{path}:{line}" if line else path
        key = ".".join(str(x) for x in loc) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (a typo? remove it or check the spelling against docs/RECIPES.md)"
        given = f" (given: {err['input']!r})" if err["type"] not in ("missing", "extra_forbidden") else ""
        out.append(f"{where}: {key}: {msg}{given}")
    return "\n".join(out)


def parse(text: str, path: str = "<recipe>") -> tuple[dict, object]:
    """The YAML mapping and its node tree (for line numbers); a YAML syntax error names its line."""
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise RecipeError(f"{where}: this is not valid YAML ({getattr(e, 'problem', e)}). Check the indentation "
                          "and quoting on that line.") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with name, title, locate, steer, ...; got "
                          f"{type(data).__name__}. See docs/RECIPES.md for the format.")
    return data, root


def load_recipe(path: str | Path, size: str | None = None) -> tuple[Recipe, dict]:
    """Read and validate a recipe file (merging `sizes[size]` when given); returns (recipe, raw mapping)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"No recipe file at {path}. Give a .yaml path, or a bundled recipe name "
                          "(`mechanic run --list` shows them).")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8.") from None
    data, root = parse(text, str(path))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{path} does not describe a valid recipe:\n{describe(e, str(path), root)}") from None
    if size is not None:
        if size not in recipe.sizes:
            raise RecipeError(f"{path} has no size {size!r} (it has: {', '.join(recipe.sizes) or 'none'}). "
                              "Add it under `sizes:` or run without --size.")
        data = merge({k: v for k, v in data.items() if k != "sizes"}, recipe.sizes[size])
        data["sizes"] = recipe.sizes
        try:
            recipe = Recipe.model_validate(data)
        except ValidationError as e:
            raise RecipeError(f"{path}: sizes.{size} makes the recipe invalid:\n"
                              f"{describe(e, str(path), root, ('sizes', size))}") from None
    from mechanic.recipes.methods import settings_for
    for stage in ("locate", "steer", "control"):
        spec = getattr(recipe, stage)
        if spec is not None:
            settings_for(stage, spec, str(path), root)
    if recipe.baselines.random is not None:
        settings_for("control", random_method(recipe.baselines.random), str(path), root)
    return recipe, data


def random_method(spec: RandomSpec) -> MethodSpec:
    """The steer method of a random baseline, without the baseline's own `draws` setting."""
    return MethodSpec.model_validate({k: v for k, v in spec.model_dump().items() if k != "draws"})

