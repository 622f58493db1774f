"""Temporary entries in transformers' function registries (AttentionInterface, ExpertsInterface), undone exactly."""

from __future__ import annotations

from typing import Callable


def override(interface, key: str, fn: Callable) -> Callable[[], None]:
    """Register `fn` under `key` in the interface's local mapping; return the undo that restores what was there."""
    local = interface._local_mapping
    had, previous = key in local, local.get(key)
    interface[key] = fn

    def undo() -> None:
        if had:
            interface[key] = previous
        else:
            del interface[key]
    return undo
