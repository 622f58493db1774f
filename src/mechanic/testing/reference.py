"""Plain reference implementations that faster code is checked against (by the tests and the benchmarks)."""

from __future__ import annotations

import torch


def eap_ig_loop(model, batch, steps: int, size: int = 8) -> torch.Tensor:
    """EAP-IG as mechanic computed it before its points were batched: per chunk of `size` examples the clean and
    corrupted graph runs, then one graph forward + backward per interpolation point (logit-difference metric)."""
    from mechanic.locate.gradient import ComponentGraph, prepare_graph_inputs, receiver_grads
    from mechanic.tasks.metrics import logit_diff

    g = ComponentGraph(model)
    total = 0
    for start in range(0, batch.n, size):
        sub = batch.select(slice(start, start + size))
        x0c, x0x, calls, _, _ = prepare_graph_inputs(model, g, sub)
        with torch.no_grad():
            s_corr, _ = g.execute(x0x, calls)
            s_clean, _ = g.execute(x0c, calls)
        G = 0
        for k in range(steps):
            G = G + receiver_grads(g, x0x + (k / steps) * (x0c - x0x), calls,
                                   lambda lg, sub=sub: logit_diff(lg, sub).sum())[1]
        total = total + torch.einsum("ubpd,vbpd->uv", s_corr - s_clean, G / steps).double()
    return ((total / batch.n).float() * g.upstream).float()
