"""Circuits from edge scores: top-n extraction and faithfulness by patching every edge outside the circuit.

An edge u -> v outside the circuit carries a reference value of u's output instead of the one of the
running (clean) forward: u's output on the corrupted prompt ("corrupted"), its mean over the task's
clean prompts per position ("mean"), or zero ("zero"). Edges inside the circuit carry u's output in
the patched run itself, so effects compose through the circuit. Faithfulness is the fraction of the
metric kept: (m_circuit - m_corrupted) / (m_clean - m_corrupted), with every metric averaged over
the examples. With every edge kept it is 1, with none kept and corrupted patching it is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from mechanic.locate.gradient import (ComponentGraph, Metric, metric_fn, need_corrupted, prepare_graph_inputs, rows,
                                      task_batch, upstream_mask)
from mechanic.locate.scores import Scores
from mechanic.tasks.task import Task, TaskBatch

PATCHES = ("corrupted", "mean", "zero")


@dataclass
class Circuit:
    """A set of edges of the component graph (keep[u, v] True = edge u -> v is in the circuit)."""

    senders: list[str]
    receivers: list[str]
    keep: torch.Tensor
    requested: int | None = None

    def __post_init__(self):
        if self.keep.shape != (len(self.senders), len(self.receivers)):
            raise ValueError(f"Circuit: keep has shape {list(self.keep.shape)} but there are {len(self.senders)} "
                             f"senders and {len(self.receivers)} receivers.")
        self.keep = self.keep.bool().cpu()

    @property
    def edges(self) -> list[tuple[str, str]]:
        """The circuit's edges as (sender, receiver) names."""
        return [(self.senders[i], self.receivers[j]) for i, j in self.keep.nonzero().tolist()]

    @property
    def nodes(self) -> list[str]:
        """Every node touched by an edge of the circuit, in graph order."""
        used = {u for u, _ in self.edges} | {v for _, v in self.edges}
        order = self.senders + ["logits"]
        return [x for x in order if x in used]

    def __len__(self) -> int:
        """Number of edges."""
        return int(self.keep.sum())

    def __repr__(self) -> str:
        return f"Circuit({len(self)} edges, {len(self.nodes)} nodes)"

    @classmethod
    def full(cls, graph: ComponentGraph) -> Circuit:
        """Every edge of the graph (faithfulness 1 by construction)."""
        return cls(graph.senders, graph.receivers, graph.upstream.clone())

    @classmethod
    def empty(cls, graph: ComponentGraph) -> Circuit:
        """No edge at all (with corrupted patching: the corrupted run)."""
        return cls(graph.senders, graph.receivers, torch.zeros_like(graph.upstream))

    @classmethod
    def from_edges(cls, graph: ComponentGraph, edges: Iterable[tuple[str, str]]) -> Circuit:
        """A circuit from (sender, receiver) name pairs, e.g. ("L3.head4", "L5.mlp_out")."""
        keep = torch.zeros_like(graph.upstream)
        si, ri = {s: i for i, s in enumerate(graph.senders)}, {r: j for j, r in enumerate(graph.receivers)}
        for u, v in edges:
            if u not in si or v not in ri or not graph.upstream[si[u], ri[v]]:
                raise ValueError(f"({u!r}, {v!r}) is not an edge of this model's component graph: senders are "
                                 "embed, L<l>.head<h>, L<l>.mlp_out; receivers are L<l>.head<h>, L<l>.mlp_out, logits, "
                                 "and the sender must write to the residual before the receiver reads it.")
            keep[si[u], ri[v]] = True
        return cls(graph.senders, graph.receivers, keep)


def prune(senders: list[str], receivers: list[str], keep: torch.Tensor) -> torch.Tensor:
    """keep restricted to edges on a path embed -> ... -> logits (others cannot change the patched metric)."""
    keep = keep.bool().clone()
    edges = keep.nonzero().tolist()
    to_logits, from_embed = {"logits"}, {"embed"}
    changed = True
    while changed:
        changed = False
        for i, j in edges:
            u, v = senders[i], receivers[j]
            if v in to_logits and u not in to_logits:
                to_logits.add(u)
                changed = True
            if u in from_embed and v not in from_embed:
                from_embed.add(v)
                changed = True
    for i, j in edges:
        if senders[i] not in from_embed or receivers[j] not in to_logits:
            keep[i, j] = False
    return keep


def top_edges(scores: Scores, n: int, prune_dangling: bool = True) -> Circuit:
    """The n edges with the largest |score| (EAP / EAP-IG Scores), pruned to paths from embed to logits."""
    if scores.positions is None or scores.settings.get("axes") != ["sender", "receiver"]:
        raise ValueError(f"top_edges needs edge scores (from mechanic.locate.gradient.eap), got {scores!r}: "
                         "node scores such as AtP have no receivers.")
    if n < 0:
        raise ValueError(f"n must be a number of edges >= 0, got {n}.")
    senders, receivers = scores.sites, scores.positions
    real = upstream_mask(senders, receivers, scores.settings.get("parallel", False))
    key = scores.values.abs().masked_fill(~real, -1.0).reshape(-1)
    keep = torch.zeros(key.numel(), dtype=torch.bool)
    k = min(n, int(real.sum()))
    keep[key.argsort(descending=True)[:k]] = True
    keep = keep.view_as(real)
    if prune_dangling:
        keep = prune(senders, receivers, keep)
    return Circuit(senders, receivers, keep, requested=n)


