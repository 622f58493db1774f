"""Real English prose shipped with mechanic: calibration passages and disjoint held-out passages.

Calibration text feeds statistics (massive activations, super-weight search, covariances);
held-out text measures perplexity, so an effect is never measured on the text that found it.
Sources and licenses: SOURCES.md in this folder.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

FILES = ("devils_dictionary.txt", "founding_documents.txt")
HELDOUT_EVERY = 5   # passage i is held out when i % 5 == 4


@lru_cache(maxsize=None)
def passages() -> tuple[str, ...]:
    """Every shipped passage, in file order (files in FILES order)."""
    out: list[str] = []
    root = resources.files("mechanic.data")
    for name in FILES:
        text = root.joinpath(name).read_text(encoding="utf-8")
        out += [p.strip() for p in text.split("\n\n") if p.strip()]
    return tuple(out)


def calibration() -> list[str]:
    """Passages for statistics and searches (about 80% of the text)."""
    return [p for i, p in enumerate(passages()) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]


def heldout() -> list[str]:
    """Passages kept out of calibration, for measuring perplexity (about 20% of the text)."""
    return [p for i, p in enumerate(passages()) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
