"""Activation collection in batches, planned for memory and split over torch.distributed ranks.

The inputs are padded once, whole, on every rank (model.inputs) and cut by rows, so every rank sees the
single-process padding and positions; each rank caches its rows in batches (stopping after the last layer
a site needs) into one preallocated tensor per site, and `gather_rows` joins the caches in row order, on every
rank. Outside a process group it is the same loop in one process. Without a batch size the batch is the
largest that fits the memory budget (mechanic.memory); a cache larger than the budget is written to disk
batch by batch and comes back memory-mapped (mechanic.model.spill).
"""

from __future__ import annotations

import torch

from mechanic import distributed as D
from mechanic import memory


def collect(model, inputs, sites, batch_size: int | None = 32, pos=None, dtype: torch.dtype | None = None,
            budget: int | str | None = None, spill_dir=None):
    """{site: [rows, ...]} cached activations of every row of `inputs` (prompts or token ids), rows split over ranks.

    batch_size: rows per forward; None plans it (the largest batch whose estimated peak fits the budget).
    dtype: the cache's dtype (default the model's; e.g. torch.float16 halves it). budget: bytes (or '4GiB')
    this may use, default 80% of the memory free now. A cache that alone exceeds the budget is streamed to
    safetensors files in `spill_dir` (a temporary directory by default) and returned as a SpilledCache of
    memory-mapped tensors, indexed like the dict; under torch.distributed it is refused instead.
    """
    sites = [sites] if isinstance(sites, str) else list(sites)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of rows, got {batch_size}.")
    batch = model.inputs(inputs)
    lo, hi = D.bounds(batch["input_ids"].shape[0])
    cap = memory.budget(model.device) if budget is None else memory.parse_bytes(budget)
    est = memory.cache(model, sites, max(1, hi - lo), batch["input_ids"].shape[1], pos, dtype)
    spill = est.fixed > cap // 2      # the cache alone takes most of the budget: keep it on disk
    if spill and D.is_distributed():
        raise memory.MemoryPlanError(
            f"The {est.what} needs about {est.fixed / 2**20:.0f} MiB on each rank, more than half the budget of "
            f"{cap / 2**20:.0f} MiB, and a cache spread over ranks is joined in memory. Cache fewer sites, rows or "
            "positions, a smaller dtype, or stream it to disk with mechanic.model.store.stream.")
    if batch_size is None:
        room = memory.Estimate(est.what, 0 if spill else est.fixed, est.per_row, rows=est.rows, parts=est.parts)
        batch_size = memory.plan_batch(room, cap, hints="fewer sites or positions, shorter prompts")
    writer = None
    if spill:
        from mechanic.model.spill import SpillWriter

        writer = SpillWriter(spill_dir, hi - lo)
    out: dict[str, torch.Tensor | None] = {s: None for s in sites}

    def work() -> None:
        for start in range(lo, hi, batch_size):
            stop = min(start + batch_size, hi)
            chunk = {k: v[start:stop] for k, v in batch.items()}
            run = model.run(chunk, cache=sites, pos=pos, stop_at="auto")
            for s in sites:
                value = run[s] if dtype is None else run[s].to(dtype)
                if writer is not None:
                    writer.write(s, value)
                    continue
                if out[s] is None:    # one tensor for every row: no list of parts joined at the end (2x peak)
                    out[s] = torch.empty((hi - lo, *value.shape[1:]), dtype=value.dtype, device=value.device)
                out[s][start - lo:stop - lo] = value
            del run

    try:
        D.run(work)          # a rank that fails is named on every rank before any rows move
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        return writer.finish()
    return {s: D.gather_rows(out[s]) for s in sites}


__all__ = ["collect"]
