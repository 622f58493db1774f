"""Query neurons (Yu & Ananiadou, EMNLP 2024): which earlier FFN neurons activate the top attention value neurons.

An attention value neuron (l, h, k) writes z_hk * W_O[:, h*d_head + k] at the last position T, and
z_hk = sum_p alpha_Tp v_pk: one term per source position p, with importance I_p (log-probability
increase of that term alone, as in mechanic.locate.neurons). The value v_pk reads the residual x_p
entering layer l through the input norm: v_pk = kappa . x_p / sigma_p + bias, with the key
kappa = W_V[row of (h, k)] * gain (centred for LayerNorm). An earlier FFN neuron (l' < l, n) at p wrote
s_pn W_down[:, n] into x_p, so it gets

    I_p * (s_pn W_down[:, n] . kappa) / (x_p . kappa)

its share of the value's input, times the importance that value carries. Scores are summed over the
top value neurons chosen; one value neuron at a time is listed in settings.
"""

from __future__ import annotations

import torch

from mechanic.locate.gradient import position_labels, task_batch
from mechanic.locate.neurons import importance
from mechanic.locate.readout import Readout, collect, freeze, targets, write
from mechanic.locate.scores import Scores
from mechanic.tasks.task import Task, TaskBatch

INPUT_NORMS = ("input_layernorm", "ln_1")  # the norm in front of attention, per family


class QueryError(ValueError):
    """A model whose value projection or attention input norm this method cannot find."""


def value_weight(model, layer: int) -> torch.Tensor:
    """W_V of one layer as [n_kv_heads * d_head, d_model] (separate v_proj, or the v part of a fused projection)."""
    d = model.dims
    attn = model.layer_module(layer, model.arch.attn)
    kv = d.n_kv_heads * d.d_head
    if hasattr(attn, "v_proj"):
        return attn.v_proj.weight
    if hasattr(attn, "qkv_proj"):                                   # Phi-3: [q; k; v] stacked
        return attn.qkv_proj.weight[d.n_heads * d.d_head + kv:]
    if hasattr(attn, "c_attn"):                                     # GPT-2 Conv1D [in, 3 * out]
        return attn.c_attn.weight.T[2 * d.n_heads * d.d_head:]
    if hasattr(attn, "query_key_value"):                            # GPT-NeoX: per head [q, k, v]
        w = attn.query_key_value.weight
        return w.view(d.n_heads, 3, d.d_head, -1)[:, 2].reshape(d.n_heads * d.d_head, -1)
    raise QueryError(f"{type(attn).__name__}: no v_proj, qkv_proj, c_attn or query_key_value found, so the value "
                     "keys are unknown. Query-neuron scoring supports Llama-, Phi-3-, GPT-2- and GPT-NeoX-style "
                     "attention.")


def input_norm(model, layer: int) -> torch.nn.Module:
    """The norm applied to the residual before attention in `layer`."""
    for name in INPUT_NORMS:
        m = model.layer_module(layer, name)
        if m is not None:
            return m
    raise QueryError(f"No attention input norm ({', '.join(INPUT_NORMS)}) in layer {layer} of this model.")


