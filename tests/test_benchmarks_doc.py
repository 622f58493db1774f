"""docs/BENCHMARKS.md is exactly what benchmarks/run.py --render makes of the committed raw results, and the README
states no benchmark number the page does not have. Needs neither the model nor the peers environment."""

import re
from pathlib import Path

from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent


def _run_module():
    return load_script(ROOT / "benchmarks" / "run.py", "benchmarks_run")


def test_page_is_the_render_of_the_committed_results():
    run = _run_module()
    data, meta = run.load_results()
    measured = {name for name, result in data.items() if result is not None}
    assert set(meta["sections"]) == measured, "every measured section (and only those) needs its provenance in meta.json"
    page = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    assert run.render(data, meta) == page, ("docs/BENCHMARKS.md differs from the render of benchmarks/results/*.json: "
                                            "run `python benchmarks/run.py --render` and commit both")


def test_readme_benchmark_numbers_are_on_the_page():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Benchmarks", 1)[1].split("\n## ", 1)[0]
    page = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    numbers = re.findall(r"\d+\.\d+x?", section)
    assert numbers, "expected the README's Benchmarks section to quote numbers from the page"
    missing = [x for x in numbers if not re.search(rf"(?<![\d.]){re.escape(x)}(?![\d])", page)]
    assert not missing, f"README Benchmarks numbers not on docs/BENCHMARKS.md: {missing}"
