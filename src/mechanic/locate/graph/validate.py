"""Validation of an attribution graph by intervention: the change of each logit the graph predicts when a
feature is ablated (or scaled), against the change measured in the real model.

Prediction. The graph is linear: with M[t, s] = adjacency[t, s] / value[s] (the direct effect per unit of
feature s's activation), changing feature s's activation by delta changes every target by
((I - M)^-1)[t, s] * delta: the direct effect plus the indirect effect through downstream features, each
assumed to move its activation as much as its pre-activation (an active feature stays active, an inactive
one inactive) and with attention patterns, norm scales and error nodes frozen at the prompt's values.
Measurement. The feature's transcoder is attached to the real model as a dictionary at `L{l}.mlp_out`
(mechanic.features.attach; with no intervention the spliced model equals the original bit for bit) and the
intervention mechanic.steer.feature_plans.feature_scale makes (`scale` on the latent site; locate may not import
steer) multiplies the latent by `factor` at its position, the transcoder's error term kept; the rest of the model (other MLPs, attention, norms) runs for real. Both sides are changes of the demeaned
logits (logit - mean logit) the graph has nodes for.
They agree exactly only where nothing the graph freezes lies downstream of the change (a feature of the last
layer at the last position, with a final norm whose scale does not depend on its input); elsewhere the
agreement (Pearson, Spearman, sign) says how far the linear graph can be trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mechanic.locate.graph.errors import GraphError
from mechanic.locate.graph.graph import KINDS, Graph
from mechanic.locate.graph.prune import influence, normalized


def total_effects(graph: Graph) -> torch.Tensor:
    """[K, N] float64: the change of each logit node per unit change of each feature's activation, along all paths
    of the graph (row k of (I - M)^-1, M the per-unit direct effects; summed as I + M + M^2 + ... on an acyclic graph)."""
    A = graph.adjacency.double()
    feats = graph.span("feature")
    M = torch.zeros_like(A)
    v = graph.value.double()[feats]
    M[:, feats] = A[:, feats] / torch.where(v == 0, torch.ones_like(v), v)   # inactive features carry no edges anyway
    logit = graph.span("logit")
    current = torch.zeros(logit.stop - logit.start, len(graph), dtype=torch.float64)
    current[:, logit] = torch.eye(logit.stop - logit.start, dtype=torch.float64)
    total = current.clone()
    for _ in range(len(graph) + 1):
        current = current @ M
        if not current.any():
            return total
        total += current
    raise GraphError("The graph's adjacency has a cycle; an attribution graph only has edges from earlier nodes.")


def top_features(graph: Graph, n: int) -> list[int]:
    """The `n` feature nodes with the largest influence on the logits (circuit-tracer's pruning measure)."""
    feats = graph.span("feature")
    inf = influence(normalized(graph.adjacency.float()), graph.logit_weights.float())[feats]
    return [feats.start + int(i) for i in inf.argsort(descending=True)[:n]]


def predict(graph: Graph, nodes: list[int], factor: float = 0.0) -> torch.Tensor:
    """[n, K] the graph's predicted change of each demeaned logit node when node i's activation is times `factor`."""
    bad = [i for i in nodes if KINDS[int(graph.kind[i])] != "feature"]
    if bad:
        raise GraphError(f"Nodes {bad[:5]} are not feature nodes; validation by intervention scales features.")
    R = total_effects(graph)
    delta = (factor - 1.0) * graph.value.double()[nodes]
    return (R[:, nodes] * delta).T


def _demeaned(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    z = logits.double()
    return z[tokens] - z.mean()


def measure(model, transcoders, graph: Graph, nodes: list[int], factor: float = 0.0) -> torch.Tensor:
    """[n, K] the change of each demeaned logit node in the real model when feature node i is times `factor` at its
    position (its transcoder attached at L{l}.mlp_out with the error kept; attached only for the measurement)."""
    from mechanic.features import attach, detach
    from mechanic.locate.graph.replacement import as_layers
    from mechanic.model.interventions import scale

    layers = as_layers(model, transcoders)
    ids = graph.tokens[None]
    out = torch.zeros(len(nodes), len(graph.logit_tokens), dtype=torch.float64)
    by_layer: dict[int, list[int]] = {}
    for r, i in enumerate(nodes):
        by_layer.setdefault(int(graph.layer[i]), []).append(r)
    with torch.no_grad():
        base = _demeaned(model.run(ids, last_only=True).logits[0, -1], graph.logit_tokens)
        for layer, rows in by_layer.items():
            d = layers[layer]
            if d is None:
                raise GraphError(f"Layer {layer} has feature nodes but no transcoder was given for it; pass the "
                                 "transcoders the graph was built with.")
            site = f"L{layer}.mlp_out"
            if site in model.dictionaries:
                raise GraphError(f"A dictionary is already attached at {site}; detach it (mechanic.features.detach) "
                                 "before validating, so the measurement goes through this graph's transcoder.")
            attach(model, d)
            try:
                for r in rows:
                    i = nodes[r]
                    iv = scale(f"{site}.sae{int(graph.feature[i])}", float(factor), pos=int(graph.pos[i]))
                    z = model.run(ids, interventions=[iv], last_only=True).logits[0, -1]
                    out[r] = _demeaned(z, graph.logit_tokens) - base
            finally:
                detach(model, site)
    return out


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank), as Spearman's correlation needs."""
    order = x.argsort(stable=True)
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=x.dtype)
    for v in x.unique():
        tie = x == v
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two flat tensors (nan when either is constant)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = (a.norm() * b.norm()).item()
    return float((a @ b).item() / den) if den > 0 else float("nan")


