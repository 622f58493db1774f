"""Splice a dictionary into the model: replace what it reads/writes by its reconstruction (optionally + error term).

An SAE (every dictionary site, mlp_in included, is an engine site) is one run with a `fn`
intervention. A transcoder takes two runs: a truncated one reads its input and the original
output, then the output site is replaced by the new value. (With the dictionary attached, the
engine's own sites do the same: zero-ablating `<site>.sae_error` is this splice; see
mechanic.features.attach.) With `error_term=True` the error
(original - reconstruction) is added back, so the spliced model equals the original up to float error;
that is the check that the splice itself is exact. Positions before `skip_first` are left untouched.
"""

from __future__ import annotations

from typing import Callable

import torch

from mechanic.features.dictionary import Dictionary
from mechanic.features.errors import FeaturesError
from mechanic.features.hooknames import parse_site
from mechanic.model.interventions import apply_fn, replace

Replace = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (input value, original output) -> new output


def reconstruction(d: Dictionary, error_term: bool = False) -> Replace:
    """The dictionary's output in place of the original (plus the error term if asked)."""
    def fn(x, y):
        out = d(x).reshape(y.shape)
        if not error_term:
            return out.to(y.dtype)
        # out + (y - out) in float64 rounds back to y exactly; in float32 it drifts by eps * |y|, which the
        # residual's massive activations (|y| ~ 1e3) turn into logit changes of 1e-4
        out = out.double()
        return (out + (y.double() - out)).to(y.dtype)
    return fn


def zero_ablation(x, y):
    """The written value set to zero (the CE-recovered baseline)."""
    return torch.zeros_like(y)


@torch.no_grad()
def read(model, ids, sites: list[str], stop: int | None = None) -> dict[str, torch.Tensor]:
    """Values [batch, pos, ...] of dictionary sites from one truncated run."""
    stop = max(parse_site(s)[0] for s in sites) if stop is None else stop
    run = model.run(ids, cache=list(sites), stop_at=stop)
    return {s: run.cache[s] for s in sites}


@torch.no_grad()
def spliced_logits(model, d: Dictionary, ids: torch.Tensor, fn: Replace, skip_first: int = 1) -> torch.Tensor:
    """Logits [batch, pos, vocab] with the dictionary's site(s) replaced through `fn`."""
    if d.site is None:
        raise FeaturesError("The dictionary has no site; load it with site= to splice it into a model.")
    pos = slice(skip_first, None)
    if not d.transcoder:
        return model.run(ids, interventions=[apply_fn(d.site, lambda v: fn(v, v), pos=pos)]).logits
    vals = read(model, ids, [d.site, d.out_site])
    new = fn(vals[d.site], vals[d.out_site])
    return model.run(ids, interventions=[replace(d.out_site, new[:, skip_first:], pos=pos)]).logits
