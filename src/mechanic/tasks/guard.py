"""The split guard: a stage may read only the splits it is allowed, and every read is recorded.

The recipe runner runs locate, steer and control inside `reading("locate", {"train", "validation"})`
and the evaluation inside `reading("evaluate", None)` (anything). The places where rows are consumed
(Task.tokenize, facts_from_task, pairs_from_task, the refusal instruction loader) call `check`, which
records (stage, source, splits) and raises SplitError when a row of a forbidden split is read. Rows
without a split label (tasks built in code) are recorded as "unlabelled" and always allowed. Outside
any `reading` block nothing is restricted and nothing recorded, so library use is unchanged.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterable

_STAGE: ContextVar[tuple[str, frozenset | None, list] | None] = ContextVar("mechanic_split_stage", default=None)


class SplitError(RuntimeError):
    """A stage read rows of a split it must not see (e.g. a locate stage reading the test split)."""


@contextlib.contextmanager
def reading(stage: str, allowed: Iterable[str] | None, log: list | None = None):
    """Within the block, `check` allows only `allowed` splits (None: all) and appends reads to `log`."""
    token = _STAGE.set((stage, None if allowed is None else frozenset(allowed), log if log is not None else []))
    try:
        yield
    finally:
        _STAGE.reset(token)


def current() -> str | None:
    """The stage name of the innermost `reading` block, or None outside one."""
    s = _STAGE.get()
    return None if s is None else s[0]


def check(source: str, splits: Iterable[str | None]) -> None:
    """Record that `source` rows of `splits` are read now; raise SplitError if the stage may not read one of them."""
    s = _STAGE.get()
    if s is None:
        return
    stage, allowed, log = s
    seen = sorted({x if x is not None else "unlabelled" for x in splits})
    entry = {"stage": stage, "source": source, "splits": seen}
    if entry not in log:
        log.append(entry)
    bad = [x for x in seen if allowed is not None and x != "unlabelled" and x not in allowed]
    if bad:
        raise SplitError(f"The {stage} stage read {source} rows of the {', '.join(bad)} split, but it may read only "
                         f"{', '.join(sorted(allowed))}: every choice (layer, coefficient, k, threshold) is made on "
                         "train/validation rows and the test split is read once, by the evaluation. Give the stage "
                         "a task with `split: train` (or validation) in the recipe.")
