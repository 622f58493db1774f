"""Gradient attribution: AtP for heads, neurons, experts, residual states and dictionary latents; EAP / EAP-IG for
the edges of the component graph, or of the feature graph in which attached dictionaries' latents and error nodes
replace what they decompose (eap(features=True); see FeatureGraph).

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

import itertools
from typing import Callable, Iterable

import torch

from mechanic import memory
from mechanic.locate.parallel import data_parallel
from mechanic.locate.scores import Scores
from mechanic.model.hooks import frozen_parameters
from mechanic.model.sites import Site
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


@data_parallel   # under torchrun: examples split over the ranks (locate.parallel)
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
    batch_size: examples per gradient run; None: the largest that fits the memory budget (mechanic.memory).
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
    n, size = batch.n, batch_size
    if size is None:   # the largest batch of examples whose gradient run fits the memory budget
        size = memory.plan_batch(memory.gradient(model, cache, n, batch.seq), device=model.device,
                                 hints="fewer kinds per call, shorter prompts")
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
        del clean, corr, grads      # not alive while the next chunk runs (its peak is one chunk's, as planned)
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


# Where each node reads and writes the residual stream. Every layer has five steps: a dictionary on
# resid_pre, the attention (its heads, or the latents of a dictionary on attn_out / head.z), a dictionary
# on resid_mid, the MLP (or the latents of a dictionary on mlp_out / neuron, or of a transcoder), a
# dictionary on resid_post. Step s reads at time 2s and writes at 2s + 1; a parallel-residual MLP reads
# and writes with the attention. A dictionary on the residual stream is a cut: nodes written before it
# reach nodes that read after it only through its latents and error node.
_STEPS = {"resid_pre": 0, "attn_out": 1, "head.z": 1, "resid_mid": 2, "mlp_out": 3, "neuron": 3, "resid_post": 4}
CUT_PARTS = ("resid_pre", "resid_mid", "resid_post")


def _layer_of(name: str) -> int | None:
    """The layer of a node name (None for embed and logits)."""
    return None if name in ("embed", "logits") else int(name[1:name.index(".")])


def _part_of(name: str) -> str:
    """The component a node belongs to: head, mlp_out, or the base part of a dictionary node (resid_post, head.z...)."""
    rest = name.split(".", 1)[1]
    if rest == "mlp_out":
        return "mlp_out"
    if ".sae" in rest:
        return rest.rsplit(".sae", 1)[0]
    return "head"


def _step(name: str, parallel: bool) -> float:
    """The step at which a node reads the residual stream (it writes half a step later); embed -1, logits inf."""
    if name == "embed":
        return -1.0
    if name == "logits":
        return float("inf")
    part = _part_of(name)
    k = 1 if part == "head" else _STEPS[part]
    if parallel and k == 3:
        k = 1
    return 5.0 * _layer_of(name) + k


def upstream_mask(senders: list[str], receivers: list[str], parallel: bool = False) -> torch.Tensor:
    """[senders, receivers] bool: True where the sender writes to the residual before the receiver reads it, with no
    dictionary on the residual stream (a cut, see eap(features=...)) in between."""
    cuts = sorted({_step(n, parallel) for n in senders + receivers
                   if n not in ("embed", "logits") and _part_of(n) in CUT_PARTS})
    cut = torch.tensor(cuts, dtype=torch.float64)
    w = torch.tensor([2 * _step(u, parallel) + 1 for u in senders], dtype=torch.float64)
    r = torch.tensor([2 * _step(v, parallel) for v in receivers], dtype=torch.float64)
    seg_w = (2 * cut[None] + 1 <= w[:, None]).sum(1)       # cuts written by the time the sender writes
    seg_r = (2 * cut[None] + 1 < r[:, None]).sum(1)        # cuts written before the receiver reads
    return (w[:, None] < r[None]) & (seg_w[:, None] == seg_r[None])


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

    def _call(self, L: int, x: torch.Tensor, call, what: str, grab: dict | None = None) -> torch.Tensor:
        """Call decoder layer L as the model did, on residual x; return its heads' z ("z") or its MLP output ("mlp").

        grab (with "mlp"): a dict that receives the MLP module's input ("mlp_in") and the FFN activations
        ("neuron", the down_proj input) of this call."""
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
                for key, path in (("mlp_in", a.mlp), ("neuron", a.down_proj)):
                    mod = m.layer_module(L, path) if grab is not None else None
                    if mod is not None:
                        handles.append(mod.register_forward_pre_hook(
                            lambda mod, inputs, key=key: grab.__setitem__(key, inputs[0])))
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
                inputs: list | None = None, record: dict | None = None):
        """Run the graph from the residual x0 [b, p, d]; returns (sender outputs [U, b, p, d], last-position logits).

        keep/ref: an edge (u, v) with keep[u, v] False carries ref[u] instead of u's output in this run.
        inputs: if a list, every receiver input tensor is appended to it (heads as [H, b, p, d]), for gradients.
        record: if a dict, it receives the residual stream (detached) at ("resid_pre" | "resid_mid" | "resid_post", L).
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
            if record is not None:
                record[("resid_pre", L)] = R.detach()
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
            if record is not None and not self.parallel:
                record[("resid_mid", L)] = mid.detach()
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
            if record is not None:
                record[("resid_post", L)] = R.detach()
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


