"""Greedy ACDC-style pruning of a circuit: drop every edge whose removal barely moves the metric.

As in ACDC (Conmy et al. 2023), receivers are visited from the logits backwards and, for each one, its
incoming edges from the latest sender to the earliest; an edge is removed for good when the patched
metric moves by less than `threshold` (in units of the clean - corrupted gap) from the current
circuit's. Every test is one exact patched-graph run (mechanic.locate.circuit.PatchedGraph), so the
cost is one run per edge of the starting circuit: start from a top-n EAP / EAP-IG circuit, not from
the full graph, on a large model.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from mechanic.locate.circuit import Circuit, PatchedGraph, prune
from mechanic.locate.gradient import Metric
from mechanic.tasks.task import Task, TaskBatch


def acdc(model, task: Task | TaskBatch, start: Circuit, threshold: float = 0.01, *, patch: str = "corrupted",
         metric: str | Metric | None = None, batch_size: int | None = 8, progress: bool = True) -> tuple[Circuit, dict]:
    """Prune `start` greedily; returns the pruned circuit and a log (edges tried, removed, metric after each step).

    threshold: an edge goes when |m_without - m_current| < threshold * |m_clean - m_corrupted|.
    """
    if threshold < 0:
        raise ValueError(f"threshold is a fraction of the clean - corrupted metric gap and must be >= 0, got "
                         f"{threshold}.")
    runner = PatchedGraph(model, task, patch, metric, batch_size)
    runner.check(start)
    gap = abs(runner.metric_clean - runner.metric_corrupted)
    keep = start.keep.clone()
    current = runner.metric(keep)
    steps = []
    order = [(i, j) for j in reversed(range(len(start.receivers))) for i in reversed(range(len(start.senders)))
             if keep[i, j]]
    for i, j in tqdm(order, desc="acdc", disable=not progress, leave=False):
        keep[i, j] = False
        m = runner.metric(keep)
        removed = abs(m - current) < threshold * gap
        if removed:
            current = m
        else:
            keep[i, j] = True
        steps.append({"edge": [start.senders[i], start.receivers[j]], "metric_without": m, "removed": removed})
    pruned = prune(start.senders, start.receivers, keep)
    final = runner.metric(pruned) if not torch.equal(pruned, keep) else current
    circuit = Circuit(start.senders, start.receivers, pruned, requested=None)
    log = {"threshold": threshold, "patch": patch, "edges_start": len(start), "edges_end": len(circuit),
           "runs": len(order) + 1, "steps": steps, **runner.report(circuit, final)}
    return circuit, log