def agreement(predicted: torch.Tensor, measured: torch.Tensor) -> dict[str, float]:
    """Pearson and Spearman correlation, sign agreement, and the largest absolute difference, over all entries."""
    p, m = predicted.flatten().double(), measured.flatten().double()
    return {"pearson": pearson(p, m), "spearman": pearson(_ranks(p), _ranks(m)),
            "sign": float((torch.sign(p) == torch.sign(m)).double().mean()) if len(p) else float("nan"),
            "max_abs_diff": float((p - m).abs().max()) if len(p) else 0.0,
            "max_abs_measured": float(m.abs().max()) if len(m) else 0.0}


@dataclass
class Validation:
    """Per feature node (rows) and logit node (columns): the predicted and measured change of the demeaned logit."""

    nodes: list[int]
    labels: list[str]
    logit_tokens: list[int]
    factor: float
    predicted: torch.Tensor
    measured: torch.Tensor
    agreement: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """One dict per (node, logit): label, node, logit token, predicted, measured."""
        return [{"node": n, "label": lab, "logit_token": t, "predicted": float(self.predicted[r, k]),
                 "measured": float(self.measured[r, k])}
                for r, (n, lab) in enumerate(zip(self.nodes, self.labels)) for k, t in enumerate(self.logit_tokens)]

    def to_dict(self) -> dict:
        return {"factor": self.factor, "agreement": self.agreement, "rows": self.rows()}

    def __repr__(self) -> str:
        a = self.agreement
        return (f"Validation({len(self.nodes)} features x {len(self.logit_tokens)} logits, factor {self.factor:g}: "
                f"pearson {a['pearson']:.3f}, spearman {a['spearman']:.3f}, sign {a['sign']:.2f})")


def validate(model, transcoders, graph: Graph, top: int = 10, factor: float = 0.0,
             nodes: list[int] | None = None) -> Validation:
    """Scale (factor=0: ablate) each of the graph's `top` most influential features (or the given feature `nodes`)
    in the real model, one at a time, and compare the change of every logit node with the graph's prediction."""
    if top < 1 and nodes is None:
        raise GraphError(f"validate needs at least one feature to intervene on; got top={top}.")
    if graph.count("feature") == 0:
        raise GraphError("The graph has no feature nodes (no transcoder feature was active), so there is nothing "
                         "to validate by intervention.")
    nodes = list(nodes) if nodes is not None else top_features(graph, top)
    predicted = predict(graph, nodes, factor)
    measured = measure(model, transcoders, graph, nodes, factor)
    return Validation(nodes, [graph.labels[i] for i in nodes], graph.logit_tokens.tolist(), factor, predicted,
                      measured, agreement(predicted, measured))


__all__ = ["Validation", "agreement", "measure", "predict", "top_features", "total_effects", "validate"]
