"""Site: the one canonical, parseable name for a place in a model (used in code, JSON, reports, CLI)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

# Kinds that live in a layer and take no index.
LAYER_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_in", "router")
# Kinds outside the layers.
GLOBAL_KINDS = ("embed", "final", "logits")
HEAD_PARTS = ("q", "k", "v", "z", "pattern")

# Sites a sparse dictionary can be attached at (its latents are <base>.sae[<f>]).
FEATURE_BASES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_in", "head.z", "neuron")

GRAMMAR = """site := embed | final | logits | L<layer>.<part>
part := resid_pre | resid_mid | resid_post | attn_out | mlp_out | mlp_in | router
      | head[<h>][.q|.k|.v|.z|.pattern]
      | neuron[<j>]
      | expert[<e>][.neuron[<j>]]
      | shared_expert[.neuron[<j>]]
      | <base>.sae[<f>] | <base>.sae_error
base := resid_pre | resid_mid | resid_post | attn_out | mlp_out | mlp_in | head.z | neuron
An index left out means "all of them" (e.g. L3.head is every head of layer 3). mlp_in is the MLP
block's input (after its norm).
<base>.sae<f> is latent f of the sparse dictionary attached at L<layer>.<base> (mechanic.features.attach;
for a transcoder, the site it writes), <base>.sae_error its reconstruction error (base value minus
reconstruction), so that reconstruction + error is the base value."""


class SiteError(ValueError):
    """A site string that does not parse, or an index out of range."""


@dataclass(frozen=True, order=True)
class Site:
    """A place in the model: kind (resid_pre, head, neuron, expert, ...), layer and optional indices.

    `index` is the head, neuron, expert or dictionary-latent number (None = all); `neuron` is the
    neuron inside an expert; `part` is a head internal (q, k, v, z, pattern), or for the dictionary
    kinds `sae` and `sae_error` the base site part they sit at (`resid_post`, `head.z`, ...).
    """

    kind: str
    layer: int | None = None
    index: int | None = None
    part: str | None = None
    neuron: int | None = None

    @classmethod
    def parse(cls, text: str | Site) -> Site:
        """Parse the canonical string form, e.g. `L3.head4.z`, `L10.neuron512` or `L6.resid_post.sae17`."""
        if isinstance(text, Site):
            return text
        text = str(text).strip()
        for kind in _kinds():
            m = kind.regex.match(text)
            if m:
                g = m.groupdict()
                layer = int(g["layer"]) if kind.layered else None
                return cls(kind.name, layer, **kind.fields(g))
        raise SiteError(f"Cannot parse site {text!r}. Sites follow this grammar:\n{GRAMMAR}\n"
                        "Examples: 'L3.resid_post', 'L5.head2', 'L0.neuron17', 'L1.expert3.neuron5', "
                        "'L6.resid_post.sae17'.")

    def __str__(self) -> str:
        kind = _kinds_by_name().get(self.kind)
        if kind is None:
            raise SiteError(f"Unknown site kind {self.kind!r}")
        return f"L{self.layer}.{kind.text(self)}" if kind.layered else kind.text(self)

    def __repr__(self) -> str:
        return f"Site({str(self)!r})"

    def with_index(self, index: int | None) -> Site:
        """The same site with another head/neuron/expert index."""
        return Site(self.kind, self.layer, index, self.part, self.neuron)


def as_site(site: str | Site) -> Site:
    """Accept a Site or its string form."""
    return Site.parse(site)


@cache
def _kinds() -> tuple:
    """The site-kind table (mechanic.model.kinds), imported on first use: its entries build Sites."""
    from mechanic.model.kinds import KINDS

    return tuple(KINDS)


@cache
def _kinds_by_name() -> dict:
    from mechanic.model.kinds import BY_NAME

    return BY_NAME