def receiver_grads(graph: ComponentGraph, x0: torch.Tensor, calls, value_fn, record: dict | None = None) -> tuple:
    """(sender outputs [U, b, p, d], d value / d (each receiver's input) [V, b, p, d], value) for a run from x0.
    record: see ComponentGraph.execute."""
    with frozen_parameters(graph.model.hf), torch.enable_grad():
        x = x0.detach().requires_grad_()
        inputs: list[torch.Tensor] = []
        senders, logits = graph.execute(x, calls, inputs=inputs, record=record)
        value = value_fn(logits)
        grads = torch.autograd.grad(value, inputs, allow_unused=True, materialize_grads=True)
    G = torch.cat([g if g.dim() == 4 else g[None] for g in grads])
    return senders.detach(), G, float(value.detach())


def _ig_runs(graph: ComponentGraph, x0c: torch.Tensor, x0x: torch.Tensor, calls, value_fn, steps: int,
             per_run: int, record: bool):
    """EAP-IG's gradient points x0x + k/steps (x0c - x0x), k = 0..steps-1, `per_run` at a time as extra batch rows
    (the chunk's examples repeated, each copy at its own point): one graph forward + backward covers several steps.
    Yields per point (sender outputs [U, b, p, d] or None, receiver input gradients [V, b, p, d], residual record
    or None); sender outputs only for point 0 (the corrupted run itself, so it needs no run of its own)."""
    b = x0c.shape[0]
    for k0 in range(0, steps, per_run):
        ks = range(k0, min(steps, k0 + per_run))
        x = torch.cat([x0x + (k / steps) * (x0c - x0x) for k in ks])
        tiled = [(_tile(a, b, len(ks)), _tile(kw, b, len(ks))) for a, kw in calls] if len(ks) > 1 else calls
        rec: dict | None = {} if record else None
        value = lambda logits: sum(value_fn(logits[i * b:(i + 1) * b]) for i in range(len(ks)))  # noqa: E731
        senders, G, _ = receiver_grads(graph, x, tiled, value, record=rec)
        s0 = senders[:, :b].clone() if k0 == 0 else None
        del senders
        for i, k in enumerate(ks):
            rows_ = slice(i * b, (i + 1) * b)
            yield s0, G[:, rows_], None if rec is None else {key: v[rows_] for key, v in rec.items()}
            s0 = None
        del G, rec


class _Chunk:
    """One chunk of examples as the edge methods see it (made by _edge_chunks)."""

    def __init__(self, batch, calls, logits_clean, logits_corrupted, n_points):
        self.batch, self.calls, self.n_points = batch, calls, n_points
        self.logits_clean, self.logits_corrupted = logits_clean, logits_corrupted
        self.clean = self.corrupted = None     # (sender outputs [U, b, p, d], residual record or None)
        self.points = iter(())                 # (receiver input gradients [V, b, p, d], record), each of weight 1/n


def _edge_chunks(model, graph: ComponentGraph, batch: TaskBatch, mfn: Metric, ig_steps: int | None, size: int,
                 ig_batch: int, record: bool = False):
    """The one EAP / EAP-IG loop over chunks of examples, shared by the component and the feature graph: per chunk,
    the clean and corrupted runs' sender outputs and the receivers' input gradients at the clean run (EAP) or at
    each IG point (run ig_batch points at a time as batch rows). record: keep the residual streams as well."""
    for start in range(0, batch.n, size):
        b = rows(batch, slice(start, start + size))
        x0c, x0x, calls, lc, lx = prepare_graph_inputs(model, graph, b)
        value_fn = lambda logits, b=b: mfn(logits, b).sum()  # noqa: E731
        chunk = _Chunk(b, calls, lc, lx, 1 if ig_steps is None else ig_steps)
        rec_c: dict | None = {} if record else None
        if ig_steps is None:
            rec_x: dict | None = {} if record else None
            with torch.no_grad():
                s_corr, _ = graph.execute(x0x, calls, record=rec_x)
            s_clean, G, _ = receiver_grads(graph, x0c, calls, value_fn, record=rec_c)
            chunk.clean, chunk.corrupted, chunk.points = (s_clean, rec_c), (s_corr, rec_x), iter([(G, rec_c)])
            del s_clean, s_corr, G
        else:
            with torch.no_grad():
                s_clean, _ = graph.execute(x0c, calls, record=rec_c)
            runs = _ig_runs(graph, x0c, x0x, calls, value_fn, ig_steps, ig_batch, record)
            s_corr, G, rec = next(runs)
            chunk.clean, chunk.corrupted = (s_clean, rec_c), (s_corr, rec)
            chunk.points = itertools.chain([(G, rec)], ((G, r) for _, G, r in runs))
            del s_clean, s_corr, G, rec
        yield chunk
        del chunk


