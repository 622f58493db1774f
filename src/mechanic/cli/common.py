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
    """Turn user mistakes (bad model path, site, task, plan, file, full disk...) into one paragraph and exit 2, no
    traceback: every error type the project defines (a ValueError, RuntimeError or OSError subclass in a
    mechanic module), missing or existing files, and a full disk."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mechanic.files import DISK_ERRNOS, disk_message

        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, FileExistsError) as e:
            fail(str(e))
        except (ValueError, RuntimeError, OSError) as e:
            if type(e).__module__.startswith("mechanic."):
                fail(str(e))
            if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
                fail(disk_message(e, e.filename or "a file"))
            raise
    return wrapper


def fail(message: str) -> None:
    """Print one paragraph (user text shown as written, never read as rich markup) and exit with code 2."""
    from rich.markup import escape

    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(2)


def emit_json(data) -> None:
    """Machine output on stdout."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
