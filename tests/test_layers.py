"""The rooms keep the layer order of the design (model < tasks < features < locate < steer < improve <
recipes < report < cli): import-linter's contracts in pyproject.toml, run as `make test` runs tests."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    exe = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"import-linter found a layering violation:\n{r.stdout}\n{r.stderr}"
    assert "0 broken" in r.stdout and "Contracts: 2 kept" in r.stdout, r.stdout


def test_moved_pieces_live_in_their_rooms():
    """The four pieces issue 16 moved: the value types live in the engine room, the suite builder outside."""
    from mechanic.improve.perplexity import perplexity as improve_ppl
    from mechanic.locate import magnitude
    from mechanic.model.perplexity import perplexity
    from mechanic.model.vector import Vector
    from mechanic.steer.vectors import Vector as SteerVector

    assert SteerVector is Vector and improve_ppl is perplexity and magnitude.perplexity is perplexity
    assert not (ROOT / "src/mechanic/tasks/build_suites.py").exists() and (ROOT / "scripts/build_suites.py").is_file()
