"""mechanic's attribution-graph viewer: one self-contained HTML page (inline JS and CSS, drawn on a canvas).

Nodes sit by layer (rows: tokens at the bottom, logits on top) and token position (columns); edges are drawn
blue (positive) or red (negative), wider for larger weights. Pan (drag), zoom (wheel), hover a node for its
details (and its feature page when given), click to select it and highlight its edges (shift-click adds to
the selection), group the selection into a named supernode, and prune with two sliders: nodes and edges by
cumulative influence on the logits (as circuit-tracer's node and edge thresholds). Every string reaches the
page as JSON inside a non-executed script element and is shown with textContent or canvas text only.

    from mechanic.report import graph_viewer
    graph_viewer.write(graph, "graph.html")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mechanic.files import atomic_path
from mechanic.locate.graph import Graph, GraphError
from mechanic.locate.graph.graph import KINDS
from mechanic.locate.graph.prune import influence, normalized
from mechanic.report.graph_json import node_ids, token_texts
from mechanic.report.sections import esc

HERE = Path(__file__).parent


def _round(values: torch.Tensor, digits: int) -> list[float]:
    """Floats with `digits` significant digits (keeps the page small; the JSON export keeps full precision)."""
    return [float(f"{v:.{digits}g}") for v in values.tolist()]


def _cumulative_start(scores: torch.Tensor) -> torch.Tensor:
    """For each item, the share of the total score held by the items ranked before it (0 for the strongest)."""
    order = scores.argsort(descending=True, stable=True)
    total = scores.sum().clamp(min=1e-30)
    before = torch.zeros_like(scores)
    before[order] = (scores[order].cumsum(0) - scores[order]) / total
    return before


def _top_edges(A: torch.Tensor, factor: torch.Tensor, keep: torch.Tensor, max_edges: int, chunk: int = 1024):
    """(dst, src, weight, c) of the `max_edges` best-scoring nonzero edges between kept nodes, where an edge's score
    is |A[t, s]| / sum|A[t]| x factor[t] and c is the share of all nonzero edges' total score held by edges scoring
    higher. Rows go in chunks, so no [N, N] temporary beyond the adjacency itself is made."""
    N = A.shape[0]
    row_sum = A.abs().sum(1).clamp(min=1e-10)

    def chunks():
        for r0 in range(0, N, chunk):
            a = A[r0:r0 + chunk]
            yield r0, a != 0, a.abs() / row_sum[r0:r0 + chunk, None] * factor[r0:r0 + chunk, None]

    total, found_s, found_i = 0.0, [], []
    for r0, nz, s in chunks():
        total += float(s.double().sum())
        flat = torch.where(nz & keep[r0:r0 + chunk, None] & keep[None, :], s, -1.0).flatten()
        v, i = flat.topk(min(max_edges, flat.numel()))
        found_s.append(v[v >= 0])
        found_i.append(i[v >= 0] + r0 * N)
    s, i = torch.cat(found_s), torch.cat(found_i)
    if len(s) > max_edges:
        s, j = s.topk(max_edges)
        i = i[j]
    i, j = i.sort()
    s = s[j]
    asc, order = s.sort()
    bucket = torch.zeros(len(s) + 1, dtype=torch.float64)       # bucket[k]: score of edges above k candidates
    for _, nz, sc in chunks():
        v = sc[nz]
        bucket.index_add_(0, torch.searchsorted(asc, v), v.double())
    above = bucket.flip(0).cumsum(0).flip(0)[1:]                 # above[j]: total score above candidate j
    c = torch.empty(len(s), dtype=torch.float64)
    c[order] = above / max(total, 1e-30)
    dst, src = i // N, i % N
    return dst, src, A[dst, src], c


def _pages(graph: Graph, pages: dict | None, contexts: int = 3, logits: int = 5) -> dict:
    """The shown part of each graph feature's page: {"layer_feature": {ctx, up, down}} from feature_pages data."""
    if not pages:
        return {}
    wanted = {(int(L), int(f)) for k, L, f in zip(graph.kind.tolist(), graph.layer.tolist(), graph.feature.tolist())
              if KINDS[k] == "feature"}
    out = {}
    for layer, data in pages.items():
        for f in (data or {}).get("features", []):
            if (int(layer), int(f["id"])) not in wanted:
                continue
            ctx = []
            for c in f.get("contexts", [])[:contexts]:
                toks, at = c["tokens"], c["at"]
                ctx.append(["".join(toks[max(0, at - 12):at]), toks[at], "".join(toks[at + 1:at + 5]), c["value"]])
            eff = f.get("logits", {})
            out[f"{int(layer)}_{int(f['id'])}"] = {
                "ctx": ctx, "up": [[e["token"], e["logit"]] for e in eff.get("promoted", [])[:logits]],
                "down": [[e["token"], e["logit"]] for e in eff.get("suppressed", [])[:logits]]}
    return out


