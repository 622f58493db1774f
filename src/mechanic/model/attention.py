"""Per-head q, k, v and attention patterns, through transformers' AttentionInterface.

q and k are read after the rotary embedding (what the scores use); k and v of a query head are
those of its KV group (GQA aware). During a run that asks for them, the active attention function
is wrapped (via the interface's registry) for this model's attention modules only.
"""

from __future__ import annotations

import sys

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mechanic.model.interfaces import override


def instrument_attention(session):
    """Install the wrapper for the layers in `session.attn_fn`; returns the undo."""
    model = session.model
    by_module = {id(model.layer_module(L, model.arch.attn)): L for L in session.attn_fn}
    impl = model.hf.config._attn_implementation
    registered = ALL_ATTENTION_FUNCTIONS.get(impl, None) if impl != "eager" else None

    def attention(module, query, key, value, attention_mask, **kwargs):
        base = registered or sys.modules[type(module).__module__].eager_attention_forward
        L = by_module.get(id(module))
        if L is None:
            return base(module, query, key, value, attention_mask, **kwargs)
        query, key, value = _qkv(session, L, module, query, key, value)
        out, weights = base(module, query, key, value, attention_mask, **kwargs)
        pats = [s for s in session.attn_fn[L]["reads"] if s.part == "pattern"]
        if pats:
            p = weights if weights is not None else attention_pattern(module, query, key, attention_mask, kwargs)
            for s in pats:
                v = p.transpose(1, 2)  # [batch, q_pos, head, k_pos]
                session.store(str(s), v if s.index is None else v[:, :, s.index])
        return out, weights

    return override(ALL_ATTENTION_FUNCTIONS, impl, attention)


def _qkv(session, L, module, query, key, value):
    """Apply q/k/v interventions and store reads; tensors are [batch, heads, pos, d_head]."""
    bucket = session.attn_fn[L]
    H = query.shape[1]
    group = H // key.shape[1]
    tensors = {"q": query, "k": key, "v": value}
    for s, iv in bucket["ivs"]:
        t = tensors[s.part].transpose(1, 2).clone()  # [batch, pos, heads, d]
        heads = range(t.shape[2]) if s.index is None else [s.index if s.part == "q" else s.index // group]
        for h in heads:
            v = t[:, :, h]
            idx = session.where(v, iv)
            if idx is not None:
                v[idx] = iv.apply(v[idx])
        tensors[s.part] = t.transpose(1, 2)
    for s in bucket["reads"]:
        if s.part == "pattern":
            continue
        tensors[s.part] = base = session.track(tensors[s.part])

        def view(t, part=s.part, h=s.index):
            t = t.transpose(1, 2)  # [batch, pos, heads (kv heads for k, v), d]
            if part != "q":
                t = t.repeat_interleave(group, dim=2)
            return t if h is None else t[:, :, h]
        session.store(str(s), view(base), base, view)
    return tensors["q"], tensors["k"], tensors["v"]


def attention_pattern(module, query, key, attention_mask, kwargs) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) for implementations that do not return weights (e.g. sdpa)."""
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
    scores = query @ k.transpose(-1, -2) * scaling
    if kwargs.get("softcap"):
        scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
    qlen, klen = scores.shape[-2:]
    if attention_mask is None:
        causal = torch.ones(qlen, klen, dtype=torch.bool, device=scores.device).tril(klen - qlen)
        scores = scores.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :klen], float("-inf"))
    else:
        scores = scores + attention_mask[..., :klen]
    # rows of padding queries see no key at all: report zeros there, not NaN
    return torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(query.dtype)
