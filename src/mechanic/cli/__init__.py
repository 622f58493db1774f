"""The `mechanic` command line: one typer app, one module per command group."""

from __future__ import annotations

from typing import Optional

from mechanic.cli.common import app
from mechanic.cli import locate as _locate  # noqa: F401  (registers the `locate` group)
from mechanic.cli import model as _model  # noqa: F401  (registers inspect, check)
from mechanic.cli import run as _run  # noqa: F401  (registers run, eval, report, demo)
from mechanic.cli import sae as _sae  # noqa: F401  (registers the `sae` group)
from mechanic.cli import features as _features  # noqa: F401  (registers `features`)
from mechanic.cli import steer as _steer  # noqa: F401  (registers the `steer` group)
from mechanic.cli import graph as _graph  # noqa: F401  (registers `graph`)

__all__ = ["app", "main"]


def main(argv: Optional[list[str]] = None) -> None:
    app(argv)
