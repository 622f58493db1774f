"""Greedy ACDC-style pruning of a circuit: drop every edge whose removal barely moves the metric.

As in ACDC (Conmy et al. 2023), receivers are visited from the logits backwards and, for each one, its
incoming edges from the latest sender to the earliest; an edge is removed for good when the patched
metric moves by less than `threshold` (in units of the clean - corrupted gap) from the current
circuit's. Every test is an exact patched-graph run (mechanic.locate.circuit.PatchedGraph semantics).

Fast by construction (the decisions and their order are those of one run per edge):
- removing an edge into receiver v changes v's input only, and every edge removed so far goes into a
  receiver visited earlier (a later one), so everything before v's layer is the start circuit's run:
  it is recorded once, and each test runs from v's layer on (an edge into the logits: one unembedding);
- with corrupted patching, a receiver none of whose edges is in the circuit reads the corrupted run's
  residual, so its output is its corrupted output (its reference): it is not run (equal up to float
  rounding; most receivers of a sparse circuit are such);
- the candidates of one receiver run as batch rows, `candidates` per forward; row r assumes the
  decisions of the rows before it (predicted from the decisions so far), so a forward settles every edge
  up to and including the first mispredicted one, and the next forward starts after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mechanic.locate.circuit import Circuit, PatchedGraph, prune
from mechanic.locate.gradient import ComponentGraph, Metric, _tile
from mechanic.tasks.task import Task, TaskBatch


@dataclass
class _Chunk:
    """One chunk of examples and the start circuit's run on it: sender outputs, residual before each layer and
    before each MLP, and the final residual."""

    batch: TaskBatch
    calls: list
    ref: torch.Tensor
    outs: torch.Tensor        # [U, b, p, d]
    pre: list[torch.Tensor]   # per layer [b, p, d]
    mid: list[torch.Tensor]
    final: torch.Tensor
    logits: torch.Tensor      # [b, vocab] at the last position


def _record(graph: ComponentGraph, chunk, keep: torch.Tensor) -> _Chunk:
    """Run the circuit `keep` on one chunk and keep the states a later test starts from."""
    b, x0, calls, ref = chunk
    outs, logits = graph.execute(x0, calls, keep=keep.to(x0.device), ref=ref)
    pre, mid, R, H = [], [], x0, graph.H
    for L in range(graph.n_layers):
        s0 = graph.sender(L, 0)
        bias = getattr(graph.model.layer_module(L, graph.model.arch.o_proj), "bias", None)
        m = R + (outs[s0:s0 + H].sum(0) + (bias if bias is not None else 0))
        pre.append(R)
        mid.append(m)
        R = m + outs[graph.sender(L)]
    return _Chunk(b, calls, ref, outs, pre, mid, R, logits)


def _ref(ref: torch.Tensor, u) -> torch.Tensor:
    """Reference value(s) of sender(s) u (a zero reference is one broadcast scalar for every sender)."""
    return ref if ref.shape[0] == 1 else ref[u]


def _start(graph: ComponentGraph, j: int) -> tuple[int, str, int]:
    """(layer, stage, first sender whose output can change) of a test of an edge into receiver j."""
    if j == len(graph.receivers) - 1:
        return graph.n_layers, "final", len(graph.senders)
    L, h = divmod(j, graph.H + 1)
    if h == graph.H:
        return L, "mlp", graph.sender(L)
    return L, "heads", graph.sender(L, 0)


def _groups(drop: torch.Tensor, v0: int, H: int, n_up: int, j: int) -> tuple[list[int], torch.Tensor]:
    """Heads v0..v0+H-1 whose inputs are equal (same dropped senders, not the tested receiver j) share one copy
    of the layer: (one receiver per copy, the copy of each head [H])."""
    heads = range(v0, v0 + H)
    key = [("j",) if v == j else tuple(drop[:n_up, v].nonzero().flatten().tolist()) for v in heads]
    first: dict = {}
    group = torch.tensor([first.setdefault(k, len(first)) for k in key])
    reps = [v0 + key.index(k) for k in first]
    return reps, group


def _rows(graph: ComponentGraph, st: _Chunk, drop: torch.Tensor, j: int, fixed: torch.Tensor, index: dict,
          extra: torch.Tensor, corrupted: bool, stats: dict) -> torch.Tensor:
    """Last-position logits [K * b, vocab] of K circuits that equal the current one (edges `drop` carry their
    reference) except that receiver j's input gets extra[k] [K, b, p, d] in row block k.

    fixed [n, b, p, d]: the input change of the receivers run (receiver v in row index[v]) from dropped
    senders before j's layer, the same in every row; the senders from j's layer on are computed here per row (K row blocks of b examples).
    corrupted (the reference is the corrupted run): a receiver with every incoming edge dropped reads the
    corrupted run's residual, so its output is its corrupted output, the reference: it is not run.
    stats counts the receiver copies run and those taken from the reference."""
    m, a, H = graph.model, graph.model.arch, graph.H
    K = extra.shape[0]
    b, p, d = st.pre[0].shape
    B = K * b
    L0, stage, n0 = _start(graph, j)
    new = torch.empty(len(graph.senders) - n0, K, b, p, d, dtype=extra.dtype, device=extra.device)
    ran: list[int] = []  # senders (offset by n0) run here; the others carry their reference (difference 0)

    def delta(cols: list[int], n_up: int) -> torch.Tensor:
        """Input change [len(cols), K, b, p, d] of receivers cols from dropped senders before n_up."""
        out = fixed[[index[c] for c in cols]].unsqueeze(1).expand(-1, K, -1, -1, -1)
        sel = [u for u in ran if u < n_up - n0]
        w = drop[[n0 + u for u in sel]][:, cols]
        if sel and bool(w.any()):
            out = out + torch.einsum("uv,ukbpd->vkbpd", w, new[sel])
        if j in cols:
            out = out.clone()
            out[cols.index(j)] += extra
        return out

    up = graph.upstream.to(drop.device)

    def dead(v: int, n_up: int) -> bool:
        """Receiver v reads only dropped edges (and is not the one tested): its output is the reference."""
        out = corrupted and v != j and bool((drop[:n_up, v].bool() == up[:n_up, v]).all())
        stats["skipped" if out else "run"] += 1
        return out

    rep = lambda x: x.unsqueeze(0).expand(K, -1, -1, -1).reshape(B, p, d)  # noqa: E731
    R = rep(st.pre[L0]) if stage != "final" else rep(st.final)
    for L in range(L0, graph.n_layers):
        args, kwargs = st.calls[L]
        s0 = graph.sender(L, 0)
        if L > L0 or stage == "heads":
            heads, group = _groups(drop, graph.receiver(L, 0), H, s0, j)
            live = [g for g, v in enumerate(heads) if not dead(v, s0)]
            hs = [h for h in range(H) if int(group[h]) in live]
            o = m.layer_module(L, a.o_proj)
            c = _ref(st.ref, slice(s0, s0 + H)).unsqueeze(1).expand(H, K, b, p, d).reshape(H, B, p, d).clone()
            if live:
                G = len(live)
                X = R.view(1, K, b, p, d) + delta([heads[g] for g in live], s0)
                z = graph._call(L, X.reshape(G * B, p, d), (_tile(args, b, G * K), _tile(kwargs, b, G * K)), "z")
                z = z.view(G, B, p, H, -1)[[live.index(int(group[h])) for h in hs], :, :, hs]  # head h, its copy
                c[hs] = torch.einsum("hbpk,dhk->hbpd", z, a.o_weight(o).view(d, H, -1)[:, hs])
            bias = getattr(o, "bias", None)
            mid = R + (c.sum(0) + (bias if bias is not None else 0))
            if hs:
                new[[s0 - n0 + h for h in hs]] = _ref(st.ref, slice(s0, s0 + H)).unsqueeze(1).expand(
                    H, 1, -1, -1, -1)[hs] - c[hs].reshape(len(hs), K, b, p, d)
                ran += [s0 - n0 + h for h in hs]
        else:
            mid = rep(st.mid[L])
        n_up = s0 if graph.parallel else graph.sender(L)
        if dead(graph.receiver(L), n_up):
            y = _ref(st.ref, graph.sender(L)).expand(K, b, p, d).reshape(B, p, d)
        else:
            Xm = (R if graph.parallel else mid).view(K, b, p, d) + delta([graph.receiver(L)], n_up)[0]
            y = graph._call(L, Xm.reshape(B, p, d), (_tile(args, b, K), _tile(kwargs, b, K)), "mlp")
            new[graph.sender(L) - n0] = _ref(st.ref, graph.sender(L)) - y.view(K, b, p, d)
            ran.append(graph.sender(L) - n0)
        R = mid + y
    Xf = R.view(K, b, p, d) + delta([len(graph.receivers) - 1], len(graph.senders))[0]
    return m.module(a.unembed)(m.module(a.final_norm)(Xf.reshape(B, p, d)[:, -1:]))[:, 0]


class _Tester:
    """Tests of edges into one receiver at a time, from the start circuit's recorded run."""

    def __init__(self, runner: PatchedGraph, keep: torch.Tensor):
        self.runner, self.graph = runner, runner.graph
        self.stats = {"run": 0, "skipped": 0}  # receiver copies run / taken from the corrupted run, per chunk
        with torch.no_grad():
            self.chunks = [_record(self.graph, c, keep) for c in runner.chunks]

    def receiver(self, j: int, drop: torch.Tensor) -> None:
        """Prepare the tests of edges into receiver j: every receiver's input change from the fixed senders."""
        g, V = self.graph, len(self.graph.receivers)
        L, _, self.n0 = _start(g, j)
        self.j, n0 = j, self.n0
        # receivers from j's layer on that may run: with corrupted patching, one whose every edge is dropped does not
        full = (drop == g.upstream).all(0) if self.runner.patch == "corrupted" else torch.zeros(V, dtype=torch.bool)
        cols = [v for v in range(min(g.receiver(L, 0), j), V) if v in (j, V - 1) or not bool(full[v])]
        self.index = {v: k for k, v in enumerate(cols)}
        self.D = [(_ref(st.ref, slice(0, n0)) - st.outs[:n0]) for st in self.chunks]
        self.fixed = [torch.einsum("uv,ubpd->vbpd", drop[:n0, cols].to(D.dtype), D) for D in self.D]

    def metrics(self, drop: torch.Tensor, sets: list[list[int]]) -> list[float]:
        """The metric (mean over examples) of the current circuit with, in row k, the edges (i, j) for i in
        sets[k] dropped as well."""
        j, K, total = self.j, len(sets), torch.zeros(len(sets), dtype=torch.float64)
        with torch.no_grad():
            for st, D, fixed in zip(self.chunks, self.D, self.fixed):
                dropf = drop.to(D.device, D.dtype)
                # j's own column changes as its edges go
                fixed[self.index[j]] = torch.einsum("u,ubpd->bpd", dropf[:self.n0, j], D)
                extra = torch.stack([D[s].sum(0) if s else torch.zeros_like(D[0]) for s in sets])
                logits = _rows(self.graph, st, dropf, j, fixed, self.index, extra, self.runner.patch == "corrupted",
                               self.stats)
                b = st.batch
                vals = self.runner.fn(logits, b.select(torch.arange(b.n).repeat(K)))
                total += vals.view(K, b.n).double().sum(1).cpu()
        return (total / self.runner.n).tolist()


