"""Site kinds as one table: each entry says how a kind is written, checked, shaped and hooked.

Adding a kind is one `Kind(...)` entry in `KINDS`: `syntax` is the regex of the text after
`L<layer>.` (the whole text for a kind outside the layers) with named groups that `fields` turns
into Site fields, `text` writes it back, `check` validates it against a model (after the layer
range), `shape` gives its tensor shape, and `hook` says where the engine reads and changes it: a
hook-point key (see `mechanic.model.hooks._Session.bucket`) and a view from the hooked tensor to
the site's tensor (a view, so writes go through).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from mechanic.model.dictsites import DictView
from mechanic.model.sites import FEATURE_BASES, Site, SiteError

Fields = Callable[[dict], dict]


@dataclass(frozen=True)
class Hook:
    """Where a site lives in the engine: a hook-point key and a view of the hooked tensor."""

    key: tuple
    view: Callable = lambda t: t


@dataclass(frozen=True)
class Kind:
    """One site kind: grammar, range check, shape and hook point."""

    name: str
    syntax: str
    text: Callable[[Site], str]
    hook: Callable[[object, Site], Hook]           # (hooks._Session, site) -> Hook
    shape: Callable[[object, Site, object, object], tuple]   # (model, site, batch, seq) -> shape
    check: Callable[[object, Site], None] = lambda model, s: None
    fields: Fields = lambda g: {}
    layered: bool = True

    def __post_init__(self):
        full = rf"^L(?P<layer>\d+)\.(?:{self.syntax})$" if self.layered else rf"^(?:{self.syntax})$"
        object.__setattr__(self, "regex", re.compile(full))


def _int(text: str | None) -> int | None:
    return None if text is None else int(text)


def _idx(value: int | None) -> str:
    return "" if value is None else str(value)


def check_range(site: Site, value: int | None, size: int | None, what: str) -> None:
    """A SiteError naming the valid range unless `value` is None or in 0..size-1."""
    if value is not None and not (size and 0 <= value < size):
        raise SiteError(f"{what.capitalize()} {value} in {site} is out of range: valid {what}s are "
                        f"0..{(size or 0) - 1}.")


def _pick(i: int | None):
    return (lambda t: t) if i is None else (lambda t: t[..., i])


def _lead(batch, seq, *rest) -> tuple:
    return (batch, seq) + tuple(rest)


def _some(i: int | None, n) -> tuple:
    return (n,) if i is None else ()


# ---------------------------------------------------------------- checks
def _dense(model, s: Site) -> None:
    if model.is_moe(s.layer):
        raise SiteError(f"{s}: layer {s.layer} is a mixture-of-experts layer; name an expert's neuron, "
                        f"e.g. L{s.layer}.expert0.neuron{s.index or 0}.")
    check_range(s, s.index, model.dims.d_mlp, "neuron")


def _moe(model, s: Site) -> None:
    if not model.is_moe(s.layer):
        raise SiteError(f"{s}: layer {s.layer} is not a mixture-of-experts layer.")
    if s.kind.startswith("shared") and not model.arch.shared_expert:
        raise SiteError(f"{s}: this architecture has no shared expert.")
    if s.kind in ("expert", "expert_neuron"):
        check_range(s, s.index, model.dims.n_experts, "expert")
    if s.kind == "expert_neuron":
        check_range(s, s.neuron, model.dims.d_expert, "neuron")
    if s.kind == "shared_expert_neuron":
        check_range(s, s.index, model.dims.d_shared, "neuron")


def _serial(model, s: Site) -> None:
    if model.parallel:
        raise SiteError(f"{s}: this model uses a parallel residual (attention and MLP both read resid_pre), "
                        "so there is no resid_mid. Use resid_pre, attn_out or mlp_out.")


# ---------------------------------------------------------------- hooks
def _head_hook(se, s: Site) -> Hook:
    if s.part in ("q", "k", "v", "pattern"):
        return Hook(("attn_fn", s.layer))
    if s.part is None:
        return Hook(("heads", s.layer))
    d, h = se.model.dims, s.index

    def z(t):
        v = t.view(*t.shape[:-1], d.n_heads, d.d_head)
        return v if h is None else v[..., h, :]
    return Hook(("lpre", s.layer, se.model.arch.o_proj), z)


def _flat_rows(se, view):
    """The MoE block runs a shared expert on flattened [tokens, d] rows: view them as [batch, pos, d]."""
    return lambda t: view(t.view(se.batch_size, -1, *t.shape[1:]) if t.dim() == 2 else t)


def _head_shape(m, s: Site, batch, seq) -> tuple:
    d = m.dims
    if s.part == "pattern":
        return (batch, seq) + _some(s.index, d.n_heads) + (seq,)
    return _lead(batch, seq, *_some(s.index, d.n_heads), d.d_model if s.part is None else d.d_head)


def _d_model(m, s, batch, seq) -> tuple:
    return _lead(batch, seq, m.dims.d_model)


def _plain(name: str, key: Callable[[object, Site], tuple], check=lambda model, s: None) -> Kind:
    """A layer kind without an index whose hooked tensor is the site (residual writes and states)."""
    return Kind(name, re.escape(name), lambda s: name, lambda se, s: Hook(key(se, s)), _d_model, check)


def _global(name: str, path: Callable, width: Callable) -> Kind:
    return Kind(name, re.escape(name), lambda s: name, lambda se, s: Hook(("fwd", path(se.model.arch))),
                lambda m, s, b, p: _lead(b, p, width(m.dims)), layered=False)


# ---------------------------------------------------------------- dictionary sites
def codec_at(model, s: Site):
    """The dictionary attached at a dictionary site's base, or a SiteError saying how to attach one."""
    base = f"L{s.layer}.{s.part}"
    codec = model.dictionary(base)
    if codec is None:
        have = ", ".join(model.dictionaries) or "none"
        raise SiteError(f"{s}: no dictionary is attached at {base} (attached: {have}). Attach one first with "
                        "mechanic.features.attach(model, dictionary); a transcoder is attached at the site it writes.")
    return codec


