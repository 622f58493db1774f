"""Feature steering as Plans: add a latent's decoder direction, clamp or scale a latent, ablate latents.

Sites are dictionary sites (`L6.resid_post.sae17`; see mechanic.model.sites.GRAMMAR). Clamping, scaling and
ablating change the latent inside the attached dictionary, so the dictionary must be attached
(mechanic.features.attach) when such a plan is applied; the rest of the site (the other latents and
the reconstruction error) is left as it was. Adding a direction is a plain add at the site the
dictionary writes, so that plan needs no dictionary to apply. All of them save, load and undo like
every Plan.
"""

from __future__ import annotations

from mechanic.features.attach import attached
from mechanic.model.interventions import Intervention, add, replace, scale
from mechanic.model.select import Pos
from mechanic.model.sites import Site, SiteError
from mechanic.steer.plan import Plan


def _latent(model, site: str | Site, need_index: bool = True) -> Site:
    s = model.check(site)
    if s.kind != "sae" or (need_index and s.index is None):
        want = "one latent, e.g. L6.resid_post.sae17" if need_index else "latents, e.g. L6.resid_post.sae17"
        raise SiteError(f"{s} is not a dictionary latent site; feature steering takes {want} "
                        "(attach the dictionary with mechanic.features.attach first).")
    return s


def _plan(model, ivs: list[Intervention], method: str, s: Site, **settings) -> Plan:
    d = attached(model, s)
    return Plan(ivs, method=method, fingerprint=model.fingerprint,
                settings={"site": str(s), "feature": s.index, "dictionary": repr(d), **settings})


def feature_add(model, site: str | Site, coef: float, pos: Pos = None) -> Plan:
    """Add coef x the latent's unit decoder direction at the site the dictionary writes (steer towards a feature)."""
    s = _latent(model, site)
    d = attached(model, s)
    base = f"L{s.layer}.{s.part}"
    direction = d.direction(s.index).to(model.hf.dtype)
    if s.part == "head.z":
        direction = direction.view(model.dims.n_heads, model.dims.d_head)
    return _plan(model, [add(base, direction, coef, pos=pos)], "feature-add", s, coef=coef)


def feature_clamp(model, site: str | Site, value: float, pos: Pos = None) -> Plan:
    """Hold the latent's activation at `value` (on every token, or at `pos`)."""
    s = _latent(model, site)
    return _plan(model, [replace(s, float(value), pos=pos)], "feature-clamp", s, value=float(value))


def feature_ablate(model, site: str | Site, pos: Pos = None) -> Plan:
    """Zero the latent (`L6.resid_post.sae17`) or every latent (`L6.resid_post.sae`); the error term is kept."""
    s = _latent(model, site, need_index=False)
    return _plan(model, [scale(s, 0.0, pos=pos)], "feature-ablate", s)


def feature_scale(model, site: str | Site, factor: float, pos: Pos = None) -> Plan:
    """Multiply the latent's activation by `factor` (0 ablates it, 2 doubles it); the error term is kept."""
    s = _latent(model, site)
    return _plan(model, [scale(s, float(factor), pos=pos)], "feature-scale", s, factor=float(factor))
