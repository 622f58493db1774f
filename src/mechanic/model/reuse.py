"""Re-run only what an intervention can change.

A change at layer l and position p cannot alter layers below l or positions before p (causal
attention). So a patched run reuses the unpatched run: positions before p come from its key/value
cache, layers below the first changed one replay its stored states instead of computing, and logits
are computed at the last position only. The model's own forward still does all the work that is done.
Runs that start at different columns share one forward packed end to end (packed_logits), so the
linear layers see one large matrix instead of one small forward per column.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mechanic.model.hooks import _Session, frozen_parameters
from mechanic.model.interfaces import override
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
        _restore_forwards(saved)


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


# ------------------------------------------------------------------------------------------ packed suffixes
# Runs that start at different columns have suffixes of different lengths; padding them to one length wastes
# the padded tokens, one forward per column gives small matmuls. Packed: every run's suffix is laid end to end
# in one sequence (batch 1), so the model's linear layers see one large [tokens, d] matrix; only attention
# needs the runs apart, and it gets them through transformers' AttentionInterface: each run's queries go back
# to their columns next to the unpatched run's keys and values of the earlier columns.


@dataclass
class Packing:
    """Runs laid end to end, sorted by start layer so that the tokens any layer computes are a prefix."""

    order: torch.Tensor        # packed run -> the caller's run
    ex: torch.Tensor           # per packed run: its row in the prefix batch
    first: torch.Tensor        # per caller's run: packed index of its first token (its start column)
    tok_run: torch.Tensor      # per token: its packed run
    tok_ex: torch.Tensor       # per token: its row in the prefix batch
    tok_col: torch.Tensor      # per token: its column
    active: list[int]          # per layer: tokens it computes (those of the runs starting at or below it)
    active_runs: list[int]     # per layer: runs it computes
    last: torch.Tensor         # per packed run: packed index of its last token

    @property
    def tokens(self) -> int:
        return len(self.tok_col)


def packing(base: Prefix, rows: torch.Tensor, start_pos: torch.Tensor, start_layer: torch.Tensor,
            n_layers: int) -> Packing:
    """The packed layout of runs `rows` (indices into the prefix batch), each from its column and layer on."""
    seq = base.inputs["input_ids"].shape[1]
    order = torch.sort(start_layer, stable=True).indices
    lengths = seq - start_pos[order]
    ends = lengths.cumsum(0)
    starts = ends - lengths
    tok_run = torch.repeat_interleave(torch.arange(len(order)), lengths)
    tok_col = start_pos[order][tok_run] + torch.arange(int(ends[-1])) - starts[tok_run]
    first = torch.empty_like(starts)
    first[order] = starts
    layers = start_layer[order]
    runs = [int((layers <= i).sum()) for i in range(n_layers)]
    return Packing(order, rows[order], first, tok_run, rows[order][tok_run], tok_col,
                   [int(ends[r - 1]) if r else 0 for r in runs], runs, ends - 1)


def packs(model, base: Prefix) -> bool:
    """Whether packed runs apply: attention through a registered AttentionInterface function (not eager) and
    every layer's cache holding all columns (no sliding-window cache)."""
    impl = model.hf.config._attn_implementation
    seq = base.inputs["input_ids"].shape[1]
    return impl != "eager" and impl in ALL_ATTENTION_FUNCTIONS and all(k.shape[2] == seq for k in base.keys)


def packed_logits(model, base: Prefix, pk: Packing, interventions: list[Intervention]) -> torch.Tensor:
    """Last-position logits of every packed run, in the caller's order. Intervention positions are packed
    indices (Packing.first[run] + column - start column), on batch row 0."""
    ids = base.inputs["input_ids"][pk.tok_ex, pk.tok_col][None]
    pos = base.inputs["position_ids"][pk.tok_ex, pk.tok_col][None]
    session = _Session(model, [], interventions)
    session.batch_size = 1
    with _packed_attention(model, base, pk), session, _packed_layers(model, base, pk), torch.no_grad():
        out = model.hf(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=pk.last)
    back = torch.empty_like(pk.order)
    back[pk.order] = torch.arange(len(pk.order))
    return out.logits[0][back]


