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

MAX_FEATURE_NODES = 7500        # circuit-tracer's command-line default


def salient_logits(logits: torch.Tensor, mass: float = 0.95, max_logits: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """The fewest most probable tokens whose probabilities sum to >= `mass` (at most `max_logits`): (ids, probs)."""
    if not 0 < mass <= 1 or max_logits < 1:
        raise GraphError(f"logit_mass must be in (0, 1] and max_logits >= 1; got {mass} and {max_logits}.")
    probs = torch.softmax(logits.float(), -1)
    p, idx = probs.topk(min(max_logits, probs.shape[-1]))
    n = int(torch.searchsorted(p.cumsum(0), torch.tensor(mass, dtype=p.dtype))) + 1
    return idx[:n], p[:n]


def attribute(model, transcoders, prompt, *, logit_mass: float = 0.95, max_logits: int = 10,
              batch_size: int = 64, prefixes: int = 4, max_feature_nodes: int | None = MAX_FEATURE_NODES,
              rows_per_update: int = 1024, zero_first: bool = True) -> Graph:
    """The unpruned attribution graph of `prompt` (see mechanic.locate.graph.prune to prune and score it).

    transcoders: one mechanic transcoder per layer (a list with None for layers without one, or a dict
    {layer: Dictionary}), or an already built Replacement (then `prompt` is only the graph's text).
    logit_mass / max_logits: which next tokens become logit nodes (see salient_logits).
    batch_size: target rows per backward pass (memory grows with it: the replacement runs on that many
    copies of the prompt).
    prefixes: how many prompt prefixes the targets are grouped into by position (1: one forward of the
    whole prompt; more: shorter backward passes for early targets, one forward per prefix).
    max_feature_nodes: keep only this many features, the most influential on the logits, chosen as the rows
    are computed (circuit-tracer's `max_feature_nodes`; its command line's default, 7500); None keeps every
    active feature. Memory and time grow with it: the adjacency is dense, (features + errors + tokens +
    logits) squared, and pruning holds a few copies.
    rows_per_update: with a cap, influence is re-estimated after this many feature rows (circuit-tracer:
    update_interval x batch_size, 4 x 512 by default); smaller follows influence more closely, at more cost.
    zero_first: position 0 has no feature nodes; its MLP outputs are error nodes. Position 0 attends only to
    itself, so its features are a function of the first token alone; it is the attention sink, with massive
    activations that dominate the graph without explaining the prompt (circuit-tracer zeroes the BOS position
    for the same reason). False keeps them.
    """
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise GraphError(f"max_feature_nodes must be >= 0 (or None for every active feature); got {max_feature_nodes}.")
    if rows_per_update < 1:
        raise GraphError(f"rows_per_update must be >= 1 (feature rows between influence updates); got {rows_per_update}.")
    clock = _Clock()
    rep = transcoders if isinstance(transcoders, Replacement) else Replacement(model, transcoders, prompt,
                                                                               zero_first=zero_first)
    clock.lap("replacement")
    logit_ids, probs = salient_logits(rep.hf_logits[-1], logit_mass, max_logits)
    nodes = _Nodes(rep, logit_ids, probs)
    adjacency, kept = _edges(rep, nodes, batch_size, clock, prefixes, max_feature_nodes, rows_per_update)
    keep = torch.cat([kept, torch.arange(nodes.F, nodes.N)])
    bias = _biases(rep, nodes)[keep]
    m = model
    meta = {"model": m.name, "n_layers": nodes.L, "transcoders": [repr(d) if d is not None else None
                                                                for d in rep.transcoders],
            "logit_mass": logit_mass, "max_logits": max_logits, "batch_size": batch_size, "prefixes": prefixes,
            "max_feature_nodes": max_feature_nodes, "rows_per_update": rows_per_update, "zero_first": rep.zero_first, "active_features": nodes.F,
            **clock.done()}
    tok = m.tokenizer
    text = prompt if isinstance(prompt, str) else (tok.decode(rep.ids.tolist()) if tok is not None else None)
    kind, layer, pos, feature = nodes.kind[keep], nodes.layer[keep], nodes.pos[keep], nodes.feature[keep]
    graph = Graph(kind, layer.int(), pos.int(), feature.long(), nodes.value[keep], bias, adjacency,
                  rep.ids.cpu(), logit_ids.cpu(), probs.float().cpu(),
                  _labels(m, kind, layer, pos, feature, probs), text, {}, meta)
    graph.scores = graph_scores(graph)       # replacement and completeness, reported with every graph
    return graph


class _Nodes:
    """The node table in graph order: features (layer, pos, feature), errors (layer, pos), tokens (pos), logits."""

    def __init__(self, rep: Replacement, logit_ids: torch.Tensor, probs: torch.Tensor):
        self.probs = probs.float().cpu()
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


class _Rows:
    """Edge rows [n, N] of any targets, by batched backward passes through the replacement.

    A target at position p depends on positions <= p only, so targets are grouped by position into
    `buckets` prompt prefixes; each prefix is run once on `batch_size` copies (the replacement of a prefix
    is exact for its positions) and its forward is kept for later calls. Within a prefix, logits come first,
    then features from the top layer down (a backward pass only goes as deep as its deepest target).
    """

    def __init__(self, rep: Replacement, nodes: _Nodes, batch_size: int, clock, buckets: int = 4):
        self.rep, self.nodes, self.B, self.clock = rep, nodes, batch_size, clock
        src = rep.sources
        self.enc = {i: encoder_rows(d, rep.active[i].feat).to(src.embed.dtype) for i, d in enumerate(rep.transcoders)
                    if d is not None and len(rep.active[i].feat)}
        P = nodes.P
        self.need = torch.cat([nodes.f_pos + 1, torch.full((nodes.K,), P)])        # prefix length each target needs
        self.ends = sorted({-(-P * (b + 1) // buckets) for b in range(buckets)})
        self.layer_of = torch.cat([nodes.f_layer, torch.full((nodes.K,), nodes.L)])
        self.leaves = src.leaves()
        self.values = Sources(self.leaves.embed.detach(), [a.detach() for a in self.leaves.acts],
                              [e.detach() for e in self.leaves.errors])
        self._forwards: dict[int, tuple] = {}

    def _forward(self, n: int, keep: bool):
        if n in self._forwards:
            return self._forwards[n]
        with torch.enable_grad():
            batched = self.rep.prefix(self.leaves.expand(self.B), n)
            trace = self.rep.run(batched)
        with_acts = [i for i, a in enumerate(batched.acts) if a.shape[-1]]
        out = (trace, [batched.embed] + [batched.acts[i] for i in with_acts] + batched.errors, with_acts)
        if keep:
            self._forwards[n] = out
        self.clock.lap("forward")
        return out

    def __call__(self, targets: torch.Tensor, keep: bool = True) -> torch.Tensor:
        """Rows of `targets` (indices into features + logits: i < F a feature, F + k logit k), in that order.
        keep: retain each prefix's forward for later calls (False frees it once its rows are done)."""
        nodes, L, F = self.nodes, self.nodes.L, self.nodes.F
        out = torch.zeros(len(targets), nodes.N)
        where = {int(t): r for r, t in enumerate(targets.tolist())}
        start, need = 0, self.need[targets]
        for n in self.ends:
            mine = targets[(need > start) & (need <= n)]
            start = n
            if not len(mine):
                continue
            order = mine[torch.argsort(self.layer_of[mine], descending=True, stable=True)].tolist()
            trace, inputs, with_acts = self._forward(n, keep)
            for c in range(0, len(order), self.B):
                chunk = order[c:c + self.B]
                inject: dict[int, torch.Tensor] = {}    # layer -> [B, n, d] injected at its MLP input; L: final norm
                for r, t in enumerate(chunk):
                    if t >= F:
                        inject.setdefault(L, torch.zeros_like(trace.final))[r, -1] = nodes.logit_vecs[t - F]
                    else:
                        li = int(nodes.f_layer[t])
                        g = inject.setdefault(li, torch.zeros_like(trace.mlp_in[li]))
                        g[r, int(nodes.f_pos[t])] = self.enc[li][t - int(nodes.starts[li])]
                outs = [trace.final if li == L else trace.mlp_in[li] for li in inject]
                grads = torch.autograd.grad(outs, inputs, list(inject.values()), retain_graph=True, allow_unused=True)
                out[[where[t] for t in chunk]] = _rows(grads, with_acts, self.values, nodes, len(chunk), n)
                self.clock.lap("backward")
        return out


def _edges(rep: Replacement, nodes: _Nodes, batch_size: int, clock, buckets: int = 4,
           max_features: int | None = None, per_round: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(adjacency [N', N'], kept features): every feature and logit row, or with `max_features` the rows of the
    features with the largest influence on the logits (circuit-tracer's selection).

    With a cap, the logit rows come first; then, round after round, the influence of every feature not yet
    visited is estimated from the rows known so far (influence through the partial graph, as circuit-tracer's
    `compute_partial_influences`) and the `per_round` most influential get their rows, until `max_features`
    are visited. The graph keeps only visited features: columns of the others are dropped (their effects are
    lost from the graph, which the completeness score counts) and node order stays features, errors, tokens,
    logits.
    """
    F, K = nodes.F, nodes.K
    rows = _Rows(rep, nodes, batch_size, clock, buckets)
    if max_features is None or max_features >= F:
        known = rows(torch.arange(F + K), keep=False)
        kept, order = torch.arange(F), torch.arange(F + K)
    else:
        known = torch.zeros(max_features + K, nodes.N)       # rows in the order computed: logits, then features
        targets = torch.empty(max_features + K, dtype=torch.long)
        targets[:K] = torch.arange(F, F + K)
        known[:K] = rows(targets[:K])
        visited = torch.zeros(F, dtype=torch.bool)
        n = K
        while n < max_features + K:
            inf = _partial_influence(known[:n], targets[:n], nodes)
            pending = (~visited).nonzero().flatten()
            pick = pending[inf[pending].topk(min(per_round, max_features + K - n)).indices]
            clock.lap("selection")
            visited[pick] = True
            known[n:n + len(pick)] = rows(pick)
            targets[n:n + len(pick)] = pick
            n += len(pick)
        kept = visited.nonzero().flatten()
        rank = torch.empty(F + K, dtype=torch.long)
        rank[targets] = torch.arange(len(targets))
        order = rank[torch.cat([kept, torch.arange(F, F + K)])]     # row of `known` for each kept feature, logit
    # the graph's node order: kept features, errors, tokens, logits; rows of errors and tokens are zero.
    # One gather per block straight from `known` (no reordered copy of all its rows first).
    cols = torch.cat([kept, torch.arange(F, nodes.N)])
    M = len(cols)
    adjacency = torch.zeros(M, M)
    adjacency[:len(kept)] = known[order[:len(kept), None], cols]
    adjacency[M - K:] = known[order[len(kept):, None], cols]
    return adjacency, kept


def _partial_influence(rows: torch.Tensor, targets: torch.Tensor, nodes: _Nodes) -> torch.Tensor:
    """[N] influence of every node on the logits through the rows known so far (rows[i] is target targets[i])."""
    A = rows.abs()
    A /= A.sum(1, keepdim=True).clamp(min=1e-10)          # prune.normalized, without a second copy
    node = torch.where(targets >= nodes.F, targets - nodes.F + nodes.logit_start, targets)
    w = torch.zeros(len(targets))
    w[targets >= nodes.F] = nodes.probs
    total = torch.zeros(nodes.N)
    current = w @ A
    for _ in range(nodes.N + 1):
        if not current.any():
            return total
        total += current
        current = current[node] @ A
    raise GraphError("Influence through the partial graph did not vanish (a cycle); this is a bug.")


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
