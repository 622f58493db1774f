"""Feature pages as HTML: one card per feature (top contexts with per-token highlighting, activation histogram,
logit effect), for the run report (`run_section`) or as a page of their own (`build_page`).

The input is the JSON of mechanic.locate.feature_pages. Every shown number carries data-key (a dotted path
into that JSON, e.g. `features.0.contexts.2.value`; in the run report into results.json,
`feature_pages.features.0.contexts.2.value`) and data-value; every string is escaped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mechanic.report.html import page, write
from mechanic.report.sections import esc, figure, fmt, num, stage_meta

VISIBLE = {"\n": "↵", "\r": "␍", "\t": "⇥"}
HIGHLIGHT = "234,88,12"          # orange, alpha = activation / the feature's largest activation


def visible(piece: str) -> str:
    """A token's text with line breaks and tabs shown as symbols (a context stays one line)."""
    for c, sym in VISIBLE.items():
        piece = piece.replace(c, sym)
    return piece


def shown_token(piece: str) -> str:
    """A vocabulary token for a table cell: as written, or quoted with escapes when it is blank or invisible."""
    return visible(piece) if piece.strip() else json.dumps(piece)


def _token(piece: str, act, top: float, is_place: bool) -> str:
    cls = "tok max" if is_place else "tok"
    if act is None:
        return f'<span class="{cls} unread" title="not read (first token of a window)">{esc(visible(piece))}</span>'
    alpha = max(0.0, min(1.0, act / top)) if top > 0 else 0.0
    style = f' style="background:rgba({HIGHLIGHT},{alpha:.2f})"' if alpha > 0 else ""
    return (f'<span class="{cls}" data-act="{esc(json.dumps(act))}" title="{esc(fmt(act, ".4g"))}"{style}>'
            f"{esc(visible(piece))}</span>")


def contexts(f: dict, i: int, prefix: str = "") -> str:
    """Top contexts, best first: the activation at the marked token, then the tokens shaded by activation."""
    if not f["contexts"]:
        return '<p class="note">Never fired on the text read.</p>'
    rows = []
    for j, c in enumerate(f["contexts"]):
        toks = "".join(_token(p, a, f["max"], n == c["at"]) for n, (p, a) in enumerate(zip(c["tokens"], c["acts"])))
        rows.append(f'<div class="ctx" data-context="{j}"><span class="ctx-value">'
                    f'{num(f"{prefix}features.{i}.contexts.{j}.value", c["value"], fmt(c["value"], ".3g"))}</span>'
                    f'<span class="ctx-text" title="window {c["window"]}, token {c["position"]}">{toks}</span></div>')
    return f'<div class="contexts">{"".join(rows)}</div>'


def histogram(f: dict, i: int, plots: list, prefix: str = "") -> str:
    """The activation histogram (nonzero activations; bins labelled by their lower edge) as a bar plot."""
    h = f["histogram"]
    if not h["counts"]:
        return ""
    fig = {"kind": "bars", "id": f"histogram-{f['id']}", "title": "Activation histogram",
           "labels": [f"{n * h['width']:.3g}" for n in range(len(h["counts"]))],
           "series": [{"name": "tokens", "mean": h["counts"]}], "ylabel": "tokens",
           "caption": f"Nonzero activations in bins of width {h['width']:.3g} (labelled by the lower edge); "
                      "zeros are left out."}
    return figure(fig, f"{prefix}features.{i}.histogram", plots)


def logit_table(f: dict, i: int, side: str, prefix: str = "") -> str:
    """The tokens one side of the logit effect, with their logit per unit of activation."""
    rows = "".join(f'<tr><td><code class="tok-text" title="token id {esc(t["id"])}">{esc(shown_token(t["token"]))}</code></td><td class="num">'
                   f'{num(f"{prefix}features.{i}.logits.{side}.{j}.logit", t["logit"], fmt(t["logit"], "+.3f"))}</td></tr>'
                   for j, t in enumerate(f["logits"][side]))
    return (f'<div><table class="fig logits {side}"><thead><tr><th>{side}</th><th>logit</th></tr></thead>'
            f"<tbody>{rows}</tbody></table></div>")


def role(f: dict, i: int, prefix: str) -> str:
    """In a run report: what the recipe did with this latent (steered by the plan, its attribution rank)."""
    r = f.get("role")
    if not r:
        return ""
    parts = [f'<code>{esc(r["latent"])}</code>']
    if r.get("steered"):
        parts.append('<span class="badge warn">steered by the plan</span>')
    if r.get("rank") is not None:
        k = f"{prefix}features.{i}.role"
        att = "" if r.get("attribution") is None else \
            f', attribution {num(k + ".attribution", r["attribution"], fmt(r["attribution"], "+.3g"))}'
        parts.append(f'located #{num(k + ".rank", r["rank"])}{att}')
    return f'<div class="meta role">{" · ".join(parts)}</div>'


