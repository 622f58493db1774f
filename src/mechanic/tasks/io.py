"""Load your own tasks from JSONL or CSV (and save a task as JSONL), with errors that name the file and line.

JSONL: one JSON object per line with "prompt" and "answer" (strings), optionally "wrong", "corrupted"
(strings or null), "meta" (an object) and "split" ("train", "validation" or "test"); any other key is kept
in meta. CSV: a header row with at least the columns prompt and answer, optionally wrong, corrupted, split
and meta (a JSON object); every other column goes to meta. Empty wrong/corrupted/split cells mean "none".
Rows without a split get one from a hash of their entity key when a split is asked for
(mechanic.tasks.splits).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from mechanic.tasks import metrics
from mechanic.tasks.splits import SPLITS
from mechanic.tasks.task import Example, Task, TaskError

FIELDS = ("prompt", "answer", "wrong", "corrupted", "meta", "split")
_EXPECT = ('"prompt" and "answer" (non-empty strings), and optionally "wrong" and "corrupted" (strings, '
           'or empty/null for none) and "meta" (a JSON object)')


def from_jsonl(path, name: str | None = None, metric: str = "logit_diff", description: str = "") -> Task:
    """A Task from a JSONL file (one example per line; blank lines are skipped)."""
    path = Path(path)
    metrics.get(metric)
    examples = []
    for lineno, line in enumerate(_read(path).split("\n"), start=1):   # JSON Lines end at \n only
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _row_error(path, lineno, f"this line is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise _row_error(path, lineno, f"this line is a JSON {type(row).__name__}, not an object")
        examples.append(_example(row, path, lineno))
    return _task(examples, path, name, metric, description)


def from_csv(path, name: str | None = None, metric: str = "logit_diff", description: str = "",
             delimiter: str = ",") -> Task:
    """A Task from a CSV file with a header row (columns prompt, answer, wrong, corrupted; others go to meta)."""
    path = Path(path)
    metrics.get(metric)
    text = _read(path)
    # newline="": quoted cells keep their own line breaks (\r, \n, \x85, \u2028 ...) as written
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        return _csv_rows(reader, path, name, metric, description)
    except csv.Error as e:
        raise TaskError(f"{path}, line {reader.line_num}: not readable as CSV ({e}). A task CSV has a header row "
                        "and one row per example; quote cells that hold the delimiter or line breaks.") from None


def _csv_rows(reader, path: Path, name, metric: str, description: str) -> Task:
    header = reader.fieldnames or []
    missing = [c for c in ("prompt", "answer") if c not in header]
    if missing:
        raise TaskError(
            f"{path}, line 1: the header row has columns {header or 'none'} but is missing "
            f"{' and '.join(missing)}. A task CSV needs a header with the columns prompt and answer, optionally "
            "wrong, corrupted and meta (a JSON object); any other column is kept in each example's meta.")
    examples = []
    start = 1
    for raw in reader:
        lineno = start + 1          # first physical line of this record
        start = reader.line_num
        if None in raw:
            raise _row_error(path, lineno, f"this row has {len(header) + len(raw[None])} cells but the header "
                                           f"has {len(header)} columns (an unquoted delimiter in a prompt?)")
        if all((v or "").strip() == "" for v in raw.values()):
            continue
        row: dict = {}
        for k, v in raw.items():
            if v is None:
                raise _row_error(path, lineno, f"this row has fewer cells than the {len(header)} header columns")
            if k == "meta":
                if v.strip():
                    try:
                        row["meta"] = json.loads(v)
                    except json.JSONDecodeError as e:
                        raise _row_error(path, lineno, f"the meta cell is not valid JSON ({e.msg})") from None
            elif k in ("wrong", "corrupted", "split"):
                row[k] = v if v != "" else None
            else:
                row[k] = v
        examples.append(_example(row, path, lineno))
    return _task(examples, path, name, metric, description)


def to_jsonl(task: Task, path) -> Path:
    """Write a task's examples as JSONL (the format from_jsonl reads; "split" only on labelled rows)."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for e in task.examples:
            row = dict(prompt=e.prompt, answer=e.answer, wrong=e.wrong, corrupted=e.corrupted, meta=e.meta)
            if e.split is not None:
                row["split"] = e.split
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def load_file(path, **kwargs) -> Task:
    """from_jsonl or from_csv by the file's extension (.jsonl/.json or .csv/.tsv)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return from_jsonl(path, **kwargs)
    if suffix in (".csv", ".tsv"):
        return from_csv(path, delimiter="\t" if suffix == ".tsv" else ",", **kwargs)
    raise TaskError(f"{path}: unknown task file type {suffix or '(none)'!r}; use .jsonl (one JSON object per "
                    "line) or .csv/.tsv (a header row with prompt, answer, wrong, corrupted).")


# ---- helpers -------------------------------------------------------------------------------------

def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")     # no newline translation; a leading BOM is dropped
    except FileNotFoundError:
        raise TaskError(f"{path}: no such task file.") from None
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text (byte {e.start}); save the task file as UTF-8.") from None
    except OSError as e:   # a directory, no permission
        raise TaskError(f"{path}: cannot read this task file ({e.strerror or e}).") from None


def _row_error(path: Path, lineno: int, what: str) -> TaskError:
    return TaskError(f"{path}, line {lineno}: {what}. Each example needs {_EXPECT}.")


def _example(row: dict, path: Path, lineno: int) -> Example:
    for k in ("prompt", "answer"):
        v = row.get(k)
        if not isinstance(v, str) or not v:
            got = "missing" if k not in row else f"{v!r}"
            raise _row_error(path, lineno, f'"{k}" is {got}')
    for k in ("wrong", "corrupted"):
        v = row.get(k)
        if v is not None and not isinstance(v, str):
            raise _row_error(path, lineno, f'"{k}" is a {type(v).__name__} ({v!r}), not a string')
    split = row.get("split")
    if split is not None and split not in SPLITS:
        raise TaskError(f'{path}, line {lineno}: "split" is {split!r}, which is not one of '
                        f'{", ".join(map(repr, SPLITS))}. Use one of these, or leave "split" out and the row '
                        "gets one from a hash of its entity key (mechanic.tasks.splits).")
    meta = row.get("meta") or {}
    if not isinstance(meta, dict):
        raise _row_error(path, lineno, f'"meta" is a {type(meta).__name__}, not an object')
    extra = {k: v for k, v in row.items() if k not in FIELDS}
    meta = {**extra, **meta}
    return Example(row["prompt"], row["answer"], row.get("wrong") or None, row.get("corrupted") or None, meta,
                   split=split)


def _task(examples: list[Example], path: Path, name, metric, description) -> Task:
    if not examples:
        raise TaskError(f"{path}: the file has no examples. Each example needs {_EXPECT}.")
    return Task(name or path.stem, examples, metric, description)
