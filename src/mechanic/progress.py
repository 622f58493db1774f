"""Progress of long loops: every long stage calls `track` (or `counter`), and where progress shows is decided once.

A front end installs a reporter with `reporting(fn)`: loops then call fn(description, done, total, info)
and the front end draws it (`mechanic run` shows a sub-bar with an ETA under its stage bar). With no
reporter, a loop shows a tqdm bar on stderr when its caller asks (`show=True`), else nothing. Under
torch.distributed only rank 0 reports, so N processes print one bar.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

Reporter = Callable[[str, int, "int | None", dict], None]
_REPORTER: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("mechanic_progress", default=None)


@contextmanager
def reporting(fn: Reporter):
    """Send every loop's progress inside the block to fn(description, done, total, info)."""
    token = _REPORTER.set(fn)
    try:
        yield fn
    finally:
        _REPORTER.reset(token)


def _rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class counter:
    """A progress count for loops that are not one iterable (tokens trained, rows scored): update(n, **info)."""

    def __init__(self, desc: str, total: int | None = None, *, show: bool = False, unit: str = "it",
                 initial: int = 0):
        self.desc, self.total, self.done = desc, total, initial
        self._report = _REPORTER.get() if _rank_zero() else None
        self._bar = None
        if self._report is not None:
            self._report(desc, initial, total, {})
        elif show and _rank_zero():
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit == "tok",
                             dynamic_ncols=True, leave=False)

    def update(self, n: int = 1, **info) -> None:
        """Count n more; info (e.g. fvu=0.2) is shown beside the count."""
        self.done += n
        if self._report is not None:
            self._report(self.desc, self.done, self.total, info)
        elif self._bar is not None:
            self._bar.update(n)
            if info:
                self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()},
                                      refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "counter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable: Iterable, desc: str, total: int | None = None, *, show: bool = False,
          unit: str = "it") -> Iterator:
    """Yield from `iterable`, reporting each item done (to the installed reporter, else a tqdm bar if `show`)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)   # type: ignore[arg-type]
    with counter(desc, total, show=show, unit=unit) as c:
        for x in iterable:
            yield x
            c.update()
