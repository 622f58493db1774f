"""Figures of results.json (docs/RUNS.md) as plotly figures: heatmap, bars, line, and the before/after chart."""

from __future__ import annotations

import html
import math

PLOT_KINDS = ("heatmap", "bars", "line")            # drawn by plotly
REQUIRED = {"heatmap": ("x", "y", "z"), "bars": ("labels", "series"), "line": ("x", "series"),
            "table": ("columns", "rows"), "samples": ("items",)}
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
BEFORE, AFTER = "#9aa5b1", "#2563eb"
SERIES = [AFTER, "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2"]


def check(fig: dict, where: str) -> str:
    """The figure's kind, after checking it is known and has the fields its kind needs (clear error otherwise)."""
    kind = fig.get("kind") if isinstance(fig, dict) else None
    if kind not in REQUIRED:
        raise ValueError(f"{where}: unknown figure kind {kind!r}; known kinds: {', '.join(sorted(REQUIRED))} "
                         "(see docs/RUNS.md)")
    missing = [k for k in REQUIRED[kind] if k not in fig]
    if missing:
        raise ValueError(f"{where}: {kind} figure {fig.get('id')!r} lacks {', '.join(missing)} (see docs/RUNS.md)")
    return kind


def text(s) -> str:
    """Text for plotly labels: plotly reads a subset of HTML in labels, so escape it to show it literally."""
    return html.escape(str(s), quote=False)


