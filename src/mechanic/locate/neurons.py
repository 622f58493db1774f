"""Neuron-level knowledge attribution (Yu & Ananiadou, EMNLP 2024): importance as log-probability increase.

    Imp(v | h) = log p(w | h + v) - log p(w | h),   p(. | u) = softmax(W_U norm*(u))

norm* is the final norm with its scale frozen at the prompt's full final residual (sigma*, see
mechanic.locate.readout); w is the answer token (or the model's own top prediction); h is the residual
before the component at the last position, v its write there:

| kind | v | h |
|---|---|---|
| attn (layer) | attn_out | resid_pre |
| mlp (layer) | mlp_out | resid_pre + attn_out |
| head | z_h @ W_O[:, h] | resid_pre |
| attn_neuron (head h, dim k) | z_hk * W_O[:, h*d_head + k] (summed over source positions) | resid_pre |
| neuron (FFN value neuron j) | m_j * W_down[:, j] | resid_pre + attn_out |
| expert (MoE) | router weight * expert output | resid_pre + attn_out |

Everything comes from ONE forward; neurons are scored by batched projections: the vocabulary image of
each value vector W_U norm*(W[:, j]) is computed once per chunk of neurons and shared by all prompts
(norm* differs between prompts only by its scalar scale), then one log-softmax per (prompt, neuron).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mechanic.locate.gradient import task_batch
from mechanic.locate.parallel import data_parallel
from mechanic.locate.readout import Collected, FrozenNorm, Readout, collect, freeze, targets, write
from mechanic.locate.scores import Scores
from mechanic.tasks.task import Task, TaskBatch

KINDS = ("attn", "mlp", "head", "attn_neuron", "neuron", "expert")
CONVENTION = ("Imp = log p(w | h + v) - log p(w | h) at the last position; final norm scale frozen at the full "
              "final residual (sigma*); attention neurons summed over source positions")


def _check_kinds(model, kinds) -> list[str]:
    kinds = list(KINDS) if kinds is None else ([kinds] if isinstance(kinds, str) else list(kinds))
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"neuron_attribution cannot score kind {k!r}; choose from {', '.join(KINDS)}.")
    dense = any(not model.is_moe(L) for L in range(model.dims.n_layers))
    moe = any(model.is_moe(L) for L in range(model.dims.n_layers))
    if kinds == ["neuron"] and not dense:
        raise ValueError("This model has no dense FFN layer (every layer is mixture-of-experts); score 'expert' "
                         "instead of 'neuron'.")
    if kinds == ["expert"] and not moe:
        raise ValueError("This model has no mixture-of-experts layer; score 'neuron' instead of 'expert'.")
    return kinds


def _check_layers(model, layers) -> list[int]:
    N = model.dims.n_layers
    layers = list(range(N)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < N]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} out of range: this model has layers 0..{N - 1}; give at least one.")
    return layers


def _lp_gain(R: Readout, pre: torch.Tensor, w: int) -> torch.Tensor:
    """log p(w) from pre-cap logits [..., V]."""
    return torch.log_softmax(R.cap(pre), -1)[..., w]  # (several times faster than logsumexp on CPU)


def column_importance(R: Readout, h: torch.Tensor, a: torch.Tensor, W: torch.Tensor, post: FrozenNorm | None,
                      w: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Imp of every value vector a[i, j] * W[:, j] added to h[i] (through a frozen post-norm, if any): [n, m].

    The vocabulary image of each column is computed once per chunk and shared by the n prompts.
    """
    n, m = a.shape
    base = R.pre_logits(h)                                              # [n, V]
    base_lp = torch.stack([_lp_gain(R, base[i], int(w[i])) for i in range(n)])
    scale = R.norm.inv * (post.inv if post is not None else 1.0)       # [n]
    out = torch.empty(n, m)
    for s in range(0, m, chunk):
        cols = W[:, s:s + chunk].T                                      # [J, d]
        u = cols if post is None else post.linear(cols, inv=False)
        U = R.norm.linear(u, inv=False) @ R.W_U.T                        # [J, V]: shared by every prompt
        for i in range(n):
            pre = torch.addcmul(base[i], (a[i, s:s + chunk] * scale[i])[:, None], U)
            out[i, s:s + chunk] = _lp_gain(R, pre, int(w[i])) - base_lp[i]
    return out


