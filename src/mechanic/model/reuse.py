"""Re-run only what an intervention can change.

A change at layer l and position p cannot alter layers below l or positions before p (causal
attention). So a patched run reuses the unpatched run: positions before p come from its key/value
cache, layers below the first changed one replay its stored states instead of computing, and logits
are computed at the last position only. The model's own forward still does all the work that is done.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache

from mechanic.model.hooks import _Session, frozen_parameters
from mechanic.model.interventions import Intervention


_CACHE_ARGS = ("past_key_values", "layer_past", "past_key_value")  # a decoder layer's key/value cache argument


@dataclass
class Prefix:
    """The unpatched run: its inputs, key/value cache, every layer's output and its last-position logits."""

    inputs: dict[str, torch.Tensor]
    keys: list[torch.Tensor]        # per layer [batch, kv_heads, pos, d_head]
    values: list[torch.Tensor]
    states: list[torch.Tensor]      # per layer resid_post [batch, pos, d_model]
    logits: torch.Tensor            # [batch, vocab] at the last position
    cache: dict[str, torch.Tensor]  # any extra sites asked for


def prefix(model, inputs, cache=(), interventions: Sequence[Intervention] = (), upto: int | None = None,
           last_only: bool = False) -> Prefix:
    """Run once with a key/value cache, every layer's output and the extra `cache` sites recorded; the
    `interventions` (e.g. noise on the subject's embeddings) are part of this base run. `upto`: record the
    outputs of the layers below it only (suffix runs that start there replay no later layer; saves memory);
    `last_only`: compute the logits at the last position only (the unembedding of every position is the
    largest tensor of a long batch)."""
    inputs = model.inputs(inputs)
    sites = [f"L{i}.resid_post" for i in range(model.dims.n_layers if upto is None else upto)]
    session = _Session(model, sites + [s for s in cache if s not in sites], list(interventions))
    session.batch_size = inputs["input_ids"].shape[0]
    with session, torch.no_grad():
        out = model.hf(**inputs, use_cache=True, **({"logits_to_keep": 1} if last_only else {}))
    kv = out.past_key_values
    keys = [layer.keys for layer in kv.layers]
    values = [layer.values for layer in kv.layers]
    if len(keys) != model.dims.n_layers:
        raise NotImplementedError(f"{type(model.hf).__name__}: its cache has {len(keys)} layers for "
                                  f"{model.dims.n_layers} decoder layers; causal reuse does not support it.")
    return Prefix(inputs, keys, values, [session.values[s] for s in sites], out.logits[:, -1],
                  {s: session.values[s] for s in cache})


def _sub(obj, active: torch.Tensor, R: int):
    """obj with every batch-first tensor (dim >= 2, first dim R) restricted to the active rows."""
    if isinstance(obj, torch.Tensor):
        return obj[active] if obj.dim() >= 2 and obj.shape[0] == R else obj
    if isinstance(obj, tuple):
        return tuple(_sub(o, active, R) for o in obj)
    return obj


@contextmanager
def _replay(model, base: Prefix, rows: torch.Tensor, start: torch.Tensor, p: int, session):
    """Layer i computes only the rows whose start layer is <= i; the other rows take the unpatched run's
    output. A layer with no active row does not run at all; a partly active one runs on a sub-batch
    with its own key/value cache (the earlier columns of those rows)."""
    saved = []
    R = len(rows)
    try:
        for i, layer in enumerate(model.layers):
            active = start <= i
            if bool(active.all()):
                continue
            saved.append((layer, layer.__dict__.get("forward")))
            stored = base.states[i][rows, p:]
            if not bool(active.any()):
                layer.forward = lambda *a, _s=stored, **k: _s
                continue
            orig = type(layer).forward.__get__(layer)

            def partial(*args, _i=i, _a=active, _s=stored, _orig=orig, **kwargs):
                idx = _a.nonzero().squeeze(-1)
                sig = inspect.signature(_orig)
                bound = sig.bind(*args, **kwargs)
                cache = None
                # the layer's name for its cache argument (GPT-NeoX: layer_past)
                name = next((n for n in _CACHE_ARGS if n in sig.parameters), "past_key_values")
                if p > 0:  # this layer's earlier columns, for the active rows only
                    data = [(None, None)] * len(model.layers)
                    data[_i] = (base.keys[_i][rows[idx], :, :p], base.values[_i][rows[idx], :, :p])
                    cache = DynamicCache(ddp_cache_data=data)
                    if name in sig.parameters:
                        bound.arguments[name] = cache
                args = tuple(_sub(a, _a, R) if not isinstance(a, DynamicCache) else a for a in bound.args)
                kwargs = {k: (v if isinstance(v, DynamicCache) else _sub(v, _a, R)) for k, v in bound.kwargs.items()}
                if cache is not None and name not in sig.parameters:
                    kwargs[name] = cache
                row_map = torch.full((R,), -1, dtype=torch.long)
                row_map[idx] = torch.arange(len(idx))
                session.row_map, session.batch_size = row_map, len(idx)
                try:
                    out = _orig(*args, **kwargs)
                finally:
                    session.row_map, session.batch_size = None, R
                full = _s.clone()
                full[idx] = out[0] if isinstance(out, tuple) else out
                return full
            layer.forward = partial
        yield
    finally:
        for layer, fwd in saved:
            if fwd is None:
                del layer.forward
            else:
                layer.forward = fwd


def suffix_logits(model, base: Prefix, rows: torch.Tensor, start_pos: int, start_layer,
                  interventions: list[Intervention]) -> torch.Tensor:
    """Last-position logits of the runs `rows` (indices into the prefix batch) with `interventions`,
    computing only positions >= start_pos and, for each row, layers >= its start layer (an int for all
    rows, or a LongTensor with one per row). Intervention positions are local: 0 is column start_pos."""
    return suffix_run(model, base, rows, start_pos, start_layer, interventions)[:, -1]


def suffix_run(model, base: Prefix, rows: torch.Tensor, start_pos: int, start_layer,
               interventions: list[Intervention], keep: int = 1, grad: bool = False) -> torch.Tensor:
    """suffix_logits' run, returning the logits of the last `keep` positions [rows, keep, vocab]; with
    grad=True inside autograd (parameters frozen), so a loss on them back-propagates into the interventions'
    values (e.g. an optimised vector added at a layer above every replayed one)."""
    p = start_pos
    start = torch.as_tensor(start_layer, dtype=torch.long).expand(len(rows)) if not torch.is_tensor(start_layer) \
        else start_layer
    inp = base.inputs
    ids = inp["input_ids"][rows, p:]
    past = None
    if p > 0:
        data = [(k[rows, :, :p], v[rows, :, :p]) for k, v in zip(base.keys, base.values)]
        past = DynamicCache(ddp_cache_data=data, config=model.hf.config)
    session = _Session(model, [], interventions)
    session.batch_size = len(rows)
    frozen = frozen_parameters(model.hf) if grad else nullcontext()
    with session, _replay(model, base, rows, start, p, session), frozen, torch.set_grad_enabled(grad):
        out = model.hf(input_ids=ids, attention_mask=inp["attention_mask"][rows],
                       position_ids=inp["position_ids"][rows, p:], past_key_values=past, use_cache=True,
                       logits_to_keep=keep)
    return out.logits
