"""Open a report in headless Chromium (Debian's /usr/bin/chromium via playwright): wait for its plots, screenshot it."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mechanic.files import atomic_path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    """The browser binary, or a clear error naming the package that provides it."""
    if not os.access(CHROMIUM, os.X_OK):
        raise RuntimeError(f"{CHROMIUM} not found: the report screenshots and browser tests use Debian's Chromium; "
                           "run `apt-get install chromium` (never `playwright install`)")
    return CHROMIUM


@contextmanager
def opened(html_path: str | os.PathLike, width: int = 1200, timeout_ms: int = 120_000) -> Iterator[tuple]:
    """Yield (page, errors) once every plot is drawn; errors lists console/page errors, dialogs, any http(s) request."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []

    def block(route):                       # a report must open with no network: refuse and record any request
        errors.append(f"network request blocked: {route.request.url}")
        route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda m: m.type == "error" and errors.append(f"console error: {m.text}"))
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("dialog", lambda d: (errors.append(f"dialog opened: {d.message}"), d.dismiss()))
            page.route("http://**/*", block)
            page.route("https://**/*", block)
            page.goto(Path(html_path).resolve().as_uri(), wait_until="load", timeout=timeout_ms)
            page.wait_for_function(
                "() => document.body.dataset.plotsError !== undefined || "
                "document.body.dataset.plotsRendered === document.body.dataset.plotsExpected", timeout=timeout_ms)
            failed = page.evaluate("() => document.body.dataset.plotsError")
            if failed is not None:
                errors.append(f"plot error: {failed}")
            yield page, errors
        finally:
            browser.close()


def screenshot(html_path: str | os.PathLike, png_path: str | os.PathLike, width: int = 1200,
               max_height: int | None = None) -> list[str]:
    """Write a PNG of the full page (cut at max_height pixels if given); return the errors the page produced."""
    with opened(html_path, width) as (page, errors):
        height = page.evaluate("() => document.documentElement.scrollHeight")
        clip = {"x": 0, "y": 0, "width": width, "height": min(height, max_height or height)}
        with atomic_path(png_path, suffix=".png") as tmp:
            page.screenshot(path=tmp, full_page=True, clip=clip, animations="disabled")
        return list(errors)


def main(argv: list[str] | None = None) -> None:
    """`python -m mechanic.report.screenshot OUT.png`: the sample report's first 1600 px (docs/report.png)."""
    import sys
    import tempfile

    from mechanic.report.html import build_report
    from mechanic.report.sample import sample_results

    out = Path((argv if argv is not None else sys.argv[1:] or ["docs/report.png"])[0])
    with tempfile.TemporaryDirectory() as d:
        errors = screenshot(build_report(sample_results(), Path(d) / "report.html"), out, 1200, max_height=1600)
    if errors:
        raise SystemExit("\n".join(errors))
    print(out)


if __name__ == "__main__":
    main()