def importance(model, col: Collected, R: Readout, w: torch.Tensor, kinds: Iterable[str], chunk: int = 512,
               layers: Iterable[int] | None = None) -> dict[str, tuple[list[str], torch.Tensor]]:
    """kind -> (site names, per-example importances [n, rows] (attn_neuron: [n, rows, d_head])) from one run."""
    d, a = model.dims, model.arch
    H, dh = d.n_heads, d.d_head
    gain = lambda h, v: R.logprob(h[:, None] + v, w) - R.logprob(h, w)[:, None]  # noqa: E731 - [n, k]
    out: dict[str, tuple[list[str], list[torch.Tensor]]] = {k: ([], []) for k in kinds}
    for L in (range(d.n_layers) if layers is None else layers):
        h_attn, h_mlp = col.resid_pre[L], col.mlp_in(L)
        if "attn" in out:
            out["attn"][0].append(f"L{L}.attn_out")
            out["attn"][1].append(gain(h_attn, col.attn_out[L][:, None]))
        if "mlp" in out:
            out["mlp"][0].append(f"L{L}.mlp_out")
            out["mlp"][1].append(gain(h_mlp, col.mlp_out[L][:, None]))
        if "head" in out:
            out["head"][0].extend(f"L{L}.head{h}" for h in range(H))
            out["head"][1].append(gain(h_attn, write(col.attn_post[L], col.heads[L])))
        if "attn_neuron" in out:
            W_O = a.o_weight(model.layer_module(L, a.o_proj)).float()
            imp = column_importance(R, h_attn, col.z[L], W_O, col.attn_post[L], w, chunk)
            out["attn_neuron"][0].extend(f"L{L}.head{h}.z" for h in range(H))
            out["attn_neuron"][1].append(imp.view(-1, H, dh))
        if "neuron" in out and L in col.neurons:
            W = a.down_weight(model.layer_module(L, a.down_proj)).float()
            out["neuron"][0].extend(f"L{L}.neuron{j}" for j in range(W.shape[1]))
            out["neuron"][1].append(column_importance(R, h_mlp, col.neurons[L], W, col.mlp_post[L], w, chunk))
        if "expert" in out and L in col.experts:
            v = write(col.mlp_post[L], col.experts[L])                     # [n, E, d]
            names = [f"L{L}.expert{e}" for e in range(v.shape[1])]
            if a.shared_expert:  # the gated shared expert: the rest of the block's write
                v = torch.cat([v, (col.mlp_out[L] - v.sum(1))[:, None]], 1)
                names.append(f"L{L}.shared_expert")
            out["expert"][0].extend(names)
            out["expert"][1].append(gain(h_mlp, v))
    return {k: (names, torch.cat(vals, 1)) for k, (names, vals) in out.items() if names}


@data_parallel   # under torchrun: examples split over the ranks (locate.parallel)
def neuron_attribution(model, task: Task | TaskBatch, kinds: str | Iterable[str] | None = None, *,
                       target: str = "answer", layers: Iterable[int] | None = None,
                       chunk: int = 512) -> dict[str, Scores]:
    """Log-probability increase of every attention layer, FFN layer, head, attention neuron, FFN value neuron
    (and MoE expert) for the target token at the last position, from one forward plus batched projections.

    kinds: any of attn, mlp, head, attn_neuron, neuron, expert (default all the model has). target:
    "answer" (the task's answer token) or "predicted" (the model's own top-1). layers: score only these
    layers (default all; the projections cost ~ neurons x vocab x d_model). Returns kind -> Scores,
    means over examples; attn_neuron Scores have one row per head (site L.head{h}.z) and one column per
    head dimension k (the o_proj column h * d_head + k).
    """
    kinds = _check_kinds(model, kinds)
    layers = _check_layers(model, layers)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of neurons per projection, got {chunk}.")
    batch, name, _ = task_batch(model, task)
    with torch.no_grad():
        col = collect(model, batch.clean, neurons="neuron" in kinds)
        R = Readout(model, col.final)
        w = targets(batch, col.logits, target)
        found = importance(model, col, R, w, kinds, chunk, layers)
    return _scores(model, found, name, batch, w, target, {"forward_passes": 1, "layers": layers})


def _scores(model, found, name, batch, w, target, extra) -> dict[str, Scores]:
    out = {}
    for k, (names, vals) in found.items():
        settings = {"kind": k, "target": target, "target_ids": w.tolist(), "n_examples": batch.n,
                    "convention": CONVENTION, **extra}
        positions = [f"dim{j}" for j in range(vals.shape[-1])] if k == "attn_neuron" else None
        if k == "attn_neuron":
            settings["axis"] = "head dimension k: the o_proj column h * d_head + k"
        out[k] = Scores(vals.mean(0), names, "neuron_attribution", positions=positions, task=name,
                        metric="logprob_increase", model=model.name, fingerprint=model.fingerprint, settings=settings)
    return out


def promoted_tokens(model, sites: Iterable[str], signs: Iterable[float] | None = None, k: int = 1) -> list[list[str]]:
    """The tokens each FFN value neuron pushes up most: top-k of W_U norm(W_down[:, j]) with the final norm's gain
    (and centering) but not its scale, which only rescales; flipped when `signs` says the activation is negative."""
    norm, head = model.module(model.arch.final_norm), model.module(model.arch.unembed)
    signs = list(signs) if signs is not None else None
    out = []
    with torch.no_grad():
        shape = freeze(norm, torch.ones(1, model.dims.d_model))
        for i, s in enumerate(sites):
            site = model.check(s)
            if site.kind != "neuron" or site.index is None:
                raise ValueError(f"promoted_tokens takes FFN neuron sites like 'L3.neuron17', got {s!r}.")
            W = model.arch.down_weight(model.layer_module(site.layer, model.arch.down_proj))
            col = W[:, site.index].float() * (-1.0 if signs is not None and signs[i] < 0 else 1.0)
            ids = (head.weight.float() @ shape.linear(col, inv=False)).topk(k).indices.tolist()
            out.append(model.tokenizer.convert_ids_to_tokens(ids) if model.tokenizer else [str(t) for t in ids])
    return out
