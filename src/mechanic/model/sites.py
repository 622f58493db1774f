"""Site: the one canonical, parseable name for a place in a model (used in code, JSON, reports, CLI)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Kinds that live in a layer and take no index.
LAYER_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "router")
# Kinds outside the layers.
GLOBAL_KINDS = ("embed", "final", "logits")
HEAD_PARTS = ("q", "k", "v", "z", "pattern")

GRAMMAR = """site := embed | final | logits | L<layer>.<part>
part := resid_pre | resid_mid | resid_post | attn_out | mlp_out | router
      | head[<h>][.q|.k|.v|.z|.pattern]
      | neuron[<j>]
      | expert[<e>][.neuron[<j>]]
      | shared_expert[.neuron[<j>]]
An index left out means "all of them" (e.g. L3.head is every head of layer 3)."""

_LAYER_RE = re.compile(
    r"^L(?P<layer>\d+)\.(?:"
    r"(?P<plain>resid_pre|resid_mid|resid_post|attn_out|mlp_out|router)"
    r"|head(?P<head>\d+)?(?:\.(?P<part>q|k|v|z|pattern))?"
    r"|(?P<shared>shared_expert)(?P<sneuron>\.neuron(?P<sj>\d+)?)?"
    r"|expert(?P<expert>\d+)?(?P<eneuron>\.neuron(?P<ej>\d+)?)?"
    r"|neuron(?P<neuron>\d+)?"
    r")$"
)


class SiteError(ValueError):
    """A site string that does not parse, or an index out of range."""


def _int(text: str | None) -> int | None:
    return None if text is None else int(text)


@dataclass(frozen=True, order=True)
class Site:
    """A place in the model: kind (resid_pre, head, neuron, expert, ...), layer and optional indices.

    `index` is the head, neuron or expert number (None = all); `neuron` is the neuron inside an
    expert; `part` is a head internal (q, k, v, z, pattern).
    """

    kind: str
    layer: int | None = None
    index: int | None = None
    part: str | None = None
    neuron: int | None = None

    @classmethod
    def parse(cls, text: str | Site) -> Site:
        """Parse the canonical string form, e.g. `L3.head4.z` or `L10.neuron512`."""
        if isinstance(text, Site):
            return text
        text = str(text).strip()
        if text in GLOBAL_KINDS:
            return cls(text)
        m = _LAYER_RE.match(text)
        if not m:
            raise SiteError(f"Cannot parse site {text!r}. Sites follow this grammar:\n{GRAMMAR}\n"
                            "Examples: 'L3.resid_post', 'L5.head2', 'L0.neuron17', 'L1.expert3.neuron5'.")
        layer = int(m["layer"])
        if m["plain"]:
            return cls(m["plain"], layer)
        if m["shared"]:
            if m["sneuron"]:
                return cls("shared_expert_neuron", layer, _int(m["sj"]))
            return cls("shared_expert", layer)
        if text.split(".", 2)[1].startswith("head"):
            return cls("head", layer, _int(m["head"]), m["part"])
        if text.split(".", 2)[1].startswith("expert"):
            if m["eneuron"]:
                return cls("expert_neuron", layer, _int(m["expert"]), neuron=_int(m["ej"]))
            return cls("expert", layer, _int(m["expert"]))
        return cls("neuron", layer, _int(m["neuron"]))

    def __str__(self) -> str:
        k = self.kind
        if k in GLOBAL_KINDS:
            return k
        prefix = f"L{self.layer}."
        idx = "" if self.index is None else str(self.index)
        if k in LAYER_KINDS:
            return prefix + k
        if k == "head":
            return prefix + f"head{idx}" + (f".{self.part}" if self.part else "")
        if k == "neuron":
            return prefix + f"neuron{idx}"
        if k == "expert":
            return prefix + f"expert{idx}"
        if k == "expert_neuron":
            n = "" if self.neuron is None else str(self.neuron)
            return prefix + f"expert{idx}.neuron{n}"
        if k == "shared_expert":
            return prefix + "shared_expert"
        if k == "shared_expert_neuron":
            return prefix + f"shared_expert.neuron{idx}"
        raise SiteError(f"Unknown site kind {k!r}")

    def __repr__(self) -> str:
        return f"Site({str(self)!r})"

    def with_index(self, index: int | None) -> Site:
        """The same site with another head/neuron/expert index."""
        return Site(self.kind, self.layer, index, self.part, self.neuron)


def as_site(site: str | Site) -> Site:
    """Accept a Site or its string form."""
    return Site.parse(site)