@data_parallel   # under torchrun: examples split over the ranks (locate.parallel)
def eap(model, task: Task | TaskBatch, *, ig_steps: int | None = None, metric: str | Metric | None = None,
        batch_size: int | None = 8, features=False, latents=None, ig_batch: int = 1) -> Scores:
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
    again on H copies up to its o_proj) and one (EAP) or m (EAP-IG) graph forward + backward passes
    (EAP-IG's first point is the corrupted run, whose sender outputs it gives, so that run is not repeated).
    ig_batch: EAP-IG points run together as extra batch rows of one graph forward + backward (memory grows
    with batch_size x ig_batch; the result does not depend on it). Default 1: on CPU a graph run is compute-bound
    and costs as much per row or more when it is wider (SmolLM2 IOI, 5 points: 1.0-1.1x the CPU time of one point
    a run, docs/BENCHMARKS.md); larger values are for accelerators, where a wider run is cheaper per row.
    batch_size: examples per chunk; None: the largest chunk whose graph runs fit the memory budget
    (mechanic.memory.edges; with features, every example in one chunk).

    features: False (the component graph), True (every attached dictionary), or the base sites of the
    dictionaries to use (e.g. ["L6.resid_post"]): their latents and error nodes become graph nodes in place
    of what they decompose (FeatureGraph), so edges into or out of a dictionary's latents and error node add
    up to the edges of the node(s) they replace.
    latents (with features): None makes every latent a node; an int N keeps as nodes the N latents per
    dictionary whose activation differs most between clean and corrupted prompts (sum of |a_clean -
    a_corrupted| over the task, as patch(kind="sae", latents=N)) and gathers the others in one node
    `<base>.sae`; or {base site: [latents]} (a list when one dictionary is used). The edge matrix is
    senders x receivers, so a 9,216-latent dictionary with every latent a node is ~9.5k x 9.5k (360 MB).
    """
    if ig_steps is not None and (not isinstance(ig_steps, int) or ig_steps < 1):
        raise ValueError(f"ig_steps must be a positive number of points (5 to 30 is usual) or None for plain EAP, "
                         f"got {ig_steps!r}.")
    if isinstance(ig_batch, bool) or not isinstance(ig_batch, int) or ig_batch < 1:
        raise ValueError(f"ig_batch is the number of EAP-IG points run together as batch rows and must be an "
                         f"integer >= 1 (1 runs them one at a time, using the least memory), got {ig_batch!r}.")
    if features is not False and features is not None:
        return _feature_eap(model, task, features, latents, ig_steps, metric, batch_size, ig_batch)
    if latents is not None:
        raise ValueError("latents= chooses dictionary latents as graph nodes; it needs features=True (or the base "
                         "sites of the dictionaries to use).")
    graph = ComponentGraph(model)
    batch, task_name, task_metric = task_batch(model, task)
    need_corrupted(batch, "Edge attribution patching")
    mname, mfn = metric_fn(metric, task_metric)
    n, size = batch.n, batch_size
    if size is None:   # the largest chunk of examples whose graph runs fit the memory budget
        padded = bool((batch.clean["attention_mask"] == 0).any()) if "attention_mask" in batch.clean else False
        est = memory.edges(model, n, batch.seq, ig_steps, ig_batch, padded)
        size = memory.plan_batch(est, device=model.device, hints="fewer or shorter prompts" +
                                 (", ig_batch=1" if ig_batch > 1 and ig_steps else ""))
    if size < 1:
        raise ValueError(f"batch_size must be a positive number of examples, got {batch_size}.")
    total = torch.zeros(len(graph.senders), len(graph.receivers), dtype=torch.float64)
    m_clean = m_corr = 0.0
    for ch in _edge_chunks(model, graph, batch, mfn, ig_steps, size, ig_batch):
        m_clean += float(mfn(ch.logits_clean, ch.batch).sum())
        m_corr += float(mfn(ch.logits_corrupted, ch.batch).sum())
        G = 0
        for g, _ in ch.points:
            G = G + g
        delta = ch.corrupted[0] - ch.clean[0]
        del ch
        total += torch.einsum("ubpd,vbpd->uv", delta, G / (ig_steps or 1)).double().cpu()
        del delta, G
    values = (total / n).float() * graph.upstream
    settings = {"axes": ["sender", "receiver"], "ig_steps": ig_steps, "parallel": graph.parallel, "n_examples": n,
                "n_edges": graph.n_edges, "metric_clean": m_clean / n, "metric_corrupted": m_corr / n,
                "approximates": "m(clean, edge := corrupted) - m(clean)"}
    return Scores(values, graph.senders, "eap" if ig_steps is None else "eap-ig", positions=graph.receivers,
                  task=task_name, metric=mname, model=model.name, fingerprint=model.fingerprint, settings=settings)


# ---------------------------------------------------------------- feature graph (EAP over dictionary latents)
# After Marks et al. 2024 ("Sparse Feature Circuits"), fitted to the component graph: a dictionary's latents
# and its error node replace the node (or nodes) the dictionary decomposes, as senders and as receivers.
#
# - On a component's output (attn_out or head.z: all heads of the layer; mlp_out, neuron or a transcoder
#   writing mlp_out: the MLP), latent f sends a~_f W[f] (W = W_dec, mapped through o_proj / down_proj for
#   head.z / neuron) and reads the residual through the component and the encoder; the error node sends
#   the rest of the component's output (the dictionary's error and its constant part: b_dec, and what
#   moves between runs with it, a normalising SAE's denormalisation or a transcoder's skip term) and reads
#   the residual as component(x) - sum_f a~_f(x) W[f].
# - On the residual stream (resid_pre / resid_mid / resid_post) the dictionary is a cut: its latents and
#   error read the residual at that point (the error as x - sum_f a~_f(x) W_dec[f]) and write it back, so
#   every path from a node before the cut to a node after it goes through them.
#
# a~ = the latents as the decoder applies them (acts x scaling factor / decoder norm if rescaled x the
# input's normalisation scale), so that reconstruction = a~ W_dec + constant part. The outputs of a
# dictionary's nodes sum to the output of what they replace, and their input gradients sum to its input
# gradient, so edges add up exactly: out of the latents and error = out of the replaced node(s), into
# them = into the replaced node(s) (for a cut: the edges from a sender to every receiver after the cut).
# The forward itself is not changed (reconstruction + error = the value), so the gradients of the
# component graph's receivers stay as they are; each dictionary adds its nodes' input gradients: for a
# per-token component (a cut, the MLP) from one backward per active-latent slot (k copies for a TopK
# dictionary; only latents firing at a token have a nonzero gradient there), for the attention, which
# mixes positions, from one backward per latent node that fires anywhere in the chunk.

_ROLE = {"resid_pre": "cut", "resid_mid": "cut", "resid_post": "cut", "attn_out": "attn", "head.z": "attn",
         "mlp_out": "mlp", "neuron": "mlp"}
_BIG = 1 << 24   # elements per temporary block of the feature kernels


class _Dict:
    """One dictionary as graph nodes: where it sits, what it encodes, its write directions and node rows."""

    def __init__(self, graph: ComponentGraph, base: str, codec, keep: list[int] | None):
        model, a = graph.model, graph.model.arch
        d = getattr(codec, "dictionary", None)
        if d is None:
            raise ValueError(f"EAP over features needs the dictionary at {base} attached with "
                             "mechanic.features.attach (a mechanic Dictionary), not a bare codec.")
        site = Site.parse(base)
        self.base, self.layer, self.dictionary = base, site.layer, d
        self.part = base.split(".", 1)[1]
        if d.transcoder:
            src = Site.parse(codec.source)
            src_part = str(src).split(".", 1)[1]
            feeds = ("mlp_in", "resid_pre" if graph.parallel else "resid_mid")
            if self.part != "mlp_out" or src.layer != self.layer or src_part not in feeds:
                raise ValueError(f"EAP over features takes transcoders that replace an MLP (read L.mlp_in or the "
                                 f"residual the MLP reads, write L.mlp_out of the same layer); the one at {base} "
                                 f"reads {codec.source}.")
            self.enc = "mlp_in" if src_part == "mlp_in" else "x"
        elif self.part == "mlp_in":
            raise ValueError(f"The SAE at {base} reads the MLP's normalised input, inside the MLP node: EAP over "
                             "features places dictionaries on the residual stream (resid_pre/mid/post) or on a "
                             "component's output (attn_out, head.z, mlp_out, neuron), or transcoders.")
        else:
            self.enc = {"attn_out": "attn", "head.z": "z", "mlp_out": "y", "neuron": "neuron"}.get(self.part, "x")
        self.role = _ROLE[self.part]
        W = d.W_dec.detach()
        if self.part == "head.z":
            W = W @ a.o_weight(model.layer_module(self.layer, a.o_proj)).detach().T
        elif self.part == "neuron":
            W = W @ a.down_weight(model.layer_module(self.layer, a.down_proj)).detach().T
        self.W = W
        F = d.d_sae
        if keep is None:
            self.names = [f"{base}.sae{f}" for f in range(F)]
            self.row = torch.arange(F)
        else:
            keep = sorted({int(f) for f in keep})
            bad = [f for f in keep if not 0 <= f < F]
            if bad:
                raise ValueError(f"latents {bad} are out of range for the dictionary at {base} (0..{F - 1}).")
            self.names = [f"{base}.sae{f}" for f in keep] + ([f"{base}.sae"] if len(keep) < F else [])
            self.row = torch.full((F,), len(keep), dtype=torch.long)
            self.row[torch.tensor(keep, dtype=torch.long)] = torch.arange(len(keep))
        self.n_nodes = len(self.names)           # latent nodes (kept latents, then the others as one node)
        self.names.append(f"{base}.sae_error")
        self.s_idx: list[int] = []
        self.r_idx: list[int] = []


class FeatureGraph:
    """The component graph with attached dictionaries' latents and error nodes in place of what they decompose.

    Node names: embed, L<l>.head<h>, L<l>.mlp_out, logits as in ComponentGraph, and per dictionary
    `<base>.sae<f>` (a latent), `<base>.sae` (the latents not kept as nodes, with latents=), `<base>.sae_error`.
    A dictionary on attn_out / head.z replaces the heads of its layer, one on mlp_out / neuron (or a
    transcoder) the MLP, one on the residual stream is a cut (see the comment above). Edges follow
    upstream_mask. The graph runs through ComponentGraph.execute, whose forward it does not change.
    """

    def __init__(self, model, bases: list[str], keep: dict[str, list[int] | None]):
        g = self.graph = ComponentGraph(model)
        self.model, self.parallel = model, g.parallel
        self.dicts: dict[tuple, _Dict] = {}
        for base in bases:
            D = _Dict(g, base, model.dictionary(base), keep.get(base))
            slot = D.part if D.role == "cut" else D.role
            other = self.dicts.get((D.layer, slot))
            if other is not None:
                raise ValueError(f"The dictionaries at {other.base} and {base} both decompose the "
                                 f"{'attention' if slot == 'attn' else 'MLP'} of layer {D.layer}; EAP over features "
                                 "takes one dictionary per component: pass features=[...] without one of them.")
            self.dicts[(D.layer, slot)] = D
        senders, receivers = ["embed"], []
        self.s_plain, self.r_plain = [(0, 0)], []       # (feature-graph index, component-graph index)
        for L in range(g.n_layers):
            for slot in ("resid_pre", "attn", "resid_mid", "mlp", "resid_post"):
                D = self.dicts.get((L, slot))
                if D is not None:
                    D.s_idx = list(range(len(senders), len(senders) + len(D.names)))
                    D.r_idx = list(range(len(receivers), len(receivers) + len(D.names)))
                    senders += D.names
                    receivers += D.names
                elif slot in ("attn", "mlp"):
                    for h in (range(g.H) if slot == "attn" else [None]):
                        self.s_plain.append((len(senders), g.sender(L, h)))
                        self.r_plain.append((len(receivers), g.receiver(L, h)))
                        name = f"L{L}.head{h}" if h is not None else f"L{L}.mlp_out"
                        senders.append(name)
                        receivers.append(name)
        self.r_plain.append((len(receivers), len(g.receivers) - 1))
        receivers.append("logits")
        self.senders, self.receivers = senders, receivers
        self.upstream = upstream_mask(senders, receivers, self.parallel)
        # the component graph's receivers that read what each dictionary's nodes write
        read_t = torch.tensor([2 * _step(v, self.parallel) for v in g.receivers])
        for D in self.dicts.values():
            D.after = read_t > 2 * _step(D.names[0], self.parallel) + 1

    @property
    def n_edges(self) -> int:
        return int(self.upstream.sum())

    # -- the dictionary's view of a run
    def _input(self, D: _Dict, record: dict) -> torch.Tensor:
        """The residual the dictionary's component reads (for a cut: the residual at the cut)."""
        if D.role == "cut":
            return record[(D.part, D.layer)]
        if D.role == "mlp" and not self.parallel:
            return record[("resid_mid", D.layer)]
        return record[("resid_pre", D.layer)]

    def _component(self, D: _Dict, X: torch.Tensor, calls) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder input, component output in the residual) for C copies X [C, b, p, d] of the component's input."""
        if D.role == "cut":
            return X, X
        m, a, g = self.model, self.model.arch, self.graph
        C, b, p, d = X.shape
        args, kwargs = calls[D.layer]
        call = (_tile(args, b, C), _tile(kwargs, b, C))
        flat = X.reshape(C * b, p, d)
        if D.role == "attn":
            z = g._call(D.layer, flat, call, "z").reshape(C, b, p, -1)
            o = m.layer_module(D.layer, a.o_proj)
            out = z @ a.o_weight(o).T
            if D.enc == "z":
                return z, out
            bias = getattr(o, "bias", None)
            return out + (bias if bias is not None else 0), out
        grab: dict = {}
        y = g._call(D.layer, flat, call, "mlp", grab).reshape(C, b, p, d)
        if D.enc == "y":
            return y, y
        if D.enc == "x":
            return X, y
        return grab[D.enc].reshape(C, b, p, -1), y

    def _acts(self, D: _Dict, enc: torch.Tensor) -> torch.Tensor:
        """a~: the latents of `enc` as the decoder applies them (reconstruction = a~ W_dec + constant part)."""
        return effective_latents(D.dictionary, enc).to(enc.dtype)

    # -- one chunk
    def sender_blocks(self, s_clean, s_corr, rec_clean: dict, rec_corr: dict, calls):
        """The senders' output differences (corrupted - clean): dense [n, N, d] rows (component-graph senders and
        error nodes) with their indices, and per dictionary the latent differences [N, F]."""
        idx, dense, lat = [], [], []
        for i, j in self.s_plain:
            idx.append(i)
            dense.append(s_corr[j] - s_clean[j])
        g = self.graph
        with torch.no_grad():
            for D in self.dicts.values():
                x_c, x_x = self._input(D, rec_clean), self._input(D, rec_corr)
                a_c = self._acts(D, self._component(D, x_c[None], calls)[0])[0]
                a_x = self._acts(D, self._component(D, x_x[None], calls)[0])[0]
                da = a_x - a_c
                if D.role == "cut":
                    group = x_x - x_c
                elif D.role == "attn":
                    hs = [g.sender(D.layer, h) for h in range(g.H)]
                    group = (s_corr[hs] - s_clean[hs]).sum(0)
                else:
                    group = s_corr[g.sender(D.layer)] - s_clean[g.sender(D.layer)]
                idx.append(D.s_idx[-1])
                dense.append(group - da @ D.W.to(da.dtype))
                lat.append((D, da.reshape(-1, da.shape[-1])))
        d = dense[0].shape[-1]
        return (idx, torch.stack(dense).reshape(len(dense), -1, d)), lat

    def receiver_blocks(self, G: torch.Tensor, record: dict, calls):
        """The receivers' input gradients: dense [n, N, d] rows (component-graph receivers, attention-dictionary
        latent nodes, error nodes) with their indices, and per per-token dictionary its active-latent slots
        ([N, K, d] input gradients of w_f a~_f and the latent ids [N, K], -1 where a token has fewer)."""
        g = self.graph
        idx = [i for i, _ in self.r_plain]
        dense = [G[j] for _, j in self.r_plain]
        slots = []
        for D in self.dicts.values():
            x = self._input(D, record)
            g_out = G[D.after.to(G.device)].sum(0)          # d metric / d (what the nodes write)
            if D.role == "cut":
                group = g_out
            elif D.role == "attn":
                group = G[[g.receiver(D.layer, h) for h in range(g.H)]].sum(0)
            else:
                group = G[g.receiver(D.layer)]
            w = g_out @ D.W.to(g_out.dtype).T                # [b, p, F]: d metric / d a~
            if D.role == "attn":
                reps, rows_ = self._node_grads(D, x, w, calls)
                idx += [D.r_idx[r] for r in rows_]
                dense += list(reps)
                err = group - reps.sum(0)
            else:
                R, lat = self._slot_grads(D, x, w, calls)
                slots.append((D, R.reshape(-1, *R.shape[2:]), lat.reshape(-1, lat.shape[-1])))
                err = group - R.sum(2)
            idx.append(D.r_idx[-1])
            dense.append(err)
        d = G.shape[-1]
        return (idx, torch.stack(dense).reshape(len(dense), -1, d)), slots

    def _fires(self, D: _Dict, x: torch.Tensor, calls) -> torch.Tensor:
        with torch.no_grad():
            return self._acts(D, self._component(D, x[None], calls)[0])[0] != 0

    def _slot_grads(self, D: _Dict, x: torch.Tensor, w: torch.Tensor, calls):
        """For a per-token component: per token, the input gradient of w_f a~_f(x) of each latent f firing there."""
        b, p, d = x.shape
        F = w.shape[-1]
        fires = self._fires(D, x, calls)
        K = int(fires.sum(-1).max()) if fires.numel() else 0
        on, order = fires.to(torch.float32).sort(dim=-1, descending=True, stable=True)
        lat = torch.where(on[..., :K] > 0, order[..., :K], -1)
        R = x.new_zeros(b, p, K, d)
        step = max(1, _BIG // max(1, b * p * F))
        for k0 in range(0, K, step):
            c = min(K, k0 + step) - k0
            sel = lat[..., k0:k0 + c].permute(2, 0, 1)            # [c, b, p]
            safe = sel.clamp(min=0)[..., None]
            with frozen_parameters(self.model.hf), frozen_parameters(D.dictionary), torch.enable_grad():
                X = x.detach()[None].expand(c, b, p, d).clone().requires_grad_()
                A = self._acts(D, self._component(D, X, calls)[0])
                val = A.gather(-1, safe)[..., 0] * w[None].expand(c, b, p, F).gather(-1, safe)[..., 0] * (sel >= 0)
                (gx,) = torch.autograd.grad(val.sum(), X, allow_unused=True, materialize_grads=True)
            R[:, :, k0:k0 + c] = gx.permute(1, 2, 0, 3)
        return R, lat

    def _node_grads(self, D: _Dict, x: torch.Tensor, w: torch.Tensor, calls):
        """For the attention (which mixes positions): each latent node's input gradient sum_f in node w_f a~_f(x),
        for the nodes with a latent firing somewhere in the chunk (the others have none)."""
        b, p, d = x.shape
        F = w.shape[-1]
        fires = self._fires(D, x, calls).reshape(-1, F).any(0).cpu()
        rows_ = D.row[fires].unique()
        reps = x.new_zeros(len(rows_), b, p, d)
        step = max(1, _BIG // max(1, b * p * F))
        for r0 in range(0, len(rows_), step):
            rr = rows_[r0:r0 + step]
            member = (D.row[None, :] == rr[:, None]).to(w.device, w.dtype)   # [c, F]
            with frozen_parameters(self.model.hf), frozen_parameters(D.dictionary), torch.enable_grad():
                X = x.detach()[None].expand(len(rr), b, p, d).clone().requires_grad_()
                A = self._acts(D, self._component(D, X, calls)[0])
                val = (A * w[None] * member[:, None, None, :]).sum()
                (gx,) = torch.autograd.grad(val, X, allow_unused=True, materialize_grads=True)
            reps[r0:r0 + len(rr)] = gx
        return reps, rows_.tolist()

    def accumulate(self, total: torch.Tensor, senders, receivers, weight: float = 1.0) -> None:
        """total[sender, receiver] += weight * sum over tokens of (sender output change) . (receiver input gradient)."""
        (s_idx, S), lat = senders
        (r_idx, Gd), slots = receivers

        def add(si, ri, m):
            si, ri = torch.as_tensor(si, dtype=torch.long), torch.as_tensor(ri, dtype=torch.long)
            total.index_put_((si[:, None], ri[None, :]), weight * m.double().cpu(), accumulate=True)

        add(s_idx, r_idx, torch.einsum("und,vnd->uv", S, Gd))
        dev = S.device
        for D, da in lat:
            A = (da != 0).any(0).nonzero()[:, 0]
            if not len(A):
                continue
            Wa, daA, rows_ = D.W.to(dev, da.dtype)[A], da[:, A], D.row.to(dev)[A]
            out = torch.zeros(D.n_nodes, len(r_idx), dtype=da.dtype, device=dev)
            step = max(1, _BIG // max(1, da.shape[0] * len(A)))
            for v0 in range(0, len(r_idx), step):
                e = torch.einsum("vnf,nf->fv", Gd[v0:v0 + step] @ Wa.T, daA)
                out[:, v0:v0 + step] = torch.zeros_like(out[:, v0:v0 + step]).index_add_(0, rows_, e)
            add(D.s_idx[:D.n_nodes], r_idx, out)
        for E, R, lat_ids in slots:
            if not R.shape[1]:
                continue
            cols = torch.where(lat_ids >= 0, E.row.to(dev)[lat_ids.clamp(min=0)], E.n_nodes).reshape(-1)
            P = torch.einsum("und,nkd->unk", S, R).reshape(S.shape[0], -1)
            out = torch.zeros(S.shape[0], E.n_nodes + 1, dtype=P.dtype, device=dev).index_add_(1, cols, P)
            add(s_idx, E.r_idx[:E.n_nodes], out[:, :-1])
            for D, da in lat:
                if not bool(self.upstream[D.s_idx[:D.n_nodes]][:, E.r_idx[:E.n_nodes]].any()):
                    continue
                A = (da != 0).any(0).nonzero()[:, 0]
                if not len(A):
                    continue
                out = torch.zeros(D.n_nodes, E.n_nodes, dtype=P.dtype, device=dev)
                step = max(1, _BIG // max(1, R.shape[0] * R.shape[1]))
                for f0 in range(0, len(A), step):
                    Af = A[f0:f0 + step]
                    M = torch.einsum("nkd,fd->nkf", R, D.W.to(dev, R.dtype)[Af]) * da[:, None, Af]
                    t = torch.zeros(E.n_nodes + 1, len(Af), dtype=M.dtype, device=dev)
                    t.index_add_(0, cols, M.reshape(-1, len(Af)))
                    out.index_add_(0, D.row.to(dev)[Af], t[:-1].T)
                add(D.s_idx[:D.n_nodes], E.r_idx[:E.n_nodes], out)


def effective_latents(dictionary, x: torch.Tensor) -> torch.Tensor:
    """The latents of x as the decoder applies them: dictionary(x) = a~ W_dec + c(x), with c(x) = b_dec (denormalised:
    b_dec / coeff, or b_dec * std + mean, for an SAE that normalises its input) plus a skip transcoder's skip term.
    a~ = acts (x the old scaling factor, / the decoder norms if acts are rescaled by them) x the denormalisation scale.
    Differentiable in x (the dictionary's own parameters are left as they are)."""
    d = dictionary
    acts = d.encode(x)
    state, d._norm_state = d._norm_state, None
    if d.scaling_factor is not None:
        acts = acts * d.scaling_factor
    if d.rescale_acts_by_decoder_norm:
        acts = acts / d.W_dec.norm(dim=-1)
    if d.normalize != "none" and not d.transcoder:
        acts = acts / state[1] if state[0] == "scale" else acts * state[2]
    return acts


def _feature_bases(model, features) -> list[str]:
    """The base sites of the dictionaries EAP uses (features=True: every attached one)."""
    if not model.dictionaries:
        raise ValueError("EAP over features needs a dictionary attached to the model; attach one with "
                         "mechanic.features.attach(model, dictionary) (one per site, any number of sites).")
    if features is True:
        return list(model.dictionaries)
    asked = [features] if isinstance(features, (str, Site)) else list(features)
    out = []
    for f in asked:
        base = str(Site.parse(f))
        if base not in model.dictionaries:
            raise ValueError(f"features names {base}, where no dictionary is attached (attached: "
                             f"{', '.join(model.dictionaries)}).")
        out.append(base)
    if not out:
        raise ValueError("features is empty; pass True (every attached dictionary) or base sites.")
    return list(dict.fromkeys(out))


def _kept_latents(model, batch: TaskBatch, bases: list[str], latents, size: int) -> dict[str, list[int] | None]:
    """Which latents are nodes, per dictionary (None = all); for an int N, the N whose activation differs most
    between the clean and corrupted prompts (sum of |a_clean - a_corrupted| over examples and positions)."""
    if latents is None:
        return {b: None for b in bases}
    if isinstance(latents, dict):
        names = {str(Site.parse(k)): v for k, v in latents.items()}
        unknown = set(names) - set(bases)
        if unknown:
            raise ValueError(f"latents names {', '.join(sorted(unknown))}, which is not among the dictionaries used "
                             f"({', '.join(bases)}).")
        return {b: [int(f) for f in names.get(b, [])] for b in bases}
    if isinstance(latents, bool) or not isinstance(latents, int):
        if len(bases) != 1:
            raise ValueError("latents as a list names latents of one dictionary, but several are used; give a dict "
                             "base site -> latents, e.g. {'L6.resid_post': [3, 17]}.")
        return {bases[0]: [int(f) for f in latents]}
    if latents < 0:
        raise ValueError(f"latents must be a number of latents >= 0 per dictionary, got {latents}.")
    sizes = {b: 0 for b in bases}
    sites = [f"{b}.sae" for b in bases]
    for start in range(0, batch.n, size):
        sub = rows(batch, slice(start, start + size))
        c, x = model.run(sub.clean, cache=sites), model.run(sub.corrupted, cache=sites)
        for b, s in zip(bases, sites):
            sizes[b] = sizes[b] + (c[s] - x[s]).abs().sum((0, 1)).float().cpu()
    return {b: sorted(v.argsort(descending=True, stable=True)[:latents].tolist()) for b, v in sizes.items()}


def _feature_eap(model, task, features, latents, ig_steps, metric, batch_size, ig_batch) -> Scores:
    bases = _feature_bases(model, features)
    batch, task_name, task_metric = task_batch(model, task)
    need_corrupted(batch, "Edge attribution patching")
    mname, mfn = metric_fn(metric, task_metric)
    n, size = batch.n, batch_size or batch.n
    keep = _kept_latents(model, batch, bases, latents, size)
    fg = FeatureGraph(model, bases, keep)
    total = torch.zeros(len(fg.senders), len(fg.receivers), dtype=torch.float64)
    m_clean = m_corr = 0.0
    for ch in _edge_chunks(model, fg.graph, batch, mfn, ig_steps, size, ig_batch, record=True):
        m_clean += float(mfn(ch.logits_clean, ch.batch).sum())
        m_corr += float(mfn(ch.logits_corrupted, ch.batch).sum())
        (s_clean, rec_c), (s_corr, rec_x) = ch.clean, ch.corrupted
        ch.clean = ch.corrupted = None
        senders = fg.sender_blocks(s_clean, s_corr, rec_c, rec_x, ch.calls)
        del s_clean, s_corr, rec_c, rec_x
        for G, rec in ch.points:
            fg.accumulate(total, senders, fg.receiver_blocks(G, rec, ch.calls), 1.0 / ch.n_points)
            del G, rec
        del senders, ch
    values = (total / n).float() * fg.upstream
    settings = {"axes": ["sender", "receiver"], "ig_steps": ig_steps, "parallel": fg.parallel, "n_examples": n,
                "n_edges": fg.n_edges, "metric_clean": m_clean / n, "metric_corrupted": m_corr / n,
                "approximates": "m(clean, edge := corrupted) - m(clean)", "features": bases,
                "latents": keep if latents is not None else None}
    return Scores(values, fg.senders, "eap" if ig_steps is None else "eap-ig", positions=fg.receivers,
                  task=task_name, metric=mname, model=model.name, fingerprint=model.fingerprint, settings=settings)
