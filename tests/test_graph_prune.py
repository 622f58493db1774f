"""Pruning by indirect influence and the replacement/completeness scores: a hand-worked graph, and the
invariants plus a matrix-inverse reference on a tiny model's graph."""

import pytest
import torch

from mechanic.locate.graph import Graph, GraphError, graph_scores, influence, prune
from mechanic.locate.graph.prune import normalized
from test_graph_attribute import graph_for

# nodes: f0 (L0 feature), f1 (L1 feature), e0, e1 (errors of L0, L1), t0 (token), g0 (logit, p = 0.8)
F0, F1, E0, E1, T0, G0 = range(6)


def hand_graph() -> Graph:
    """t0 -2-> f0 -3-> f1 -4-> g0, e0 -(-1)-> f1, e1 -2-> g0, t0 -(-2)-> g0 (adjacency[target, source])."""
    A = torch.zeros(6, 6)
    A[F0, T0] = 2
    A[F1, F0], A[F1, E0] = 3, -1
    A[G0, F1], A[G0, E1], A[G0, T0] = 4, 2, -2
    return Graph(kind=torch.tensor([0, 0, 1, 1, 2, 3], dtype=torch.int8), layer=torch.tensor([0, 1, 0, 1, -1, 2]),
                 pos=torch.zeros(6, dtype=torch.int32), feature=torch.tensor([5, 7, -1, -1, 42, 9]),
                 value=torch.ones(6), bias=torch.zeros(6), adjacency=A, tokens=torch.tensor([42]),
                 logit_tokens=torch.tensor([9]), logit_probs=torch.tensor([0.8]))


def test_hand_graph_influence_and_scores():
    # row-normalised |A|: f0 <- t0: 1; f1 <- f0: 3/4, e0: 1/4; g0 <- f1: 1/2, e1: 1/4, t0: 1/4.
    # influence on g0 (weight 0.8): one step f1 .4, e1 .2, t0 .2; two steps f0 .3, e0 .1; three steps t0 .3.
    g = hand_graph()
    inf = influence(normalized(g.adjacency), g.logit_weights)
    assert torch.allclose(inf, torch.tensor([0.3, 0.4, 0.1, 0.2, 0.5, 0.0]))
    s = graph_scores(g)
    # replacement: tokens .5 / (tokens .5 + errors .1 + .2)
    assert s["replacement"] == pytest.approx(0.5 / 0.8)
    # completeness: sum over nodes of (1 - error share of inputs) * (influence + logit weight), over the total 2.3:
    # f0 1*.3 + f1 .75*.4 + e0 .1 + e1 .2 + t0 .5 + g0 .75*.8 = 2.0
    assert s["completeness"] == pytest.approx(2.0 / 2.3)


def test_hand_graph_pruning():
    g = hand_graph()
    # node influences sorted .5 .4 .3 .2 .1 0 (cumulative 1/3, .6, .8, .93, 1): 0.95 keeps all nodes;
    # edge scores (normalised weight x (influence + logit weight) of the target): g0<-f1 .4, f0<-t0 .3,
    # f1<-f0 .3, g0<-e1 .2, g0<-t0 .2, f1<-e0 .1 (cumulative .27 .47 .67 .8 .93 1)
    p = prune(g, node_threshold=0.95, edge_threshold=0.7)       # edges >= .2: only f1<-e0 goes, then e0
    assert p.node_mask.tolist() == [True, True, False, True, True, True]
    assert p.edge_mask.sum() == 5 and not p.edge_mask[F1, E0]
    p = prune(g, node_threshold=0.95, edge_threshold=0.5)       # edges >= .3: the chain t0 -> f0 -> f1 -> g0
    assert p.node_mask.tolist() == [True, True, False, False, True, True]
    assert {tuple(e) for e in p.edge_mask.nonzero().tolist()} == {(F0, T0), (F1, F0), (G0, F1)}
    # 0.5 keeps nodes with influence >= .4 (t0, f1); f1 then has no incoming edge left and goes too
    p = prune(g, node_threshold=0.5, edge_threshold=0.98)
    assert p.node_mask.tolist() == [False, False, False, False, True, True]
    assert {tuple(e) for e in p.edge_mask.nonzero().tolist()} == {(G0, T0)}
    assert torch.allclose(p.cumulative, torch.tensor([0.8, 0.6, 1.0, 14 / 15, 1 / 3, 1.0]))
    sub = p.subgraph(g)
    assert len(sub) == 2 and sub.adjacency.tolist() == [[0, 0], [-2, 0]]
    with pytest.raises(GraphError, match="between 0 and 1"):
        prune(g, node_threshold=1.5)


def test_cycles_are_refused():
    g = hand_graph()
    g.adjacency[T0, G0] = 1.0
    with pytest.raises(GraphError, match="cycle"):
        graph_scores(g)


def test_tiny_model_graph_pruning():
    model, rep, g = graph_for("llama")
    A, w = normalized(g.adjacency), g.logit_weights
    reference = w @ (torch.linalg.inv(torch.eye(len(g)) - A) - torch.eye(len(g)))      # (I - A)^-1 - I
    assert (influence(A, w) - reference).abs().max() <= 1e-5
    s = graph_scores(g)
    assert 0 < s["replacement"] < 1 and 0 < s["completeness"] < 1
    p = prune(g, node_threshold=0.8, edge_threshold=0.98)
    kept = p.node_mask
    assert kept[g.span("token")].all() and kept[g.span("logit")].all()
    assert 0 < kept[g.span("feature")].sum() < g.count("feature")
    f = torch.arange(g.count("feature"))[kept[g.span("feature")]]
    assert p.edge_mask[f].any(1).all() and p.edge_mask[:, f].any(0).all()     # kept features have edges both ways
    assert not p.edge_mask[~kept].any() and not p.edge_mask[:, ~kept].any()
    assert (p.edge_mask & (g.adjacency == 0)).sum() == 0


def test_threshold_equals_sorting_every_score():
    from mechanic.locate.graph.prune import threshold

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(500, generator=g) * (torch.rand(500, generator=g) < 0.3)
    for fraction in (0.0, 0.3, 0.8, 0.98, 1.0):
        s = scores.sort(descending=True).values                    # circuit-tracer's way: sort all, zeros too
        cum = s.cumsum(0) / s.sum()
        expected = s[min(int(torch.searchsorted(cum, torch.tensor(fraction))), len(s) - 1)]
        assert threshold(scores, fraction) == expected
