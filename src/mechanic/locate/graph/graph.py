"""Graph: the nodes and direct-effect adjacency of one prompt's attribution graph, saved as safetensors + json.

Node order (circuit-tracer's): active features (layer, pos, feature), error nodes (layer-major, then
position), token embeddings (position), output logits (most probable first). `adjacency[t, s]` is the
direct effect of source s on target t; rows of error and token nodes are zero (they have no inputs).
`bias[t]` is what the target receives from no node (biases of the frozen model), so for every target
`adjacency[t].sum() + bias[t] == value[t]`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mechanic.files import atomic_path, write_text
from mechanic.locate.graph.errors import GraphError

KINDS = ("feature", "error", "token", "logit")
TENSORS = ("kind", "layer", "pos", "feature", "value", "bias", "adjacency", "tokens", "logit_tokens",
           "logit_probs")
FILES = ("graph.safetensors", "graph.json")


@dataclass
class Graph:
    """An attribution graph. Per-node tensors have one entry per node, in the order of the module docstring."""

    kind: torch.Tensor            # [N] int8, index into KINDS
    layer: torch.Tensor           # [N] int32 (-1 for tokens, n_layers for logits)
    pos: torch.Tensor             # [N] int32
    feature: torch.Tensor         # [N] int64: feature id, vocabulary id for logits, token id for tokens, -1 for errors
    value: torch.Tensor           # [N] activation (features), vector norm (errors, tokens), demeaned logit (logits)
    bias: torch.Tensor            # [N] constant input of each target node (0 for sources)
    adjacency: torch.Tensor       # [N, N] direct effects, rows = targets, columns = sources
    tokens: torch.Tensor          # [P] the prompt's token ids
    logit_tokens: torch.Tensor    # [K] vocabulary ids of the logit nodes
    logit_probs: torch.Tensor     # [K] their probabilities under the real model
    labels: list[str] = field(default_factory=list)
    prompt: str | None = None
    scores: dict = field(default_factory=dict)     # e.g. replacement, completeness (see prune.graph_scores)
    meta: dict = field(default_factory=dict)       # model, transcoders, settings, timings

    def __post_init__(self):
        n = self.kind.shape[0]
        if self.adjacency.shape != (n, n):
            raise GraphError(f"A graph with {n} nodes needs an adjacency of shape [{n}, {n}], got "
                             f"{list(self.adjacency.shape)}.")
        if not self.labels:
            self.labels = [self.node_id(i) for i in range(n)]

    # ---- sizes and ranges ------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.kind.shape[0])

    def count(self, kind: str) -> int:
        return int((self.kind == KINDS.index(kind)).sum())

    def span(self, kind: str) -> slice:
        """The contiguous node range of one kind."""
        idx = (self.kind == KINDS.index(kind)).nonzero().flatten()
        return slice(int(idx[0]), int(idx[-1]) + 1) if len(idx) else slice(0, 0)

    @property
    def logit_weights(self) -> torch.Tensor:
        """[N]: each logit node's probability, zero elsewhere (what influence is measured against)."""
        w = torch.zeros(len(self), dtype=self.adjacency.dtype)
        w[self.span("logit")] = self.logit_probs.to(w.dtype)
        return w

    def node_id(self, i: int) -> str:
        """A short id in circuit-tracer's style: `{layer}_{feature}_{pos}`, `E_{token}_{pos}`, `L{layer}_err_{pos}`, `logit_{tok}`."""
        k, L, p, f = KINDS[int(self.kind[i])], int(self.layer[i]), int(self.pos[i]), int(self.feature[i])
        return {"feature": f"{L}_{f}_{p}", "error": f"L{L}_err_{p}", "token": f"E_{f}_{p}",
                "logit": f"logit_{f}"}[k]

    def top(self, k: int = 10, kind: str = "feature") -> list[int]:
        """Node indices of one kind with the largest direct effect on the logits (probability weighted)."""
        span = self.span(kind)
        w = self.logit_weights[self.span("logit")]
        effect = (w[:, None] * self.adjacency[self.span("logit"), span]).sum(0).abs()
        return [span.start + int(i) for i in effect.argsort(descending=True)[:k]]

    def __repr__(self) -> str:
        counts = ", ".join(f"{self.count(k)} {k}s" for k in KINDS)
        scores = "".join(f", {k}={v:.3f}" for k, v in self.scores.items() if isinstance(v, float))
        return f"Graph({counts}{scores})"

    # ---- files -----------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write `path`/graph.safetensors (tensors) and `path`/graph.json (labels, prompt, scores, meta), atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: getattr(self, k).detach().cpu().contiguous() for k in TENSORS}
        with atomic_path(path / FILES[0], suffix=".safetensors") as tmp:
            save_file(tensors, tmp)
        doc = {"format": "mechanic-graph/1", "prompt": self.prompt, "labels": self.labels, "scores": self.scores,
               "meta": self.meta, "kinds": list(KINDS)}
        write_text(path / FILES[1], json.dumps(doc, indent=1))
        return path

    @classmethod
    def load(cls, path) -> "Graph":
        """Read a graph written by `save`."""
        path = Path(path)
        missing = [f for f in FILES if not (path / f).is_file()]
        if missing:
            raise GraphError(f"{path} is not a saved attribution graph: {', '.join(missing)} missing. A graph "
                             "directory holds graph.safetensors and graph.json, as Graph.save writes them.")
        tensors = load_file(str(path / FILES[0]))
        doc = json.loads((path / FILES[1]).read_text())
        return cls(**{k: tensors[k] for k in TENSORS}, labels=doc["labels"], prompt=doc.get("prompt"),
                   scores=doc.get("scores", {}), meta=doc.get("meta", {}))
