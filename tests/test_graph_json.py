"""The circuit-tracer / Neuronpedia graph JSON: keys and types as circuit-tracer writes them, ids as it names
them, the pruned graph as create_graph_files keeps it, and edge weights that read back exactly."""

import json

import pytest
import torch

from mechanic.locate.graph import GraphError, graph_scores, prune
from mechanic.report import graph_json
from test_graph_attribute import graph_for

# circuit-tracer's pydantic models (circuit_tracer/frontend/graph_models.py, safety-research/circuit-tracer
# 21ab88a): every field with the JSON types model_dump_json gives it. Optional fields may be null.
METADATA = {"slug": str, "scan": str, "transcoder_list": list, "prompt_tokens": list, "prompt": str,
            "node_threshold": (float, type(None)), "schema_version": (int, type(None))}
QPARAMS = {"pinnedIds": list, "supernodes": list, "linkType": str, "clickedId": str, "sg_pos": str}
NODE = {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str, "token_prob": float,
        "is_target_logit": bool, "run_idx": int, "reverse_ctx_idx": int, "jsNodeId": str, "clerp": str,
        "influence": (float, type(None)), "activation": (float, type(None))}
LINK = {"source": str, "target": str, "weight": float}
# Neuronpedia's graph-schema.json (apps/webapp/app/api/graph/graph-schema.json): what it requires
NP_REQUIRED = {"root": ["metadata", "qParams", "nodes", "links"],
               "metadata": ["slug", "scan", "prompt_tokens", "prompt"],
               "node": ["node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"],
               "link": ["source", "target", "weight"]}


def typed(obj: dict, schema: dict, where: str):
    """Every key of `schema` present with its type (bool is not an int here, as in JSON)."""
    for key, types in schema.items():
        assert key in obj, f"{where} lacks {key}"
        types = types if isinstance(types, tuple) else (types,)
        v = obj[key]
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        assert ok, f"{where}.{key} = {v!r} is not {types}"


@pytest.fixture(scope="module")
def tiny():
    _, _, g = graph_for("llama")
    g.scores = graph_scores(g)
    return g


def test_schema_matches_circuit_tracer(tiny, tmp_path):
    path = graph_json.write(tiny, tmp_path, "tiny-llama", node_threshold=0.8, edge_threshold=0.98)
    doc = json.loads(path.read_text())                       # what a viewer reads: the file, not the dict
    assert set(doc) == {"metadata", "qParams", "nodes", "links"}
    typed(doc["metadata"], METADATA, "metadata")
    typed(doc["qParams"], QPARAMS, "qParams")
    for n in doc["nodes"]:
        typed(n, NODE, n["node_id"])
        assert set(n) == set(NODE)
    for link in doc["links"]:
        typed(link, LINK, "link")
    assert all(k in doc for k in NP_REQUIRED["root"]) and all(k in doc["metadata"] for k in NP_REQUIRED["metadata"])
    assert all(k in n for n in doc["nodes"] for k in NP_REQUIRED["node"])
    m = doc["metadata"]
    assert m["slug"] == "tiny-llama" and m["schema_version"] == 1 and len(m["prompt_tokens"]) == len(tiny.tokens)
    assert m["pruning_settings"] == {"node_threshold": 0.8, "edge_threshold": 0.98}
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["tiny-llama"]
    graph_json.write(tiny, tmp_path, "tiny-llama")           # rewriting a slug replaces its entry
    graph_json.write(tiny, tmp_path, "other")
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["tiny-llama", "other"]


