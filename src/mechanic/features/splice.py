"""Splice a dictionary into the model: replace what it reads/writes by its reconstruction (optionally + error term).

An SAE at an engine site (resid, attn_out, mlp_out, head.z, neuron) is one run with a `fn`
intervention. An SAE at `mlp_in`, and any transcoder, take two runs: a truncated one reads the
input (and the original output), then the MLP output is replaced by the new value (an SAE at mlp_in
runs the MLP module itself on the reconstruction, then any post-MLP norm). With `error_term=True` the error
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


def _mlp(model, layer: int):
    return model.layer_module(layer, model.arch.mlp)


@torch.no_grad()
def read(model, ids, sites: list[str], stop: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Values [batch, pos, ...] of dictionary sites from one truncated run, plus the MLP calls captured for mlp_in."""
    engine = [s for s in sites if parse_site(s)[1] != "mlp_in"]
    paths = {s: f"{model.arch.layers}.{parse_site(s)[0]}.{model.arch.mlp}" for s in sites if parse_site(s)[1] == "mlp_in"}
    stop = max(parse_site(s)[0] for s in sites) if stop is None else stop
    run = model.run(ids, cache=engine, capture_calls=list(paths.values()), stop_at=stop)
    out, calls = {}, {}
    for s in sites:
        if s in paths:
            args, kwargs = run.calls[paths[s]][0]
            out[s] = args[0] if args else kwargs["hidden_states"]
            calls[s] = (args, kwargs)
        else:
            out[s] = run.cache[s]
    return out, calls


@torch.no_grad()
def spliced_logits(model, d: Dictionary, ids: torch.Tensor, fn: Replace, skip_first: int = 1) -> torch.Tensor:
    """Logits [batch, pos, vocab] with the dictionary's site(s) replaced through `fn`."""
    if d.site is None:
        raise FeaturesError("The dictionary has no site; load it with site= to splice it into a model.")
    pos = slice(skip_first, None)
    layer, kind = parse_site(d.site)
    if not d.transcoder and kind != "mlp_in":
        return model.run(ids, interventions=[apply_fn(_engine(d.site), lambda v: fn(v, v), pos=pos)]).logits
    if d.transcoder:
        out_layer, out_kind = parse_site(d.out_site)
        if out_kind == "mlp_in":
            raise FeaturesError(f"A transcoder writing to {d.out_site} cannot be spliced in (the MLP input is "
                                "read, not replaced, by the engine); write to mlp_out.")
        vals, _ = read(model, ids, [d.site, d.out_site])
        new = fn(vals[d.site], vals[d.out_site])
        target = d.out_site
    else:   # an SAE on the MLP input: run the MLP itself on the reconstruction
        vals, calls = read(model, ids, [d.site])
        x = vals[d.site]
        args, kwargs = calls[d.site]
        new_in = fn(x, x)
        mlp = _mlp(model, layer)
        new = mlp(new_in, *args[1:], **kwargs) if args else mlp(*args, **{**kwargs, "hidden_states": new_in})
        new = new[0] if isinstance(new, tuple) else new
        if model.arch.mlp_write != model.arch.mlp:   # e.g. Gemma 2's post-MLP norm sits between the MLP and mlp_out
            new = model.layer_module(layer, model.arch.mlp_write)(new)
        target = f"L{layer}.mlp_out"
    return model.run(ids, interventions=[replace(_engine(target), new[:, skip_first:], pos=pos)]).logits


def _engine(site: str) -> str:
    """The engine's name for a dictionary site (`L3.head.z` reads all heads' z)."""
    return site
