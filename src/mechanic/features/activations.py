"""Activations for dictionaries: text -> token windows -> truncated forwards -> a shuffling buffer of bounded size.

One forward reads every site any dictionary needs and stops after the deepest of them, so many
dictionaries (e.g. one per layer) train from one pass over the text. The buffer holds at most
`capacity` + one forward's tokens: it is filled, shuffled, half of it is handed out in batches and
the other half kept and mixed with the next fill (the usual SAE activation store, in constant memory).
The first `skip_first` positions of every window are dropped (the first token's residual is an
attention-sink outlier, not text).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from mechanic import distributed as D
from mechanic.features.errors import FeaturesError
from mechanic.features.hooknames import parse_site, site_width


def text_windows(model, text, split: str, seq_len: int) -> Iterator[torch.Tensor]:
    """Windows from `text`: token ids (a LongTensor, cut into seq_len rows) or anything corpus.passages reads,
    joined and cut by mechanic.data.windows (the tail shorter than seq_len is dropped)."""
    from mechanic.data.windows import stream_windows

    if isinstance(text, torch.Tensor) and text.dtype not in (torch.long, torch.int32, torch.int64):
        raise FeaturesError(f"Token ids must be an integer tensor, got {text.dtype}.")
    if not isinstance(text, torch.Tensor) and model.tokenizer is None:
        raise FeaturesError("This model has no tokenizer, so it cannot read text; give token windows instead.")
    if seq_len < 2:
        raise FeaturesError(f"seq_len must be at least 2, got {seq_len}.")
    if isinstance(text, torch.Tensor):
        return stream_windows(model, text, seq_len)
    from mechanic.features.corpus import passages

    return stream_windows(model, passages(text, split), seq_len, chunk=64)


def _mlp_path(model, layer: int) -> str:
    return f"{model.arch.layers}.{layer}.{model.arch.mlp}"


class SiteReader:
    """Reads dictionary sites (engine sites, plus `mlp_in` as the MLP module's call input) in one truncated forward."""

    def __init__(self, model, sites: Iterable[str], skip_first: int = 1):
        self.model = model
        self.sites = list(dict.fromkeys(sites))
        self.widths = {s: site_width(model, s) for s in self.sites}
        self.skip_first = skip_first
        self.engine = [s for s in self.sites if parse_site(s)[1] != "mlp_in"]
        self.capture = {s: _mlp_path(model, parse_site(s)[0]) for s in self.sites if parse_site(s)[1] == "mlp_in"}
        self.stop = max(parse_site(s)[0] for s in self.sites)

    @torch.no_grad()
    def read(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """{site: [rows * (seq - skip_first), width]} for a [rows, seq] batch of token windows (float32)."""
        run = self.model.run(ids, cache=self.engine, capture_calls=list(self.capture.values()), stop_at=self.stop)
        out = {}
        for s in self.sites:
            if s in self.capture:
                args, kwargs = run.calls[self.capture[s]][0]
                t = args[0] if args else kwargs["hidden_states"]
            else:
                t = run.cache[s]
            t = t.reshape(*t.shape[:2], -1)[:, self.skip_first:]
            out[s] = t.reshape(-1, t.shape[-1]).float()
        return out

    def read_split(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """read() of every window, each torch.distributed rank running a contiguous block of them; the rows are
        joined in window order on every rank (all_gather), so every rank holds what one process would read."""
        if not D.active():
            return self.read(ids)
        part, mine = D.shard(ids), {}
        D.run(lambda: mine.update(self.read(part) if len(part) else {}))   # a failing rank is named everywhere
        return {s: D.gather_rows(mine.get(s)) for s in self.sites}


class ShuffleBuffer:
    """A bounded, shuffling store of rows shared by several sites (rows stay aligned across sites)."""

    def __init__(self, widths: dict[str, int], capacity: int, generator: torch.Generator):
        self.widths, self.capacity, self.gen = widths, capacity, generator
        self.rows: dict[str, torch.Tensor] = {s: torch.empty(0, w) for s, w in widths.items()}

    def __len__(self) -> int:
        return next(iter(self.rows.values())).shape[0]

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for s in self.rows:
            self.rows[s] = torch.cat([self.rows[s], values[s]])

    def full(self) -> bool:
        return len(self) >= self.capacity

    def take_half(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Shuffle, yield batches from the first half, keep the rest (whole batches only)."""
        n = len(self)
        perm = torch.randperm(n, generator=self.gen)
        n_out = (n // 2 // batch_size) * batch_size if n >= 2 * batch_size else (n // batch_size) * batch_size
        out = {s: r[perm[:n_out]] for s, r in self.rows.items()}
        self.rows = {s: r[perm[n_out:]] for s, r in self.rows.items()}
        for i in range(0, n_out, batch_size):
            yield {s: o[i:i + batch_size] for s, o in out.items()}