def view_data(graph: Graph, *, node_threshold: float = 0.8, edge_threshold: float = 0.98, tokenizer=None,
              pages: dict | None = None, title: str | None = None, max_nodes: int = 20_000,
              max_edges: int = 100_000) -> dict:
    """What the page draws: per-node and per-edge columns, each with its cumulative-influence rank for the sliders.

    A node is shown when the nodes ranked before it hold less than the node threshold of the total influence
    (tokens and logits always); an edge likewise by its score, |normalised weight| x (influence + logit weight)
    of its target, over all nonzero edges. pages: {layer: mechanic.locate.feature_pages data} to show on hover.
    The page keeps at most `max_nodes` feature and error nodes (the most influential; tokens and logits always)
    and `max_edges` edges (the best-scoring between kept nodes): a real graph's dense adjacency has millions.
    """
    if not isinstance(graph, Graph):
        raise GraphError(f"The graph viewer draws a mechanic attribution Graph (mechanic.locate.graph), got "
                         f"{type(graph).__name__}; build one with attribute() or read one with Graph.load(dir).")
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise GraphError(f"{name} is a fraction of the total influence, between 0 and 1; got {v}.")
    A = graph.adjacency.float()
    w = graph.logit_weights.float()
    node_inf = influence(normalized(A), w)
    node_c = _cumulative_start(node_inf)
    keep = (graph.kind == KINDS.index("token")) | (graph.kind == KINDS.index("logit"))
    ranked = node_c.argsort(stable=True)
    keep[ranked[~keep[ranked]][:max_nodes]] = True
    idx = keep.nonzero().flatten()
    new = torch.full((len(graph),), -1, dtype=torch.long)
    new[idx] = torch.arange(len(idx))
    dst, src, weight, edge_c = _top_edges(A, node_inf + w, keep, max_edges)
    prompt_tokens, _ = token_texts(graph, tokenizer)
    pick = lambda t: t[idx].tolist()   # noqa: E731
    ids = node_ids(graph)
    return {"title": title or graph.prompt or "".join(prompt_tokens), "prompt_tokens": prompt_tokens,
            "n_layers": int(graph.layer[graph.kind == KINDS.index("logit")].max()) if graph.count("logit")
            else int(graph.layer.max()) + 1,
            "scores": {k: v for k, v in graph.scores.items() if isinstance(v, (int, float))},
            "meta": {"model": str(graph.meta.get("model", "")), "nodes": len(graph),
                     "edges": int((A != 0).sum()), "kept_nodes": len(idx), "kept_edges": len(weight)},
            "node_threshold": node_threshold, "edge_threshold": edge_threshold, "kinds": list(KINDS),
            "nodes": {"kind": pick(graph.kind), "layer": pick(graph.layer), "pos": pick(graph.pos),
                      "feature": pick(graph.feature), "value": _round(graph.value.float()[idx], 5),
                      "c": _round(node_c[idx], 6), "influence": _round(node_inf[idx], 4),
                      "label": [graph.labels[i] for i in idx.tolist()], "id": [ids[i] for i in idx.tolist()]},
            "edges": {"src": new[src].tolist(), "dst": new[dst].tolist(), "w": _round(weight, 5),
                      "c": _round(edge_c, 6)},
            "pages": _pages(graph, pages)}


def script_json(data) -> str:
    """JSON that cannot end its <script> element early (nor be read as HTML): <, >, & and line separators escaped."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    for c, e in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(c, e)
    return text


def html(data: dict) -> str:
    """The page: CSS, the controls, the graph data as JSON and the viewer script, all inline."""
    css = (HERE / "graph_viewer.css").read_text(encoding="utf-8")
    js = (HERE / "graph_viewer.js").read_text(encoding="utf-8")
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{esc("Attribution graph: " + data["title"])}</title><style>{css}</style></head>\n'
            '<body data-plots-expected="0" data-plots-rendered="0">\n'
            '<header><div class="title"><span class="what">attribution graph</span><span id="title"></span></div>'
            '<div class="stats" id="stats"></div>'
            '<label>nodes <input type="range" id="node-threshold" min="0" max="1" step="0.001">'
            '<output id="node-threshold-value"></output></label>'
            '<label>edges <input type="range" id="edge-threshold" min="0" max="1" step="0.001">'
            '<output id="edge-threshold-value"></output></label>'
            '<button id="fit" type="button">fit</button></header>\n'
            '<div id="wrap"><div id="stage"><canvas id="graph"></canvas><canvas id="overlay"></canvas></div>'
            '<aside id="side">'
            '<section id="details"><p class="note">Hover a node for its details; click to select it (shift-click '
            'adds), drag to pan, wheel to zoom.</p></section>'
            '<section id="group"><h3>Supernodes</h3><div class="row"><input id="supernode-name" type="text" '
            'placeholder="name of the selected nodes"><button id="group-button" type="button">group</button></div>'
            '<ul id="supernodes"></ul><details><summary>as circuit-tracer qParams.supernodes</summary>'
            '<pre id="supernodes-json"></pre></details></section></aside></div>\n'
            f'<script type="application/json" id="graph-data">{script_json(data)}</script>\n'
            f"<script>{js}</script>\n</body></html>\n")


def write(graph: Graph, path: str | os.PathLike, **kw) -> Path:
    """Write the viewer page of `graph` to `path` atomically (keyword arguments as view_data)."""
    page = html(view_data(graph, **kw))
    with atomic_path(path, suffix=".html") as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return Path(path)


__all__ = ["html", "view_data", "write"]