def keys(model, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kappa [H, d_head, d_model] per query head (GQA: its KV group's rows), inv = 1/sigma of the input norm at x)."""
    d = model.dims
    frozen = freeze(input_norm(model, layer), x)
    W = value_weight(model, layer).detach().float().view(d.n_kv_heads, d.d_head, -1)
    W = W.repeat_interleave(d.n_heads // d.n_kv_heads, 0)             # [H, d_head, d]
    kappa = W * frozen.weight
    if frozen.center:
        kappa = kappa - kappa.mean(-1, keepdim=True)
    return kappa, frozen.inv


@torch.no_grad()
def query_neurons(model, task: Task | TaskBatch, top: int = 10, *, target: str = "answer",
                  value_neurons: list[tuple[int, int, int]] | None = None) -> Scores:
    """Score earlier FFN neurons (per position) by how much they activate the top attention value neurons.

    value_neurons: (layer, head, dim) triples to trace (default: the `top` attention neurons with the largest
    mean log-probability increase). Returns Scores over FFN neurons x positions (aligned from the end),
    summed over the value neurons and averaged over examples. Two forwards plus batched projections.
    """
    batch, name, _ = task_batch(model, task)
    d = model.dims
    H, dh = d.n_heads, d.d_head
    col = collect(model, batch.clean, neurons=False)
    R = Readout(model, col.final)
    w = targets(batch, col.logits, target)
    if value_neurons is None:
        names, imp = importance(model, col, R, w, ["attn_neuron"])["attn_neuron"]
        flat = imp.mean(0).reshape(-1)                                 # [layers * H * dh]
        chosen = [(i // (H * dh), (i // dh) % H, i % dh) for i in flat.argsort(descending=True)[:top].tolist()]
    else:
        chosen = [(int(L), int(h), int(k)) for L, h, k in value_neurons]
        for L, h, k in chosen:
            if not (0 <= L < d.n_layers and 0 <= h < H and 0 <= k < dh):
                raise ValueError(f"Value neuron {(L, h, k)} is out of range: layers 0..{d.n_layers - 1}, heads "
                                 f"0..{H - 1}, dims 0..{dh - 1}.")
    last = max(L for L, _, _ in chosen)
    dense = [L for L in range(last) if not model.is_moe(L)]
    layers_needed = sorted({L for L, _, _ in chosen})
    cache = [f"L{L}.neuron" for L in dense] + [s for L in layers_needed for s in
                                                (f"L{L}.resid_pre", f"L{L}.head.pattern", f"L{L}.head.v")]
    run = model.run(batch.clean, cache=cache, stop_at="auto")
    n, P = batch.clean["input_ids"].shape
    mask = batch.clean["attention_mask"].float()
    downs = {L: model.arch.down_weight(model.layer_module(L, model.arch.down_proj)).float() for L in dense}
    total = {L: torch.zeros(n, P, downs[L].shape[1]) for L in dense}
    listed = []
    for L, h, k in chosen:
        x = run[f"L{L}.resid_pre"].float()                              # [n, P, d]
        kappa, _ = keys(model, L, x)
        kap = kappa[h, k]                                               # [d]
        alpha = run[f"L{L}.head.pattern"][:, -1, h].float()             # [n, P]
        v = run[f"L{L}.head.v"][:, :, h, k].float()                     # [n, P]
        col_o = model.arch.o_weight(model.layer_module(L, model.arch.o_proj))[:, h * dh + k].float()
        terms = write(col.attn_post[L], (alpha * v)[..., None] * col_o)  # [n, P, d]: each source position's write
        base = col.resid_pre[L]
        I = R.logprob(base[:, None] + terms, w) - R.logprob(base, w)[:, None]      # [n, P]
        I = I * mask
        denom = x @ kap                                                 # [n, P]
        safe = torch.where(denom.abs() > 1e-12, denom, torch.ones_like(denom))
        weight = torch.where(denom.abs() > 1e-12, I / safe, torch.zeros_like(I))
        for Lp in dense:
            if Lp < L:
                total[Lp] += run[f"L{Lp}.neuron"].float() * (kap @ downs[Lp])[None, None] * weight[..., None]
        listed.append({"site": f"L{L}.head{h}.z", "dim": k, "importance": float(I.sum(1).mean()),
                       "per_position": I.mean(0).tolist()})
    sites = [f"L{L}.neuron{j}" for L in dense for j in range(downs[L].shape[1])]
    values = torch.cat([total[L].mean(0).T for L in dense], 0) if dense else torch.zeros(0, P)
    settings = {"value_neurons": listed, "target": target, "target_ids": w.tolist(), "n_examples": batch.n,
                "forward_passes": 2,
                "value": "sum over value neurons of I_p * (s_pn W_down[:, n] . kappa) / (x_p . kappa)"}
    return Scores(values, sites, "query_neurons", positions=position_labels(batch), task=name,
                  metric="logprob_increase", model=model.name, fingerprint=model.fingerprint, settings=settings)