def _dict_check(model, s: Site) -> None:
    codec = codec_at(model, s)
    if s.kind == "sae":
        check_range(s, s.index, codec.width, "feature")


def _dict_hook(se, s: Site) -> Hook:
    codec = codec_at(se.model, s)
    base = Site.parse(codec.site)
    where = kind_of(base).hook(se, base)
    source = None
    if codec.source is not None:
        src = Site.parse(codec.source)
        source = (str(src), kind_of(src).hook(se, src))
    return Hook(where.key, DictView(codec, s.kind, s.index, where.view, source))


def _dict_shape(m, s: Site, batch, seq) -> tuple:
    if s.kind == "sae_error":
        return m.shape(f"L{s.layer}.{s.part}", batch, seq)
    return _lead(batch, seq, *_some(s.index, codec_at(m, s).width))


_BASES = "|".join(re.escape(b) for b in FEATURE_BASES)


def kind_of(site: Site) -> Kind:
    """The table entry of a site's kind."""
    return BY_NAME[site.kind]


KINDS: list[Kind] = [
    _global("embed", lambda a: a.embed, lambda d: d.d_model),
    _global("final", lambda a: a.final_norm, lambda d: d.d_model),
    _global("logits", lambda a: a.unembed, lambda d: d.vocab),
    _plain("resid_pre", lambda se, s: ("pre", s.layer)),
    _plain("resid_mid", lambda se, s: ("mid", s.layer), _serial),
    _plain("resid_post", lambda se, s: ("post", s.layer)),
    _plain("attn_out", lambda se, s: ("attn", s.layer)),
    _plain("mlp_out", lambda se, s: ("mlp", s.layer)),
    _plain("mlp_in", lambda se, s: ("lpre", s.layer, se.model.arch.mlp)),
    Kind("router", "router", lambda s: "router", lambda se, s: Hook(("experts", s.layer)),
         lambda m, s, b, p: _lead(b, p, m.dims.n_experts), _moe),
    Kind("head", r"head(?P<h>\d+)?(?:\.(?P<part>q|k|v|z|pattern))?",
         lambda s: f"head{_idx(s.index)}" + (f".{s.part}" if s.part else ""), _head_hook, _head_shape,
         lambda m, s: check_range(s, s.index, m.dims.n_heads, "head"),
         lambda g: {"index": _int(g["h"]), "part": g["part"]}),
    Kind("neuron", r"neuron(?P<j>\d+)?", lambda s: f"neuron{_idx(s.index)}",
         lambda se, s: Hook(("lpre", s.layer, se.model.arch.down_proj), _pick(s.index)),
         lambda m, s, b, p: _lead(b, p, *_some(s.index, m.dims.d_mlp)), _dense, lambda g: {"index": _int(g["j"])}),
    Kind("expert", r"expert(?P<e>\d+)?", lambda s: f"expert{_idx(s.index)}", lambda se, s: Hook(("experts", s.layer)),
         lambda m, s, b, p: _lead(b, p, *_some(s.index, m.dims.n_experts), m.dims.d_model), _moe,
         lambda g: {"index": _int(g["e"])}),
    Kind("expert_neuron", r"expert(?P<e>\d+)?\.neuron(?P<j>\d+)?",
         lambda s: f"expert{_idx(s.index)}.neuron{_idx(s.neuron)}", lambda se, s: Hook(("experts", s.layer)),
         lambda m, s, b, p: _lead(b, p, *_some(s.index, m.dims.n_experts), *_some(s.neuron, m.dims.d_expert)),
         _moe, lambda g: {"index": _int(g["e"]), "neuron": _int(g["j"])}),
    Kind("shared_expert", "shared_expert", lambda s: "shared_expert",
         lambda se, s: Hook(("lfwd", s.layer, se.model.arch.shared_expert), _flat_rows(se, lambda t: t)),
         _d_model, _moe),
    Kind("shared_expert_neuron", r"shared_expert\.neuron(?P<j>\d+)?", lambda s: f"shared_expert.neuron{_idx(s.index)}",
         lambda se, s: Hook(("lpre", s.layer, f"{se.model.arch.shared_expert}.down_proj"),
                            _flat_rows(se, _pick(s.index))),
         lambda m, s, b, p: _lead(b, p, *_some(s.index, m.dims.d_shared)), _moe, lambda g: {"index": _int(g["j"])}),
    Kind("sae", rf"(?P<base>{_BASES})\.sae(?P<f>\d+)?", lambda s: f"{s.part}.sae{_idx(s.index)}", _dict_hook,
         _dict_shape, _dict_check, lambda g: {"index": _int(g["f"]), "part": g["base"]}),
    Kind("sae_error", rf"(?P<base>{_BASES})\.sae_error", lambda s: f"{s.part}.sae_error", _dict_hook,
         _dict_shape, _dict_check, lambda g: {"part": g["base"]}),
]
BY_NAME = {k.name: k for k in KINDS}
