"""Gradient attribution: AtP for heads, neurons, experts and residual states; EAP / EAP-IG for graph edges.

AtP (Nanda 2023; Kramar et al. 2024) estimates the effect of patching a site with its first-order
Taylor term. Convention used here (the default, `gradient_at="corrupted"`):

    score(site) = (a_clean - a_corrupted) . d metric / d a   at the corrupted run

which approximates m(corrupted run with the site set to its clean value) - m(corrupted run):
how much of the clean behaviour the site restores (denoising). With `gradient_at="clean"` the
gradient is taken at the clean run, which approximates m(clean) - m(clean run with the site set to
its corrupted value) (noising). Either way a positive score means the site's clean value pushes
the metric towards its clean value. Scores are means over the examples of the task batch.

Cost: one forward without gradient and one forward + backward for every site of every kind at
once (per chunk of `batch_size` examples).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from mechanic.locate.scores import Scores
from mechanic.model.hooks import frozen_parameters
from mechanic.tasks import metrics as _metrics
from mechanic.tasks.task import Task, TaskBatch, TaskError

ATP_KINDS = ("head", "neuron", "expert", "embed", "resid_pre", "resid_post", "attn_out", "mlp_out", "sae")
# one site per layer (not per component): kept per position by default
_PER_POSITION = ("embed", "resid_pre", "resid_post", "attn_out", "mlp_out")

Metric = Callable[[torch.Tensor, TaskBatch], torch.Tensor]


# ---------------------------------------------------------------- shared helpers
def task_batch(model, task: Task | TaskBatch) -> tuple[TaskBatch, str | None, str | None]:
    """(TaskBatch, task name, the task's metric name) for a Task (tokenized for `model`) or a ready TaskBatch."""
    if isinstance(task, Task):
        return task.tokenize(model), task.name, task.metric
    if isinstance(task, TaskBatch):
        return task, None, None
    raise TypeError(f"Expected a mechanic Task or TaskBatch, got {type(task).__name__}. Build one with "
                    "mechanic.tasks.Task(name, examples) (or Task.tokenize(model) for a TaskBatch).")


def metric_fn(metric: str | Metric | None, default: str | None = None) -> tuple[str, Metric]:
    """(name, fn) for a metric named in mechanic.tasks.metrics, or given as fn(last logits [n, vocab], batch) -> [n]."""
    metric = metric or default or "logit_diff"
    if callable(metric):
        return getattr(metric, "__name__", "custom"), metric
    return metric, _metrics.get(metric)


def need_corrupted(batch: TaskBatch, method: str) -> None:
    """Refuse a batch without corrupted prompts, or whose corrupted inputs do not line up with the clean ones."""
    if batch.corrupted is None:
        raise TaskError(f"{method} compares a clean and a corrupted run, but this task has no corrupted prompts. "
                        "Give every Example a `corrupted` prompt with the same token length as its clean prompt.")
    a, b = batch.clean["input_ids"].shape, batch.corrupted["input_ids"].shape
    if a != b:
        raise TaskError(f"{method}: clean inputs have shape {list(a)} and corrupted inputs {list(b)}; they must be "
                        "aligned position by position (tokenize with Task.tokenize).")


def rows(batch: TaskBatch, sl: slice) -> TaskBatch:
    """The examples `sl` of a TaskBatch (see TaskBatch.select)."""
    return batch.select(sl)


def position_labels(batch: TaskBatch) -> list[str]:
    """Labels for the position axis: the first prompt's tokens when nothing is padded, else offsets -P..-1."""
    if bool(batch.clean["attention_mask"].all()) and batch.tokens:
        return [f"{i}:{t}" for i, t in enumerate(batch.tokens[0])]
    P = batch.seq
    return [str(p - P) for p in range(P)]


# ---------------------------------------------------------------- AtP
def _atp_sites(model, kind: str) -> list[tuple[str, list[str]]]:
    """(site to cache, names of the score rows it yields) for every layer that has this kind."""
    d, out = model.dims, []
    if kind == "embed":
        return [("embed", ["embed"])]
    if kind == "sae":   # every attached dictionary: its latents, and its error as one more node
        return [x for base, c in model.dictionaries.items() for x in
                ((f"{base}.sae", [f"{base}.sae{f}" for f in range(c.width)]),
                 (f"{base}.sae_error", [f"{base}.sae_error"]))]
    for L in range(d.n_layers):
        moe = model.is_moe(L)
        if kind == "head":
            out.append((f"L{L}.head.z", [f"L{L}.head{h}" for h in range(d.n_heads)]))
        elif kind == "neuron" and not moe:
            out.append((f"L{L}.neuron", [f"L{L}.neuron{j}" for j in range(d.d_mlp)]))
        elif kind == "expert" and moe:
            out.append((f"L{L}.expert", [f"L{L}.expert{e}" for e in range(d.n_experts)]))
        elif kind in _PER_POSITION:
            out.append((f"L{L}.{kind}", [f"L{L}.{kind}"]))
    return out


def _per_cell(site: str, diff: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """diff . grad reduced to [batch, pos, rows] (rows = heads, neurons, experts, dictionary latents, or 1)."""
    prod = diff * grad
    if site.endswith(".sae_error"):
        return prod.flatten(2).sum(-1, keepdim=True)   # the error node: one number per cell
    if site.endswith((".neuron", ".sae")):
        return prod                      # [b, p, d_mlp]: one number per neuron already
    if site.endswith((".head.z", ".expert")):
        return prod.sum(-1)              # [b, p, H, d] -> [b, p, H]
    return prod.sum(-1, keepdim=True)    # [b, p, d_model] -> [b, p, 1]


def atp(model, task: Task | TaskBatch, kind: str | Iterable[str] = "head", *, metric: str | Metric | None = None,
        per_position: bool | None = None, gradient_at: str = "corrupted",
        batch_size: int | None = 16) -> Scores | dict[str, Scores]:
    """Attribution patching: score every site of `kind` by (a_clean - a_corr) . dmetric/da, to rank components cheaply.

    kind: one of head, neuron, expert, embed, resid_pre, resid_post, attn_out, mlp_out, sae, or several
    (then a dict kind -> Scores, all from the same runs). "sae" scores the latents of every attached
    dictionary (mechanic.features.attach) plus its error node `<site>.sae_error`; latents and error add up
    to the attached site's own score, except for what activation normalisation (the decoder's scale is the
    gradient run's) and a skip transcoder's skip term (a function of the MLP input, not a node) carry. Heads are scored through their z (o_proj
    input), which equals (contribution difference) . (gradient at the o_proj output) exactly.
    per_position: keep the position axis (default: yes for residual-type kinds, no for heads, neurons
    and experts, which are summed over positions). gradient_at: "corrupted" (default) or "clean"
    (see the module docstring for what each approximates). metric: a name from
    mechanic.tasks.metrics or fn(last-position logits [n, vocab], batch) -> [n]; default the task's.
    Experts are scored with the routing of the gradient run: an expert not routed to a token in that
    run gets no credit there (routing changes show up on the router, not the expert).
    """
    kinds = [kind] if isinstance(kind, str) else list(kind)
    for k in kinds:
        if k not in ATP_KINDS:
            raise ValueError(f"AtP cannot score kind {k!r}; choose from {', '.join(ATP_KINDS)}. "
                             "(Use 'head' for attention heads, 'neuron' for dense FFN neurons, 'expert' for MoE "
                             "experts.)")
    if gradient_at not in ("corrupted", "clean"):
        raise ValueError(f"gradient_at must be 'corrupted' or 'clean', got {gradient_at!r}.")
    batch, task_name, task_metric = task_batch(model, task)
    need_corrupted(batch, "Attribution patching")
    mname, mfn = metric_fn(metric, task_metric)
    plan = {k: _atp_sites(model, k) for k in kinds}
    for k, sites in plan.items():
        if not sites and k == "sae":
            raise ValueError("AtP over dictionary latents needs a dictionary attached to the model; attach one "
                             "with mechanic.features.attach(model, dictionary) (one per site, any number of sites).")
        if not sites:
            other = "expert" if k == "neuron" else "neuron"
            raise ValueError(f"This model has no {k} sites (" + ("no dense FFN layer" if k == "neuron" else
                             "no mixture-of-experts layer") + f"); use {other} instead.")
    cache = [s for sites in plan.values() for s, _ in sites]
    n, size = batch.n, batch_size or batch.n
    if size < 1:
        raise ValueError(f"batch_size must be a positive number of examples, got {batch_size}.")
    totals: dict[str, torch.Tensor] = {}
    m_clean = m_corr = 0.0
    for start in range(0, n, size):
        b = rows(batch, slice(start, start + size))
        grad = lambda logits, b=b: mfn(logits[:, -1], b).sum()  # noqa: E731 - sum: per-example gradients
        if gradient_at == "corrupted":
            clean = model.run(b.clean, cache=cache)
            corr = model.run(b.corrupted, cache=cache, grad=grad)
            grads, m_corr = corr.grads, m_corr + corr.metric
            m_clean += float(mfn(clean.logits[:, -1], b).sum())
        else:
            clean = model.run(b.clean, cache=cache, grad=grad)
            corr = model.run(b.corrupted, cache=cache)
            grads, m_clean = clean.grads, m_clean + clean.metric
            m_corr += float(mfn(corr.logits[:, -1], b).sum())
        for s in cache:
            cell = _per_cell(s, clean[s] - corr[s], grads[s]).sum(0)  # [pos, rows]: summed over examples
            totals[s] = cell if s not in totals else totals[s] + cell
    out = {}
    labels = position_labels(batch)
    meta = dict(task=task_name, metric=mname, model=model.name, fingerprint=model.fingerprint)
    for k, sites in plan.items():
        keep_pos = per_position if per_position is not None else k in _PER_POSITION
        names, vals = [], []
        for s, rnames in sites:
            t = totals[s] / n                            # [pos, rows]
            vals.append(t.T if keep_pos else t.sum(0))   # [rows, pos] or [rows]
            names += rnames
        settings = {"kind": k, "gradient_at": gradient_at, "per_position": keep_pos, "n_examples": n,
                    "metric_clean": m_clean / n, "metric_corrupted": m_corr / n,
                    "approximates": ("m(corrupted, site := clean) - m(corrupted)" if gradient_at == "corrupted"
                                     else "m(clean) - m(clean, site := corrupted)")}
        out[k] = Scores(torch.cat(vals), names, "atp", positions=labels if keep_pos else None, settings=settings,
                        **meta)
    return out[kinds[0]] if isinstance(kind, str) else out


# ---------------------------------------------------------------- component graph (EAP, EAP-IG)
# Nodes: embed (the residual stream entering layer 0), every attention head, every MLP (the whole MoE
# block in MoE layers), logits. Each node *writes* its output to the residual stream and every later
# node *reads* the sum of what was written before it, so there is an edge u -> v whenever u comes
# before v. A node is named by its output site (embed, L3.head4, L3.mlp_out); as a receiver the same
# name means the node's input, and "logits" means the final residual read by the unembedding.
#
# To give each receiver its own input (a head reads the residual through its own q, k, v only), the
# graph is executed layer by layer: each decoder layer is called again, exactly as the model called
# it (arguments captured by `run(capture_calls=...)`), on H stacked copies of the residual, copy h
# keeping only head h's z (the o_proj input); the MLP is read by calling the layer with the attention
# output set to zero, so the MLP sees exactly the given residual. Head outputs z_h @ W_O[:, h]^T are
# the engine's head contributions. The sums in between are the residual additions of the layer.


class _Stop(Exception):
    """Stops a re-called decoder layer once the value it was called for exists."""


def _tile(obj, b: int, k: int):
    """Repeat every batch-leading tensor (dim >= 2, first dim b) k times along the batch, inside tuples/lists/dicts."""
    if isinstance(obj, torch.Tensor):
        return obj.repeat(k, *[1] * (obj.dim() - 1)) if obj.dim() >= 2 and obj.shape[0] == b else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_tile(o, b, k) for o in obj)
    if isinstance(obj, dict):
        return {key: _tile(v, b, k) for key, v in obj.items()}
    return obj


def _layer_of(name: str) -> int | None:
    """The layer of a node name (None for embed and logits)."""
    return None if name in ("embed", "logits") else int(name[1:name.index(".")])


def upstream_mask(senders: list[str], receivers: list[str], parallel: bool = False) -> torch.Tensor:
    """[senders, receivers] bool: True where the sender writes to the residual before the receiver reads it."""
    out = torch.zeros(len(senders), len(receivers), dtype=torch.bool)
    for j, v in enumerate(receivers):
        lv = _layer_of(v)
        for i, u in enumerate(senders):
            lu = _layer_of(u)
            out[i, j] = (v == "logits" or u == "embed" or lu < lv
                         or (lu == lv and ".head" in u and v.endswith(".mlp_out") and not parallel))
    return out


class ComponentGraph:
    """The component graph of one model: sender and receiver names, which edges exist, and an exact executor."""

    def __init__(self, model):
        a, d = model.arch, model.dims
        if a.attn_write != a.attn:
            raise ValueError(f"{model.hf.config.model_type}: the attention output is normalised again before it is "
                             f"added to the residual (the residual write is {a.attn_write!r}), so head outputs do not "
                             "add up in the residual stream and edges between heads are not defined. EAP supports "
                             "families whose attention block writes to the residual directly (Llama, Qwen, Mistral, "
                             "Gemma, Phi-3, GPT-2, GPT-NeoX, Mixtral, Qwen-MoE, OLMoE).")
        self.model = model
        self.H, self.n_layers, self.parallel = d.n_heads, d.n_layers, model.parallel
        self.senders = ["embed"]
        self.receivers = []
        for L in range(d.n_layers):
            heads = [f"L{L}.head{h}" for h in range(d.n_heads)]
            self.senders += heads + [f"L{L}.mlp_out"]
            self.receivers += heads + [f"L{L}.mlp_out"]
        self.receivers.append("logits")
        self.upstream = upstream_mask(self.senders, self.receivers, self.parallel)

    @property
    def n_edges(self) -> int:
        """Number of edges (sender, receiver) pairs where the sender comes first."""
        return int(self.upstream.sum())

    # -- indices
    def sender(self, L: int, h: int | None = None) -> int:
        """Index of head h (or the MLP when h is None) of layer L among the senders."""
        return 1 + L * (self.H + 1) + (self.H if h is None else h)

    def receiver(self, L: int, h: int | None = None) -> int:
        """Index of head h (or the MLP when h is None) of layer L among the receivers."""
        return L * (self.H + 1) + (self.H if h is None else h)

    # -- execution
    def calls(self, run) -> list[tuple[tuple, dict]]:
        """The decoder-layer calls captured by `model.run(..., capture_calls=graph.layer_paths)`."""
        return [run.calls[p][0] for p in self.layer_paths]

    @property
    def layer_paths(self) -> list[str]:
        """Module paths of the decoder layers, for `run(capture_calls=...)`."""
        return [f"{self.model.arch.layers}.{L}" for L in range(self.n_layers)]

    def _call(self, L: int, x: torch.Tensor, call, what: str) -> torch.Tensor:
        """Call decoder layer L as the model did, on residual x; return its heads' z ("z") or its MLP output ("mlp")."""
        m, a = self.model, self.model.arch
        args, kwargs = call
        if args:
            args = (x,) + tuple(args[1:])
        else:
            kwargs = {**kwargs, "hidden_states": x}
        got = {}
        handles = []

        def grab_z(mod, inputs):
            got["v"] = inputs[0]
            raise _Stop

        def zero_attn(mod, inputs, out):
            if isinstance(out, tuple):
                return (torch.zeros_like(out[0]),) + tuple(out[1:])
            return torch.zeros_like(out)

        def grab_mlp(mod, inputs, out):
            got["v"] = out[0] if isinstance(out, tuple) else out
            raise _Stop
        try:
            if what == "z":
                handles.append(m.layer_module(L, a.o_proj).register_forward_pre_hook(grab_z))
            else:
                handles.append(m.layer_module(L, a.attn_write).register_forward_hook(zero_attn))
                handles.append(m.layer_module(L, a.mlp_write).register_forward_hook(grab_mlp))
            try:
                m.layers[L](*args, **kwargs)
            except _Stop:
                pass
        finally:
            for h in handles:
                h.remove()
        if "v" not in got:
            target = a.o_proj if what == "z" else a.mlp_write
            raise RuntimeError(f"Decoder layer {L} returned without calling {target}; the architecture map does not "
                               "match this model.")
        return got["v"]

    def execute(self, x0: torch.Tensor, calls, keep: torch.Tensor | None = None, ref: torch.Tensor | None = None,
                inputs: list | None = None):
        """Run the graph from the residual x0 [b, p, d]; returns (sender outputs [U, b, p, d], last-position logits).

        keep/ref: an edge (u, v) with keep[u, v] False carries ref[u] instead of u's output in this run.
        inputs: if a list, every receiver input tensor is appended to it (heads as [H, b, p, d]), for gradients.
        """
        m, a, H = self.model, self.model.arch, self.H
        b, p, d = x0.shape
        U = len(self.senders)
        drop = None if keep is None else (self.upstream & ~keep.bool().cpu()).to(x0.device, x0.dtype)
        outs = torch.zeros(U, b, p, d, dtype=x0.dtype, device=x0.device) if inputs is None else None
        parts = [x0]
        if outs is not None:
            outs[0] = x0

        def patched(cols, n_up):
            """sum over dropped upstream senders u of (ref[u] - this run's output of u), per receiver in cols."""
            if drop is None or not bool(drop[:n_up, cols].any()):
                return None
            done = outs[:n_up] if outs is not None else torch.stack(parts[:n_up])
            return torch.einsum("uv,ubpd->vbpd", drop[:n_up, cols], ref[:n_up] - done)

        R = x0
        for L in range(self.n_layers):
            args, kwargs = calls[L]
            n_up = self.sender(L, 0)
            heads = slice(self.receiver(L, 0), self.receiver(L, 0) + H)
            delta = patched(heads, n_up)
            X = R.unsqueeze(0).repeat(H, 1, 1, 1) if delta is None else R.unsqueeze(0) + delta
            if inputs is not None:
                inputs.append(X)
            z = self._call(L, X.reshape(H * b, p, d), (_tile(args, b, H), _tile(kwargs, b, H)), "z")
            z = torch.diagonal(z.view(H, b, p, H, -1), dim1=0, dim2=3).permute(0, 1, 3, 2)  # copy h, head h
            o = m.layer_module(L, a.o_proj)
            W = a.o_weight(o).view(d, H, -1)
            c = torch.einsum("bphk,dhk->hbpd", z, W)                  # head contributions
            bias = getattr(o, "bias", None)
            attn = c.sum(0) + (bias if bias is not None else 0)
            if outs is not None:
                outs[n_up:n_up + H] = c
            else:
                parts += list(c)
            mid = R + attn
            n_up_mlp = self.sender(L, 0) if self.parallel else self.sender(L)
            delta = patched([self.receiver(L)], n_up_mlp)
            # "+ 0" makes the MLP's input its own tensor, so its gradient is the MLP's alone (not the skip path's)
            Xm = (R if self.parallel else mid) + (0 if delta is None else delta[0])
            if inputs is not None:
                inputs.append(Xm)
            y = self._call(L, Xm, (args, kwargs), "mlp")
            if outs is not None:
                outs[self.sender(L)] = y
            else:
                parts.append(y)
            R = mid + y
        delta = patched([len(self.receivers) - 1], U)
        Xf = R + (0 if delta is None else delta[0])
        if inputs is not None:
            inputs.append(Xf)
        logits = m.module(a.unembed)(m.module(a.final_norm)(Xf[:, -1:]))[:, 0]
        return (outs if outs is not None else torch.stack(parts)), logits


def prepare_graph_inputs(model, graph: ComponentGraph, batch: TaskBatch):
    """(clean x0, corrupted x0, captured layer calls, clean and corrupted last-position logits) for one chunk."""
    for key in ("attention_mask", "position_ids"):
        if key in batch.clean and not torch.equal(batch.clean[key], batch.corrupted[key]):
            raise TaskError(f"Edge methods run clean and corrupted prompts through the same captured layer calls, so "
                            f"their {key} must be equal; here they differ (tokenized with align=True?). Use clean "
                            "and corrupted prompts with the same token length.")
    clean = model.run(batch.clean, cache=["L0.resid_pre"], capture_calls=graph.layer_paths)
    corr = model.run(batch.corrupted, cache=["L0.resid_pre"])
    return clean["L0.resid_pre"], corr["L0.resid_pre"], graph.calls(clean), clean.logits[:, -1], corr.logits[:, -1]


def receiver_grads(graph: ComponentGraph, x0: torch.Tensor, calls, value_fn) -> tuple:
    """(sender outputs [U, b, p, d], d value / d (each receiver's input) [V, b, p, d], value) for a run from x0."""
    with frozen_parameters(graph.model.hf), torch.enable_grad():
        x = x0.detach().requires_grad_()
        inputs: list[torch.Tensor] = []
        senders, logits = graph.execute(x, calls, inputs=inputs)
        value = value_fn(logits)
        grads = torch.autograd.grad(value, inputs, allow_unused=True, materialize_grads=True)
    G = torch.cat([g if g.dim() == 4 else g[None] for g in grads])
    return senders.detach(), G, float(value.detach())


def eap(model, task: Task | TaskBatch, *, ig_steps: int | None = None, metric: str | Metric | None = None,
        batch_size: int | None = 8) -> Scores:
    """Edge attribution patching over the component graph (EAP; EAP-IG with ig_steps), to find circuits cheaply.

    score(u -> v) = (z_u,corrupted - z_u,clean) . d metric / d (input of v), summed over positions and
    averaged over examples; it approximates m(clean run with only that edge carrying u's corrupted
    output) - m(clean), so for a logit difference important edges are negative: rank by |score|.
    The gradient is at the clean run (EAP), or with ig_steps=m the mean gradient at the m points
    corrupted + k/m (clean - corrupted), k = 0..m-1, of the input embeddings (EAP-IG, as in the
    reference implementation; m = 5..30 is usual). Each head receives through its own input.
    Returns Scores with values [senders, receivers]: `sites` are the senders, `positions` the
    receivers (see ComponentGraph for the names); entries that are not edges are 0.
    Cost per chunk: 2 ordinary forwards, one graph run (about 1 + H/3 forwards: every layer is called
    again on H copies up to its o_proj) and one (EAP) or m (EAP-IG) graph forward + backward passes.
    """
    if ig_steps is not None and (not isinstance(ig_steps, int) or ig_steps < 1):
        raise ValueError(f"ig_steps must be a positive number of points (5 to 30 is usual) or None for plain EAP, "
                         f"got {ig_steps!r}.")
    graph = ComponentGraph(model)
    batch, task_name, task_metric = task_batch(model, task)
    need_corrupted(batch, "Edge attribution patching")
    mname, mfn = metric_fn(metric, task_metric)
    n, size = batch.n, batch_size or batch.n
    total = torch.zeros(len(graph.senders), len(graph.receivers), dtype=torch.float64)
    m_clean = m_corr = 0.0
    for start in range(0, n, size):
        b = rows(batch, slice(start, start + size))
        x0c, x0x, calls, lc, lx = prepare_graph_inputs(model, graph, b)
        m_clean += float(mfn(lc, b).sum())
        m_corr += float(mfn(lx, b).sum())
        value_fn = lambda logits, b=b: mfn(logits, b).sum()  # noqa: E731
        with torch.no_grad():
            s_corr, _ = graph.execute(x0x, calls)
        if ig_steps is None:
            s_clean, G, _ = receiver_grads(graph, x0c, calls, value_fn)
        else:
            with torch.no_grad():
                s_clean, _ = graph.execute(x0c, calls)
            G = 0
            for k in range(ig_steps):
                G = G + receiver_grads(graph, x0x + (k / ig_steps) * (x0c - x0x), calls, value_fn)[1]
            G = G / ig_steps
        total += torch.einsum("ubpd,vbpd->uv", s_corr - s_clean, G).double().cpu()
        del s_corr, s_clean, G
    values = (total / n).float() * graph.upstream
    settings = {"axes": ["sender", "receiver"], "ig_steps": ig_steps, "parallel": graph.parallel, "n_examples": n,
                "n_edges": graph.n_edges, "metric_clean": m_clean / n, "metric_corrupted": m_corr / n,
                "approximates": "m(clean, edge := corrupted) - m(clean)"}
    return Scores(values, graph.senders, "eap" if ig_steps is None else "eap-ig", positions=graph.receivers,
                  task=task_name, metric=mname, model=model.name, fingerprint=model.fingerprint, settings=settings)
