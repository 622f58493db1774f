"""The run report: one self-contained HTML page (plotly.js inlined once) built from results.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from mechanic.files import atomic_path
from mechanic.report import figures, sections
from mechanic.report.sections import esc
from mechanic.report.style import CSS, RUNNER


def _specs(plots: list) -> str:
    """Plot specs as JSON that cannot end its <script> element early."""
    specs = "[" + ",".join(p.to_json() for p in plots) + "]"
    return specs.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _evaluation(ev: dict, plots: list) -> str:
    """Evaluation section: the table (targets first), the before/after chart and the generation samples."""
    rows = sorted(ev.get("rows", []), key=lambda r: r.get("kind") != "target")
    if not rows and not ev.get("samples"):
        return ""
    parts = ['<section class="card evaluation"><h2>Evaluation: before and after</h2>']
    if rows:
        plots.append(figures.evaluation_chart(rows))
        parts += [sections.evaluation_table(ev), '<h3>Before / after</h3>',
                  f'<div class="plot" id="plot-{len(plots) - 1}"></div>']
    if ev.get("samples"):
        parts += ["<h3>Generation samples</h3>", sections.samples(ev["samples"])]
    return "".join(parts) + "</section>"


def page(title: str, body: str, plots: list, footer: str) -> Iterator[str]:
    """A self-contained page in three pieces around plotly.js: head, CSS and body (already escaped), the plot
    specs; then plotly.js; then the script that draws the plots."""
    import plotly.offline

    yield ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
           '<meta name="viewport" content="width=device-width, initial-scale=1">'
           f"<title>{esc(title)}</title><style>{CSS}</style></head>\n"
           f'<body data-plots-expected="{len(plots)}"><main>{body}<footer>{esc(footer)}</footer></main>\n'
           f'<script type="application/json" id="plot-specs">{_specs(plots)}</script>\n<script>')
    yield plotly.offline.get_plotlyjs()
    yield f"</script>\n<script>{RUNNER}</script>\n</body></html>\n"


def pieces(results: dict) -> Iterator[str]:
    """The page in pieces: all but plotly.js is built (and figures checked) before the first piece is yielded."""
    from mechanic.report.feature_pages import run_section   # it builds on page() and write() below

    plots: list = []
    body = [sections.summary(results.get("summary") or {}), _evaluation(results.get("evaluation") or {}, plots),
            sections.verdict(results, plots)]
    body += [sections.stage(st, i, plots) for i, st in enumerate(results.get("stages", []))]
    body.append(run_section(results, plots))
    body.append(sections.manifest(results))
    return page((results.get("summary") or {}).get("title", "mechanic run"), "".join(body), plots,
                f'mechanic {results.get("mechanic", "")} · report built from results.json')


def write(parts: Iterator[str], path: str | os.PathLike) -> Path:
    """Write a page's pieces to `path` atomically; the first piece is built before the file is opened."""
    first = next(parts)
    path = Path(path)
    with atomic_path(path, suffix=".html") as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(first)
        for part in parts:
            f.write(part)
    return path


def build_report(results: dict, path: str | os.PathLike) -> Path:
    """Write the report page for `results` (a results.json dict) to `path`, atomically."""
    return write(pieces(results), path)


def rebuild(run_dir: str | os.PathLike) -> Path:
    """Rebuild run_dir/report.html from run_dir/results.json."""
    run_dir = Path(run_dir)
    return build_report(json.loads((run_dir / "results.json").read_text(encoding="utf-8")), run_dir / "report.html")
