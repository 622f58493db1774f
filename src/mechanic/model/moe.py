"""Per-expert sites for fused MoE experts modules, through transformers' ExpertsInterface.

Mixtral, Qwen2/3-MoE and OLMoE keep all experts of a layer as 3-D parameters in one module, so
there is no per-expert module to hook. During a run that asks for expert sites, the active experts
implementation is replaced (via the interface's own registry) by an instrumented one that computes
each expert explicitly for the modules of this run and defers to the original for everything else.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from mechanic.model.interfaces import override



def _expert_forward(module, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(neuron activations, output) of expert e on rows x, the same math as the eager reference."""
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False):
        raise NotImplementedError(f"{type(module).__name__}: transposed or biased expert weights are not "
                                  "supported yet for per-expert sites.")
    gate_up = torch.nn.functional.linear(x, module.gate_up_proj[e])
    act = module._apply_gate(gate_up) if hasattr(module, "_apply_gate") else _gate(module, gate_up)
    return act, torch.nn.functional.linear(act, module.down_proj[e])


def _gate(module, gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def instrument_experts(session):
    """Install the instrumented experts function for the layers in `session.experts`; returns the undo."""
    model = session.model
    by_module = {id(model.layer_module(L, model.arch.experts)): L for L in session.experts}
    impl = model.hf.config._experts_implementation or "eager"
    original = ALL_EXPERTS_FUNCTIONS.get(impl, None)

    def experts(module, hidden_states, top_k_index, top_k_weights):
        L = by_module.get(id(module))
        if L is None:
            if original is None:
                return _dense(module, hidden_states, top_k_index, top_k_weights)
            return original(module, hidden_states, top_k_index, top_k_weights)
        return _instrumented(session, L, module, hidden_states, top_k_index, top_k_weights)

    return override(ALL_EXPERTS_FUNCTIONS, impl, experts)


def _dense(module, hidden_states, top_k_index, top_k_weights):
    w = torch.zeros(hidden_states.shape[0], module.num_experts, dtype=top_k_weights.dtype, device=hidden_states.device)
    w.scatter_(1, top_k_index, top_k_weights)
    out = torch.zeros_like(hidden_states)
    for e in range(module.num_experts):
        rows = (top_k_index == e).any(-1).nonzero().squeeze(-1)
        if rows.numel():
            _, y = _expert_forward(module, e, hidden_states[rows])
            out.index_add_(0, rows, (y * w[rows, e, None]).to(out.dtype))
    return out


def _apply(session, ivs, kind, t, e=None):
    """Apply the interventions of one kind (and expert) to a [batch, pos, ...] tensor, returning a new one."""
    todo = [(s, iv) for s, iv in ivs if s.kind == kind and (e is None or s.index in (None, e))]
    if not todo:
        return t
    t = t.clone()
    for s, iv in todo:
        v = t
        if kind == "expert_neuron" and s.neuron is not None:
            v = t[..., s.neuron]
        idx = session.where(v, iv)
        if idx is not None:
            v[idx] = iv.apply(v[idx])
    return t


def _instrumented(session, L, module, hidden_states, top_k_index, top_k_weights):
    bucket = session.experts[L]
    ivs, reads = bucket["ivs"], bucket["reads"]
    N, d = hidden_states.shape
    B = session.batch_size or 1
    P = N // B
    E = module.num_experts
    w = torch.zeros(N, E, dtype=top_k_weights.dtype, device=hidden_states.device)
    w.scatter_(1, top_k_index, top_k_weights)
    w = session.track(_apply(session, ivs, "router", w.view(B, P, E)).reshape(N, E))
    want = {s.kind for s in reads} | {s.kind for s, _ in ivs}
    outs, acts = [], []
    final = torch.zeros_like(hidden_states)
    for e in range(E):
        routed = (top_k_index == e).any(-1) | (w[:, e] != 0)
        rows = routed.nonzero().squeeze(-1)
        y_full = torch.zeros(N, d, dtype=hidden_states.dtype, device=hidden_states.device)
        a_full = None
        if "expert_neuron" in want:
            a_full = torch.zeros(N, module.down_proj.shape[-1], dtype=hidden_states.dtype, device=hidden_states.device)
        if rows.numel():
            act, y = _expert_forward(module, e, hidden_states[rows])
            if a_full is not None:  # neurons are a site: the output is recomputed from them (so changes count)
                a_full[rows] = act
                a_full = session.track(_apply(session, ivs, "expert_neuron", a_full.view(B, P, -1), e).reshape(N, -1))
                y = torch.nn.functional.linear(a_full[rows], module.down_proj[e])
            y_full[rows] = y
        y_full = session.track(_apply(session, ivs, "expert", y_full.view(B, P, d), e).reshape(N, d))
        final = final + y_full * w[:, e, None].to(y_full.dtype)
        outs.append(y_full)
        acts.append(a_full)
    for s in reads:
        if s.kind == "router":
            session.store(str(s), w.view(B, P, E), w, lambda g: g.view(B, P, E))
        elif s.kind == "expert":
            def pick(t, e=s.index):  # [tokens, experts, d] -> [batch, pos, (experts,) d]
                t = t.view(B, P, *t.shape[1:])
                return t if e is None else t[:, :, e]
            session.store_stack(str(s), outs, pick)
        elif s.kind == "expert_neuron":
            def pick(t, e=s.index, j=s.neuron):
                t = t.view(B, P, *t.shape[1:])
                t = t if e is None else t[:, :, e]
                return t if j is None else t[..., j]
            session.store_stack(str(s), acts, pick)
    return final.to(hidden_states.dtype)
