"""Directional ablation (refusal-direction style): remove one direction from every residual write.

Hook form: `project_out` on the token embedding (`embed`) and on every layer's `attn_out` and
`mlp_out`, so no component can write along the direction (learned position embeddings, as in GPT-2,
are not a site and are left alone). Weight form: the same projection baked into the matrices that make
those writes (embedding rows, o_proj and down_proj outputs and biases, every expert's down_proj), so
the edited model runs anywhere, plain transformers included. The two give the same outputs (tested).
A tied unembedding is first given its own copy, so the readout is not orthogonalized with the embedding.
"""

from __future__ import annotations

import torch

from mechanic.model.interventions import project_out
from mechanic.steer.plan import Orthogonalize, Plan, PlanError, Untie


def _unit(model, direction) -> torch.Tensor:
    d = torch.as_tensor(getattr(direction, "direction", direction)).detach().float().reshape(-1).cpu()
    if d.numel() != model.dims.d_model or not bool(torch.isfinite(d).all()) or float(d.norm()) == 0:
        raise PlanError(f"A direction for this model must be a finite, non-zero vector of size d_model = "
                        f"{model.dims.d_model}; got {d.numel()} values.")
    return d / d.norm()


def writes(model) -> list[str]:
    """Every residual-stream write the hook form projects: embed, then attn_out and mlp_out per layer."""
    return ["embed"] + [f"L{L}.{k}" for L in range(model.dims.n_layers) for k in ("attn_out", "mlp_out")]


def directional_ablation(model, direction) -> Plan:
    """Hook plan: project `direction` out of every residual write."""
    d = _unit(model, direction)
    return Plan([project_out(s, d) for s in writes(model)], method="directional_ablation",
                fingerprint=model.fingerprint, settings={"form": "hooks", "sites": writes(model)})


def baked_directional_ablation(model, direction) -> Plan:
    """Weight plan equal to `directional_ablation`: orthogonalize every matrix that writes to the residual."""
    a = model.arch
    if a.attn_write != a.attn or a.mlp_write != a.mlp:
        raise PlanError(f"{model.hf.config.model_type}: the attention/MLP outputs pass a norm before the residual "
                        f"add ({a.attn_write}, {a.mlp_write}), so no weight produces the residual write linearly and "
                        "the projection cannot be baked in. Use the hook form, directional_ablation().")
    d = _unit(model, direction)
    names = {id(p): n for n, p in model.hf.named_parameters()}
    edits: list = [Untie()]
    embed = model.module(a.embed).weight
    edits.append(Orthogonalize(names[id(embed)], d, dim=1, note="embedding rows"))

    def linear(mod, what):  # Linear stores [d_model, in]; GPT-2's Conv1D [in, d_model]
        edits.append(Orthogonalize(names[id(mod.weight)], d, dim=1 if a.conv1d else 0, note=what))
        if getattr(mod, "bias", None) is not None:
            edits.append(Orthogonalize(names[id(mod.bias)], d, dim=0, note=what + " bias"))
    for L in range(model.dims.n_layers):
        linear(model.layer_module(L, a.o_proj), f"L{L} o_proj")
        if model.is_moe(L):
            experts = model.layer_module(L, a.experts)
            w = experts.down_proj  # fused [experts, d_model, d_ff]
            if w.dim() != 3 or w.shape[1] != model.dims.d_model:
                raise PlanError(f"Layer {L}: expert down_proj has shape {list(w.shape)}, not [experts, d_model, "
                                "d_ff]; baking is not supported for this layout. Use the hook form.")
            edits.append(Orthogonalize(names[id(w)], d, dim=1, note=f"L{L} experts down_proj"))
            if a.shared_expert:
                linear(model.layer_module(L, a.shared_expert + ".down_proj"), f"L{L} shared expert down_proj")
        else:
            linear(model.layer_module(L, a.down_proj), f"L{L} down_proj")
    return Plan(edits=edits, method="directional_ablation", fingerprint=model.fingerprint,
                settings={"form": "weights", "params": [e.param for e in edits if hasattr(e, "param")]})
