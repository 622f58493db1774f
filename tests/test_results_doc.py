"""docs/RESULTS.md is generated from the committed results/ files; each committed run obeys the split and verdict rules."""

import json
from pathlib import Path

import pytest

from mechanic.improve.verdict import judge, resolve_margins
from mechanic.report.markdown import page

ROOT = Path(__file__).resolve().parents[1]
RUNS = sorted((ROOT / "results").glob("*/results.json"))


def test_results_md_is_generated_from_the_committed_results():
    assert RUNS, "no committed results/<recipe>/results.json"
    assert (ROOT / "docs" / "RESULTS.md").read_text() == page(ROOT / "results"), (
        "docs/RESULTS.md differs from what results/ generates; run "
        "`python -m mechanic.report.markdown results > docs/RESULTS.md`")


@pytest.mark.parametrize("path", RUNS, ids=[p.parent.name for p in RUNS])
def test_committed_run_read_test_rows_only_in_the_evaluation(path):
    r = json.loads(path.read_text())
    reads = r["manifest"]["reads"]
    assert reads, "the run recorded no reads"
    for x in reads:
        if "test" in x["splits"]:
            assert x["stage"] == "evaluate", x
    assert (path.parent / "manifest.json").is_file()
    assert json.loads((path.parent / "manifest.json").read_text()) == r["manifest"]


@pytest.mark.parametrize("path", RUNS, ids=[p.parent.name for p in RUNS])
def test_committed_verdict_follows_from_its_rows(path):
    r = json.loads(path.read_text())
    rows = r["evaluation"]["rows"]
    v = judge(rows, resolve_margins(r["recipe"]["evaluate"]["protect"], rows))
    assert v == r["verdict"]
    assert r["summary"]["label"] == v["label"] and r["summary"]["helped"] == (v["label"] == "helped")


@pytest.mark.parametrize("path", RUNS, ids=[p.parent.name for p in RUNS])
def test_committed_selection_follows_its_rule(path):
    """A run with a select stage kept the candidate the rule prefers, and its steer stage used those settings."""
    from mechanic.recipes.selection import candidates, choose

    r = json.loads(path.read_text())
    stages = {s["name"]: s for s in r["stages"]}
    if r["recipe"].get("select") is None:
        assert "select" not in stages
        return
    tried = stages["select"]["data"]["candidates"]
    assert [c["settings"] for c in tried] == candidates(r["recipe"]["select"]["grid"])
    assert stages["select"]["data"]["choice"] == tried[choose(tried)]["settings"]
    reads = [x["splits"] for x in r["manifest"]["reads"] if x["stage"] == "select"]
    assert any("validation" in x for x in reads) and not any("test" in x for x in reads)
