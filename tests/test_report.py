"""The run report: one self-contained, escaped, atomically written page whose numbers match results.json."""

import json
import os
import re
import struct
import zlib

import numpy as np
import pytest

from mechanic.report import build_report, rebuild
from mechanic.report.sample import sample_results
from mechanic.report.screenshot import CHROMIUM, opened, screenshot

XSS = "<script>alert(1)</script>"
PLOT_KINDS = {"heatmap", "bars", "line"}
KEY = re.compile(r'data-key="([^"]*)" data-value="([^"]*)"')


def n_plots(results: dict) -> int:
    """Plots the page must draw: the before/after chart plus every heatmap, bars and line figure."""
    figs = [f for st in results["stages"] for f in st["figures"]] + results.get("verdict_figures", [])
    return 1 + sum(f["kind"] in PLOT_KINDS for f in figs)


def lookup(results: dict, key: str):
    """The number a data-key names in results.json (scheme in mechanic.report.sections)."""
    head, _, rest = key.partition(".")
    if head == "summary":
        s = results["summary"]
        return s["helped"] if rest == "helped" else next(k["value"] for k in s["key_numbers"] if k["id"] == rest)
    if head == "verdict":
        rid, field = rest.rsplit(".", 1)
        return next(p[field] for p in results["verdict"]["protected"] if p["id"] == rid)
    if key.startswith("baselines.random."):
        rid, field = key[len("baselines.random."):].rsplit(".", 1)
        return results["baselines"]["random"]["rows"][rid][field]
    if head == "eval":
        if rest.endswith(".mdc"):
            return next(r["mdc"] for r in results["evaluation"]["rows"] if r["id"] == rest[:-4])
        rows = {r["id"]: r for r in results["evaluation"]["rows"]}
        for field in ("n", "p"):
            if rest.endswith("." + field) and rest[: -len(field) - 1] in rows:
                return rows[rest[: -len(field) - 1]][field]
        rid, part, stat = rest.rsplit(".", 2)
        return rows[rid][part][stat]
    node = results
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def expected_keys(results: dict) -> set[str]:
    """Keys the page must carry: every key number, the helped flag, every number of every evaluation row, each
    protected row's harm bound and margin, and the plan's percentile among random draws."""
    keys = {"summary.helped"} | {f"summary.{k['id']}" for k in results["summary"]["key_numbers"]}
    for p in results.get("verdict", {}).get("protected", []):
        keys |= {f"verdict.{p['id']}.worst", f"verdict.{p['id']}.limit"}
    for rid in results.get("baselines", {}).get("random", {}).get("rows", {}):
        keys.add(f"baselines.random.{rid}.percentile")
    for r in results["evaluation"]["rows"]:
        keys |= {f"eval.{r['id']}.{f}" for f in ("n", "p")}
        keys |= {f"eval.{r['id']}.{part}.{s}" for part in ("before", "after", "delta") for s in ("mean", "lo", "hi")}
    return keys


def check_keys(results: dict, pairs: list[tuple[str, str]]):
    """Every data-value equals the number in results.json exactly, and no expected key is missing."""
    wrong = [(k, v, lookup(results, k)) for k, v in pairs if json.loads(v) != lookup(results, k)]
    assert not wrong
    assert expected_keys(results) <= {k for k, _ in pairs}


def hostile() -> dict:
    """The sample with markup in every kind of user text, and side-effect rows listed before the targets."""
    r = sample_results()
    r["summary"]["title"] += " " + XSS
    r["summary"]["key_numbers"][0]["label"] = XSS
    r["evaluation"]["samples"][0]["prompt"] = XSS + " & more"
    r["evaluation"]["rows"][0]["description"] = XSS
    r["evaluation"]["rows"].reverse()
    r["stages"][0]["text"] = XSS
    r["stages"][0]["figures"][1]["rows"][0][0] = XSS
    r["stages"][1]["figures"][0]["x"][0] = XSS
    r["recipe"]["prompt"] = XSS
    r["verdict"]["text"] = XSS
    r["verdict"]["protected"][0]["rule"] = XSS
    r["baselines"]["prompt"] = {"prefix": XSS, "verdict": {"label": XSS}, "evaluation": {"rows": []}}
    return r


