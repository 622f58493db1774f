"""Attribution graphs (Ameisen et al. 2025, "Circuit Tracing"): one prompt's computation as a linear graph.

    from mechanic.locate.graph import attribute, prune, graph_scores
    g = attribute(model, transcoders, "The capital of France is")   # one transcoder per layer (or None)
    g.scores                                                         # replacement, completeness (graph_scores)
    kept = prune(g, node_threshold=0.8, edge_threshold=0.98)
    g.save("runs/graph")
    validate(model, transcoders, g, top=10)                          # predicted vs measured logit changes
    scores(g).top(10)                                                # features as Scores over L{l}.mlp_out.sae{f}

See docs/GRAPHS.md.
"""

from mechanic.locate.graph.attribute import attribute, salient_logits
from mechanic.locate.graph.errors import GraphError
from mechanic.locate.graph.graph import Graph
from mechanic.locate.graph.prune import Pruned, graph_scores, influence, prune
from mechanic.locate.graph.replacement import Replacement
from mechanic.locate.graph.scores import scores
from mechanic.locate.graph.transcoders import load_transcoders
from mechanic.locate.graph.validate import Validation, validate

__all__ = ["Graph", "GraphError", "Pruned", "Replacement", "Validation", "attribute", "graph_scores", "influence",
           "load_transcoders", "prune", "salient_logits", "scores", "validate"]
