"""Direct-effect edges of one prompt's attribution graph, by batched backward passes through the replacement.

The replacement is affine in its sources (token embeddings, active feature activations, error vectors),
so the direct effect of source s on target t is value_s * d target_t / d source_s. One backward pass per
target row gives a whole row; rows are batched: the replacement runs once on `batch_size` copies of
the prompt and each backward injects a different target's read-out vector into each copy (a feature's
encoder row at its layer's MLP input, a logit's demeaned unembedding row at the final norm output).
"""

from __future__ import annotations

import time

import torch

from mechanic.locate.graph.codes import encoder_rows
from mechanic.locate.graph.errors import GraphError
from mechanic.locate.graph.graph import KINDS, Graph
from mechanic.locate.graph.prune import graph_scores
from mechanic.locate.graph.replacement import Replacement, Sources


def salient_logits(logits: torch.Tensor, mass: float = 0.95, max_logits: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """The fewest most probable tokens whose probabilities sum to >= `mass` (at most `max_logits`): (ids, probs)."""
    if not 0 < mass <= 1 or max_logits < 1:
        raise GraphError(f"logit_mass must be in (0, 1] and max_logits >= 1; got {mass} and {max_logits}.")
    probs = torch.softmax(logits.float(), -1)
    p, idx = probs.topk(min(max_logits, probs.shape[-1]))
    n = int(torch.searchsorted(p.cumsum(0), torch.tensor(mass, dtype=p.dtype))) + 1
    return idx[:n], p[:n]


def attribute(model, transcoders, prompt, *, logit_mass: float = 0.95, max_logits: int = 10,
              batch_size: int = 64, prefixes: int = 4) -> Graph:
    """The full (unpruned) attribution graph of `prompt` (see mechanic.locate.graph.prune to prune and score it).

    transcoders: one mechanic transcoder per layer (a list with None for layers without one, or a dict
    {layer: Dictionary}), or an already built Replacement (then `prompt` is only the graph's text).
    logit_mass / max_logits: which next tokens become logit nodes (see salient_logits).
    batch_size: target rows per backward pass (memory grows with it: the replacement runs on that many
    copies of the prompt).
    prefixes: how many prompt prefixes the targets are grouped into by position (1: one forward of the
    whole prompt; more: shorter backward passes for early targets, one forward per prefix).
    """
    clock = _Clock()
    rep = transcoders if isinstance(transcoders, Replacement) else Replacement(model, transcoders, prompt)
    clock.lap("replacement")
    logit_ids, probs = salient_logits(rep.hf_logits[-1], logit_mass, max_logits)
    nodes = _Nodes(rep, logit_ids)
    adjacency = _edges(rep, nodes, batch_size, clock, prefixes)
    bias = _biases(rep, nodes)
    m = model
    meta = {"model": m.name, "n_layers": nodes.L, "transcoders": [repr(d) if d is not None else None
                                                                for d in rep.transcoders],
            "logit_mass": logit_mass, "max_logits": max_logits, "batch_size": batch_size, "prefixes": prefixes,
            **clock.done()}
    tok = m.tokenizer
    text = prompt if isinstance(prompt, str) else (tok.decode(rep.ids.tolist()) if tok is not None else None)
    graph = Graph(nodes.kind, nodes.layer.int(), nodes.pos.int(), nodes.feature.long(), nodes.value, bias, adjacency,
                  rep.ids.cpu(), logit_ids.cpu(), probs.float().cpu(),
                  _labels(m, nodes.kind, nodes.layer, nodes.pos, nodes.feature, probs), text, {}, meta)
    graph.scores = graph_scores(graph)       # replacement and completeness, reported with every graph
    return graph


class _Nodes:
    """The node table in graph order: features (layer, pos, feature), errors (layer, pos), tokens (pos), logits."""

    def __init__(self, rep: Replacement, logit_ids: torch.Tensor):
        L, P, K = len(rep.transcoders), rep.n_pos, len(logit_ids)
        src = rep.sources
        self.L, self.P, self.K = L, P, K
        self.f_layer = torch.cat([torch.full((len(a.pos),), i, dtype=torch.long) for i, a in enumerate(rep.active)])
        self.f_pos = torch.cat([a.pos.cpu() for a in rep.active])
        F = self.F = len(self.f_layer)
        self.starts = torch.tensor([0] + [len(a.pos) for a in rep.active]).cumsum(0)   # layer l: starts[l]..starts[l+1]
        self.error_start, self.token_start, self.logit_start = F, F + L * P, F + L * P + P
        self.N = F + L * P + P + K
        self.kind = torch.tensor([0] * F + [1] * (L * P) + [2] * P + [3] * K, dtype=torch.int8)
        self.layer = torch.cat([self.f_layer, torch.arange(L).repeat_interleave(P), torch.full((P,), -1),
                                torch.full((K,), L)])
        self.pos = torch.cat([self.f_pos, torch.arange(P).repeat(L), torch.arange(P), torch.full((K,), P - 1)])
        self.feature = torch.cat([torch.cat([a.feat.cpu() for a in rep.active]), torch.full((L * P,), -1),
                                  rep.ids.cpu(), logit_ids.cpu()])
        z = rep.logits[-1]
        self.value = torch.cat([*src.acts, torch.stack(src.errors).norm(dim=-1).flatten(), src.embed.norm(dim=-1),
                                z[logit_ids] - z.mean()]).detach().float().cpu()
        W_U = rep._unembed.weight.detach()
        self.logit_ids = logit_ids
        self.logit_vecs = W_U[logit_ids] - W_U.mean(0)        # what a demeaned logit reads from the final norm output


def _edges(rep: Replacement, nodes: _Nodes, batch_size: int, clock, buckets: int = 4) -> torch.Tensor:
    """adjacency [N, N]: one backward row per feature and logit target, `batch_size` rows per backward pass.

    A target at position p depends on positions <= p only, so targets are grouped by position into
    `buckets` prompt prefixes, each run once (the replacement of a prefix is exact for its positions).
    """
    L, P, F, N = nodes.L, nodes.P, nodes.F, nodes.N
    src = rep.sources
    enc = {i: encoder_rows(d, rep.active[i].feat).to(src.embed.dtype) for i, d in enumerate(rep.transcoders)
           if d is not None and len(rep.active[i].feat)}
    need = torch.cat([nodes.f_pos + 1, torch.full((nodes.K,), P)])        # prefix length each target needs
    ends = sorted({-(-P * (b + 1) // buckets) for b in range(buckets)})
    # within a prefix: logits first (they read the last layer), then features from the top layer down
    layer_of = torch.cat([nodes.f_layer, torch.full((nodes.K,), L)])
    adjacency = torch.zeros(N, N)
    leaves = rep.sources.leaves()
    values = Sources(leaves.embed.detach(), [a.detach() for a in leaves.acts], [e.detach() for e in leaves.errors])
    clock.lap("setup")
    start = 0
    for n in ends:
        mine = ((need > start) & (need <= n)).nonzero().flatten()
        start = n
        if not len(mine):
            continue
        order = mine[torch.argsort(layer_of[mine], descending=True, stable=True)].tolist()
        B = max(1, min(batch_size, len(order)))
        with torch.enable_grad():
            batched = rep.prefix(leaves.expand(B), n)
            trace = rep.run(batched)
            clock.lap("forward")
            with_acts = [i for i, a in enumerate(batched.acts) if a.shape[-1]]
            inputs = [batched.embed] + [batched.acts[i] for i in with_acts] + batched.errors
            for c in range(0, len(order), B):
                chunk = order[c:c + B]
                inject: dict[int, torch.Tensor] = {}    # layer -> [B, n, d] injected at its MLP input; L: final norm
                rows = []
                for r, t in enumerate(chunk):
                    if t >= F:
                        inject.setdefault(L, torch.zeros_like(trace.final))[r, -1] = nodes.logit_vecs[t - F]
                        rows.append(nodes.logit_start + t - F)
                    else:
                        li = int(nodes.f_layer[t])
                        g = inject.setdefault(li, torch.zeros_like(trace.mlp_in[li]))
                        g[r, int(nodes.f_pos[t])] = enc[li][t - int(nodes.starts[li])]
                        rows.append(t)
                outs = [trace.final if li == L else trace.mlp_in[li] for li in inject]
                grads = torch.autograd.grad(outs, inputs, list(inject.values()), retain_graph=c + B < len(order),
                                            allow_unused=True)
                adjacency[torch.tensor(rows)] = _rows(grads, with_acts, values, nodes, len(chunk), n)
            clock.lap("backward")
    return adjacency


def _rows(grads, with_acts, values: Sources, nodes: _Nodes, rows: int, n: int) -> torch.Tensor:
    """Edge rows [rows, N] from the gradients at the sources of an n-position prefix: value x gradient."""
    F, P = nodes.F, nodes.P
    g_embed, g_acts, g_err = grads[0], grads[1:1 + len(with_acts)], grads[1 + len(with_acts):]
    row = torch.zeros(rows, nodes.N)
    for i, g in zip(with_acts, g_acts):
        if g is not None:
            s = int(nodes.starts[i])
            row[:, s:s + g.shape[1]] = (g[:rows] * values.acts[i][:g.shape[1]]).detach().float()
    for i, g in enumerate(g_err):
        if g is not None:
            row[:, F + i * P:F + i * P + n] = (g[:rows] * values.errors[i][:n]).sum(-1).detach().float()
    if g_embed is not None:
        row[:, nodes.token_start:nodes.token_start + n] = (g_embed[:rows] * values.embed[:n]).sum(-1).detach().float()
    return row


def _biases(rep: Replacement, nodes: _Nodes) -> torch.Tensor:
    """Each target's value when every source is zero (the frozen model's constant part); 0 for sources."""
    bias = torch.zeros(nodes.N)
    with torch.no_grad():
        zero = rep.run(rep.sources.zeros().expand(1))
        for i, d in enumerate(rep.transcoders):
            a = rep.active[i]
            if d is not None and len(a.pos):
                bias[int(nodes.starts[i]):int(nodes.starts[i + 1])] = d.pre(zero.mlp_in[i][0])[a.pos, a.feat].float()
        z = zero.logits[0]
        bias[nodes.logit_start:] = (z[nodes.logit_ids] - z.mean()).float()
    return bias


class _Clock:
    """Wall and CPU seconds per phase (CPU time is the honest measure on a shared machine)."""

    def __init__(self):
        self.wall, self.cpu = {}, {}
        self.t = self.t0 = (time.perf_counter(), time.process_time())

    def lap(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall[name] = round(self.wall.get(name, 0.0) + now[0] - self.t[0], 3)
        self.cpu[name] = round(self.cpu.get(name, 0.0) + now[1] - self.t[1], 3)
        self.t = now

    def done(self) -> dict:
        self.lap("bias")
        now = (time.perf_counter(), time.process_time())
        self.wall["total"], self.cpu["total"] = round(now[0] - self.t0[0], 3), round(now[1] - self.t0[1], 3)
        return {"seconds": self.wall, "cpu_seconds": self.cpu}


def _labels(model, kind, layer, pos, feature, probs) -> list[str]:
    """Readable node labels: `L3.mlp_out.sae17@5`, `L3.mlp_out.sae_error@5`, `embed@5 'the'`, `logit ' cat' p=0.41`."""
    tok = model.tokenizer
    text = (lambda i: repr(tok.decode([i]))) if tok is not None else (lambda i: f"#{i}")   # noqa: E731
    out, k = [], 0
    for kd, L, p, f in zip(kind.tolist(), layer.tolist(), pos.tolist(), feature.tolist()):
        name = KINDS[kd]
        if name == "feature":
            out.append(f"L{L}.mlp_out.sae{f}@{p}")
        elif name == "error":
            out.append(f"L{L}.mlp_out.sae_error@{p}")
        elif name == "token":
            out.append(f"embed@{p} {text(f)}")
        else:
            out.append(f"logit {text(f)} p={float(probs[k]):.3f}")
            k += 1
    return out


__all__ = ["attribute", "salient_logits"]