@pytest.fixture(scope="module")
def page_file(tmp_path_factory):
    """The hostile sample's report on disk, with its results."""
    results = hostile()
    path = build_report(results, tmp_path_factory.mktemp("report") / "report.html")
    return path, results


def test_one_self_contained_file(page_file):
    path, results = page_file
    assert os.listdir(path.parent) == ["report.html"]
    html = path.read_text(encoding="utf-8")
    import plotly.offline
    assert html.count(plotly.offline.get_plotlyjs()) == 1
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, re.I)
    assert not re.search(r"<link\b", html, re.I)
    assert not re.search(r"<img\b[^>]*\bsrc\s*=\s*[\"']?\s*(https?:)?//", html, re.I)
    style = "".join(re.findall(r"<style>(.*?)</style>", html, re.S))
    assert style and "url(" not in style and "@import" not in style and "@font-face" not in style
    assert f'data-plots-expected="{n_plots(results)}"' in html


def test_text_escaped(page_file):
    path, _ = page_file
    html = path.read_text(encoding="utf-8")
    assert XSS not in html and "<script>alert" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in html
    assert html.count("<script") == html.count("</script>") == 3        # plot specs, plotly.js, runner


def test_numbers_match_results(page_file):
    path, results = page_file
    html = path.read_text(encoding="utf-8")
    check_keys(results, KEY.findall(html))
    ids = [r["id"] for r in results["evaluation"]["rows"]]
    order = sorted(ids, key=lambda i: html.index(f'data-key="eval.{i}.n"'))
    kinds = {r["id"]: r["kind"] for r in results["evaluation"]["rows"]}
    assert [kinds[i] for i in order] == sorted(kinds[i] for i in order)[::-1]     # "target" rows before "side"


def test_delta_colour_follows_better(page_file):
    path, _ = page_file
    html = path.read_text(encoding="utf-8")

    def colour(rid):
        return re.search(rf'<td class="delta (\w+)"><span class="mean" data-key="eval\.{re.escape(rid)}\.delta', html)[1]
    assert colour("sentiment.positive_rate") == "better"      # higher is better, went up
    assert colour("neutral.perplexity") == "worse"            # lower is better, went up
    assert colour("facts.accuracy") == "same"                 # interval contains 0