def acdc(model, task: Task | TaskBatch, start: Circuit, threshold: float = 0.01, *, patch: str = "corrupted",
         metric: str | Metric | None = None, batch_size: int | None = 8, candidates: int = 2,
         progress: bool = True) -> tuple[Circuit, dict]:
    """Prune `start` greedily; returns the pruned circuit and a log (edges tried, removed, metric after each step).

    threshold: an edge goes when |m_without - m_current| < threshold * |m_clean - m_corrupted|.
    batch_size: examples per chunk; candidates: candidate removals run together as batch rows (memory grows
    with batch_size x candidates; the result does not depend on either).
    """
    if threshold < 0:
        raise ValueError(f"threshold is a fraction of the clean - corrupted metric gap and must be >= 0, got "
                         f"{threshold}.")
    if candidates < 1:
        raise ValueError(f"candidates is the number of candidate removals per forward and must be >= 1, got "
                         f"{candidates}.")
    runner = PatchedGraph(model, task, patch, metric, batch_size)
    runner.check(start)
    gap = abs(runner.metric_clean - runner.metric_corrupted)
    keep = start.keep.clone()
    tester = _Tester(runner, keep)
    current = sum(float(runner.fn(st.logits, st.batch).sum()) for st in tester.chunks) / runner.n
    upstream = runner.graph.upstream
    steps, rows_run, forwards = [], 0, 0
    removed_so_far, decided = 0, 0
    order = [(i, j) for j in reversed(range(len(start.receivers))) for i in reversed(range(len(start.senders)))
             if keep[i, j]]
    bar = tqdm(total=len(order), desc="acdc", disable=not progress, leave=False)
    for j in reversed(range(len(start.receivers))):
        todo = [i for i in reversed(range(len(start.senders))) if keep[i, j]]
        if not todo:
            continue
        tester.receiver(j, upstream & ~keep)
        while todo:
            chunk = todo[:candidates]
            guess = removed_so_far * 2 >= decided  # predict the more frequent decision so far
            sets = [[i for i in chunk[:r]] if guess else [] for r in range(len(chunk))]
            sets = [s + [i] for s, i in zip(sets, chunk)]
            ms = tester.metrics(upstream & ~keep, sets)
            rows_run, forwards = rows_run + len(chunk), forwards + 1
            done = 0
            for i, m in zip(chunk, ms):
                removed = abs(m - current) < threshold * gap
                if removed:
                    current = m
                    keep[i, j] = False
                steps.append({"edge": [start.senders[i], start.receivers[j]], "metric_without": m, "removed": removed})
                removed_so_far, decided, done = removed_so_far + removed, decided + 1, done + 1
                if removed != guess:
                    break  # later rows assumed the other decision
            todo = todo[done:]
            bar.update(done)
    bar.close()
    pruned = prune(start.senders, start.receivers, keep)
    final = runner.metric(pruned)  # the log's faithfulness is the plain faithfulness() of the result
    circuit = Circuit(start.senders, start.receivers, pruned, requested=None)
    log = {"threshold": threshold, "patch": patch, "edges_start": len(start), "edges_end": len(circuit),
           "runs": len(order) + 1, "rows_computed": rows_run, "forwards": forwards,
           "receivers_run": tester.stats["run"], "receivers_from_reference": tester.stats["skipped"], "steps": steps,
           **runner.report(circuit, final)}
    return circuit, log
