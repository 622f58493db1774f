"""docs/RELIABILITY.md is exactly what scripts/reliability.py --render makes of the committed counts, and those
counts meet issue 16's goals (thousands of fuzzed cases, >= 20 SIGKILLs, every section, no third outcome)."""

import json
from pathlib import Path

from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent


def _script():
    return load_script(ROOT / "scripts" / "reliability.py", "reliability_script")


def test_page_is_the_render_of_the_committed_counts():
    script = _script()
    counts = json.loads(script.COUNTS.read_text())
    assert script.PAGE.read_text() == script.render(counts), (
        "docs/RELIABILITY.md differs from the render of docs/reliability/counts.json: "
        "run `python scripts/reliability.py --render` and commit both")


def test_committed_counts_meet_the_goals():
    script = _script()
    assert script.problems(json.loads(script.COUNTS.read_text())) == []


def test_a_missing_section_or_a_third_outcome_is_a_problem():
    script = _script()
    counts = json.loads(script.COUNTS.read_text())
    name = next(iter(counts["sections"]))
    broken = {"sections": {n: s for n, s in counts["sections"].items() if n != "faults_sigkill"}}
    broken["sections"][name] = dict(broken["sections"][name], counts={"traceback": 1})
    found = script.problems(broken)
    assert any("faults_sigkill missing" in p for p in found)
    assert any("outcome 'traceback'" in p for p in found)
    assert any("SIGKILLs" in p for p in found)
