"""Feature pages as HTML: one card per feature (top contexts with per-token highlighting, activation histogram,
logit effect), for the run report (`feature_sections`) or as a page of their own (`build_page`).

The input is the JSON of mechanic.locate.feature_pages. Every shown number carries data-key (a dotted path
into that JSON, e.g. `features.0.contexts.2.value`) and data-value; every string is escaped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mechanic.report.html import page, write
from mechanic.report.sections import esc, figure, fmt, num

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


def contexts(f: dict, i: int) -> str:
    """Top contexts, best first: the activation at the marked token, then the tokens shaded by activation."""
    if not f["contexts"]:
        return '<p class="note">Never fired on the text read.</p>'
    rows = []
    for j, c in enumerate(f["contexts"]):
        toks = "".join(_token(p, a, f["max"], n == c["at"]) for n, (p, a) in enumerate(zip(c["tokens"], c["acts"])))
        rows.append(f'<div class="ctx" data-context="{j}"><span class="ctx-value">'
                    f'{num(f"features.{i}.contexts.{j}.value", c["value"], fmt(c["value"], ".3g"))}</span>'
                    f'<span class="ctx-text" title="window {c["window"]}, token {c["position"]}">{toks}</span></div>')
    return f'<div class="contexts">{"".join(rows)}</div>'


def histogram(f: dict, i: int, plots: list) -> str:
    """The activation histogram (nonzero activations; bins labelled by their lower edge) as a bar plot."""
    h = f["histogram"]
    if not h["counts"]:
        return ""
    fig = {"kind": "bars", "id": f"histogram-{f['id']}", "title": "Activation histogram",
           "labels": [f"{n * h['width']:.3g}" for n in range(len(h["counts"]))],
           "series": [{"name": "tokens", "mean": h["counts"]}], "ylabel": "tokens",
           "caption": f"Nonzero activations in bins of width {h['width']:.3g} (labelled by the lower edge); "
                      "zeros are left out."}
    return figure(fig, f"features.{i}.histogram", plots)


def logit_table(f: dict, i: int, side: str) -> str:
    """The tokens one side of the logit effect, with their logit per unit of activation."""
    rows = "".join(f'<tr><td><code class="tok-text" title="token id {esc(t["id"])}">{esc(shown_token(t["token"]))}</code></td><td class="num">'
                   f'{num(f"features.{i}.logits.{side}.{j}.logit", t["logit"], fmt(t["logit"], "+.3f"))}</td></tr>'
                   for j, t in enumerate(f["logits"][side]))
    return (f'<div><table class="fig logits {side}"><thead><tr><th>{side}</th><th>logit</th></tr></thead>'
            f"<tbody>{rows}</tbody></table></div>")


def feature_section(f: dict, i: int, plots: list) -> str:
    """One feature's card (the i-th of the JSON's features)."""
    stats = (f'fires on {num(f"features.{i}.frequency", f["frequency"], fmt(100 * f["frequency"], ".3g") + "%")} of '
             f'tokens ({num(f"features.{i}.count", f["count"])}) · max {num(f"features.{i}.max", f["max"], fmt(f["max"], ".3g"))}'
             f' · mean when firing {num(f"features.{i}.mean_active", f["mean_active"], fmt(f["mean_active"], ".3g"))}')
    return (f'<section class="card feature" id="feature-{esc(f["id"])}" data-feature="{esc(f["id"])}">'
            f'<h2>Feature {esc(f["id"])}</h2><div class="meta">{stats}</div><h3>Top contexts</h3>{contexts(f, i)}'
            f'{histogram(f, i, plots)}<h3>Logit effect</h3><p class="note">Tokens the decoder direction promotes and '
            "suppresses (direct logit attribution through the final norm's gain and the unembedding).</p>"
            f'<div class="pair">{logit_table(f, i, "promoted")}{logit_table(f, i, "suppressed")}</div></section>')


def feature_sections(data: dict, plots: list) -> str:
    """Every feature's card, for a page or the run report (plots are appended to `plots`)."""
    return "".join(feature_section(f, i, plots) for i, f in enumerate(data["features"]))


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


def build_page(data: dict, path: str | os.PathLike) -> Path:
    """Write the feature pages of `data` as one self-contained HTML file, atomically."""
    plots: list = []
    body = header(data) + feature_sections(data, plots)
    return write(page(f"Feature pages: {data['dictionary'].get('path') or data['dictionary']['description']}", body,
                      plots, "mechanic feature pages"), path)
