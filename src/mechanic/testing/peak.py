"""Measured peak memory of one call on this process's CPU (Linux), to check mechanic.memory's estimates against.

How: free what Python and malloc hold (gc, malloc_trim), read the resident set (VmRSS), reset the kernel's
high-water mark (writing "5" to /proc/self/clear_refs resets VmHWM, Linux >= 4.0), run the call, read VmHWM.
The difference is the peak resident growth the call caused, its result included. Why not the others: ru_maxrss
cannot be reset, so after a model load (whose own peak is higher than most operations) it would not move;
torch's profiler records allocations per operator but not a peak across them, and torch keeps no CPU allocator
statistics. glibc's malloc serves tensors below a threshold it raises by itself (up to 32 MiB) from its heap and
keeps freed ones there, so RSS would also count fragments of freed tensors (up to ~2x the live bytes on SmolLM2,
varying with the order of frees). `peak` therefore first fixes that threshold at 64 KiB (mallopt, for the rest
of the process): every tensor larger than that is its own mapping, returned to the system when freed, and RSS
follows the live tensors. This measures what the estimates count, the tensors; keep the budget's margin
(mechanic.memory.BUDGET_FRACTION) for the allocator's own overhead.
"""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path
from typing import Callable

_STATUS = Path("/proc/self/status")


def _kb(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status: measuring peak memory needs Linux.")


def _trim() -> None:
    """Return freed heap pages to the system, so the baseline RSS holds only live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: the baseline may include some freed pages
        pass


def _fixed_mmap_threshold() -> None:
    """Serve every allocation over 64 KiB with its own mapping (glibc mallopt M_MMAP_THRESHOLD; no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)   # -3: M_MMAP_THRESHOLD (also stops its dynamic raising)
    except (OSError, AttributeError):
        pass


def peak(fn: Callable[[], object]) -> tuple[object, int]:
    """(fn(), bytes): how far this process's resident memory rose above its level before the call, at its highest."""
    _fixed_mmap_threshold()
    _trim()
    base = _kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    out = fn()
    return out, (_kb("VmHWM") - base) * 1024


__all__ = ["peak"]
