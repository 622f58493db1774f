"""Perplexity of a model on text, with interventions active, from streaming sums (bounded memory).

Text is cut into non-overlapping windows (mechanic.data.windows); every token but a window's first
is predicted from the tokens before it in that window. NLL sums accumulate in float64 batch by
batch, so any amount of text costs one batch of logits in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mechanic.data.windows import batches, windows
from mechanic.model.interventions import Intervention


@dataclass
class PerplexityResult:
    """ppl = exp(mean NLL) over `tokens` predicted tokens in `windows` windows."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    settings: dict = field(default_factory=dict)


def perplexity(model, texts, seq_len: int = 128, batch_size: int = 8, max_tokens: int | None = None,
               interventions=()) -> PerplexityResult:
    """Perplexity on `texts` (passages, or token ids), running through model.run so interventions apply."""
    ivs = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    wins = windows(model, texts, seq_len, max_tokens)
    total, count = 0.0, 0
    for ids in batches(wins, batch_size):
        logits = model.run(ids.to(model.device), interventions=ivs).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                ids[:, 1:].flatten().to(logits.device), reduction="sum")
        total += float(nll.double())
        count += ids[:, 1:].numel()
        del logits
    mean = total / count
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=count, windows=len(wins),
                            settings={"seq_len": seq_len, "batch_size": batch_size, "max_tokens": max_tokens,
                                      "interventions": len(ivs)})
