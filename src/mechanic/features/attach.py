"""Attach a Dictionary to a Model: its latents become the sites `<site>.sae[f]` and its error `<site>.sae_error`.

    from mechanic.features import attach, load
    attach(model, load("runs/sae/L6.resid_post.topk"))       # the site it hangs off: L6.resid_post
    run = model.run(ids, cache=["L6.resid_post.sae", "L6.resid_post.sae_error"])
    model.run(ids, interventions=[zero("L6.resid_post.sae17")])   # ablate latent 17

An SAE is attached at the site it reads and reconstructs; a transcoder at the site it writes (its
`out_site`, e.g. L3.mlp_out), encoding the value of its input site (e.g. L3.mlp_in) read earlier
in the same forward. See mechanic.model.dictsites for what the engine does with it.
"""

from __future__ import annotations

from typing import Callable

import torch

from mechanic.features.dictionary import Dictionary
from mechanic.features.errors import FeaturesError
from mechanic.model.hooks import frozen_parameters
from mechanic.model.sites import Site


class DictionaryCodec:
    """A Dictionary as the engine's Codec (mechanic.model.dictsites.Codec)."""

    def __init__(self, dictionary: Dictionary):
        d = dictionary
        self.dictionary = d
        self.site, self.source = (d.out_site, d.site) if d.transcoder else (d.site, None)
        self.width = d.d_sae

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """(latents of x, decode) where decode(latents) is the reconstruction, skip term included."""
        d = self.dictionary
        with torch.no_grad():
            acts = d.encode(x)
            state = d._norm_state          # the input's normalisation scale, which decode undoes
            skip = d.skip(x)

        def decode(a: torch.Tensor) -> torch.Tensor:
            d._norm_state = state
            with frozen_parameters(d):               # gradients reach the latents, never the dictionary's weights
                return d.decode(a) + skip
        return acts, decode

    def __repr__(self) -> str:
        return f"DictionaryCodec({self.dictionary!r})"


def attach(model, dictionary: Dictionary) -> Site:
    """Attach `dictionary` to `model` (widths checked); returns the site its latents and error hang off."""
    if not isinstance(dictionary, Dictionary):
        raise FeaturesError(f"attach() takes a mechanic.features.Dictionary (load one with mechanic.features.load), "
                            f"got {type(dictionary).__name__}.")
    dictionary.check(model)
    return model.attach(DictionaryCodec(dictionary))


def detach(model, site: str | Site) -> Dictionary:
    """Remove the dictionary attached at `site`; returns it."""
    codec = model.detach(site)
    return getattr(codec, "dictionary", codec)


def attached(model, site: str | Site) -> Dictionary:
    """The Dictionary attached at `site` (the base site, or any of its `.sae[f]` / `.sae_error` sites)."""
    s = Site.parse(site)
    base = f"L{s.layer}.{s.part}" if s.kind in ("sae", "sae_error") else str(s)
    codec = model.dictionary(base)
    if codec is None:
        raise FeaturesError(f"No dictionary is attached at {base} (attached: {', '.join(model.dictionaries) or 'none'}); "
                            "attach one with mechanic.features.attach(model, dictionary).")
    return getattr(codec, "dictionary", codec)
