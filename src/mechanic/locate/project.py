"""Vocabulary projection: logit lens, direct logit attribution (DLA) and logit flow.

DLA convention: the final norm's scale is frozen at its value for the full final residual of each
prompt (sigma*), which makes the readout affine, so the final logit (difference) is exactly

    embed + sum(heads) + sum(attention o_proj biases) + sum(MLPs) + constant

where `embed` is the residual entering layer 0 (token + position embeddings), a head is its
z_h @ W_O[:, h] write, an MLP is its whole write (its neurons plus the down_proj bias, or its weighted
experts plus the gated shared expert), and `constant` is the final norm's bias and the unembedding
bias (zero for RMSNorm models). Logits are pre-soft-capping (Gemma 2). Neuron attribution by
log-probability increase lives in mechanic.locate.neurons.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechanic.locate.gradient import position_labels, task_batch
from mechanic.locate.readout import Readout, collect
from mechanic.locate.scores import Scores
from mechanic.tasks.task import Task, TaskBatch, TaskError

CONVENTION = ("final norm scale frozen at the full final residual of each prompt (sigma*); the logit (difference) "
              "is pre-soft-capping; embed = residual entering layer 0")


def _meta(model, name):
    return dict(task=name, model=model.name, fingerprint=model.fingerprint)


def _need_answers(batch: TaskBatch, method: str) -> None:
    if batch.answer is None or batch.answer.numel() == 0:
        raise TaskError(f"{method} needs an answer token for every example.")


# ---------------------------------------------------------------- logit lens
@dataclass
class Lens:
    """Logit lens output: answer probability and rank per state x position, and the top-k tokens of every cell.

    top[i][r][p] is a list of (token, probability) for prompt i, state r (prob.sites[r]) and position p.
    """

    prob: Scores
    rank: Scores
    top: list


def _lens_inputs(model, inputs, answers):
    """(model inputs, answer ids [n] or None, TaskBatch or None, name) from a Task, TaskBatch, text or ids."""
    if isinstance(inputs, (Task, TaskBatch)):
        batch, name, _ = task_batch(model, inputs)
        return batch.clean, batch.answer, batch, name
    batch = model.inputs(inputs)
    ids = None
    if answers is not None:
        if isinstance(answers, str):
            answers = [answers]
        if model.tokenizer is None and not isinstance(answers, torch.Tensor):
            raise TaskError("Answers given as text need a tokenizer; pass token ids (a LongTensor [n]) instead.")
        ids = torch.as_tensor([model.tokenizer(a, add_special_tokens=False)["input_ids"][0] if isinstance(a, str)
                               else int(a) for a in answers], dtype=torch.long)
        if ids.numel() != batch["input_ids"].shape[0]:
            raise TaskError(f"logit_lens got {ids.numel()} answers for {batch['input_ids'].shape[0]} prompts; give "
                            "one answer per prompt (or none, to follow the model's own final prediction).")
    return batch, ids, None, None


@torch.no_grad()
def logit_lens(model, inputs, layers=None, k: int = 10, answers=None) -> Lens:
    """Read every residual state (the embedding stream and each layer's resid_post) through the real final norm
    and unembedding: top-k tokens per cell, and the probability and rank of each prompt's answer.

    inputs: a Task or TaskBatch (answers = the task's), or prompts (text or token ids) with `answers`
    (one per prompt; default the model's own final top-1 token). layers: resid_post layers to read
    (default all). Scores values are means over prompts at positions aligned from the end (left padding).
    """
    N = model.dims.n_layers
    layers = list(range(N)) if layers is None else [int(x) for x in layers]
    for L in layers:
        if not 0 <= L < N:
            raise ValueError(f"Layer {L} is out of range: this model has layers 0..{N - 1}.")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    batch_in, ids, batch, name = _lens_inputs(model, inputs, answers)
    sites = ["L0.resid_pre"] + [f"L{L}.resid_post" for L in layers]
    run = model.run(batch_in, cache=sites)
    if ids is None:
        ids = run.logits[:, -1].argmax(-1)
    norm, head = model.module(model.arch.final_norm), model.module(model.arch.unembed)
    cap = getattr(model.hf.config, "final_logit_softcapping", None)
    mask = batch_in["attention_mask"].bool()
    n, P = mask.shape
    probs, ranks, top = torch.zeros(len(sites), n, P), torch.zeros(len(sites), n, P), [[] for _ in range(n)]
    tok = model.tokenizer
    decode = tok.convert_ids_to_tokens if tok is not None else (lambda t: [str(x) for x in t])
    for r, s in enumerate(sites):
        logits = head(norm(run[s])).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        p = torch.softmax(logits, -1)                                       # [n, P, V]
        ans = p.gather(-1, ids.view(n, 1, 1).expand(n, P, 1))[..., 0]
        probs[r], ranks[r] = ans, (p > ans[..., None]).sum(-1).float()
        tp, ti = p.topk(min(k, p.shape[-1]), -1)
        for i in range(n):
            top[i].append([list(zip(decode(ti[i, q].tolist()), tp[i, q].tolist())) if mask[i, q] else []
                           for q in range(P)])
    w = mask.float()
    mean = lambda t: (t * w).sum(1) / w.sum(0).clamp(min=1)  # noqa: E731 - mean over prompts at real positions
    labels = position_labels(batch) if batch is not None else (
        [f"{q}:{t}" for q, t in enumerate(decode(batch_in["input_ids"][0].tolist()))] if bool(mask.all())
        else [str(q - P) for q in range(P)])
    settings = {"layers": layers, "k": k, "n_prompts": n, "answers": ids.tolist(),
                "norm": "the model's final norm applied to each state (not frozen)"}
    meta = _meta(model, name)
    return Lens(Scores(mean(probs), sites, "logit_lens", positions=labels, metric="prob", settings=settings, **meta),
                Scores(mean(ranks), sites, "logit_lens", positions=labels, metric="rank", settings=settings, **meta),
                top)


# ---------------------------------------------------------------- direct logit attribution
@torch.no_grad()
def direct_logit_attribution(model, task: Task | TaskBatch) -> dict[str, Scores]:
    """The final logit difference (answer - wrong; the answer's logit when the task has no wrong answers) split
    into embed, every head, every MLP, and every neuron (dense layers) or expert (MoE layers); one forward.

    Returns {"component": embed + heads + mlp_out rows, "neuron": ..., "expert": ...} (neuron / expert
    only when the model has such layers), each a mean over examples. Exactness (see the module
    docstring): component values + settings["attn_bias"] + settings["constant"] == settings["total"];
    per layer, neurons (or experts) + settings["mlp_rest"][layer] == that layer's mlp_out row.
    """
    batch, name, _ = task_batch(model, task)
    _need_answers(batch, "Direct logit attribution")
    d = model.dims
    col = collect(model, batch.clean)
    R = Readout(model, col.final)
    c, const = R.logit_direction(batch.answer, batch.wrong)
    dot = lambda x: (x * c).sum(-1)  # noqa: E731
    total = dot(col.final) + const
    comp_sites, comp = ["embed"], [dot(col.resid_pre[0])[:, None]]
    mlp_sites, mlp_vals = [], []
    neuron_sites, neuron_vals, expert_sites, expert_vals = [], [], [], []
    attn_bias, mlp_rest = [], []
    for L in range(d.n_layers):
        ca = c if col.attn_post[L] is None else col.attn_post[L].adjoint(c)
        heads = (col.heads[L] * ca[:, None]).sum(-1)                      # [n, H]
        comp_sites += [f"L{L}.head{h}" for h in range(d.n_heads)]
        comp.append(heads)
        attn_bias.append(float((dot(col.attn_out[L]) - heads.sum(-1)).mean()))
        mlp = dot(col.mlp_out[L])
        mlp_sites.append(f"L{L}.mlp_out")
        mlp_vals.append(mlp[:, None])
        cm = c if col.mlp_post[L] is None else col.mlp_post[L].adjoint(c)
        if L in col.neurons:
            W = model.arch.down_weight(model.layer_module(L, model.arch.down_proj)).float()   # [d, m]
            v = col.neurons[L] * (cm @ W)                                   # [n, m]
            neuron_sites += [f"L{L}.neuron{j}" for j in range(v.shape[1])]
            neuron_vals.append(v)
        elif L in col.experts:
            v = (col.experts[L] * cm[:, None]).sum(-1)                      # [n, E]
            expert_sites += [f"L{L}.expert{e}" for e in range(v.shape[1])]
            expert_vals.append(v)
            if model.arch.shared_expert:
                expert_sites.append(f"L{L}.shared_expert")
                expert_vals.append((mlp - v.sum(-1))[:, None])
                v = torch.cat([v, (mlp - v.sum(-1))[:, None]], 1)
        else:
            v = mlp[:, None]
        mlp_rest.append(float((mlp - v.sum(-1)).mean()))
    settings = {"convention": CONVENTION, "total": float(total.mean()), "total_per_example": total.tolist(),
                "constant": float(const.mean()), "attn_bias": attn_bias, "mlp_rest": mlp_rest,
                "n_examples": batch.n, "forward_passes": 1,
                "logit": "answer - wrong" if batch.wrong is not None else "answer"}
    metric = "logit_diff" if batch.wrong is not None else "logit"
    meta = dict(metric=metric, settings=settings, **_meta(model, name))
    out = {"component": Scores(torch.cat(comp + mlp_vals, 1).mean(0), comp_sites + mlp_sites, "dla", **meta)}
    if neuron_vals:
        out["neuron"] = Scores(torch.cat(neuron_vals, 1).mean(0), neuron_sites, "dla", **meta)
    if expert_vals:
        out["expert"] = Scores(torch.cat(expert_vals, 1).mean(0), expert_sites, "dla", **meta)
    return out


# ---------------------------------------------------------------- logit flow
@torch.no_grad()
def logit_flow(model, task: Task | TaskBatch, score: str = "logit") -> Scores:
    """How the final-position logit difference is built across layers and source positions.

    Rows: embed, then per layer L.attn_out and L.mlp_out; columns: positions (aligned from the end).
    An attention cell (L, p) is what layer L's heads move from source position p into the last position,
    sum_h alpha_h[T, p] * v_h[p] @ W_O[:, h]; an MLP writes at the last position only, as does embed.
    score="logit": the cell's direct logit (difference) with the final norm's scale frozen (cells +
    attention biases + constant add up to the total, see settings); score="logprob": the log-probability
    increase of the answer, LP(h + cell) - LP(h), h = the residual before the block at the last position
    (Yu & Ananiadou's importance, per cell). Two forwards.
    """
    if score not in ("logit", "logprob"):
        raise ValueError(f"score must be 'logit' (direct logit attribution per cell) or 'logprob' (log-probability "
                         f"increase per cell), got {score!r}.")
    batch, name, _ = task_batch(model, task)
    _need_answers(batch, "Logit flow")
    d = model.dims
    N, H, dh = d.n_layers, d.n_heads, d.d_head
    col = collect(model, batch.clean, neurons=False)
    R = Readout(model, col.final)
    c, const = R.logit_direction(batch.answer, batch.wrong)
    run = model.run(batch.clean, cache=[s for L in range(N) for s in (f"L{L}.head.pattern", f"L{L}.head.v")],
                    stop_at="auto")
    n, P = batch.clean["input_ids"].shape
    rows, vals, attn_bias = ["embed"], [], []
    last = torch.zeros(n, P)
    last[:, -1] = 1.0
    if score == "logit":
        vals.append((col.resid_pre[0] * c).sum(-1)[:, None] * last)
    else:
        vals.append(torch.zeros(n, P))  # nothing comes before the embedding to compare against
    for L in range(N):
        alpha = run[f"L{L}.head.pattern"][:, -1].float()                    # [n, H, P]
        v = run[f"L{L}.head.v"].float()                                    # [n, P, H, dh]
        W_O = model.arch.o_weight(model.layer_module(L, model.arch.o_proj)).float().view(-1, H, dh)  # [d, H, dh]
        post = col.attn_post[L]
        if score == "logit":
            ca = c if post is None else post.adjoint(c)                     # [n, d]
            r = torch.einsum("nd,dhk->nhk", ca, W_O)                        # [n, H, dh]
            cell = torch.einsum("nhp,nphk,nhk->np", alpha, v, r)
            heads = (col.heads[L] * ca[:, None]).sum(-1)
            attn_bias.append(float(((col.attn_out[L] * c).sum(-1) - heads.sum(-1)).mean()))
            mlp = (col.mlp_out[L] * c).sum(-1)[:, None] * last
        else:
            moved = torch.einsum("nhp,nphk,dhk->npd", alpha, v, W_O)       # [n, P, d]
            moved = moved if post is None else post.linear(moved)
            h = col.resid_pre[L]
            base = R.logprob(h, batch.answer)
            cell = R.logprob(h[:, None] + moved, batch.answer) - base[:, None]
            h2 = col.mlp_in(L)
            mlp = (R.logprob(h2 + col.mlp_out[L], batch.answer) - R.logprob(h2, batch.answer))[:, None] * last
        vals += [cell, mlp]
        rows += [f"L{L}.attn_out", f"L{L}.mlp_out"]
    values = torch.stack(vals, 1) * batch.clean["attention_mask"].float()[:, None]   # [n, rows, P]
    mean = values.mean(0)  # a plain mean over examples (padding cells count as 0) keeps the cells additive
    settings = {"score": score, "convention": CONVENTION, "n_examples": batch.n, "forward_passes": 2,
                "cell": "attention: alpha[T,p] v[p] W_O summed over heads; mlp/embed: the write at T"}
    if score == "logit":
        total = (col.final * c).sum(-1) + const
        settings.update(total=float(total.mean()), constant=float(const.mean()), attn_bias=attn_bias)
    metric = ("logit_diff" if batch.wrong is not None else "logit") if score == "logit" else "logprob_increase"
    return Scores(mean, rows, "logit_flow", positions=position_labels(batch), metric=metric, settings=settings,
                  **_meta(model, name))
