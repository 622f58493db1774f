"""Run reports: one self-contained HTML page per run, built from its results.json (docs/RUNS.md)."""

from mechanic.report.html import build_report, rebuild

__all__ = ["build_report", "rebuild"]
