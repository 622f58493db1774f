"""A graph's features as `Scores` over feature sites (`L{l}.mlp_out.sae{f}`), the sites feature plans act on.

A feature's score is its total effect on the logits along the graph (direct + indirect, as
mechanic.locate.graph.validate predicts): activation x d(target)/d(activation), where the target is the
probability-weighted sum of the demeaned logit nodes, or one logit node's demeaned logit (`token`). It is
what the target would lose if the feature were ablated, according to the graph: positive features push the
target up. Feature plans act at every position, so by default the scores of one feature at different
positions are summed (`per_position=True` keeps a [sites, positions] table).
"""

from __future__ import annotations

import torch

from mechanic.locate.graph.errors import GraphError
from mechanic.locate.graph.graph import Graph
from mechanic.locate.graph.validate import total_effects


def feature_effects(graph: Graph, token: int | None = None) -> torch.Tensor:
    """[F] each feature node's total effect on the target (weighted logits, or the logit node of vocabulary id `token`)."""
    R = total_effects(graph)
    if token is None:
        w = graph.logit_probs.double()
    else:
        hit = (graph.logit_tokens == int(token)).nonzero().flatten()
        if not len(hit):
            raise GraphError(f"Token {token} is not one of the graph's logit nodes ({graph.logit_tokens.tolist()}); "
                             "raise logit_mass / max_logits when building the graph, or pick one of those tokens.")
        w = torch.zeros(len(graph.logit_tokens), dtype=torch.float64)
        w[int(hit[0])] = 1.0
    F = graph.span("feature")
    return (w @ R[:, F]) * graph.value.double()[F]


def scores(graph: Graph, token: int | None = None, per_position: bool = False, site: str = "mlp_out"):
    """Scores over the graph's feature sites `L{l}.{site}.sae{f}` (see the module docstring)."""
    from mechanic.locate.scores import Scores

    if graph.count("feature") == 0:
        raise GraphError("The graph has no feature nodes (no transcoder feature was active); nothing to score.")
    eff = feature_effects(graph, token)
    F = graph.span("feature")
    layer, feat, pos = graph.layer[F].tolist(), graph.feature[F].tolist(), graph.pos[F].tolist()
    names = list(dict.fromkeys(f"L{L}.{site}.sae{f}" for L, f in zip(layer, feat)))
    row = {n: i for i, n in enumerate(names)}
    P = len(graph.tokens)
    values = torch.zeros(len(names), P, dtype=torch.float64)
    for e, L, f, p in zip(eff.tolist(), layer, feat, pos):
        values[row[f"L{L}.{site}.sae{f}"], p] += e
    labels = [lab.split(" ", 1)[1] if " " in lab else lab for lab in graph.labels[graph.span("token")]]
    target = "weighted logits" if token is None else f"logit {token}"
    meta = graph.meta or {}
    return Scores(values if per_position else values.sum(1), names, "graph",
                  positions=[f"{i}:{t}" for i, t in enumerate(labels)] if per_position else None,
                  metric=f"total effect on the demeaned {target}", model=meta.get("model"),
                  settings={"prompt": graph.prompt, "token": token, "logit_tokens": graph.logit_tokens.tolist(),
                            "logit_probs": graph.logit_probs.tolist(), "graph_scores": dict(graph.scores)})


__all__ = ["feature_effects", "scores"]