def test_nodes_named_and_typed_as_circuit_tracer(tiny):
    doc = graph_json.to_json(tiny, node_threshold=None, edge_threshold=None)
    L = tiny.meta["n_layers"]
    by_type = {}
    for n in doc["nodes"]:
        by_type.setdefault(n["feature_type"], []).append(n)
    assert set(by_type) == {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    for n in by_type["cross layer transcoder"]:
        layer, feat, pos = map(int, n["node_id"].split("_"))
        assert (n["layer"], n["ctx_idx"]) == (str(layer), pos) and n["jsNodeId"] == f"{layer}_{feat}-0"
        assert n["feature"] == (layer + feat) * (layer + feat + 1) // 2 + feat and n["activation"] > 0
    for n in by_type["mlp reconstruction error"]:
        layer, minus, pos = n["node_id"].split("_")
        assert minus == "-1" and n["feature"] == -1 and n["layer"] == layer and n["ctx_idx"] == int(pos)
    tokens = sorted(by_type["embedding"], key=lambda n: n["ctx_idx"])
    assert [n["node_id"] for n in tokens] == [f"E_{t}_{p}" for p, t in enumerate(tiny.tokens.tolist())]
    assert all(n["layer"] == "E" and n["feature"] == n["ctx_idx"] for n in tokens)
    logits = by_type["logit"]
    assert [n["node_id"] for n in logits] == [f"{L + 1}_{t}_{len(tiny.tokens) - 1}" for t in tiny.logit_tokens.tolist()]
    assert [n["is_target_logit"] for n in logits] == [True] + [False] * (len(logits) - 1)
    assert [n["token_prob"] for n in logits] == pytest.approx(tiny.logit_probs.tolist())
    assert logits[0]["clerp"].startswith('Output "') and all(n["influence"] is None for n in logits)
    assert all(0 < n["influence"] <= 1 + 1e-6 for n in doc["nodes"] if n["feature_type"] != "logit")


def test_full_graph_weights_round_trip_exactly(tiny):
    doc = json.loads(json.dumps(graph_json.to_json(tiny, node_threshold=None, edge_threshold=None)))
    ids, A = graph_json.adjacency(doc)
    where = {n: i for i, n in enumerate(graph_json.node_ids(tiny))}
    idx = torch.tensor([where[n] for n in ids])
    full = tiny.adjacency.double()
    assert (A - full[idx][:, idx]).abs().max() == 0
    assert len(doc["links"]) == int((tiny.adjacency != 0).sum()) > 0       # every nonzero edge, nothing else
    assert full[idx][:, idx].abs().sum() == full.abs().sum()                # the dropped nodes have no edges


def test_pruned_graph_keeps_what_prune_keeps(tiny):
    doc = graph_json.to_json(tiny, node_threshold=0.8, edge_threshold=0.98)
    kept = prune(tiny, 0.8, 0.98)
    ids, A = graph_json.adjacency(doc)
    where = {n: i for i, n in enumerate(graph_json.node_ids(tiny))}
    idx = torch.tensor([where[n] for n in ids])
    assert kept.node_mask[idx].all() and len(ids) < len(tiny)
    want = (tiny.adjacency * kept.edge_mask).double()[idx][:, idx]
    assert (A - want).abs().max() == 0
    assert len(doc["links"]) == int(((tiny.adjacency * kept.edge_mask) != 0).sum())   # no kept edge was lost
    cum = {n["node_id"]: n["influence"] for n in doc["nodes"] if n["influence"] is not None}
    assert all(cum[n] == pytest.approx(float(kept.cumulative[where[n]])) for n in cum)


def test_token_texts_from_tokenizer_or_labels(tiny, word_tokenizer):
    decoded, _ = graph_json.token_texts(tiny, word_tokenizer)
    assert decoded == [word_tokenizer.decode([t]) for t in tiny.tokens.tolist()]
    g = type(tiny)(**{k: getattr(tiny, k) for k in ("kind", "layer", "pos", "feature", "value", "bias", "adjacency",
                                                    "tokens", "logit_tokens", "logit_probs")}, meta=tiny.meta)
    t0 = g.span("token").start
    g.labels[t0] = "embed@0 'a\\nb'"                       # mechanic's label: the repr of the token's text
    doc = graph_json.to_json(g, node_threshold=1.0, edge_threshold=1.0)
    assert doc["metadata"]["prompt_tokens"][0] == "a⏎b"
    assert doc["metadata"]["prompt_tokens"][1] == f"#{int(tiny.tokens[1])}"   # a label without text: the id


def test_supernodes_saved_in_qparams(tiny):
    doc = graph_json.to_json(tiny)
    a, b = doc["nodes"][0]["node_id"], doc["nodes"][1]["node_id"]
    doc = graph_json.to_json(tiny, supernodes=[["<b>group</b>", a, b]])
    assert doc["qParams"]["supernodes"] == [["<b>group</b>", a, b]] and doc["qParams"]["pinnedIds"] == [a, b]
    with pytest.raises(GraphError, match="not nodes of the exported graph"):
        graph_json.to_json(tiny, supernodes=[["x", "99_99_99"]])


def test_not_a_graph_is_one_clear_error():
    with pytest.raises(GraphError, match="mechanic attribution Graph"):
        graph_json.to_json({"nodes": []})
