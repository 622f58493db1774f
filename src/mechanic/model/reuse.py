"""Re-run only what an intervention can change.

A change at layer l and position p cannot alter layers below l or positions before p (causal
attention). So a patched run reuses the unpatched run: positions before p come from its key/value
cache, layers below the first changed one replay its stored states instead of computing, and logits
are computed at the last position only. The model's own forward still does all the work that is done.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from mechanic.model.hooks import _Session
from mechanic.model.interventions import Intervention


@dataclass
class Prefix:
    """The unpatched run: its inputs, key/value cache, every layer's output and its last-position logits."""

    inputs: dict[str, torch.Tensor]
    keys: list[torch.Tensor]        # per layer [batch, kv_heads, pos, d_head]
    values: list[torch.Tensor]
    states: list[torch.Tensor]      # per layer resid_post [batch, pos, d_model]
    logits: torch.Tensor            # [batch, vocab] at the last position


def prefix(model, inputs) -> Prefix:
    """Run once with a key/value cache and every layer's output recorded."""
    inputs = model.inputs(inputs)
    sites = [f"L{i}.resid_post" for i in range(model.dims.n_layers)]
    session = _Session(model, sites, [])
    session.batch_size = inputs["input_ids"].shape[0]
    with session, torch.no_grad():
        out = model.hf(**inputs, use_cache=True)
    cache = out.past_key_values
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    if len(keys) != model.dims.n_layers:
        raise NotImplementedError(f"{type(model.hf).__name__}: its cache has {len(keys)} layers for "
                                  f"{model.dims.n_layers} decoder layers; causal reuse does not support it.")
    return Prefix(inputs, keys, values, [session.values[s] for s in sites], out.logits[:, -1])


@contextmanager
def _replay(model, upto: int, states: list[torch.Tensor]):
    """Layers below `upto` return stored outputs instead of computing (their caches are already complete)."""
    saved = []
    try:
        for i in range(upto):
            layer = model.layers[i]
            saved.append((layer, layer.__dict__.get("forward")))
            layer.forward = lambda *a, _s=states[i], **k: _s
        yield
    finally:
        for layer, fwd in saved:
            if fwd is None:
                del layer.forward
            else:
                layer.forward = fwd


def suffix_logits(model, base: Prefix, rows: torch.Tensor, start_pos: int, start_layer: int,
                  interventions: list[Intervention]) -> torch.Tensor:
    """Last-position logits of the runs `rows` (indices into the prefix batch) with `interventions`,
    computing only positions >= start_pos and layers >= start_layer. Intervention positions are
    local: 0 is column start_pos."""
    p, s = start_pos, start_layer
    inp = base.inputs
    ids = inp["input_ids"][rows, p:]
    past = None
    if p > 0:
        data = [(k[rows, :, :p], v[rows, :, :p]) for k, v in zip(base.keys, base.values)]
        past = DynamicCache(ddp_cache_data=data, config=model.hf.config)
    states = [st[rows, p:] for st in base.states[:s]]
    session = _Session(model, [], interventions)
    session.batch_size = len(rows)
    with session, _replay(model, s, states), torch.no_grad():
        out = model.hf(input_ids=ids, attention_mask=inp["attention_mask"][rows],
                       position_ids=inp["position_ids"][rows, p:], past_key_values=past, use_cache=True,
                       logits_to_keep=1)
    return out.logits[:, -1]
