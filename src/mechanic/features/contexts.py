"""Where features fire, read in one streaming pass over text: each feature's top-k contexts, firing count and histogram.

Memory stays bounded whatever the number of tokens: per tracked feature a running top-k (value, place,
the token ids and that feature's activations around the place) merged with each batch's own top-k, and
a histogram of its nonzero activations with `BINS` bins of a power-of-two width that doubles (merging
pairs of bins) when a larger activation arrives. The final width is the smallest power of two w with
BINS * w > the feature's maximum, so the counts equal binning all activations at once with that width.
A place is window * seq_len + position (windows numbered from 0 in reading order); ties in value keep
the earlier place. Positions before `skip_first` are not read (the attention-sink token) and show as NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechanic.features.activations import SiteReader, text_windows
from mechanic.features.dictionary import Dictionary
from mechanic.features.errors import FeaturesError

BINS = 64
NOT_READ = float("nan")


@dataclass
class Scan:
    """What one pass found for the tracked `features` (every array's first axis follows `features`)."""

    features: torch.Tensor      # [F] latent ids
    tokens: int                 # positions read (activations seen per feature)
    windows: int
    seq_len: int
    count: torch.Tensor         # [F] positions where the feature fired (activation > 0)
    max: torch.Tensor           # [F] largest activation (0 if it never fired)
    total: torch.Tensor         # [F] sum of activations (float64)
    top_value: torch.Tensor     # [F, k] descending; -inf where fewer than k positive activations were seen
    top_place: torch.Tensor     # [F, k] window * seq_len + position
    top_ids: torch.Tensor       # [F, k, before + 1 + after] token ids around the place, -1 outside the window
    top_acts: torch.Tensor      # [F, k, before + 1 + after] the feature's activations there, NaN where not read
    hist: torch.Tensor          # [F, BINS] counts of nonzero activations in [i * width, (i + 1) * width)
    width: torch.Tensor         # [F] bin width (float64; 0 if it never fired)
    before: int                 # context tokens kept before the place (and top_ids' width - 1 - before after it)

    def contexts(self, i: int) -> list[tuple[float, int, list[int], list[float], int]]:
        """Feature number i's contexts, best first: (value, place, token ids, activations, index of the place in
        them), with the padding outside the window dropped."""
        out = []
        for v, p, ids, acts in zip(self.top_value[i], self.top_place[i], self.top_ids[i], self.top_acts[i]):
            if v > 0:
                keep = ids >= 0
                at = self.before - int((~keep[: self.before]).sum())
                out.append((float(v), int(p), ids[keep].tolist(), acts[keep].tolist(), at))
        return out


def bin_width(m: torch.Tensor) -> torch.Tensor:
    """The smallest power of two w with BINS * w > m (elementwise, float64; 0 where m <= 0)."""
    _, e = torch.frexp(m.double() / BINS)
    return torch.where(m > 0, torch.ldexp(torch.ones_like(m, dtype=torch.float64), e), torch.zeros_like(m, dtype=torch.float64))


def first_top(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of flat [N, F], the k largest values and their rows, the earliest rows first among equal
    positive values (topk alone may pick any of them; columns with such a tie at the cut are sorted stably)."""
    val, idx = flat.topk(k, dim=0)
    cut = val[-1]
    tied = ((flat >= cut).sum(0) > k) & (cut > 0)
    if tied.any():
        cols = tied.nonzero(as_tuple=True)[0]
        order = torch.argsort(flat[:, cols], dim=0, descending=True, stable=True)[:k]
        idx[:, cols], val[:, cols] = order, flat[:, cols].gather(0, order)
    return val, idx


class Collector:
    """Running top-k contexts, counts and histograms of the tracked features over batches of token windows."""

    def __init__(self, features: torch.Tensor, k: int, before: int, after: int, skip_first: int):
        F, W = len(features), before + 1 + after
        self.features, self.k, self.before, self.after, self.skip = features, k, before, after, skip_first
        self.count = torch.zeros(F, dtype=torch.long)
        self.max = torch.zeros(F)
        self.total = torch.zeros(F, dtype=torch.float64)
        self.top_value = torch.full((F, k), -torch.inf)
        self.top_place = torch.full((F, k), torch.iinfo(torch.long).max, dtype=torch.long)
        self.top_ids = torch.full((F, k, W), -1, dtype=torch.int32)
        self.top_acts = torch.full((F, k, W), NOT_READ)
        self.hist = torch.zeros(F, BINS, dtype=torch.long)
        self.width = torch.zeros(F, dtype=torch.float64)
        self.tokens = 0

    def add(self, ids: torch.Tensor, acts: torch.Tensor, first_window: int) -> None:
        """One batch: token windows ids [R, S] and the tracked features' activations acts [R, S - skip_first, F]."""
        R, S = ids.shape
        flat = acts.reshape(-1, acts.shape[-1])
        self.tokens += flat.shape[0]
        self._histogram(flat)
        val, idx = first_top(flat, min(self.k, flat.shape[0]))          # [kk, F]
        r, t = idx // acts.shape[1], idx % acts.shape[1] + self.skip     # window in batch, position in window
        place = (first_window + r) * S + t
        new_ids, new_acts = self._around(ids, acts, r, t)                # [kk, F, W]
        v = torch.cat([self.top_value, val.T], 1)
        p = torch.cat([self.top_place, place.T], 1)
        order = torch.argsort(p, dim=1, stable=True)                     # earlier place first among equal values
        order = order.gather(1, torch.argsort(v.gather(1, order), dim=1, descending=True, stable=True))[:, :self.k]
        self.top_value, self.top_place = v.gather(1, order), p.gather(1, order)
        W = self.top_ids.shape[-1]
        pick = order[..., None].expand(-1, -1, W)
        self.top_ids = torch.cat([self.top_ids, new_ids.transpose(0, 1)], 1).gather(1, pick)
        self.top_acts = torch.cat([self.top_acts, new_acts.transpose(0, 1)], 1).gather(1, pick)

    def _around(self, ids, acts, r, t):
        """Token ids and activations at positions t - before .. t + after of windows r (both [kk, F])."""
        S = ids.shape[1]
        s = t[..., None] + torch.arange(-self.before, self.after + 1)          # [kk, F, W]
        inside = (s >= 0) & (s < S)
        rr = r[..., None].expand_as(s)
        tok = torch.where(inside, ids[rr, s.clamp(0, S - 1)], -1).to(torch.int32)
        read = inside & (s >= self.skip)
        f = torch.arange(acts.shape[-1])[None, :, None].expand_as(s)
        a = acts[rr, (s - self.skip).clamp(0, acts.shape[1] - 1), f]
        return tok, torch.where(read, a, torch.full_like(a, NOT_READ))

    def _histogram(self, flat: torch.Tensor) -> None:
        """Count positive activations; widen (merge bin pairs) first where this batch holds a larger one."""
        bmax = flat.max(0).values.clamp_min(0)
        self.max = torch.maximum(self.max, bmax)
        fired = flat > 0
        self.count += fired.sum(0)
        self.total += flat.clamp_min(0).double().sum(0)
        need = torch.maximum(self.width, bin_width(bmax))
        grow = (need > self.width) & (self.width > 0)
        if grow.any():
            shift = torch.log2(need[grow] / self.width[grow]).round().long().clamp(max=BINS.bit_length())
            dest = (torch.arange(BINS)[None] >> shift[:, None]).clamp(max=BINS - 1)
            self.hist[grow] = torch.zeros_like(self.hist[grow]).scatter_add(1, dest, self.hist[grow])
        self.width = need
        n, f = fired.nonzero(as_tuple=True)
        if len(n):
            b = (flat[n, f].double() / self.width[f]).floor().long().clamp(max=BINS - 1)
            self.hist += torch.bincount(f * BINS + b, minlength=self.hist.numel()).view_as(self.hist)

    def result(self, windows: int, seq_len: int) -> Scan:
        return Scan(self.features, self.tokens, windows, seq_len, self.count, self.max, self.total, self.top_value,
                    self.top_place, self.top_ids, self.top_acts, self.hist, self.width, self.before)


@torch.no_grad()
def scan(model, d: Dictionary, text=None, features=None, tokens: int = 32768, k: int = 10, seq_len: int = 128,
         batch: int = 8, before: int = 24, after: int = 8, skip_first: int = 1) -> Scan:
    """Read `tokens` tokens of held-out text (default corpus held-out split, or `text`) through `d` and collect
    the top-k contexts, counts and histograms of `features` (latent ids; None = every latent)."""
    d.check(model)
    d.eval()
    if features is None:
        features = torch.arange(d.d_sae)
    features = torch.as_tensor(list(features) if not isinstance(features, torch.Tensor) else features, dtype=torch.long)
    bad = [int(f) for f in features if not 0 <= int(f) < d.d_sae]
    if bad or not len(features):
        raise FeaturesError(f"Feature ids must be in 0..{d.d_sae - 1} (this dictionary has {d.d_sae} latents); "
                            f"got {bad or 'none'}.")
    if k < 1 or before < 0 or after < 0:
        raise FeaturesError(f"Need k >= 1 contexts and non-negative context sizes, got k={k}, before={before}, "
                            f"after={after}.")
    reader = SiteReader(model, [d.site], skip_first=skip_first)
    col = Collector(features, k, before, after, skip_first)
    wins, n_win = [], 0
    windows = text_windows(model, text, "heldout", seq_len)
    budget = max(1, -(-tokens // seq_len))
    for w in windows:
        wins.append(w)
        if len(wins) == batch or n_win + len(wins) == budget:
            _batch(reader, d, col, torch.stack(wins), n_win, features)
            n_win += len(wins)
            wins = []
        if n_win == budget:
            break
    if wins:
        _batch(reader, d, col, torch.stack(wins), n_win, features)
        n_win += len(wins)
    if n_win == 0:
        raise FeaturesError(f"The text gives no window of {seq_len} tokens; give more text or a smaller seq_len.")
    return col.result(n_win, seq_len)


def _batch(reader: SiteReader, d: Dictionary, col: Collector, ids: torch.Tensor, first: int, features) -> None:
    x = reader.read(ids)[d.site]
    acts = d.encode(x).float()
    if len(features) != d.d_sae or not torch.equal(features, torch.arange(d.d_sae)):
        acts = acts[:, features]
    col.add(ids, acts.view(ids.shape[0], -1, acts.shape[-1]), first)
