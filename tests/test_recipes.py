"""Recipes: validation with file:line errors, the resumable content-addressed runner, and the CLI around them."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mechanic.cli import app
from mechanic.recipes import list_recipes, recipe_path
from mechanic.recipes.schema import RecipeError, load_recipe

BUNDLED = ["efficiency", "fact-editing", "fact-editing-at-scale", "gender-bias", "gender-bias-features", "icl-heads",
           "ioi-circuit", "safety-refusal", "sentiment-steering"]
CHEAP = """\
name: cheap
title: "Gender neurons, tiny"
task: {name: gender, n: 6}
locate: {method: neuron_attribution, top_k: 4, keep: 2}
steer: {method: neuron_edit, factor: 0.0}
evaluate: {target: [task], better: lower, contrast: true, task: {name: gender, n: 8}, side_effects: [kl],
           n_boot: 200}
"""


def write(tmp_path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_every_bundled_recipe_validates_at_both_sizes():
    assert list_recipes() == BUNDLED
    for name in BUNDLED:
        recipe, _ = load_recipe(recipe_path(name))
        assert recipe.name == name
        small, _ = load_recipe(recipe_path(name), "ci")
        assert small.model_dump() != recipe.model_dump()


@pytest.mark.parametrize("bad, line, words", [
    (CHEAP.replace("top_k: 4", "top_kk: 4"), 4, ["locate.top_kk", "unknown key"]),
    (CHEAP.replace("factor: 0.0", "factor: lots"), 5, ["steer.factor", "number"]),
    (CHEAP.replace("neuron_edit", "neuron_surgery"), 5, ["steer.method", "neuron_surgery", "rome"]),
    (CHEAP.replace("n: 6", "n: 0"), 3, ["task.n", "greater than or equal to 1"]),
    (CHEAP.replace("side_effects: [kl]", "side_effect: [kl]"), 6, ["evaluate.side_effect", "unknown key"]),
    (CHEAP.replace("title: ", "title: [unclosed"), 3, ["not valid YAML"]),
    (CHEAP.replace("name: cheap", "name: Not A Slug"), 1, ["name", "pattern"]),
])
def test_mistakes_name_the_file_line_and_what_was_expected(tmp_path, bad, line, words):
    p = write(tmp_path, bad)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert f"{p}:{line}" in msg, msg
    for w in words:
        assert w in msg, msg


def test_unknown_size_and_missing_file_are_clear(tmp_path):
    with pytest.raises(RecipeError, match="has no size 'huge'"):
        load_recipe(write(tmp_path, CHEAP), "huge")
    with pytest.raises(RecipeError, match="bundled recipe"):
        recipe_path("no-such-recipe")


def test_cli_bad_recipe_is_one_paragraph_without_traceback(tmp_path):
    p = write(tmp_path, CHEAP.replace("top_k: 4", "top_kk: 4"))
    res = CliRunner().invoke(app, ["run", str(p), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "Traceback" not in res.output and f"{p}:4" in res.output
    res = CliRunner().invoke(app, ["run", "--list"])
    assert res.exit_code == 0 and all(n in res.output for n in BUNDLED)


def stage_dirs(out: Path) -> dict[str, Path]:
    return {d.name.split("-")[0]: d for d in (out / "stages").iterdir()}


@pytest.mark.real
def test_runner_writes_reuses_and_resumes(tmp_path, monkeypatch):
    from mechanic.recipes.runner import run
    from mechanic.report import build_report

    recipe = write(tmp_path, CHEAP)
    out = tmp_path / "run"
    logs = []
    res = run(recipe, out, log=logs.append, report=build_report)
    for f in ("recipe.yaml", "manifest.json", "results.json", "report.html"):
        assert (out / f).is_file(), f
    man = json.loads((out / "manifest.json").read_text())
    assert man["model"]["fingerprint"] and man["versions"]["torch"] and man["seeds"]["recipe"] == 0
    assert set(stage_dirs(out)) == {"locate", "steer", "evaluate"}
    assert all((d / "done.json").is_file() for d in stage_dirs(out).values())
    assert (stage_dirs(out)["steer"] / "plan.safetensors").is_file()
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    # the train split located, the test split (disjoint professions) evaluated, and the manifest says so
    assert {k.split(":")[1] for k in man["splits"]} == {"train", "validation", "test"}
    assert {(x["stage"], tuple(x["splits"])) for x in man["reads"]} == {("locate", ("train",)),
                                                                        ("evaluate", ("test",))}
    row = next(r for r in res["evaluation"]["rows"] if r["id"] == "gender.logit_diff")
    assert row["after"]["mean"] < row["before"]["mean"]          # the selected neurons carried the stereotype

    # same inputs: every stage is reused, the numbers are identical
    logs.clear()
    again = run(recipe, out, log=logs.append)
    assert sum("reused" in m for m in logs) == 3
    assert again["evaluation"]["rows"] == res["evaluation"]["rows"]

    # a changed evaluate setting re-runs only the evaluation (content-addressed keys)
    logs.clear()
    run(write(tmp_path, CHEAP.replace("n_boot: 200", "n_boot: 300"), "r300.yaml"), out, log=logs.append)
    assert [m.split("]")[0] for m in logs if "reused" in m] == ["[locate", "[steer"]

    # interrupted during evaluation: finished stages stay, nothing half written, the re-run resumes
    out2 = tmp_path / "run2"
    import mechanic.improve.evaluate as E

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(E, "evaluate", boom)
    with pytest.raises(KeyboardInterrupt):
        run(recipe, out2, log=logs.append)
    assert set(stage_dirs(out2)) == {"locate", "steer"} and not (out2 / "results.json").exists()
    assert not [p for p in (out2 / "stages").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    logs.clear()
    resumed = run(recipe, out2, log=logs.append)
    assert [m.split("]")[0] for m in logs if "reused" in m] == ["[locate", "[steer"]
    assert resumed["evaluation"]["rows"] == res["evaluation"]["rows"]


@pytest.mark.real
def test_report_command_rebuilds_from_results(tmp_path):
    from mechanic.recipes.runner import run

    out = tmp_path / "run"
    run(write(tmp_path, CHEAP), out, log=lambda m: None)
    assert not (out / "report.html").exists()
    res = CliRunner().invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "report.html").stat().st_size > 100_000
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "results.json" in res.output


def test_split_guard_refuses_test_rows_outside_the_evaluation():
    from mechanic.tasks.builtin import load_task
    from mechanic.tasks.guard import SplitError, check, reading

    gender = load_task("gender")
    log: list = []
    with reading("locate", {"train", "validation"}, log):
        check("task 'gender'", [e.split for e in gender.split("validation").examples])
        with pytest.raises(SplitError, match="locate stage read .* test split"):
            check("task 'gender'", [e.split for e in gender.split("test").examples])
    with reading("evaluate", None, log):
        check("task 'gender'", [e.split for e in gender.split("test").examples])
    assert log == [{"stage": "locate", "source": "task 'gender'", "splits": ["validation"]},
                   {"stage": "locate", "source": "task 'gender'", "splits": ["test"]},
                   {"stage": "evaluate", "source": "task 'gender'", "splits": ["test"]}]
    check("outside any stage", ["test"])          # library use is unrestricted and unrecorded
    assert len(log) == 3


@pytest.mark.real
def test_runner_stops_a_locate_stage_that_reads_the_test_split(tmp_path):
    from mechanic.recipes.runner import run
    from mechanic.tasks.guard import SplitError

    leaky = CHEAP.replace("task: {name: gender, n: 6}", "task: {name: gender, n: 6, split: test}")
    with pytest.raises(SplitError, match="test split"):
        run(write(tmp_path, leaky), tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "run" / "results.json").exists()


def test_declared_margins_reach_the_verdict():
    from mechanic.improve.verdict import Margin, resolve_margins
    from mechanic.recipes.schema import load_recipe

    recipe, _ = load_recipe(recipe_path("fact-editing"))
    declared = {k: v.model_dump() for k, v in recipe.evaluate.protect.items()}
    rows = [{"id": "edit.neighborhood", "kind": "target", "better": "higher"},
            {"id": "edit.efficacy", "kind": "target", "better": "higher"},
            {"id": "ioi.accuracy", "kind": "side", "better": "higher"}]
    m = resolve_margins(declared, rows)
    assert m == {"edit.neighborhood": Margin(0.05), "ioi.accuracy": Margin(0.02)}


@pytest.mark.real
def test_baseline_methods_are_evaluated_beside_the_plan(tmp_path):
    """baselines.methods: another steer method on the same inputs, its own cached stage, evaluated on the same rows
    with the same margins; its rows equal evaluating its saved plan by hand."""
    import mechanic
    from mechanic.improve.evaluate import evaluate
    from mechanic.recipes.measures import recipe_measures
    from mechanic.recipes.runner import run, split_tasks
    from mechanic.steer.plan import Plan

    text = CHEAP + "baselines: {methods: [{method: neuron_edit, factor: 0.5}]}\n"
    out = tmp_path / "run"
    res = run(write(tmp_path, text), out)
    (m,) = res["baselines"]["methods"]
    assert m["method"] == "neuron_edit" and m["settings"]["factor"] == 0.5 and m["verdict"]["label"]
    assert [s["name"] for s in res["stages"]] == ["locate", "steer", "baseline-neuron_edit"]
    assert {(x["stage"], tuple(x["splits"])) for x in res["manifest"]["reads"]} == {
        ("locate", ("train",)), ("evaluate", ("test",))}
    recipe = load_recipe(out / "recipe.yaml")[0]
    model = mechanic.load(recipe.model)
    plan = Plan.load(stage_dirs(out)["baseline"] / "plan.safetensors")
    ev = evaluate(model, plan, recipe_measures(recipe.evaluate, model, split_tasks(recipe)[2]), seed=0, n_boot=200)
    by = {r["id"]: r for r in ev.to_dict()["rows"]}
    for r in m["evaluation"]["rows"]:
        assert abs(r["after"]["mean"] - by[r["id"]]["after"]["mean"]) < 1e-6, r["id"]