def test_unknown_figure_kind_is_a_clear_error(tmp_path):
    r = sample_results()
    r["stages"][1]["figures"].append({"kind": "violin", "id": "v", "title": "?"})
    with pytest.raises(ValueError, match=r"stages\.1\.figures\.1: unknown figure kind 'violin'; known kinds: bars"):
        build_report(r, tmp_path / "report.html")
    r = sample_results()
    del r["stages"][0]["figures"][0]["z"]
    with pytest.raises(ValueError, match="heatmap figure 'patch' lacks z"):
        build_report(r, tmp_path / "report.html")
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_old_report(tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    path.write_text("old report")
    r = sample_results()
    r["stages"][0]["figures"][0]["kind"] = "pie"
    with pytest.raises(ValueError):
        build_report(r, path)
    assert path.read_text() == "old report" and os.listdir(tmp_path) == ["report.html"]

    import plotly.offline

    def broken():
        raise OSError("disk full")
    monkeypatch.setattr(plotly.offline, "get_plotlyjs", broken)       # fails after the body was written
    with pytest.raises(OSError, match="disk full"):
        build_report(sample_results(), path)
    assert path.read_text() == "old report" and os.listdir(tmp_path) == ["report.html"]


def test_run_without_evaluation_builds(tmp_path):
    r = sample_results()
    for k in ("evaluation", "verdict", "baselines", "verdict_figures"):
        del r[k]
    r["stages"] = r["stages"][1:2]
    html = build_report(r, tmp_path / "report.html").read_text(encoding="utf-8")
    assert 'data-plots-expected="1"' in html and "Evaluation" not in html and 'data-key="eval.' not in html


def test_rebuild_reads_results_json(tmp_path):
    results = sample_results()
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = rebuild(tmp_path)
    assert out == tmp_path / "report.html"
    assert out.read_bytes() == build_report(results, tmp_path / "direct.html").read_bytes()


def png_pixels(data: bytes) -> np.ndarray:
    """Decode an 8-bit non-interlaced RGB/RGBA PNG (what Chromium writes) to [height, width, channels]."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and colour in (2, 6) and interlace == 0
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + n
    bpp = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * bpp)
    out = np.zeros((h, w * bpp), np.uint8)
    prev = np.zeros(w * bpp, np.int32)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if f == 1:                                              # sub: running sum per channel
            line = np.cumsum(line.reshape(w, bpp), axis=0).reshape(-1) % 256
        elif f == 2:                                            # up
            line = (line + prev) % 256
        elif f in (3, 4):                                       # average, Paeth: byte by byte
            cur, up = line.tolist(), prev.tolist()
            for i in range(len(cur)):
                a = cur[i - bpp] if i >= bpp else 0
                b = up[i]
                if f == 3:
                    cur[i] = (cur[i] + (a + b) // 2) % 256
                else:
                    c = up[i - bpp] if i >= bpp else 0
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) % 256
            line = np.array(cur, np.int32)
        out[y], prev = line, line
    return out.reshape(h, w, bpp)


def test_chromium_is_installed():
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: apt-get install chromium"


@pytest.fixture(scope="module")
def browser_view(page_file):
    """What headless Chromium shows of the report: errors, plot counts, data-keys, tick labels, widths."""
    path, results = page_file
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: apt-get install chromium"
    with opened(path, width=1200) as (page, errors):
        view = page.evaluate("""() => ({
            rendered: document.body.dataset.plotsRendered,
            plots: document.querySelectorAll('.js-plotly-plot').length,
            drawn: [...document.querySelectorAll('.js-plotly-plot')].filter(d => d.querySelector('.main-svg')).length,
            heatmaps: document.querySelectorAll('.js-plotly-plot .hm image').length,
            keys: [...document.querySelectorAll('[data-key]')].map(e => [e.dataset.key, e.dataset.value]),
            pattern_x: [...document.querySelectorAll('figure[data-figure-id="pattern"] .xtick text')].map(t => t.textContent),
            pattern_y: [...document.querySelectorAll('figure[data-figure-id="pattern"] .ytick text')].map(t => t.textContent),
        })""")
        page.set_viewport_size({"width": 420, "height": 900})
        page.wait_for_function("() => [...document.querySelectorAll('.main-svg')].every("
                               "s => s.getBoundingClientRect().right <= window.innerWidth)")
        view["narrow_overflow"] = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        view["errors"] = list(errors)
    return view


def test_page_renders_every_plot_without_errors(browser_view, page_file):
    _, results = page_file
    assert browser_view["errors"] == []
    assert int(browser_view["rendered"]) == browser_view["plots"] == browser_view["drawn"] == n_plots(results)
    assert browser_view["heatmaps"] == 3                      # patching, attention pattern, sweep


def test_attention_pattern_has_tokens_on_both_axes(browser_view, page_file):
    _, results = page_file
    fig = results["stages"][1]["figures"][0]
    visible = [t.replace("\n", "\\n") for t in fig["x"]]               # a newline token is shown as \n
    assert browser_view["pattern_x"] == visible
    assert browser_view["pattern_y"] == [t.replace("\n", "\\n") for t in fig["y"]]
    assert browser_view["pattern_x"][0] == XSS                # shown literally, not interpreted


def test_browser_numbers_match_results(browser_view, page_file):
    _, results = page_file
    check_keys(results, [tuple(kv) for kv in browser_view["keys"]])


def test_page_fits_a_narrow_window(browser_view):
    assert browser_view["narrow_overflow"] <= 0


def test_screenshot_is_not_blank(page_file, tmp_path):
    path, _ = page_file
    png = tmp_path / "shot.png"
    errors = screenshot(path, png, width=1200, max_height=1600)
    assert errors == []
    px = png_pixels(png.read_bytes())[..., :3]
    assert px.shape == (1600, 1200, 3)
    colours, counts = np.unique(px.reshape(-1, 3) @ np.array([65536, 256, 1]), return_counts=True)
    assert len(colours) > 500                                 # text antialiasing, bars, whiskers
    assert counts.max() < 0.9 * counts.sum()                  # not one flat colour
