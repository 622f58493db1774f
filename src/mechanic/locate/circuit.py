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


def _evaluate(model, task: Task | TaskBatch, circuits: list[Circuit], patch: str, metric, batch_size) -> list[dict]:
    if patch not in PATCHES:
        raise ValueError(f"patch must be one of {', '.join(PATCHES)}, got {patch!r}.")
    graph = ComponentGraph(model)
    for c in circuits:
        if c.senders != graph.senders or c.receivers != graph.receivers:
            raise ValueError("This circuit was built for another model's graph (its node names differ); "
                             "build it from scores or a ComponentGraph of this model.")
    batch, _, task_metric = task_batch(model, task)
    need_corrupted(batch, "Faithfulness")
    mname, mfn = metric_fn(metric, task_metric)
    n, size = batch.n, batch_size or batch.n
    chunks = [slice(s, s + size) for s in range(0, n, size)]
    mean = None
    if patch == "mean":  # per-position mean of every sender output over the task's clean prompts
        for sl in chunks:
            b = rows(batch, sl)
            x0c, _, calls, _, _ = prepare_graph_inputs(model, graph, b)
            with torch.no_grad():
                s = graph.execute(x0c, calls)[0].sum(1, keepdim=True)
            mean = s if mean is None else mean + s
        mean = mean / n
    sums = [0.0] * len(circuits)
    m_clean = m_corr = 0.0
    for sl in chunks:
        b = rows(batch, sl)
        x0c, x0x, calls, lc, lx = prepare_graph_inputs(model, graph, b)
        m_clean += float(mfn(lc, b).sum())
        m_corr += float(mfn(lx, b).sum())
        with torch.no_grad():
            if patch == "corrupted":
                ref = graph.execute(x0x, calls)[0]
            elif patch == "mean":
                ref = mean
            else:
                ref = torch.zeros(1, 1, 1, 1, dtype=x0c.dtype, device=x0c.device)
            for i, c in enumerate(circuits):
                _, logits = graph.execute(x0c, calls, keep=c.keep.to(x0c.device), ref=ref)
                sums[i] += float(mfn(logits, b).sum())
    m_clean, m_corr = m_clean / n, m_corr / n
    return [{"edges": len(c), "requested": c.requested, "nodes": len(c.nodes), "metric": s / n,
             "metric_clean": m_clean, "metric_corrupted": m_corr,
             "faithfulness": (s / n - m_corr) / (m_clean - m_corr), "patch": patch, "metric_name": mname}
            for c, s in zip(circuits, sums)]


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