@contextmanager
def logit_columns(model, ids: torch.Tensor | None):
    """Within it, the model's logits are those of the vocabulary columns `ids` only, in that order: the
    unembedding is the largest matmul of a last-position run, and a logit difference reads two columns of it.
    Yields whether it applies: not for ids None, nor for an output embedding that is not a plain Linear on
    loaded weights (offloaded by accelerate, quantised), which keeps every column."""
    out = model.hf.get_output_embeddings()
    if ids is None or type(out) is not torch.nn.Linear or out.weight.is_meta or hasattr(out, "_hf_hook"):
        yield False
        return
    idx = ids.to(out.weight.device)
    weight, bias = out.weight[idx], None if out.bias is None else out.bias[idx]
    saved = [(out, out.__dict__.get("forward"))]
    out.forward = lambda h: torch.nn.functional.linear(h, weight, bias)
    try:
        yield True
    finally:
        _restore_forwards(saved)


def _head(obj, n: int, N: int):
    """obj with every token-second tensor ([1, N, ...]) cut to its first n tokens."""
    if isinstance(obj, torch.Tensor):
        return obj[:, :n] if obj.dim() >= 2 and obj.shape[1] == N else obj
    if isinstance(obj, tuple):
        return tuple(_head(o, n, N) for o in obj)
    return obj


def _restore_forwards(saved: list) -> None:
    """Undo per-instance `forward` overrides: (layer, its own forward before, or None for the class's)."""
    for layer, fwd in saved:
        if fwd is None:
            del layer.forward
        else:
            layer.forward = fwd


@contextmanager
def _packed_layers(model, base: Prefix, pk: Packing):
    """Layer i computes its active prefix of tokens; the tokens of runs starting above it take the unpatched
    run's output of layer i. A layer no run has reached does not run at all."""
    saved = []
    N = pk.tokens
    try:
        for i, layer in enumerate(model.layers):
            n = pk.active[i]
            if n == N:
                continue
            stored = base.states[i][pk.tok_ex[n:], pk.tok_col[n:]][None]
            saved.append((layer, layer.__dict__.get("forward")))
            if n == 0:
                layer.forward = lambda *a, _s=stored, **k: _s
                continue
            orig = type(layer).forward.__get__(layer)

            def partial(*args, _n=n, _s=stored, _orig=orig, **kwargs):
                out = _orig(*_head(args, _n, N), **{k: _head(v, _n, N) for k, v in kwargs.items()})
                return torch.cat([out[0] if isinstance(out, tuple) else out, _s], 1)
            layer.forward = partial
        yield
    finally:
        _restore_forwards(saved)


@contextmanager
def _packed_attention(model, base: Prefix, pk: Packing):
    """This model's attention, run by the registered function on each active run apart: [runs, heads, seq,
    d_head] with its queries at their columns and the unpatched run's keys/values before its start column."""
    impl = model.hf.config._attn_implementation
    fn = ALL_ATTENTION_FUNCTIONS[impl]
    layer_of = {id(model.layer_module(L, model.arch.attn)): L for L in range(model.dims.n_layers)}
    seq = base.inputs["input_ids"].shape[1]
    real = base.inputs["attention_mask"].bool()

    def attention(module, query, key, value, attention_mask, **kwargs):
        L = layer_of.get(id(module))
        if L is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        n, R = query.shape[2], pk.active_runs[L]
        run, col, ex = pk.tok_run[:n].to(query.device), pk.tok_col[:n].to(query.device), pk.ex[:R]

        def spread(full, new):   # the packed [1, heads, n, d] into its runs' columns of [R, heads, seq, d]
            full[run, :, col] = new[0].transpose(0, 1)
            return full
        q = spread(query.new_zeros(R, query.shape[1], seq, query.shape[3]), query)
        k = spread(base.keys[L][ex].to(key.device), key)
        v = spread(base.values[L][ex].to(value.device), value)
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        allowed = None   # no padding and no window: plain causal attention (the function's fastest path)
        if window or not bool(real[ex].all()):
            i = torch.arange(seq, device=query.device)
            allowed = (i[:, None] >= i[None, :]) & real[ex].to(query.device)[:, None, None, :]
            if window:
                allowed = allowed & (i[:, None] - i[None, :] < window)
            allowed = allowed | torch.eye(seq, dtype=torch.bool, device=query.device)  # padding queries see themselves
        out, _ = fn(module, q, k, v, allowed, **kwargs)     # [R, seq, heads, d]
        return out[run, col][None], None

    undo = override(ALL_ATTENTION_FUNCTIONS, impl, attention)
    try:
        yield
    finally:
        undo()
