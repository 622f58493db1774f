"""An attribution graph as the JSON that circuit-tracer's and Neuronpedia's graph viewers read.

The schema is circuit-tracer's (`circuit_tracer/frontend/graph_models.py`, written by
`utils/create_graph_files.py`; schema_version 1) and Neuronpedia's graph-schema.json: `metadata` (slug, scan,
transcoder_list, prompt_tokens, prompt, node_threshold, schema_version, plus Neuronpedia's optional info,
generation_settings and pruning_settings), `qParams` (the saved subgraph state), `nodes` and `links`. As
circuit-tracer does, the graph is pruned first (node and edge thresholds on the influence on the logits), links
are the kept edges between kept nodes (rows = targets in node order, then sources), and a node stays only if a
link touches it, except tokens and logits. Unlike circuit-tracer, links of weight exactly 0 are left out.

Node ids: features `{layer}_{feature}_{pos}`, errors `{layer}_-1_{pos}` (circuit-tracer >= 0.5.1; before, the
error ids collided with layer-0 features), tokens `E_{token id}_{pos}`, logits `{n_layers + 1}_{token id}_{pos}`.
A feature's `feature` is the Cantor pairing of (layer, feature index), as circuit-tracer writes it.
"""

from __future__ import annotations

import ast
import json
import os
import time
from pathlib import Path

import torch

from mechanic.files import write_text
from mechanic.locate.graph import Graph, GraphError, prune
from mechanic.locate.graph.graph import KINDS

SCHEMA_VERSION = 1
FEATURE_TYPES = {"feature": "cross layer transcoder", "error": "mlp reconstruction error", "token": "embedding",
                 "logit": "logit"}
SHOWN = {"\n": "⏎", "\t": "→", "\r": "↵"}         # circuit-tracer's process_token


def shown(text: str) -> str:
    """A token as circuit-tracer shows it: line breaks and tabs as symbols."""
    for c, sym in SHOWN.items():
        text = text.replace(c, sym)
    return text


def cantor(layer: int, feature: int) -> int:
    """circuit-tracer's single integer for (layer, feature index)."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def n_layers(graph: Graph) -> int:
    """The model's layer count (logit nodes sit at layer n_layers)."""
    logits = graph.layer[graph.kind == KINDS.index("logit")]
    return int(graph.meta.get("n_layers", int(logits[0]) if len(logits) else int(graph.layer.max()) + 1))


def node_ids(graph: Graph) -> list[str]:
    """circuit-tracer's node_id of every node, in node order."""
    top = n_layers(graph) + 1
    out = []
    for k, L, p, f in zip(graph.kind.tolist(), graph.layer.tolist(), graph.pos.tolist(), graph.feature.tolist()):
        name = KINDS[k]
        out.append(f"{L}_{f}_{p}" if name == "feature" else f"{L}_-1_{p}" if name == "error"
                   else f"E_{f}_{p}" if name == "token" else f"{top}_{f}_{p}")
    return out


def _label_text(label: str, prefix: str) -> str | None:
    """The token text inside one of mechanic's labels (`embed@3 ' the'`, `logit ' Paris' p=0.412`), if present."""
    rest = label.split(" ", 1)[1] if label.startswith(prefix) and " " in label else ""
    if prefix == "logit":
        rest = rest.rsplit(" p=", 1)[0]
    try:
        value = ast.literal_eval(rest)
    except (ValueError, SyntaxError):
        return None
    return value if isinstance(value, str) else None


def token_texts(graph: Graph, tokenizer=None) -> tuple[list[str], list[str]]:
    """(prompt tokens, logit tokens) as text: decoded by `tokenizer`, else read from the graph's labels, else `#id`."""
    def text(ids, labels, prefix):
        if tokenizer is not None:
            return [tokenizer.decode([int(i)]) for i in ids]
        found = [_label_text(lab, prefix) for lab in labels]
        return [t if t is not None else f"#{int(i)}" for t, i in zip(found, ids)]
    labels = graph.labels
    tok = [labels[i] for i in range(*graph.span("token").indices(len(graph)))]
    logit = [labels[i] for i in range(*graph.span("logit").indices(len(graph)))]
    return text(graph.tokens.tolist(), tok, "embed@"), text(graph.logit_tokens.tolist(), logit, "logit")


