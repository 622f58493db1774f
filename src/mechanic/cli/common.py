"""What every command shares: the typer app, consoles, and turning user mistakes into one clear paragraph."""

from __future__ import annotations

import functools
import json
import sys

import typer
from rich.console import Console

app = typer.Typer(help="mechanic: locate, steer and improve the behaviour of Hugging Face causal LMs.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
errors = Console(stderr=True)


def user_errors(fn):
    """Turn user mistakes (bad model path, site, task, architecture) into one paragraph and exit 2, no traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mechanic.data.windows import TextError
        from mechanic.locate.trace import TraceError
        from mechanic.model.arch import UnknownArchitecture
        from mechanic.model.load import LoadError
        from mechanic.model.sites import SiteError
        from mechanic.recipes.schema import RecipeError
        from mechanic.steer.plan import PlanError
        from mechanic.steer.vectors import VectorError
        from mechanic.files import DISK_ERRNOS, BusyError, disk_message
        from mechanic.tasks.task import TaskError

        try:
            return fn(*args, **kwargs)
        except (LoadError, SiteError, UnknownArchitecture, TaskError, TraceError, PlanError, VectorError, TextError, RecipeError,
                FileNotFoundError, FileExistsError, BusyError) as e:
            fail(str(e))
        except OSError as e:
            if e.errno not in DISK_ERRNOS:
                raise
            fail(str(e) if type(e).__name__ == "WriteError" else disk_message(e, e.filename or "a file"))
    return wrapper


def fail(message: str) -> None:
    """Print one paragraph (user text shown as written, never read as rich markup) and exit with code 2."""
    from rich.markup import escape

    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(2)


def emit_json(data) -> None:
    """Machine output on stdout."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
