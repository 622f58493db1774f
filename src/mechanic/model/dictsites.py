"""Dictionary sites in the engine: the Codec protocol a sparse dictionary implements, and its hook-point step.

A dictionary attached at a base site (`model.attach(codec)`; mechanic.features.attach makes the
codec) adds two site kinds there: `<base>.sae[f]`, its latents, and `<base>.sae_error`, the base
value minus the reconstruction. At the base site's hook point the engine encodes the value (or, for
a transcoder, the value of its `source` site, read earlier in the same forward), applies the
interventions on latents and error, and writes back

    x' = x + (decode(latents') - decode(latents)) + (error' - error)

so a run that only reads features (or changes nothing) leaves x bit for bit as it was, and a
change reaches the model exactly through the decoder. In a gradient run the latents and the error
are leaves of the graph: d metric / d latents = J_decode^T g and d metric / d error = g, where g is
the gradient at the base site; sites upstream get g unchanged (as without the dictionary), so
attributions over latents and error add up to the base site's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch


@runtime_checkable
class Codec(Protocol):
    """What the engine needs of a sparse dictionary (mechanic.features.attach builds one from a Dictionary)."""

    site: str                  # the engine site whose value it reconstructs, e.g. "L6.resid_post"
    source: str | None         # the engine site it encodes when that is not `site` (a transcoder's input)
    width: int                 # number of latents

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """(latents [..., width] of the input x, decode: latents -> reconstruction [..., d_out] in float)."""


@dataclass(frozen=True)
class DictView:
    """A request for a dictionary site at its base hook point: latents (index f or all) or the error."""

    codec: Codec
    part: str                   # "sae" or "sae_error"
    index: int | None
    base: Callable              # view of the hooked tensor as the base site's tensor
    source: tuple | None = None  # (name, Hook) of the codec's source site, when it has one


class DictPoint:
    """The dictionary step of one hook point: interventions on latents and error, then reads."""

    def __init__(self, view: DictView):
        self.codec, self.base = view.codec, view.base
        self.source = None if view.source is None else view.source[0]   # name of the tapped source site
        self.ivs: list[tuple[str, Callable, object]] = []
        self.reads: list[tuple[str, str, Callable]] = []

    def add(self, name: str, view: DictView, iv=None) -> None:
        pick = (lambda t: t) if view.index is None else (lambda t, f=view.index: t[..., f])
        if iv is not None:
            self.ivs.append((view.part, pick, iv))
        else:
            self.reads.append((name, view.part, pick))

    def writes(self, grad: bool) -> bool:
        """Whether this step replaces the hooked tensor (a change, or gradients through its leaves)."""
        return bool(self.ivs) or (grad and bool(self.reads))

    def process(self, t: torch.Tensor, session) -> torch.Tensor:
        x = self.base(t)
        if self.source is None:
            src = x
        elif self.source in session.taps:
            src = session.taps[self.source]
        else:
            raise RuntimeError(f"The dictionary at {self.codec.site} reads {self.codec.source}, which the model did "
                               "not compute before it in this forward; the architecture map does not match.")
        with torch.no_grad():
            a, decode = self.codec.split(src.detach())
            rec = decode(a).reshape(x.shape)
            err = x.detach().to(rec.dtype) - rec
        A, E = a, err
        if self.ivs:
            A, E = a.clone(), err.clone()
            for part, pick, iv in self.ivs:
                v = pick(A if part == "sae" else E)
                idx = session.where(v, iv)
                if idx is not None:
                    v[idx] = iv.apply(v[idx])
        grad = session.grad and bool(self.reads)
        if grad:
            A, E = A.detach().requires_grad_(), E.detach().requires_grad_()
        for name, part, pick in self.reads:
            leaf = A if part == "sae" else E
            session.store(name, pick(leaf), leaf, pick)
        if not self.writes(session.grad):
            return t
        delta = (decode(A).reshape(x.shape) - rec) + (E - err)
        return (x + delta.to(x.dtype)).reshape(t.shape)
