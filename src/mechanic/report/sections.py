"""HTML sections of the report page; every shown number carries data-key/data-value so a test can check it.

Keys: `summary.<key number id>`, `summary.helped`; `eval.<row id>.<before|after|delta>.<mean|lo|hi>`,
`eval.<row id>.n`, `eval.<row id>.p`; anything else is a dotted path into results.json
(`evaluation.level`, `stages.0.seconds`, `stages.2.figures.1.rows.0.1`).
"""

from __future__ import annotations

import json
import math
from html import escape

from mechanic.report import figures


def esc(s) -> str:
    """Escape any value for HTML text or attributes (results hold user prompts)."""
    return escape("" if s is None else str(s), quote=True)


def fmt(x, spec: str | None = None) -> str:
    """A number for reading: the given format spec, or about three significant digits."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if spec:
        return format(x, spec)
    if x == 0:
        return "0"
    if isinstance(x, int):
        return f"{x:,}"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 1:
        return f"{x:.3g}" if a < 100 else f"{x:.1f}"
    return f"{x:.3f}" if a >= 1e-3 else f"{x:.2e}"


def num(key: str, value, shown: str | None = None, cls: str = "") -> str:
    """A number in a span whose data-value is exactly the JSON value (shown as `shown` or formatted)."""
    c = f' class="{cls}"' if cls else ""
    return (f'<span{c} data-key="{esc(key)}" data-value="{esc(json.dumps(value))}">'
            f"{esc(fmt(value) if shown is None else shown)}</span>")


def summary(s: dict) -> str:
    """Title card: what was located, what was changed, the verdict, a helped badge and the key numbers."""
    helped = s.get("helped")
    label = s.get("label") or ("helped" if helped else "did not help")
    cls = {"helped": "good", "improved at a cost": "warn"}.get(label, "bad")
    badge = (f'<span class="badge {cls}" data-key="summary.helped" '
             f'data-value="{esc(json.dumps(helped))}">{esc(label)}</span>')
    lines = "".join(f'<div class="line"><span class="what">{w}</span><span>{esc(s.get(k, ""))}</span></div>'
                    for w, k in (("Located", "located"), ("Changed", "changed"), ("Verdict", "verdict")) if s.get(k))
    tiles = []
    for k in s.get("key_numbers", []):
        try:
            shown = fmt(k["value"], k.get("format"))
        except ValueError as e:
            raise ValueError(f"summary key number {k.get('id')!r}: bad format {k.get('format')!r} ({e})") from None
        tiles.append(f'<div class="tile"><div class="value">{num("summary." + k["id"], k["value"], shown)}</div>'
                     f'<div class="label">{esc(k.get("label", k["id"]))}</div></div>')
    return (f'<section class="card summary"><div class="head"><h1>{esc(s.get("title", "mechanic run"))}</h1>'
            f'{badge}</div>{lines}<div class="tiles">{"".join(tiles)}</div></section>')


def _direction(row: dict) -> str:
    """better / worse / moved / same, from the delta CI and which direction counts as better."""
    d = row["delta"]
    if d["lo"] is None or d["hi"] is None or (d["lo"] <= 0 <= d["hi"]):
        return "same"
    up = d["lo"] > 0
    better = row.get("better", "none")
    if better == "none":
        return "moved"
    return "better" if up == (better == "higher") else "worse"


def _spec(*cis: dict) -> str:
    """One fixed-point format for intervals shown side by side: more decimals for smaller magnitudes."""
    m = max((abs(v) for ci in cis for v in ci.values() if isinstance(v, (int, float)) and not math.isnan(v)),
            default=0.0)
    return ".3f" if m < 1 else ".2f" if m < 10 else ".1f" if m < 1000 else ",.0f"


def _ci(rid: str, part: str, ci: dict, spec: str, sign: bool = False) -> str:
    """mean [lo, hi] with a data-key on each of the three numbers."""
    k = f"eval.{rid}.{part}"

    def show(x, plus=False):
        return fmt(x, ("+" if plus else "") + spec) if isinstance(x, (int, float)) and not math.isnan(x) else fmt(x)
    return (f'{num(k + ".mean", ci["mean"], show(ci["mean"], sign), "mean")} <span class="ci">'
            f'[{num(k + ".lo", ci["lo"], show(ci["lo"]))}, {num(k + ".hi", ci["hi"], show(ci["hi"]))}]</span>')


def evaluation_table(ev: dict) -> str:
    """Target rows, then side effects: n, before, after, delta with CIs, p; the delta is coloured by `better`."""
    arrows = {"higher": "↑ higher is better", "lower": "↓ lower is better", "none": "– no preferred direction"}
    body = []
    for kind, heading in (("target", "Target"), ("side", "Side effects")):
        rows = [r for r in ev["rows"] if r.get("kind") == kind]
        if not rows:
            continue
        body.append(f'<tr class="group"><th colspan="7">{heading}</th></tr>')
        for r in rows:
            rid, p = r["id"], r.get("p")
            spec, dspec = _spec(r["before"], r["after"]), _spec(r["delta"])
            arrow = arrows.get(r.get("better", "none"), "")
            body.append(
                f'<tr><td class="metric"><span class="name">{esc(rid)}</span> <span class="arrow" title="{esc(arrow)}">'
                f'{esc(arrow[:1])}</span><div class="desc">{esc(r.get("description", ""))}</div></td>'
                f'<td class="n">{num(f"eval.{rid}.n", r["n"])}</td>'
                f'<td>{_ci(rid, "before", r["before"], spec)}</td><td>{_ci(rid, "after", r["after"], spec)}</td>'
                f'<td class="delta {_direction(r)}">{_ci(rid, "delta", r["delta"], dspec, sign=True)}</td>'
                f'<td class="p">{num(f"eval.{rid}.p", p, "<0.001" if p is not None and p < 1e-3 else fmt(p))}</td>'
                f'<td class="n">{num(f"eval.{rid}.mdc", r["mdc"], fmt(r["mdc"], ".3g")) if r.get("mdc") is not None else "–"}'
                '</td></tr>')
    level = ev.get("level")
    note = (f'Intervals: {num("evaluation.level", level, fmt(level, ".0%") if level is not None else None)} '
            f'bootstrap ({num("evaluation.n_boot", ev.get("n_boot"))} resamples, seed {num("evaluation.seed", ev.get("seed"))}); '
            "p: paired sign-flip permutation test on after − before; mdc: minimum detectable change (80% power). "
            "Delta coloured when its interval excludes 0: "
            '<span class="delta better">better</span> <span class="delta worse">worse</span> '
            '<span class="delta moved">moved</span>.')
    return (f'<div class="scroll"><table class="eval"><thead><tr><th>metric</th><th>n</th><th>before</th>'
            f'<th>after</th><th>delta</th><th>p</th><th>mdc</th></tr></thead><tbody>{"".join(body)}</tbody></table></div>'
            f'<p class="note">{note}</p>')


def samples(items: list[dict]) -> str:
    """Generation samples: the prompt, then before and after side by side."""
    out = []
    for it in items:
        out.append(f'<div class="sample"><div class="prompt"><span class="what">prompt</span>{esc(it.get("prompt", ""))}'
                   f'</div><div class="pair"><div><span class="what">before</span><pre>{esc(it.get("before", ""))}</pre>'
                   f'</div><div><span class="what">after</span><pre>{esc(it.get("after", ""))}</pre></div></div></div>')
    return "".join(out)


def table_figure(f: dict, path: str) -> str:
    """A table figure; numeric cells carry data-keys `<path>.rows.<r>.<c>`."""
    head = "".join(f"<th>{esc(c)}</th>" for c in f["columns"])
    rows = []
    for i, row in enumerate(f["rows"]):
        cells = []
        for j, v in enumerate(row):
            isnum = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f'<td class="num">{num(f"{path}.rows.{i}.{j}", v)}</td>' if isnum else f"<td>{esc(v)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f'<div class="scroll"><table class="fig"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def samples_figure(f: dict) -> str:
    """A samples figure: labelled texts side by side."""
    items = "".join(f'<div><span class="what">{esc(it.get("label", ""))}</span><pre>{esc(it.get("text", ""))}</pre></div>'
                    for it in f["items"])
    return f'<div class="pair">{items}</div>'


def figure(f: dict, path: str, plots: list) -> str:
    """One figure block: title, the plot (appended to `plots` for the page script) or HTML, caption."""
    kind = figures.check(f, path)
    if kind in figures.PLOT_KINDS:
        plots.append(figures.plot(f, path))
        inner = f'<div class="plot" id="plot-{len(plots) - 1}"></div>'
    else:
        inner = table_figure(f, path) if kind == "table" else samples_figure(f)
    cap = f'<p class="caption">{esc(f["caption"])}</p>' if f.get("caption") else ""
    return (f'<figure class="{kind}" data-figure-id="{esc(f.get("id", ""))}"><figcaption>{esc(f.get("title", ""))}'
            f"</figcaption>{inner}{cap}</figure>")


def stage_meta(st: dict, key: str) -> list[str]:
    """A stage's seconds (data key `<key>.seconds`), a reused badge and its cache key, as meta-line pieces."""
    meta = []
    if st.get("seconds") is not None:
        meta.append(f'{num(f"{key}.seconds", st["seconds"], fmt(st["seconds"], ".1f"))} s')
    if st.get("reused"):
        meta.append('<span class="badge muted">reused</span>')
    if st.get("key"):
        meta.append(f'key <code title="{esc(st["key"])}">{esc(str(st["key"])[:10])}</code>')
    return meta


