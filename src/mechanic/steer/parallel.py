"""Steering sweeps split over torch.distributed ranks: each rank sweeps a contiguous block of layers (or coefficients).

A sweep's cells are independent and each is computed whole, so the gathered grid equals one process's bit
for bit: every rank sweeps its layers (or, when there are more coefficients than layers, its coefficients)
with steer.sweep.sweep, and the blocks are joined in rank order. The unsteered baseline is computed on
every rank (one forward each), the price of leaving sweep itself unchanged.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from mechanic import distributed as D
from mechanic.steer.sweep import Sweep, sweep


def parallel_sweep(model, vector, task, layers, coefficients, **kwargs) -> Sweep:
    """sweep(...) with its cells split over the ranks; outside a process group, just the call."""
    if not D.active():
        return sweep(model, vector, task, layers, coefficients, **kwargs)
    layers, coefficients = [int(x) for x in layers], [float(c) for c in coefficients]
    by_layer = len(layers) >= len(coefficients)
    axis = layers if by_layer else coefficients
    mine = D.shard(axis)

    def work():
        if not mine:
            return None
        with D.local():
            return sweep(model, vector, task, mine if by_layer else layers, coefficients if by_layer else mine,
                         **kwargs)
    parts = [p for p in D.run(work) if p is not None]
    dim = 0 if by_layer else 1
    first = parts[0]
    settings = {**first.settings, "layers": layers, "coefficients": coefficients}

    def join(name: str):
        s = getattr(first, name)
        sites = [x for p in parts for x in getattr(p, name).sites] if by_layer else s.sites
        labels = s.positions if by_layer else [x for p in parts for x in getattr(p, name).positions]
        return replace(s, values=torch.cat([getattr(p, name).values for p in parts], dim), sites=sites,
                       positions=labels, settings=settings)
    return Sweep(join("target"), join("kl"), join("ppl"), first.baseline, settings)


__all__ = ["parallel_sweep"]