class PatchedGraph:
    """One task made ready for patched-graph runs: per chunk of examples its inputs, layer calls and the
    reference values non-circuit edges carry; `metric(keep)` is then one graph run per chunk."""

    def __init__(self, model, task: Task | TaskBatch, patch: str = "corrupted", metric: str | Metric | None = None,
                 batch_size: int | None = 8):
        if patch not in PATCHES:
            raise ValueError(f"patch must be one of {', '.join(PATCHES)}, got {patch!r}.")
        self.graph = ComponentGraph(model)
        batch, _, task_metric = task_batch(model, task)
        need_corrupted(batch, "Faithfulness")
        self.patch = patch
        self.metric_name, self.fn = metric_fn(metric, task_metric)
        self.n, size = batch.n, batch_size or batch.n
        self.chunks = []
        m_clean = m_corr = 0.0
        with torch.no_grad():
            for sl in [slice(s, s + size) for s in range(0, self.n, size)]:
                b = rows(batch, sl)
                x0c, x0x, calls, lc, lx = prepare_graph_inputs(model, self.graph, b)
                m_clean += float(self.fn(lc, b).sum())
                m_corr += float(self.fn(lx, b).sum())
                ref = self.graph.execute(x0x, calls)[0] if patch == "corrupted" else None
                self.chunks.append((b, x0c, calls, ref))
            if patch == "mean":  # per-position mean of every sender output over the task's clean prompts
                mean = sum(self.graph.execute(x0c, calls)[0].sum(1, keepdim=True) for _, x0c, calls, _ in self.chunks)
                self.chunks = [(b, x0c, calls, mean / self.n) for b, x0c, calls, _ in self.chunks]
            elif patch == "zero":
                zero = torch.zeros(1, 1, 1, 1, dtype=x0c.dtype, device=x0c.device)
                self.chunks = [(b, x0c, calls, zero) for b, x0c, calls, _ in self.chunks]
        self.metric_clean, self.metric_corrupted = m_clean / self.n, m_corr / self.n

    def check(self, c: Circuit) -> None:
        """Refuse a circuit built for another model's graph."""
        if c.senders != self.graph.senders or c.receivers != self.graph.receivers:
            raise ValueError("This circuit was built for another model's graph (its node names differ); "
                             "build it from scores or a ComponentGraph of this model.")

    def metric(self, keep: torch.Tensor) -> float:
        """The metric averaged over the examples, with every edge outside `keep` carrying its reference value."""
        total = 0.0
        with torch.no_grad():
            for b, x0c, calls, ref in self.chunks:
                _, logits = self.graph.execute(x0c, calls, keep=keep.to(x0c.device), ref=ref)
                total += float(self.fn(logits, b).sum())
        return total / self.n

    def faithfulness(self, m: float) -> float:
        """(m - m_corrupted) / (m_clean - m_corrupted)."""
        return (m - self.metric_corrupted) / (self.metric_clean - self.metric_corrupted)

    def report(self, c: Circuit, m: float) -> dict:
        """The faithfulness dict of circuit c whose metric is m."""
        return {"edges": len(c), "requested": c.requested, "nodes": len(c.nodes), "metric": m,
                "metric_clean": self.metric_clean, "metric_corrupted": self.metric_corrupted,
                "faithfulness": self.faithfulness(m), "patch": self.patch, "metric_name": self.metric_name}


def _evaluate(model, task: Task | TaskBatch, circuits: list[Circuit], patch: str, metric, batch_size) -> list[dict]:
    runner = PatchedGraph(model, task, patch, metric, batch_size)
    for c in circuits:
        runner.check(c)
    return [runner.report(c, runner.metric(c.keep)) for c in circuits]


def faithfulness(model, task: Task | TaskBatch, circuit: Circuit, *, patch: str = "corrupted",
                 metric: str | Metric | None = None, batch_size: int | None = 8) -> dict:
    """Run the model with every edge outside `circuit` patched; report the fraction of the metric it keeps.

    Returns a dict: faithfulness = (m_circuit - m_corrupted) / (m_clean - m_corrupted), the three
    metrics, the circuit's edge and node counts. patch: corrupted (default), mean or zero.
    """
    return _evaluate(model, task, [circuit], patch, metric, batch_size)[0]


def faithfulness_curve(model, task: Task | TaskBatch, scores: Scores, ns: Iterable[int], *, patch: str = "corrupted",
                       metric: str | Metric | None = None, batch_size: int | None = 8) -> list[dict]:
    """Faithfulness of the top-n circuit for each n in ns (one dict per n, as `faithfulness`), sharing the runs."""
    circuits = [top_edges(scores, int(k)) for k in ns]
    return _evaluate(model, task, circuits, patch, metric, batch_size)
