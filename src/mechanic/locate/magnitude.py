"""Magnitude analysis: massive activations, super weights, super experts and attention sinks.

- Massive activations (Sun et al. 2024): residual values > 100 and >= 1000x the median magnitude.
- Super weights (Yu et al. 2024): the down_proj scalar W[j, k] behind a spike of |input| (neuron k)
  and |output| (dimension j); verified by zeroing it alone against magnitude-matched random scalars.
- Super experts (Su et al. 2025): experts whose max |output| stands out (P99.5 and max/10 rules).
- Attention sinks (StreamingLLM): per head, mean attention mass on the first token (and chosen tokens).

Every statistic streams over token windows (mechanic.data.windows), so calibration over many
tokens keeps one batch of activations in memory. Weights are only changed inside `zeroed_weight`,
which restores them bit for bit.

Under torchrun (mechanic.distributed) every statistic splits its batches of windows over the ranks and
reduces what they found (maxima with their place, histogram counts, sums), and the perplexity checks (a
super weight and its random controls, each pruned expert) are dealt over the ranks whole; the results equal
one process (whole batches per rank: bit for bit but for the order of the sinks' float64 sums).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from mechanic import distributed as D
from mechanic.data.windows import batches, windows
from mechanic.model.perplexity import perplexity
from mechanic.locate.scores import Scores
from mechanic.model.interventions import Intervention, apply_fn, zero


class MagnitudeError(ValueError):
    """A magnitude analysis asked of a model that cannot answer it (e.g. super experts of a dense model)."""


def _ivs(interventions) -> list[Intervention]:
    return [interventions] if isinstance(interventions, Intervention) else list(interventions)


def _token(model, tid: int) -> str:
    tok = model.tokenizer
    return tok.decode([tid]) if tok is not None else str(tid)


def _provenance(model) -> dict:
    return {"model": model.name, "fingerprint": model.fingerprint}


# ---------------------------------------------------------------- ranks
def _share(wins, batch_size: int) -> list[tuple[int, torch.Tensor]]:
    """(index of its first window, [b, L] batch) of each batch this rank computes.

    One process: every batch. Split over ranks: a contiguous block of whole batches, so each forward is the
    one-process forward; with fewer batches than ranks, a contiguous block of each batch's windows instead
    (smaller forwards: equal to ~1e-7)."""
    out, start = [], 0
    for ids in batches(wins, batch_size):
        out.append((start, ids))
        start += ids.shape[0]
    if not D.active():
        return out
    if len(out) >= D.world():
        lo, hi = D.bounds(len(out))
        return out[lo:hi]
    return [(s + lo, ids[lo:hi]) for s, ids in out for lo, hi in [D.bounds(ids.shape[0])] if hi > lo]


# ---------------------------------------------------------------- massive activations
@dataclass
class MassiveActivations:
    """scores: max |resid_post| per layer (sites) and dimension (positions d0..); top: the largest per layer."""

    scores: Scores
    top: list[dict]            # per layer, the top-k dimensions: layer, dim, value, abs, window, position, token
    medians: list[float]       # median |resid_post| per layer over every token and dimension
    settings: dict = field(default_factory=dict)

    @property
    def massive(self) -> list[dict]:
        """The entries flagged massive (> min_value and >= ratio x the layer's median)."""
        return [t for t in self.top if t["massive"]]


class _LogHistogram:
    """Streaming histogram of log10 |x| per layer: a median to within half a bin in bounded memory."""

    def __init__(self, n_layers: int, lo: float = -10.0, hi: float = 6.0, per_decade: int = 200):
        self.lo, self.hi, self.bins = lo, hi, int((hi - lo) * per_decade)
        self.counts = torch.zeros(n_layers, self.bins, dtype=torch.float64)

    def add(self, layer: int, a: torch.Tensor) -> None:
        x = a.float().clamp_min(10 ** self.lo).log10().clamp(self.lo, self.hi - 1e-9)
        self.counts[layer] += torch.histc(x, self.bins, self.lo, self.hi).double()

    def median(self, layer: int) -> float:
        c = self.counts[layer].cumsum(0)
        i = int(torch.searchsorted(c, c[-1] / 2))
        width = (self.hi - self.lo) / self.bins
        return float(10 ** (self.lo + (i + 0.5) * width))

    @property
    def rel_error(self) -> float:
        return float(10 ** ((self.hi - self.lo) / self.bins / 2) - 1)


def massive_activations(model, texts, *, seq_len: int = 128, batch_size: int = 8, max_tokens: int | None = 4096,
                        k: int = 5, min_value: float = 100.0, ratio: float = 1000.0,
                        interventions=()) -> MassiveActivations:
    """Per layer, the k dimensions with the largest |resid_post| over all tokens, against the median magnitude.

    A value is flagged massive when |h| > min_value and |h| >= ratio x median(|h|) of its layer
    (Sun et al. 2024: > 100 and about 1000x). Medians come from a log-spaced streaming histogram
    (relative error recorded in settings); maxima are exact.
    """
    wins = windows(model, texts, seq_len, max_tokens)
    L, d = model.dims.n_layers, model.dims.d_model
    sites = [f"L{l}.resid_post" for l in range(L)]

    def maxima():
        best = torch.zeros(L, d)
        signed = torch.zeros(L, d)
        where = torch.zeros(L, d, 2, dtype=torch.long)  # (window, position)
        hist = _LogHistogram(L)
        for start, ids in _share(wins, batch_size):
            run = model.run(ids.to(model.device), cache=sites, interventions=_ivs(interventions), stop_at="auto")
            b, P = ids.shape
            for l in range(L):
                h = run[sites[l]].float().cpu().reshape(b * P, d)
                a = h.abs()
                hist.add(l, a)
                m, idx = a.max(0)
                up = m > best[l]
                best[l] = torch.where(up, m, best[l])
                signed[l] = torch.where(up, h.gather(0, idx[None])[0], signed[l])
                where[l, up, 0] = start + idx[up] // P
                where[l, up, 1] = idx[up] % P
        return best, signed, where, hist

    (best, signed, where, hist), *later = D.per_rank(maxima)
    for b2, s2, w2, h2 in later:   # later ranks hold later windows: a tie keeps the earlier place, as one process
        up = b2 > best
        best, signed = torch.where(up, b2, best), torch.where(up, s2, signed)
        where[up] = w2[up]
        hist.counts += h2.counts
    medians = [hist.median(l) for l in range(L)]
    top = []
    for l in range(L):
        for j in best[l].argsort(descending=True)[:k].tolist():
            w, p = where[l, j].tolist()
            v = float(best[l, j])
            top.append({"layer": l, "dim": j, "value": float(signed[l, j]), "abs": v, "window": w, "position": p,
                        "token": _token(model, int(wins[w][p])), "median": medians[l],
                        "ratio": v / medians[l] if medians[l] > 0 else float("inf"),
                        "massive": v > min_value and v >= ratio * medians[l]})
    settings = {"min_value": min_value, "ratio": ratio, "k": k, "seq_len": seq_len, "max_tokens": max_tokens,
                "tokens": sum(w.numel() for w in wins), "windows": len(wins), "site": "resid_post",
                "median_rel_error": hist.rel_error, "interventions": len(_ivs(interventions))}
    scores = Scores(best, sites, "massive_activations", positions=[f"d{j}" for j in range(d)],
                    metric="max |resid_post|", settings=settings, **_provenance(model))
    return MassiveActivations(scores, top, medians, settings)


# ---------------------------------------------------------------- super weights
@contextmanager
def zeroed_weight(model, layer: int, row: int, col: int):
    """down_proj.weight[row, col] of `layer` set to 0 for the duration, then restored bit for bit."""
    W = model.arch.down_weight(model.layer_module(layer, model.arch.down_proj))
    with torch.no_grad():
        old = W[row, col].clone()
        try:
            W[row, col] = 0
            yield
        finally:
            W[row, col] = old


@dataclass
class SuperWeight:
    """A candidate down_proj.weight[row, col] (row = output dim j, col = neuron k) and its verification."""

    layer: int
    row: int
    col: int
    weight: float
    max_input: float           # |input| of neuron `col` at the spiking token
    max_output: float          # |output| of dimension `row` at the spiking token
    iteration: int
    ppl: float | None = None           # held-out perplexity with this scalar zeroed (alone)
    ppl_random: list[float] = field(default_factory=list)  # with each magnitude-matched random scalar zeroed
    random_weights: list[tuple[int, int, float]] = field(default_factory=list)
    verified: bool | None = None

    @property
    def site(self) -> str:
        """The FFN neuron whose down_proj column holds this weight."""
        return f"L{self.layer}.neuron{self.col}"


@dataclass
class SuperWeights:
    """scores: per dense layer max |down_proj input| and |output| (first pass); candidates: found in order."""

    scores: Scores
    candidates: list[SuperWeight]
    baseline_ppl: float | None
    settings: dict = field(default_factory=dict)


def _dense_layers(model) -> list[int]:
    return [l for l in range(model.dims.n_layers) if not model.is_moe(l)]


def _down_proj_stats(model, wins, layers: list[int], batch_size: int) -> dict[int, dict]:
    """Per layer: max |down_proj output| with its dim and token, and the largest |input| neuron at that token."""
    a = model.arch
    sites = [f"L{l}.neuron" for l in layers]

    def maxima():
        stats = {l: {"out": -1.0, "in": 0.0, "row": 0, "col": 0, "max_in": 0.0} for l in layers}
        for _, ids in _share(wins, batch_size):
            run = model.run(ids.to(model.device), cache=sites, stop_at="auto")
            for l, s in zip(layers, sites):
                mod = model.layer_module(l, a.down_proj)
                x = run[s].reshape(-1, run[s].shape[-1])
                with torch.no_grad():
                    y = torch.nn.functional.linear(x, a.down_weight(mod), getattr(mod, "bias", None))
                st = stats[l]
                st["max_in"] = max(st["max_in"], float(x.abs().max()))
                m = float(y.abs().max())
                if m > st["out"]:
                    t, j = divmod(int(y.abs().argmax()), y.shape[-1])
                    kk = int(x[t].abs().argmax())
                    st.update(out=m, row=j, col=kk, **{"in": float(x[t, kk].abs())})
        return stats

    stats, *later = D.per_rank(maxima)
    for other in later:           # in rank order: a tie keeps the earlier token, as one process
        for l, o in other.items():
            st = stats[l]
            st["max_in"] = max(st["max_in"], o["max_in"])
            if o["out"] > st["out"]:
                st.update(out=o["out"], row=o["row"], col=o["col"], **{"in": o["in"]})
    return stats


def _spike(stats: dict[int, dict], ratio: float, min_value: float) -> int | None:
    """The first layer whose max |output| is >= min_value and >= ratio x the median over layers."""
    outs = torch.tensor([s["out"] for s in stats.values()])
    med = float(outs.median())
    for l, s in stats.items():
        if s["out"] >= min_value and s["out"] >= ratio * med:
            return l
    return None


def _matched_random(model, layer: int, row: int, col: int, n: int, seed: int) -> list[tuple[int, int, float]]:
    """n scalars of the same down_proj whose |w| ranks are nearest the candidate's (chosen at random among them)."""
    W = model.arch.down_weight(model.layer_module(layer, model.arch.down_proj)).detach()
    order = W.abs().reshape(-1).argsort()
    flat = row * W.shape[1] + col
    r = int((order == flat).nonzero()[0])
    pool = torch.cat([order[max(0, r - 10 * n): r], order[r + 1: r + 1 + 10 * n]])
    g = torch.Generator().manual_seed(seed)
    pick = pool[torch.randperm(pool.numel(), generator=g)[:n]].tolist()
    return [(i // W.shape[1], i % W.shape[1], float(W.reshape(-1)[i])) for i in pick]


def super_weights(model, texts, heldout=None, *, seq_len: int = 128, batch_size: int = 8,
                  detect_tokens: int = 512, verify_tokens: int = 1024, max_iter: int = 5,
                  spike_ratio: float = 10.0, min_value: float = 20.0, n_random: int = 4,
                  verify_factor: float = 10.0, verify: bool = True, seed: int = 0) -> SuperWeights:
    """Find super-weight candidates (layer, j, k) iteratively and verify each by zeroing that one scalar.

    Detection (Yu et al. 2024): run calibration text, read every dense layer's down_proj input
    (L.neuron) and compute its output; a layer spikes when its max |output| is >= min_value and
    >= spike_ratio x the median over layers. In the first spiking layer the candidate is
    W[j, k] with j the output dimension of the spike and k the input neuron largest at that token.
    It is zeroed, the text re-run and the next spike looked for, up to max_iter candidates.
    Verification: held-out perplexity with the candidate alone zeroed vs n_random scalars of the
    same matrix with the nearest |w| ranks, each zeroed alone; verified when the perplexity increase
    exceeds verify_factor x the largest random increase. Perplexity is measured on `heldout`
    (default: `texts`). Every weight is restored exactly, also when something fails midway.
    """
    if max_iter < 1 or n_random < 0:
        raise MagnitudeError(f"super_weights needs max_iter >= 1 search passes and n_random >= 0 random controls; "
                             f"got max_iter={max_iter}, n_random={n_random}.")
    layers = _dense_layers(model)
    if not layers:
        raise MagnitudeError("This model has no dense FFN layer (every layer is mixture-of-experts), so it has no "
                             "down_proj matrix to search for super weights; use super_experts instead.")
    wins = windows(model, texts, seq_len, detect_tokens)
    found: list[SuperWeight] = []
    first = None
    with _all_zeroed(model, found) as zero_next:
        for it in range(max_iter):
            stats = _down_proj_stats(model, wins, layers, batch_size)
            first = first or stats
            l = _spike(stats, spike_ratio, min_value)
            if l is None:
                break
            s = stats[l]
            if any((c.layer, c.row, c.col) == (l, s["row"], s["col"]) for c in found):
                break  # the same scalar again (already zeroed): nothing new spikes
            W = model.arch.down_weight(model.layer_module(l, model.arch.down_proj))
            weight = float(W[s["row"], s["col"]].detach())
            found.append(SuperWeight(l, s["row"], s["col"], weight, s["in"], s["out"], it))
            zero_next()
    scores = Scores(torch.tensor([[first[l]["max_in"], first[l]["out"]] for l in layers]),
                    [f"L{l}.mlp_out" for l in layers], "super_weights", positions=["max_in", "max_out"],
                    metric="max |down_proj input| / |output|", **_provenance(model))
    base = None
    if verify and found:
        held = heldout if heldout is not None else texts
        ppl = lambda: perplexity(model, held, seq_len, batch_size, verify_tokens).ppl  # noqa: E731

        def zeroed_ppl(layer: int, row: int, col: int):
            def job():
                with zeroed_weight(model, layer, row, col):
                    return ppl()
            return job
        for c in found:
            c.random_weights = _matched_random(model, c.layer, c.row, c.col, n_random, seed)
        jobs = [ppl] + [zeroed_ppl(c.layer, j, kk) for c in found
                        for j, kk in [(c.row, c.col)] + [(j, kk) for j, kk, _ in c.random_weights]]
        base, *ppls = D.each(jobs)     # independent perplexities: dealt over the ranks under torchrun
        for c in found:
            c.ppl, c.ppl_random, ppls = ppls[0], ppls[1:1 + len(c.random_weights)], ppls[1 + len(c.random_weights):]
            worst = max([abs(p - base) for p in c.ppl_random], default=0.0)
            c.verified = (c.ppl - base) > verify_factor * worst and c.ppl > base
    settings = {"spike_ratio": spike_ratio, "min_value": min_value, "max_iter": max_iter, "n_random": n_random,
                "verify_factor": verify_factor, "seq_len": seq_len, "detect_tokens": sum(w.numel() for w in wins),
                "verify_tokens": verify_tokens, "seed": seed, "baseline_ppl": base,
                "candidates": [_sw_dict(c) for c in found]}
    scores.settings = settings
    return SuperWeights(scores, found, base, settings)


def _sw_dict(c: SuperWeight) -> dict:
    return {"layer": c.layer, "row": c.row, "col": c.col, "weight": c.weight, "max_input": c.max_input,
            "max_output": c.max_output, "iteration": c.iteration, "ppl": c.ppl, "ppl_random": c.ppl_random,
            "random_weights": c.random_weights, "verified": c.verified}


@contextmanager
def _all_zeroed(model, found: list[SuperWeight]):
    """Zero found[-1] each time the yielded function is called; restore every one (in reverse) on exit."""
    saved: list[tuple[torch.Tensor, int, int, torch.Tensor]] = []

    def zero_next():
        c = found[-1]
        W = model.arch.down_weight(model.layer_module(c.layer, model.arch.down_proj))
        with torch.no_grad():
            saved.append((W, c.row, c.col, W[c.row, c.col].clone()))
            W[c.row, c.col] = 0
    try:
        yield zero_next
    finally:
        with torch.no_grad():
            for W, j, k, old in reversed(saved):
                W[j, k] = old


# ---------------------------------------------------------------- attention sinks
def _one_token(model, tok: str | int) -> int:
    """The id of a sink token given as an id or as a string that is exactly one token."""
    if isinstance(tok, int):
        return tok
    ids = model.tokenizer(tok, add_special_tokens=False)["input_ids"] if model.tokenizer is not None else None
    if not ids or len(ids) != 1:
        raise MagnitudeError(f"Sink token {tok!r} is not a single token for this model (or the model has no "
                             "tokenizer); give strings that tokenize to one token each (e.g. '\\n', '.', ',') "
                             "or token ids.")
    return ids[0]


def attention_sinks(model, texts, interventions=(), *, seq_len: int = 128, batch_size: int = 8,
                    max_tokens: int | None = 1024, sink_tokens: tuple[str | int, ...] = ()) -> Scores:
    """Per head, the mean attention mass on the first token of each window (and on chosen sink tokens).

    Averaged over every query but the first (which can only attend to itself) of every window.
    sink_tokens: strings that are one token each (e.g. "\\n", ".") or token ids; their column is the
    mass on every later occurrence of that token. Run once without and once with `interventions` to compare.
    """
    wins = windows(model, texts, seq_len, max_tokens)
    d = model.dims
    sink_ids = [_one_token(model, s) for s in sink_tokens]
    sites = [f"L{l}.head.pattern" for l in range(d.n_layers)]

    def sums():
        total = torch.zeros(d.n_layers, d.n_heads, 1 + len(sink_ids), dtype=torch.float64)
        count = 0
        for _, ids in _share(wins, batch_size):
            if ids.shape[1] < 2:
                continue
            run = model.run(ids.to(model.device), cache=sites, interventions=_ivs(interventions), stop_at="auto")
            for l, s in enumerate(sites):
                p = run[s][:, 1:].double().cpu()             # [b, q >= 1, H, k]
                total[l, :, 0] += p[..., 0].sum((0, 1))
                for i, tid in enumerate(sink_ids):
                    keys = (ids == tid).clone()
                    keys[:, 0] = False
                    total[l, :, 1 + i] += (p * keys[:, None, None, :].double()).sum(-1).sum((0, 1))
            count += ids.shape[0] * (ids.shape[1] - 1)
        return total, count

    (total, count), *later = D.per_rank(sums)
    for t2, c2 in later:
        total, count = total + t2, count + c2
    if count == 0:
        raise MagnitudeError("No window has two tokens; give more text.")
    values = (total / count).reshape(d.n_layers * d.n_heads, -1)
    sites_out = [f"L{l}.head{h}" for l in range(d.n_layers) for h in range(d.n_heads)]
    settings = {"seq_len": seq_len, "max_tokens": max_tokens, "queries": count, "sink_tokens": list(sink_tokens),
                "interventions": len(_ivs(interventions)), "mean_first_mass": float(values[:, 0].mean())}
    return Scores(values, sites_out, "attention_sinks", positions=["first"] + [repr(s) for s in sink_tokens],
                  metric="mean attention mass", settings=settings, **_provenance(model))


# ---------------------------------------------------------------- super experts
@dataclass
class SuperExperts:
    """scores: M = max |expert output| per expert site over calibration text; super: the flagged ones."""

    scores: Scores
    super: list[dict]          # site, layer, expert (None = shared), value
    pruning: list[dict]        # site, mode (zero | router_mask), ppl, ppl_change, sink, sink_change
    baseline: dict             # ppl, sink (mean first-token attention mass over all heads)
    settings: dict = field(default_factory=dict)


def router_mask(layer: int, expert: int) -> Intervention:
    """Remove `expert` from the routing of `layer`: its top-k weight set to 0, the rest rescaled to the same sum."""
    def mask(w: torch.Tensor, e=expert) -> torch.Tensor:
        total = w.sum(-1, keepdim=True)
        w = w.clone()
        w[..., e] = 0
        rest = w.sum(-1, keepdim=True)
        return torch.where(rest > 0, w * total / rest.clamp_min(1e-30), w)
    return apply_fn(f"L{layer}.router", mask)


def _max_probe(M: dict, name: str):
    """A pass-through fn that keeps the running max |value| of one site in M[name] (nothing else is kept)."""
    def probe(x: torch.Tensor) -> torch.Tensor:
        if x.numel():
            M[name] = max(M[name], float(x.detach().abs().max()))
        return x
    return probe


def super_experts(model, texts, heldout=None, *, seq_len: int = 128, batch_size: int = 8,
                  max_tokens: int | None = 2048, percentile: float = 99.5, max_fraction: float = 0.1,
                  layer_fraction: float = 0.75, prune: bool = True, prune_tokens: int = 1024,
                  max_prune: int = 4) -> SuperExperts:
    """Experts (routed and shared) whose max |output| is an outlier, and what pruning each one does.

    M(l, e) = max |down_proj output| of expert e over the tokens routed to it (the whole output row,
    every routed token; shared experts over every token). Each expert's output is read through a
    pass-through fn intervention that keeps only a running max, so memory stays at one expert's
    [batch, pos, d] (caching `L.expert` would hold [batch, pos, experts, d] for every layer).
    Pooled over MoE layers l < layer_fraction x n_layers; super when M > the `percentile` of the
    pool and M > max_fraction x max of the pool (Su et al. 2025). Pruning, both named: `zero` (the
    expert's output zeroed, router untouched) and `router_mask` (the expert removed from the top-k
    weights, the rest rescaled to the same sum; not defined for shared experts). Each prune reports
    held-out perplexity and the mean attention mass on the first token, against the unpruned model.
    """
    d = model.dims
    moe = [l for l in range(d.n_layers) if model.is_moe(l)]
    if not moe:
        raise MagnitudeError("This model has no mixture-of-experts layer, so it has no experts; "
                             "use super_weights for dense models.")
    shared = bool(model.arch.shared_expert)
    names = [f"L{l}.expert{e}" for l in moe for e in range(d.n_experts)] + \
            ([f"L{l}.shared_expert" for l in moe] if shared else [])
    wins = windows(model, texts, seq_len, max_tokens)

    def maxima():
        M = {n: 0.0 for n in names}
        probes = [apply_fn(n, _max_probe(M, n)) for n in names]
        for _, ids in _share(wins, batch_size):
            model.run(ids.to(model.device), interventions=probes, stop_at="auto")
        return M

    parts = D.per_rank(maxima)
    M = {n: max(p[n] for p in parts) for n in names}
    limit = layer_fraction * d.n_layers
    pool = [n for n in names if int(n[1:n.index(".")]) < limit]
    vals = torch.tensor([M[n] for n in pool], dtype=torch.float64)
    cut = float(torch.quantile(vals, percentile / 100)) if len(pool) else float("inf")
    top = float(vals.max()) if len(pool) else 0.0
    flagged = sorted([n for n in pool if M[n] > cut and M[n] > max_fraction * top], key=lambda n: -M[n])
    sup = [{"site": n, "layer": int(n[1:n.index(".")]), "value": M[n],
            "expert": None if n.endswith("shared_expert") else int(n.rsplit("expert", 1)[1])} for n in flagged]
    settings = {"percentile": percentile, "max_fraction": max_fraction, "layer_fraction": layer_fraction,
                "layers_searched": [l for l in moe if l < limit], "threshold_percentile": cut,
                "threshold_max": max_fraction * top, "seq_len": seq_len,
                "tokens": sum(w.numel() for w in wins), "prune_tokens": prune_tokens}
    baseline, pruning = {}, []
    if prune and sup:
        held = heldout if heldout is not None else texts

        def measure(ivs):
            ppl = perplexity(model, held, seq_len, batch_size, prune_tokens, interventions=ivs).ppl
            sink = attention_sinks(model, held, ivs, seq_len=seq_len, batch_size=batch_size,
                                   max_tokens=prune_tokens).settings["mean_first_mass"]
            return ppl, sink
        prunes = []
        for s in sup[:max_prune]:
            prunes.append((s, "zero", zero(s["site"])))
            if s["expert"] is not None:
                prunes.append((s, "router_mask", router_mask(s["layer"], s["expert"])))
        # independent measurements: dealt over the ranks under torchrun
        (baseline["ppl"], baseline["sink"]), *measured = D.each(
            [lambda: measure([])] + [lambda iv=iv: measure([iv]) for _, _, iv in prunes])
        for (s, mode, _), (ppl, sink) in zip(prunes, measured):
            pruning.append({"site": s["site"], "mode": mode, "ppl": ppl, "ppl_change": ppl - baseline["ppl"],
                            "sink": sink, "sink_change": sink - baseline["sink"]})
    settings.update(super=sup, pruning=pruning, baseline=baseline)
    scores = Scores(torch.tensor([M[n] for n in names]), names, "super_experts", metric="max |expert output|",
                    settings=settings, **_provenance(model))
    return SuperExperts(scores, sup, pruning, baseline, settings)
