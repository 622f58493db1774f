"""Heatmaps of Scores as self-contained interactive HTML (plotly inlined: opens with no network)."""

from __future__ import annotations

import html
import os
from pathlib import Path

import torch

from mechanic.model.sites import Site
from mechanic.files import atomic_path


def grid(scores) -> tuple[torch.Tensor, list[str], list[str]]:
    """A 2-D view of scores: layer x position, or layer x head/neuron/expert for per-component scores."""
    v = scores.values
    if v.dim() == 2:
        return v, scores.sites, list(scores.positions or [str(i) for i in range(v.shape[1])])
    sites = [Site.parse(s) for s in scores.sites]
    if all(s.index is not None and s.layer is not None for s in sites):
        layers = sorted({s.layer for s in sites})
        width = max(s.index for s in sites) + 1
        g = torch.full((len(layers), width), float("nan"))
        for s, x in zip(sites, v.tolist()):
            g[layers.index(s.layer), s.index] = x
        kind = sites[0].kind
        return g, [f"L{layer}" for layer in layers], [f"{kind}{i}" for i in range(width)]
    return v[:, None], scores.sites, ["value"]


def heatmap(scores, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write an interactive heatmap of `scores` to an .html file (atomically)."""
    import plotly.graph_objects as go

    g, rows, cols = grid(scores)
    lim = float(g.nan_to_num(0).abs().max()) or 1.0
    fig = go.Figure(go.Heatmap(z=g.tolist(), x=[html.escape(f"{i}:{c}", quote=False) for i, c in enumerate(cols)],
                               y=[html.escape(str(r), quote=False) for r in rows],
                               colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim,
                               hovertemplate="%{y} %{x}<br>%{z:.4f}<extra></extra>"))
    title = title or f"{scores.method} — {scores.task or ''} ({scores.metric or ''})"
    fig.update_layout(title=html.escape(title, quote=False),   # plotly reads HTML in labels: show user text as written
                      yaxis={"autorange": "reversed"}, height=max(400, 18 * len(rows) + 150))
    path = Path(path)
    with atomic_path(path, suffix=".html") as tmp:
        fig.write_html(tmp, include_plotlyjs=True, full_html=True)
    return path
