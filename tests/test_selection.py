"""The select stage: steer settings chosen on validation rows by the Pareto rule, never on the test split."""

import pytest

from mechanic.recipes.selection import candidates, choose

CHEAP = """\
name: cheap-select
title: "Gender neurons, tiny, with a selection"
task: {name: gender, n: 6}
locate: {method: neuron_attribution, top_k: 4, keep: 3}
steer: {method: neuron_edit, factor: 0.0}
select: {grid: {count: [1, 3], factor: [0.0, 1.0]}}
baselines: {random: {method: neuron_edit, factor: 0.0, random: true, draws: 2}}
evaluate: {target: [task], better: lower, contrast: true, task: {name: gender, n: 8}, side_effects: [kl],
           n_boot: 200}
"""


def test_candidates_are_every_combination_in_grid_order():
    assert candidates({"count": [1, 3], "factor": [0.0, 0.5]}) == [
        {"count": 1, "factor": 0.0}, {"count": 1, "factor": 0.5}, {"count": 3, "factor": 0.0},
        {"count": 3, "factor": 0.5}]


def test_choice_prefers_helped_then_fewest_costs_then_gain():
    t = lambda label, costs, gain: {"label": label, "costs": costs, "gain": gain}  # noqa: E731
    # a helped candidate beats a larger improvement that costs something
    assert choose([t("improved at a cost", ["ioi.accuracy"], 2.0), t("helped", [], 0.5)]) == 1
    # among helped ones, the larger improvement
    assert choose([t("helped", [], 0.5), t("helped", [], 0.9), t("no effect", [], 0.0)]) == 1
    # nothing helped: fewest costs first, then the larger improvement
    assert choose([t("improved at a cost", ["a", "b"], 3.0), t("improved at a cost", ["a"], 1.0),
                   t("improved at a cost", ["b"], 1.5)]) == 2


@pytest.mark.real
def test_select_stage_reads_validation_only_and_hands_its_choice_on(tmp_path):
    from mechanic.recipes.runner import run

    p = tmp_path / "r.yaml"
    p.write_text(CHEAP)
    res = run(p, tmp_path / "run", log=lambda m: None)
    stages = {s["name"]: s for s in res["stages"]}
    tried = stages["select"]["data"]["candidates"]
    assert [c["settings"] for c in tried] == candidates({"count": [1, 3], "factor": [0.0, 1.0]})
    for c in tried:
        if c["settings"]["factor"] == 1.0:      # scaling by 1 changes nothing: exactly no effect
            assert c["label"] == "no effect" and c["gain"] == 0.0
    choice = stages["select"]["data"]["choice"]
    assert choice == tried[choose(tried)]["settings"]
    steer_sites = stages["steer"]["data"]["sites"]
    assert len(steer_sites) == choice["count"]
    # the random draws use the chosen count, and only the evaluation read the test split
    man = res["manifest"]
    assert {(x["stage"], tuple(x["splits"])) for x in man["reads"]} == {
        ("locate", ("train",)), ("select", ("validation",)), ("evaluate", ("test",))}
    from mechanic.steer.plan import Plan

    draws = sorted((tmp_path / "run" / "stages").glob("evaluate-*/random-*/plan.safetensors"))
    assert len(draws) == 2
    for d in draws:
        sites = Plan.load(d).settings["sites"]
        assert len(sites) == len(steer_sites) and not set(sites) & set(steer_sites)