def stage(st: dict, i: int, plots: list) -> str:
    """One stage: title, timing, cache key, text, its figures and the artifacts it wrote."""
    meta = stage_meta(st, f"stages.{i}")
    text = "".join(f"<p>{esc(p)}</p>" for p in str(st.get("text", "")).split("\n\n") if p.strip())
    figs = "".join(figure(f, f"stages.{i}.figures.{j}", plots) for j, f in enumerate(st.get("figures", [])))
    arts = "".join(f"<li><span>{esc(k)}</span> <code>{esc(v)}</code></li>" for k, v in (st.get("artifacts") or {}).items())
    arts = f'<details class="artifacts"><summary>artifacts</summary><ul>{arts}</ul></details>' if arts else ""
    return (f'<section class="card stage" id="stage-{esc(st.get("name", i))}"><h2>{esc(st.get("title", st.get("name", "")))}'
            f'</h2><div class="meta">{" · ".join(meta)}</div>{text}{figs}{arts}</section>')


def _flat(d, prefix: str = "") -> list[tuple[str, object]]:
    """Nested dicts as (dotted key, leaf value) pairs, in order."""
    if isinstance(d, dict):
        return [kv for k, v in d.items() for kv in _flat(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, d)]


def manifest(results: dict) -> str:
    """Collapsible provenance: the manifest (fingerprint, versions, seeds, timings) and the recipe as run."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td><code>{esc(json.dumps(v) if not isinstance(v, str) else v)}</code></td></tr>"
                   for k, v in _flat(results.get("manifest") or {}))
    recipe = json.dumps(results.get("recipe") or {}, indent=2, ensure_ascii=False)
    return (f'<section class="card manifest"><h2>Provenance</h2><details><summary>manifest (model fingerprint, '
            f'versions, seeds)</summary><div class="scroll"><table class="kv">{rows}</table></div></details>'
            f'<details><summary>recipe</summary><pre>{esc(recipe)}</pre></details>'
            f'<p class="note">mechanic {esc(results.get("mechanic", ""))}</p></section>')


def verdict(results: dict, plots: list) -> str:
    """The Pareto verdict: each protected row's harm bound against its margin, then the baselines' figures."""
    v = results.get("verdict")
    if not v:
        return ""
    rows = "".join(
        f'<tr><td class="metric"><span class="name">{esc(p["id"])}</span></td><td>{esc(p["rule"])}</td>'
        f'<td>{num("verdict." + p["id"] + ".worst", p["worst"], fmt(p["worst"], "+.3g"))}</td>'
        f'<td>{num("verdict." + p["id"] + ".limit", p["limit"], fmt(p["limit"], ".3g"))}</td>'
        f'<td class="delta {"better" if p["ok"] else "worse"}">{"non-inferior" if p["ok"] else "cost"}</td></tr>'
        for p in v.get("protected", []))
    table = (f'<div class="scroll"><table class="fig"><thead><tr><th>protected row</th><th>margin</th>'
             f'<th>harm bound (one-sided {1 - v.get("alpha", 0.05):.0%})</th><th>allowed</th><th>result</th></tr></thead>'
             f'<tbody>{rows}</tbody></table></div>') if rows else "<p>No protected rows.</p>"
    base = results.get("baselines") or {}
    figs_html = "".join(figure(f, f"verdict_figures.{j}", plots)
                        for j, f in enumerate(results.get("verdict_figures") or []))
    lines = []                                   # each line built from escaped pieces
    if "control_verdict" in results:
        lines.append(esc(f"Control: {results['control_verdict']['label']}."))
    if "prompt" in base:
        lines.append(esc(f"Prompting baseline ({base['prompt']['prefix']!r}): {base['prompt']['verdict']['label']}."))
    if "random" in base:
        lines += [f"{esc(k)}: the plan's change {esc(fmt(x['located'], '+.3g'))} beats "
                  f"{num(f'baselines.random.{k}.percentile', x['percentile'], fmt(x['percentile'], '.0f'))}% of "
                  f"{len(x['draws'])} random draws ({esc(base['random']['method'])})." for k, x in base["random"]["rows"].items()]
    text = "".join(f"<p>{ln}</p>" for ln in lines)
    return (f'<section class="card verdict"><h2>Verdict: {esc(v["label"])}</h2><p>{esc(v["text"])}</p>{table}'
            f"{text}{figs_html}</section>")
