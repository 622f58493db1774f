"""Activation collection split over torch.distributed ranks: each rank runs a contiguous block of rows, caches gathered.

The inputs are padded once, whole, on every rank (model.inputs) and cut by rows, so every rank sees the
single-process padding and positions; each rank caches its rows in batches (stopping after the last layer
a site needs) and `gather_rows` joins the caches in row order, on every rank. Outside a process group it is
the same loop in one process.
"""

from __future__ import annotations

import torch

from mechanic import distributed as D


def collect(model, inputs, sites, batch_size: int = 32, pos=None) -> dict[str, torch.Tensor]:
    """{site: [rows, ...]} cached activations of every row of `inputs` (prompts or token ids), rows split over ranks."""
    sites = [sites] if isinstance(sites, str) else list(sites)
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of rows, got {batch_size}.")
    batch = model.inputs(inputs)
    lo, hi = D.bounds(batch["input_ids"].shape[0])
    mine: dict[str, torch.Tensor | None] = {s: None for s in sites}

    def work() -> None:
        parts: dict[str, list] = {s: [] for s in sites}
        for start in range(lo, hi, batch_size):
            chunk = {k: v[start:min(start + batch_size, hi)] for k, v in batch.items()}
            run = model.run(chunk, cache=sites, pos=pos, stop_at="auto")
            for s in sites:
                parts[s].append(run[s])
        mine.update({s: torch.cat(v) for s, v in parts.items() if v})

    D.run(work)          # a rank that fails is named on every rank before any rows move
    return {s: D.gather_rows(mine[s]) for s in sites}


__all__ = ["collect"]
