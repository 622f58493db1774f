"""Where a dictionary reads and writes: SAELens / TransformerLens hook names <-> mechanic sites, and site widths.

A dictionary site is a mechanic site string (`L3.resid_post`, `L3.mlp_out`, `L3.head.z`, `L3.neuron`) or
`L3.mlp_in`, the MLP block's input (after its pre-MLP norm; TransformerLens's `ln2.hook_normalized`),
which the engine has no site for yet, so features reads it as the MLP module's call input.
TransformerLens's `hook_mlp_in` is the residual *before* that norm, i.e. `resid_mid`.
"""

from __future__ import annotations

import re

from mechanic.features.errors import FeaturesError

# TransformerLens hook (after `blocks.{l}.`) -> mechanic site kind (after `L{l}.`)
TL_TO_KIND = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "hook_mlp_in": "resid_mid",
    "ln2.hook_normalized": "mlp_in",
    "attn.hook_z": "head.z",
    "hook_z": "head.z",
    "mlp.hook_post": "neuron",
}
KIND_TO_TL = {
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "mlp_in": "ln2.hook_normalized",
    "head.z": "attn.hook_z", "neuron": "mlp.hook_post",
}
KINDS = tuple(KIND_TO_TL)
_TL_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_SITE_RE = re.compile(r"^L(\d+)\.(" + "|".join(re.escape(k) for k in KINDS) + r")$")


def site_from_hook(hook: str) -> str:
    """A TransformerLens hook name (or a mechanic dictionary site) as a mechanic dictionary site string."""
    hook = str(hook).strip()
    if _SITE_RE.match(hook):
        return hook
    m = _TL_RE.match(hook)
    if m and m[2] in TL_TO_KIND:
        return f"L{int(m[1])}.{TL_TO_KIND[m[2]]}"
    known = ", ".join(f"blocks.{{l}}.{k}" for k in TL_TO_KIND)
    raise FeaturesError(
        f"The dictionary reads hook {hook!r}, which mechanic cannot map to a site. Known TransformerLens hooks: "
        f"{known}; or give a mechanic site such as 'L3.resid_post', 'L3.mlp_in', 'L3.mlp_out', 'L3.head.z' or "
        "'L3.neuron' (set `hook_name` in the metadata of cfg.json, or pass site= when loading).")


def hook_from_site(site: str) -> str:
    """The TransformerLens hook name SAELens writes for a mechanic dictionary site."""
    layer, kind = parse_site(site)
    return f"blocks.{layer}.{KIND_TO_TL[kind]}"


def parse_site(site: str) -> tuple[int, str]:
    """(layer, kind) of a dictionary site, or a clear error listing the kinds a dictionary can sit at."""
    m = _SITE_RE.match(str(site).strip())
    if not m:
        raise FeaturesError(
            f"{site!r} is not a site a dictionary can read or write. Use L<layer>.<kind> with kind one of "
            f"{', '.join(KINDS)} (e.g. 'L3.resid_post'; 'L3.mlp_in' is the MLP input after its norm, "
            "'L3.head.z' all heads' z concatenated).")
    return int(m[1]), m[2]


def site_width(model, site: str) -> int:
    """The vector width of a dictionary site in this model; checks the layer range and that the site exists."""
    layer, kind = parse_site(site)
    d = model.dims
    if not 0 <= layer < d.n_layers:
        raise FeaturesError(f"{site}: layer {layer} is out of range; this model has layers 0..{d.n_layers - 1}.")
    if kind == "resid_mid" and model.parallel:
        raise FeaturesError(f"{site}: this model uses a parallel residual (attention and MLP both read resid_pre), "
                            "so there is no resid_mid (TransformerLens hook_mlp_in / hook_resid_mid). Use resid_pre, "
                            "mlp_in (the MLP's normalised input) or resid_post.")
    if kind == "head.z":
        return d.n_heads * d.d_head
    if kind == "neuron":
        if model.is_moe(layer):
            raise FeaturesError(f"{site}: layer {layer} is a mixture-of-experts layer, which has no single FFN "
                                "neuron vector; put the dictionary on mlp_in, mlp_out or the residual instead.")
        return d.d_mlp
    return d.d_model


def check_width(model, site: str, width: int, side: str = "input") -> None:
    """Raise a one-paragraph error when a dictionary's width does not match the site's width in this model."""
    want = site_width(model, site)
    if want != width:
        raise FeaturesError(
            f"The dictionary's {side} width is {width}, but {site} of {model.name} has width {want}. The "
            "dictionary was trained on another model (or another site); load it with the model it was made for, "
            "or check `hook_name` / `d_in` / `d_out` in its cfg.json.")


def layer_of(site: str) -> int:
    return parse_site(site)[0]
