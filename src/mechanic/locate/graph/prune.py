"""Pruning by indirect influence, and the replacement and completeness scores, as circuit-tracer defines them.

With A the adjacency with absolute values, each row normalised to sum 1, the indirect influence of every
node on the output is w @ (A + A^2 + A^3 + ...) = w @ ((I - A)^-1 - I), w the logit probabilities on the
logit nodes. Nodes are kept in descending influence until they hold `node_threshold` of the total; then
edges (normalised weight times the influence of their target, plus its logit weight) until they hold
`edge_threshold`; then feature and error nodes left without an outgoing edge, and features without an
incoming one, are dropped until nothing changes. Tokens and logits are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechanic.locate.graph.errors import GraphError
from mechanic.locate.graph.graph import Graph


def normalized(adjacency: torch.Tensor) -> torch.Tensor:
    """|A| with every row scaled to sum 1 (rows of zeros stay zero)."""
    a = adjacency.abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def influence(a_norm: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """weights @ (A + A^2 + ...): every node's total influence on the weighted nodes along all paths."""
    current = weights @ a_norm
    total = current.clone()
    for _ in range(a_norm.shape[0] + 1):        # an acyclic graph of N nodes has no path longer than N
        if not current.any():
            return total
        current = current @ a_norm
        total += current
    raise GraphError("The graph's adjacency has a cycle (influence did not vanish after as many steps as nodes); "
                     "an attribution graph must only have edges from earlier to later nodes.")


def threshold(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The smallest score among the largest scores that together hold `fraction` of the total.

    Only the positive scores are sorted (after node pruning most edge scores are zero); a fraction the
    positive scores do not reach (rounding at 1.0) gives 0, as sorting the zeros too would.
    """
    positive = scores[scores > 0]
    if not len(positive):
        return scores.new_zeros(())
    s = positive.sort(descending=True).values
    cum = s.cumsum(0) / s.sum()
    i = int(torch.searchsorted(cum, torch.tensor(fraction, dtype=cum.dtype)))
    if i < len(s):
        return s[i]
    return scores.new_zeros(()) if len(positive) < scores.numel() else s[-1]


@dataclass
class Pruned:
    """Which nodes and edges a pruning kept, and each node's cumulative influence rank (0..1, smaller = stronger)."""

    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    cumulative: torch.Tensor

    def subgraph(self, graph: Graph) -> Graph:
        """The kept nodes with the kept edges (other edges zeroed), as a Graph of its own."""
        keep = self.node_mask
        adj = (graph.adjacency * self.edge_mask)[keep][:, keep]
        pick = lambda t: t[keep]   # noqa: E731
        logit_keep = keep[graph.span("logit")]
        return Graph(pick(graph.kind), pick(graph.layer), pick(graph.pos), pick(graph.feature), pick(graph.value),
                     pick(graph.bias), adj, graph.tokens, graph.logit_tokens[logit_keep],
                     graph.logit_probs[logit_keep], [lab for lab, k in zip(graph.labels, keep.tolist()) if k],
                     graph.prompt, dict(graph.scores), {**graph.meta, "pruned_from": len(graph)})


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Keep the nodes and edges that carry the given fractions of the influence on the logits."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise GraphError(f"{name} is a fraction of the total influence, between 0 and 1; got {v}.")
    A = graph.adjacency.float()
    w = graph.logit_weights.float()
    fixed = graph.count("token") + graph.count("logit")
    F = graph.count("feature")
    n = len(graph)
    node_inf = influence(normalized(A), w)
    node_mask = node_inf >= threshold(node_inf, node_threshold)
    node_mask[n - fixed:] = True

    kept = A.clone()
    kept[~node_mask] = 0
    kept[:, ~node_mask] = 0
    kept_norm = normalized(kept)
    edge_scores = kept_norm * (influence(kept_norm, w) + w)[:, None]
    edge_mask = edge_scores >= threshold(edge_scores.flatten(), edge_threshold)

    before = None
    while before is None or not torch.equal(before, node_mask):
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:n - fixed] &= edge_mask[:, :n - fixed].any(0)    # features and errors need an outgoing edge
        node_mask[:F] &= edge_mask[:F].any(1)                        # features need an incoming edge

    order = node_inf.argsort(descending=True)
    cumulative = torch.zeros_like(node_inf)
    cumulative[order] = node_inf[order].cumsum(0) / node_inf.sum()
    return Pruned(node_mask, edge_mask, cumulative)


def graph_scores(graph: Graph) -> dict[str, float]:
    """circuit-tracer's two scores of a graph.

    replacement: of the influence that token nodes and error nodes have on the logits, the fraction held
    by tokens (1 = the logits are explained from the tokens through features alone).
    completeness: the average, weighted by each node's influence on the output (plus its logit weight),
    of the fraction of its normalised input that comes from non-error nodes.
    """
    A = normalized(graph.adjacency.float())
    w = graph.logit_weights.float()
    inf = influence(A, w)
    err, tok = graph.span("error"), graph.span("token")
    token_inf, error_inf = inf[tok].sum(), inf[err].sum()
    replacement = token_inf / (token_inf + error_inf)
    non_error = 1 - A[:, err].sum(1)
    out = inf + w
    completeness = (non_error * out).sum() / out.sum()
    return {"replacement": float(replacement), "completeness": float(completeness)}