def token(s) -> str:
    """A tick label with line breaks and tabs made visible (tokens such as "\\n" would otherwise show as blank)."""
    return text(str(s).replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r"))


def plot(fig: dict, where: str = "figure"):
    """A go.Figure for a heatmap, bars or line figure dict."""
    kind = check(fig, where)
    if kind not in PLOT_KINDS:
        raise ValueError(f"{where}: {kind} figures are HTML, not plots")
    return {"heatmap": heatmap, "bars": bars, "line": line}[kind](fig)


def _layout(fig, **kw):
    """Shared look: system fonts, white background, compact margins; the title is the HTML caption's job."""
    kw = {"margin": {"l": 60, "r": 20, "t": 20, "b": 50}, **kw}
    fig.update_layout(template="plotly_white", font={"family": FONT, "size": 12, "color": "#1f2933"},
                      autosize=True, **kw)
    return fig


def heatmap(f: dict):
    """Heatmap with its labels on both axes; integer positions keep repeated tokens as separate columns."""
    import plotly.graph_objects as go

    x, y, z = [token(v) for v in f["x"]], [token(v) for v in f["y"]], f["z"]
    if len(z) != len(y) or any(len(row) != len(x) for row in z):
        raise ValueError(f"heatmap {f.get('id')!r}: z must be {len(y)} rows x {len(x)} columns")
    vals = [v for row in z for v in row if v is not None and not math.isnan(v)]
    style = {"colorscale": "Viridis"}
    if f.get("zmid") is not None:
        lim = max((abs(v - f["zmid"]) for v in vals), default=0.0) or 1.0
        style = {"colorscale": "RdBu", "reversescale": True, "zmid": f["zmid"],
                 "zmin": f["zmid"] - lim, "zmax": f["zmid"] + lim}
    hover = [[f"{ry} · {cx}" for cx in x] for ry in y]
    tr = go.Heatmap(z=z, x=list(range(len(x))), y=list(range(len(y))), text=hover, xgap=1, ygap=1,
                    hovertemplate="%{text}<br>%{z:.4g}<extra></extra>", hoverongaps=False,
                    colorbar={"title": {"text": text(f.get("colorbar", "")), "side": "right"}, "thickness": 14},
                    **style)
    longest = max((len(v) for v in x), default=1)
    g = go.Figure(tr)
    _layout(g, height=min(900, max(300, 22 * len(y) + 120 + 5 * min(longest, 20))),
            xaxis={"tickvals": list(range(len(x))), "ticktext": x, "title": text(f.get("xlabel", "")),
                   "tickangle": -45 if longest > 3 and len(x) > 6 else 0, "showgrid": False, "zeroline": False},
            yaxis={"tickvals": list(range(len(y))), "ticktext": y, "title": text(f.get("ylabel", "")),
                   "autorange": "reversed", "showgrid": False, "zeroline": False})
    return g


def _whiskers(mean, lo, hi) -> dict:
    """Asymmetric error bars from a confidence interval."""
    return {"type": "data", "symmetric": False, "array": [h - m for m, h in zip(mean, hi)],
            "arrayminus": [m - lo_ for m, lo_ in zip(mean, lo)], "thickness": 1.5, "width": 6, "color": "#334155"}


def bars(f: dict):
    """Grouped bars (before/after or any named series) with CI whiskers when lo/hi are given."""
    import plotly.graph_objects as go

    g = go.Figure()
    for i, s in enumerate(f["series"]):
        colour = {"before": BEFORE, "after": AFTER}.get(s.get("name"), SERIES[i % len(SERIES)])
        err = _whiskers(s["mean"], s["lo"], s["hi"]) if "lo" in s and "hi" in s else None
        g.add_bar(x=[text(v) for v in f["labels"]], y=s["mean"], name=text(s.get("name", "")), marker_color=colour,
                  error_y=err, hovertemplate="%{x}: %{y:.4g}<extra>%{fullData.name}</extra>")
    return _layout(g, barmode="group", height=360, yaxis_title=text(f.get("ylabel", "")),
                   legend={"orientation": "h", "y": 1.08, "x": 0})


def line(f: dict):
    """Lines over a shared x, optionally on a log x axis."""
    import plotly.graph_objects as go

    g = go.Figure()
    for i, s in enumerate(f["series"]):
        g.add_scatter(x=f["x"], y=s["y"], name=text(s.get("name", "")), mode="lines+markers",
                      line={"color": SERIES[i % len(SERIES)], "width": 2}, marker={"size": 6})
    xaxis = {"title": text(f.get("xlabel", "")), "type": "log" if f.get("log_x") else "linear"}
    if f.get("log_x") and len(f["x"]) <= 12:
        xaxis |= {"tickvals": list(f["x"]), "ticktext": [f"{v:g}" for v in f["x"]], "minor": {"showgrid": False}}
    return _layout(g, height=360, xaxis=xaxis,
                   yaxis_title=text(f.get("ylabel", "")), showlegend=len(f["series"]) > 1,
                   legend={"orientation": "h", "y": 1.08, "x": 0})


def evaluation_chart(rows: list[dict]):
    """Before/after bars with CI whiskers, one small panel per evaluation row (each metric keeps its own scale)."""
    from plotly.subplots import make_subplots

    nrows = math.ceil(len(rows) / 5)
    cols = math.ceil(len(rows) / nrows)
    g = make_subplots(rows=nrows, cols=cols, subplot_titles=[text(r["id"]) for r in rows],
                      horizontal_spacing=0.08, vertical_spacing=0.22 / max(1, nrows - 1) if nrows > 1 else 0.1)
    for i, r in enumerate(rows):
        where = {"row": i // cols + 1, "col": i % cols + 1}
        for name, colour in (("before", BEFORE), ("after", AFTER)):
            ci = r[name]
            g.add_bar(x=[name], y=[ci["mean"]], marker_color=colour, showlegend=False, name=name,
                      error_y=_whiskers([ci["mean"]], [ci["lo"]], [ci["hi"]]),
                      hovertemplate=f"{text(r['id'])} {name}: %{{y:.4g}}<extra></extra>", **where)
    _layout(g, height=230 * nrows + 40, bargap=0.35, margin={"l": 50, "r": 20, "t": 40, "b": 30})
    g.update_annotations(font={"size": 12})
    return g
