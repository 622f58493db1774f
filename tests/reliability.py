"""Counts for docs/RELIABILITY.md: hardening tests tally each case's outcome here.

Outcomes: "clear error" (the project's own one-paragraph error), "correct result" (checked against the
expected value), anything else fails the test. With MECHANIC_RELIABILITY_DIR set, each section's counts
are written to DIR/<section>.json when its test ends; `python scripts/reliability.py --collect DIR`
turns them into docs/reliability/counts.json and docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

CLEAR, CORRECT = "clear error", "correct result"


class Tally:
    """Outcome counts of one section (what was tried, and how each try ended)."""

    def __init__(self, section: str, kind: str, what: str):
        self.section, self.kind, self.what = section, kind, what
        self.counts: Counter = Counter()
        self.detail: Counter = Counter()

    def add(self, outcome: str, detail: str | None = None) -> None:
        assert outcome in (CLEAR, CORRECT), outcome
        self.counts[outcome] += 1
        if detail:
            self.detail[detail] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def save(self) -> None:
        out = os.environ.get("MECHANIC_RELIABILITY_DIR")
        if not out:
            return
        Path(out).mkdir(parents=True, exist_ok=True)
        old = Path(out) / f"{self.section}.json"
        counts, detail = Counter(self.counts), Counter(self.detail)
        if old.is_file():   # a section tallied by several tests (or parametrised cases) adds up
            prev = json.loads(old.read_text())
            counts.update(prev["counts"])
            detail.update(prev["detail"])
        old.write_text(json.dumps({"section": self.section, "kind": self.kind, "what": self.what,
                                   "counts": dict(sorted(counts.items())), "detail": dict(sorted(detail.items()))},
                                  indent=1))