def feature_section(f: dict, i: int, plots: list, prefix: str = "") -> str:
    """One feature's card (the i-th of the JSON's features; `prefix` leads its data-keys)."""
    k = f"{prefix}features.{i}"
    stats = (f'fires on {num(f"{k}.frequency", f["frequency"], fmt(100 * f["frequency"], ".3g") + "%")} of '
             f'tokens ({num(f"{k}.count", f["count"])}) · max {num(f"{k}.max", f["max"], fmt(f["max"], ".3g"))}'
             f' · mean when firing {num(f"{k}.mean_active", f["mean_active"], fmt(f["mean_active"], ".3g"))}')
    return (f'<section class="card feature" id="feature-{esc(f["id"])}" data-feature="{esc(f["id"])}">'
            f'<h2>Feature {esc(f["id"])}</h2>{role(f, i, prefix)}<div class="meta">{stats}</div><h3>Top contexts</h3>'
            f'{contexts(f, i, prefix)}{histogram(f, i, plots, prefix)}<h3>Logit effect</h3><p class="note">Tokens the '
            "decoder direction promotes and suppresses (direct logit attribution through the final norm's gain and "
            f'the unembedding).</p><div class="pair">{logit_table(f, i, "promoted", prefix)}'
            f'{logit_table(f, i, "suppressed", prefix)}</div></section>')


def feature_sections(data: dict, plots: list, prefix: str = "") -> str:
    """Every feature's card, for a page or the run report (plots are appended to `plots`)."""
    return "".join(feature_section(f, i, plots, prefix) for i, f in enumerate(data["features"]))


def header(data: dict) -> str:
    """What was read: dictionary, model, text, tokens, how the features were chosen, and links to each."""
    d = data["dictionary"]
    where = f'{d["site"]} → {d["out_site"]}' if d.get("out_site") else d["site"]
    lines = [("Dictionary", d.get("path") or d["description"]), ("Reads", f'{where} of {data["model"]}'),
             ("Text", data["text"]), ("Features", data["selection"])]
    body = "".join(f'<div class="line"><span class="what">{esc(w)}</span><span>{esc(v)}</span></div>' for w, v in lines)
    note = f'<p class="note">{esc(d["description"])}</p>' if d.get("path") else ""
    links = " ".join(f'<a href="#feature-{esc(f["id"])}">{esc(f["id"])}</a>' for f in data["features"])
    return (f'<section class="card summary"><div class="head"><h1>Feature pages</h1></div>{body}'
            f'<div class="line"><span class="what">Tokens</span><span>{num("tokens", data["tokens"])} in '
            f'{num("windows", data["windows"])} windows of {num("seq_len", data["seq_len"])}</span></div>'
            f'{note}<nav class="feature-links">{links}</nav></section>')


def run_section(results: dict, plots: list) -> str:
    """The run report's Features section: what was read, then a card per latent (results["feature_pages"])."""
    data = results.get("feature_pages")
    if not data:
        return ""
    d, st, key = data["dictionary"], data.get("stage") or {}, "feature_pages"
    where = f'{d["site"]} → {d["out_site"]}' if d.get("out_site") else d["site"]
    lines = [("Dictionary", f'{d.get("path") or d["description"]} ({where})'), ("Text", data["text"]),
             ("Features", data["selection"])]
    body = "".join(f'<div class="line"><span class="what">{esc(w)}</span><span>{esc(v)}</span></div>' for w, v in lines)
    meta = [f'{num(f"{key}.tokens", data["tokens"])} tokens in {num(f"{key}.windows", data["windows"])} windows of '
            f'{num(f"{key}.seq_len", data["seq_len"])}']
    meta += stage_meta(st, f"{key}.stage")
    links = " ".join(f'<a href="#feature-{esc(f["id"])}">{esc(f["id"])}</a>' for f in data["features"])
    head = (f'<section class="card stage features" id="features"><h2>Features</h2><div class="meta">'
            f'{" · ".join(meta)}</div>{body}<nav class="feature-links">{links}</nav>'
            "</section>")
    return head + feature_sections(data, plots, f"{key}.")


def build_page(data: dict, path: str | os.PathLike) -> Path:
    """Write the feature pages of `data` as one self-contained HTML file, atomically."""
    plots: list = []
    body = header(data) + feature_sections(data, plots)
    return write(page(f"Feature pages: {data['dictionary'].get('path') or data['dictionary']['description']}", body,
                      plots, "mechanic feature pages"), path)