def to_json(graph: Graph, slug: str = "graph", *, scan: str | None = None, node_threshold: float | None = 0.8,
            edge_threshold: float | None = 0.98, tokenizer=None, clerps: dict | None = None,
            supernodes: list | None = None) -> dict:
    """The pruned graph as a circuit-tracer / Neuronpedia graph document (a dict ready for json.dump).

    scan: the model id Neuronpedia uses (default: the graph's model name); clerps: labels by node id or index.
    node_threshold=None and edge_threshold=None: no pruning (every node with an edge, every nonzero edge).
    supernodes: [[name, node_id, ...], ...] (as mechanic's viewer shows them) saved in qParams, members pinned.
    """
    if not isinstance(graph, Graph):
        raise GraphError(f"to_json writes a mechanic attribution Graph (mechanic.locate.graph), got "
                         f"{type(graph).__name__}; build one with attribute() or read one with Graph.load(dir).")
    whole = node_threshold is None and edge_threshold is None
    kept = prune(graph, 1.0 if whole else node_threshold, 1.0 if whole else edge_threshold)
    if whole:
        kept.node_mask[:], kept.edge_mask[:] = True, True
    ids = node_ids(graph)
    prompt_tokens, logit_tokens = token_texts(graph, tokenizer)
    top, clerps = n_layers(graph) + 1, clerps or {}
    first_logit = graph.span("logit").start
    nodes = {}
    for i in kept.node_mask.nonzero().flatten().tolist():
        kind, L, p, f = KINDS[int(graph.kind[i])], int(graph.layer[i]), int(graph.pos[i]), int(graph.feature[i])
        node = {"node_id": ids[i], "feature": f, "layer": str(L), "ctx_idx": p, "feature_type": FEATURE_TYPES[kind],
                "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
                "jsNodeId": "", "clerp": "", "influence": float(kept.cumulative[i]), "activation": None}
        if kind == "feature":
            node.update(feature=cantor(L, f), jsNodeId=f"{L}_{f}-0", activation=float(graph.value[i]))
        elif kind == "error":
            node.update(feature=-1, jsNodeId=f"{L}_{p}-0")
        elif kind == "token":
            node.update(feature=p, layer="E", jsNodeId=f"E_{f}-{p}")
        else:
            k = i - first_logit
            prob = float(graph.logit_probs[k])
            node.update(layer=str(top), jsNodeId=f"L_{f}-{p}", token_prob=prob, is_target_logit=k == 0,
                        influence=None, clerp=f'Output "{shown(logit_tokens[k])}" (p={prob:.3f})')
        node["clerp"] = str(clerps.get(ids[i], clerps.get(i, node["clerp"])))
        nodes[i] = node
    mask = kept.edge_mask & (graph.adjacency != 0)
    dst, src = mask.nonzero(as_tuple=True)
    weights = graph.adjacency[dst, src].tolist()
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": w}
             for s, t, w in zip(src.tolist(), dst.tolist(), weights) if s in nodes and t in nodes]
    touched = {x for link in links for x in (link["source"], link["target"])}
    used = [n for n in nodes.values() if n["node_id"] in touched or n["feature_type"] in ("embedding", "logit")]
    groups = [[str(x) for x in g] for g in supernodes or []]
    unknown = sorted({m for g in groups for m in g[1:]} - {n["node_id"] for n in used})
    if unknown:
        raise GraphError(f"Supernode members {unknown[:5]} are not nodes of the exported graph; a supernode is "
                         "[name, node_id, ...] with ids of nodes the pruning kept (lower the thresholds to keep more).")
    pinned = list(dict.fromkeys(m for g in groups for m in g[1:]))
    return {"metadata": metadata(graph, slug, scan, prompt_tokens, node_threshold, edge_threshold),
            "qParams": {"pinnedIds": pinned, "supernodes": groups, "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": used, "links": links}


def metadata(graph: Graph, slug: str, scan: str | None, prompt_tokens: list[str], node_threshold: float,
             edge_threshold: float) -> dict:
    """circuit-tracer's metadata, with Neuronpedia's optional info, generation and pruning settings."""
    import mechanic

    meta = graph.meta or {}
    scores = ", ".join(f"{k} score {v:.4f}" for k, v in graph.scores.items() if isinstance(v, float))
    return {"slug": slug, "scan": scan or str(meta.get("model", "mechanic")),
            "transcoder_list": [str(t) for t in meta.get("transcoders", []) if t],
            "prompt_tokens": [shown(t) for t in prompt_tokens],
            "prompt": graph.prompt if graph.prompt is not None else "".join(prompt_tokens),
            "node_threshold": node_threshold, "schema_version": SCHEMA_VERSION,
            "info": {"description": f"mechanic attribution graph ({scores or 'scores not computed'})",
                     "generator": {"name": "mechanic", "version": str(getattr(mechanic, "__version__", ""))},
                     "create_time_ms": int(time.time() * 1000)},
            "generation_settings": {"max_n_logits": meta.get("max_logits"),
                                    "desired_logit_prob": meta.get("logit_mass"),
                                    "batch_size": meta.get("batch_size"),
                                    "max_feature_nodes": meta.get("max_feature_nodes")},
            "pruning_settings": {"node_threshold": node_threshold, "edge_threshold": edge_threshold}}


def adjacency(doc: dict) -> tuple[list[str], torch.Tensor]:
    """(node ids, adjacency[target, source]) read back from a graph document's nodes and links."""
    ids = [n["node_id"] for n in doc["nodes"]]
    index = {n: i for i, n in enumerate(ids)}
    if len(index) != len(ids):
        raise GraphError("The graph document has repeated node ids; each node_id must be unique.")
    A = torch.zeros(len(ids), len(ids), dtype=torch.float64)
    for link in doc["links"]:
        A[index[link["target"]], index[link["source"]]] = link["weight"]
    return ids, A


def write(graph: Graph, directory: str | os.PathLike, slug: str = "graph", **kw) -> Path:
    """Write `directory`/{slug}.json and add it to `directory`/graph-metadata.json (circuit-tracer's server layout)."""
    directory = Path(directory)
    doc = to_json(graph, slug, **kw)
    path = write_text(directory / f"{slug}.json", json.dumps(doc, indent=1))
    index_path = directory / "graph-metadata.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"graphs": []}
    index["graphs"] = [g for g in index.get("graphs", []) if g.get("slug") != slug] + [doc["metadata"]]
    write_text(index_path, json.dumps(index, indent=1))
    return path


__all__ = ["adjacency", "cantor", "node_ids", "to_json", "write"]
