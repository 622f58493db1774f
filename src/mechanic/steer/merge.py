"""Neuron-level merging of a base and a fine-tuned checkpoint (Locate-then-Merge / Neuron-Fusion, Yu & Ananiadou 2025).

Units (unit="neuron"; each parameter element belongs to one unit, one kv head, or nothing):
- FFN neuron j of layer L (site L.neuron{j}): row j of every input projection (gate, up, fused gate_up:
  rows j and d_mlp + j; GPT-2 c_fc column j) with its bias entry, and column j of down_proj (GPT-2 c_proj row j).
- attention head h of layer L (site L.head{h}): its q rows (and bias), its o_proj columns, and the k/v rows
  (and biases) of the kv head it reads. Under grouped-query attention a kv head is shared by n_heads/n_kv_heads
  query heads: its k/v rows count in each of their shifts and follow the tuned model when any of them is kept.
- MoE layers, per expert: neuron j of expert e (site L.expert{e}.neuron{j}) owns rows j and d_expert + j of
  that expert's gate_up_proj and column j of its down_proj; a shared expert's neurons are FFN neurons of their
  own (L.shared_expert.neuron{j}). Experts are ranked one expert at a time; the router is "other".
Everything else (embeddings, norms, o_proj/down_proj biases, routers, q/k norms) is "other".

Shift of a unit u: the relative shift ||theta_tuned[u] - theta_base[u]|| / ||theta_base[u]|| over all its
elements (score="absolute" drops the denominator). Units are ranked within their layer and kind (FFN neurons,
heads, each expert, the shared expert): keep=0.1 keeps round(0.1 n) of each such block, keep=5 keeps 5 of
each. Parts outside `scope` (e.g. attention with scope=("mlp",)) are "other".
Merge rule: kept units take the tuned values exactly; every other unit, and "other" parameters unless
keep_other="tuned", becomes theta_base + coefficient * (theta_tuned - theta_base).
The result is a Plan of weight edits made for the TUNED model: applied, it holds the merged weights; undone,
the tuned weights come back bit for bit. Relative shift was chosen over absolute because Adam moves every
element by about the same step, so absolute shifts are nearly flat; on SmolLM2 (tests/test_merge.py) keeping
the top 5% by relative shift recovers more of a fine-tune than by absolute shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mechanic.locate.scores import Scores
from mechanic.steer.plan import Plan, PlanError, WeightEdit

SCOPES = ("mlp", "attn")


class MergeError(PlanError):
    """Two models, or merge settings, that cannot be merged as given."""


@dataclass
class _Group:
    """Units ranked together: their sites, ranking blocks, and how parameter slots map onto units."""

    key: str                        # e.g. "L3.neuron", "L3.head", "L3.expert", "L3.shared_expert"
    sites: list[str]                # one per unit
    n_slots: int                    # owner ids used in parameters (units, or heads + kv heads)
    members: torch.Tensor | None    # [n_slots, n_units] 0/1: which units a slot belongs to (None = identity)
    blocks: list[range]             # units ranked together (one block, or one per expert)


# ---------------------------------------------------------------- which unit owns which element
@dataclass
class _Owner:
    """Which slot of group `key` owns each element of a parameter: ids over dimensions `dims` (ascending),
    the same along every other dimension."""

    key: str
    dims: tuple[int, ...]
    ids: torch.Tensor

    def per_slot(self, x: torch.Tensor, n_slots: int) -> torch.Tensor:
        """Sum of x over each slot's elements (float64, one entry per slot)."""
        rest = [d for d in range(x.dim()) if d not in self.dims]
        part = (x.sum(rest, dtype=torch.float64) if rest else x.double()).reshape(-1)
        return torch.zeros(n_slots, dtype=torch.float64).index_add_(0, self.ids.reshape(-1), part.cpu())

    def spread(self, per_slot: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """A per-slot value broadcast to the parameter's shape."""
        view = [shape[d] if d in self.dims else 1 for d in range(len(shape))]
        return per_slot[self.ids].reshape(view)


def _linears(module: torch.nn.Module, skip: torch.nn.Module | None = None) -> list[tuple[str, torch.nn.Module]]:
    """The weight-carrying submodules (2-D weight) of `module`, except `skip`."""
    return [(n, m) for n, m in module.named_modules() if m is not skip and m is not module
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2]


def _ffn(model, names, owners, mlp, down, key: str, site) -> _Group:
    """FFN neurons of a dense MLP (or a shared expert): input-projection rows and down_proj columns."""
    conv = model.arch.conv1d
    d = down.weight.shape[0] if conv else down.weight.shape[1]
    ids = torch.arange(d)
    owners[names[id(down.weight)]] = _Owner(key, (0 if conv else 1,), ids)
    for n, m in _linears(mlp, down):
        out_dim = 1 if conv else 0
        width = m.weight.shape[out_dim]
        if width % d:
            raise MergeError(f"{key}: the MLP projection {n!r} has {width} outputs, not a multiple of the {d} "
                             "neurons read by down_proj, so merge cannot tell which neuron owns which row.")
        rows = torch.arange(width) % d
        owners[names[id(m.weight)]] = _Owner(key, (out_dim,), rows)
        if getattr(m, "bias", None) is not None:
            owners[names[id(m.bias)]] = _Owner(key, (0,), rows)
    return _Group(key, [site(j) for j in range(d)], d, None, [range(d)])


def _qkv_rows(attn, H: int, KV: int, dh: int) -> list[tuple[torch.nn.Module, int, torch.Tensor]]:
    """(module, output dim, owner per output index) of the q/k/v projections; owners: head h, or H + kv head."""
    q = torch.arange(H * dh) // dh
    kv = H + torch.arange(KV * dh) // dh
    if hasattr(attn, "q_proj"):
        return [(attn.q_proj, 0, q), (attn.k_proj, 0, kv), (attn.v_proj, 0, kv)]
    if hasattr(attn, "qkv_proj"):                         # Phi-3: [q; k; v] stacked
        return [(attn.qkv_proj, 0, torch.cat([q, kv, kv]))]
    if hasattr(attn, "c_attn"):                           # GPT-2 Conv1D [in, 3 * out]: columns q | k | v
        return [(attn.c_attn, 1, torch.cat([q, kv, kv]))]
    if hasattr(attn, "query_key_value"):                  # GPT-NeoX: per head [q, k, v]
        r = torch.arange(3 * H * dh)
        head, part = r // (3 * dh), (r % (3 * dh)) // dh
        return [(attn.query_key_value, 0, torch.where(part == 0, head, H + head))]
    raise MergeError(f"{type(attn).__name__}: no q_proj, qkv_proj, c_attn or query_key_value found, so merge "
                     "cannot assign attention weights to heads. Merge the MLP only with scope=('mlp',).")


def _heads(model, names, owners, L: int) -> _Group:
    """Attention heads of layer L: q rows, o_proj columns, and the k/v rows of the kv head each reads."""
    d, a = model.dims, model.arch
    H, KV, dh = d.n_heads, d.n_kv_heads, d.d_head
    key = f"L{L}.head"
    attn, o = model.layer_module(L, a.attn), model.layer_module(L, a.o_proj)
    for m, dim, ids in _qkv_rows(attn, H, KV, dh):
        owners[names[id(m.weight)]] = _Owner(key, (dim,), ids)
        if getattr(m, "bias", None) is not None:
            owners[names[id(m.bias)]] = _Owner(key, (0,), ids)
    owners[names[id(o.weight)]] = _Owner(key, (0 if a.conv1d else 1,), torch.arange(H * dh) // dh)
    members = torch.zeros(H + KV, H)
    members[torch.arange(H), torch.arange(H)] = 1
    members[H + torch.arange(H) // (H // KV), torch.arange(H)] = 1
    return _Group(key, [f"L{L}.head{h}" for h in range(H)], H + KV, members, [range(H)])


def _experts(model, names, owners, L: int) -> _Group:
    """Per-expert neurons of an MoE layer: rows j, d + j of gate_up_proj[e] and column j of down_proj[e]."""
    ex = model.layer_module(L, model.arch.experts)
    if getattr(ex, "is_transposed", False) or getattr(ex, "has_bias", False):
        raise MergeError(f"Layer {L}: {type(ex).__name__} stores transposed or biased expert weights, which merge "
                         "does not map to neurons yet. Merge attention only with scope=('attn',).")
    E, _, d = ex.down_proj.shape
    key = f"L{L}.expert"
    unit = torch.arange(E).view(E, 1) * d + torch.arange(d).view(1, d)               # [E, d]
    gu = ex.gate_up_proj
    if gu.shape[1] % d:
        raise MergeError(f"Layer {L}: gate_up_proj {list(gu.shape)} does not stack whole copies of the {d} "
                         "expert neurons.")
    owners[names[id(gu)]] = _Owner(key, (0, 1), unit.repeat(1, gu.shape[1] // d))
    owners[names[id(ex.down_proj)]] = _Owner(key, (0, 2), unit)
    sites = [f"L{L}.expert{e}.neuron{j}" for e in range(E) for j in range(d)]
    return _Group(key, sites, E * d, None, [range(e * d, (e + 1) * d) for e in range(E)])


def _layout(model, scope: tuple[str, ...]) -> tuple[dict[str, _Group], dict[str, _Owner]]:
    """Unit groups, and for each neuron-owned parameter which slot of which group owns each element."""
    names = {id(p): n for n, p in model.hf.named_parameters()}
    groups: dict[str, _Group] = {}
    owners: dict[str, _Owner] = {}
    a = model.arch
    for L in range(model.dims.n_layers):
        found = []
        if "attn" in scope:
            found.append(_heads(model, names, owners, L))
        if "mlp" in scope:
            if model.is_moe(L):
                found.append(_experts(model, names, owners, L))
                if a.shared_expert:
                    shared = model.layer_module(L, a.shared_expert)
                    found.append(_ffn(model, names, owners, shared, shared.down_proj, f"L{L}.shared_expert",
                                      lambda j, L=L: f"L{L}.shared_expert.neuron{j}"))
            else:
                found.append(_ffn(model, names, owners, model.layer_module(L, a.mlp),
                                  model.layer_module(L, a.down_proj), f"L{L}.neuron",
                                  lambda j, L=L: f"L{L}.neuron{j}"))
        groups.update({g.key: g for g in found})
    return groups, owners


# ---------------------------------------------------------------- shifts
def _check_pair(base, tuned) -> None:
    for name, m in (("base", base), ("tuned", tuned)):
        if not hasattr(m, "hf") or not hasattr(m, "arch"):
            raise MergeError(f"merge takes two mechanic Models (mechanic.load(...)); {name} is a "
                             f"{type(m).__name__}.")
    tb, tt = base.hf.config.model_type, tuned.hf.config.model_type
    if tb != tt:
        raise MergeError(f"The base model is a {tb!r} and the tuned model a {tt!r}; neuron-level merging needs two "
                         "checkpoints of the same architecture (the tuned one fine-tuned from the base).")
    pb = {n: tuple(p.shape) for n, p in base.hf.named_parameters()}
    pt = {n: tuple(p.shape) for n, p in tuned.hf.named_parameters()}
    only_b, only_t = sorted(set(pb) - set(pt)), sorted(set(pt) - set(pb))
    if only_b or only_t:
        raise MergeError(f"The two models have different parameters (only in base: {only_b[:3]}, only in tuned: "
                         f"{only_t[:3]}); merge needs the same architecture and the same tied/untied embeddings. "
                         "Load both checkpoints the same way.")
    diff = [f"{n} {list(pb[n])} vs {list(pt[n])}" for n in pb if pb[n] != pt[n]]
    if diff:
        raise MergeError(f"Parameter shapes differ between base and tuned ({'; '.join(diff[:3])}); merge needs "
                         "checkpoints of the same size (e.g. a model and its own fine-tune).")


def _unit_shifts(base, tuned, groups, owners, score: str) -> dict[str, torch.Tensor]:
    """Per group, the shift of every unit (float64)."""
    _check_score(score)
    pb, pt = dict(base.hf.named_parameters()), dict(tuned.hf.named_parameters())
    sums = {k: [torch.zeros(g.n_slots, dtype=torch.float64), torch.zeros(g.n_slots, dtype=torch.float64)]
            for k, g in groups.items()}
    moved = set()
    for name, owner in owners.items():
        t, b = pt[name].detach(), pb[name].detach()
        if not torch.equal(t, b.to(t.device)):
            sums[owner.key][0] += owner.per_slot((t.float() - b.to(t.device).float()).square(),
                                                 groups[owner.key].n_slots)
            moved.add(owner.key)
    for name, owner in owners.items():  # denominators only where something moved (else every shift is 0)
        if score == "relative" and owner.key in moved:
            sums[owner.key][1] += owner.per_slot(pb[name].detach().float().square(), groups[owner.key].n_slots)
    out = {}
    for key, g in groups.items():
        delta2, base2 = sums[key]
        if g.members is not None:
            delta2, base2 = g.members.double().T @ delta2, g.members.double().T @ base2
        shift = delta2.sqrt()
        if score == "relative":
            shift = shift / base2.sqrt().clamp_min(torch.finfo(torch.float64).tiny)
        out[key] = shift
    return out


def _check_score(score: str) -> None:
    if score not in ("relative", "absolute"):
        raise MergeError(f"score must be 'relative' (||delta|| / ||base|| per unit) or 'absolute' (||delta||), "
                         f"got {score!r}.")


def _scope(scope) -> tuple[str, ...]:
    scope = (scope,) if isinstance(scope, str) else tuple(scope)
    bad = [s for s in scope if s not in SCOPES]
    if bad or not scope:
        raise MergeError(f"scope names what is merged neuron by neuron: any of {SCOPES}, got {scope!r}.")
    return scope


def neuron_shifts(base, tuned, *, scope=SCOPES, score: str = "relative") -> Scores:
    """How far each neuron (FFN neuron, head, expert neuron) moved from base to tuned: Scores to plot or rank."""
    _check_pair(base, tuned)
    scope = _scope(scope)
    groups, owners = _layout(tuned, scope)
    shifts = _unit_shifts(base, tuned, groups, owners, score)
    sites = [s for g in groups.values() for s in g.sites]
    values = torch.cat([shifts[k] for k in groups]) if groups else torch.zeros(0)
    return Scores(values, sites, "neuron_shift", metric=f"{score} parameter shift", model=tuned.name,
                  fingerprint=tuned.fingerprint,
                  settings={"scope": list(scope), "score": score, "base": base.name,
                            "base_fingerprint": base.fingerprint})


# ---------------------------------------------------------------- merge
def _count(keep, n: int) -> int:
    """How many of n units a keep setting keeps."""
    return min(n, keep) if isinstance(keep, int) else min(n, int(round(keep * n)))


def _check_keep(keep) -> None:
    ok = (isinstance(keep, int) and not isinstance(keep, bool) and keep >= 0) or \
         (isinstance(keep, float) and 0.0 <= keep <= 1.0)
    if not ok:
        raise MergeError(f"keep is the fraction (a float in [0, 1]) or the count (an int >= 0) of neurons kept from "
                         f"the tuned model in each layer, got {keep!r}.")


def _edit(name: str, new: torch.Tensor, old: torch.Tensor, note: str) -> WeightEdit | None:
    """A weight edit taking `old` to `new`: None if equal, else the changed slices along the cheapest dimension."""
    changed = new != old
    if not bool(changed.any()):
        return None
    best = None
    for dim in range(new.dim()):
        rows = changed.movedim(dim, 0).reshape(new.shape[dim], -1).any(1).nonzero().reshape(-1)
        cost = len(rows) * (new.numel() // max(new.shape[dim], 1))
        if best is None or cost < best[0]:
            best = (cost, dim, rows)
    if best is None or best[0] == new.numel():
        return WeightEdit(name, new.detach().clone(), note=note)
    _, dim, rows = best
    index = tuple(rows.tolist() if i == dim else None for i in range(new.dim()))
    return WeightEdit(name, new.index_select(dim, rows).detach().clone(), index=index, note=note)


def _pulled(b: torch.Tensor, t: torch.Tensor, coefficient: float) -> torch.Tensor:
    """theta_base + coefficient * (theta_tuned - theta_base), exact at coefficient 0 and 1."""
    if coefficient == 0:
        return b.to(t.dtype).clone()
    if coefficient == 1:
        return t.clone()
    bf, tf = b.float(), t.float()
    return (bf + coefficient * (tf - bf)).to(t.dtype)


def merge(base, tuned, *, keep: float | int = 0.1, coefficient: float = 0.0, unit: str = "neuron",
          scope=SCOPES, keep_other: str = "pull", score: str = "relative", shifts: Scores | None = None) -> Plan:
    """A Plan that turns `tuned` into the neuron-level merge of base and tuned (see the module docstring).

    keep: fraction (float) or count (int) of units kept from the tuned model per layer and kind;
    coefficient: where every other unit lands between base (0) and tuned (1);
    keep_other: "pull" (other parameters follow the coefficient rule) or "tuned" (they stay tuned);
    shifts: the result of neuron_shifts(base, tuned, scope=..., score=...) if already computed.
    """
    _check_pair(base, tuned)
    _check_keep(keep)
    _check_score(score)
    scope = _scope(scope)
    if unit != "neuron":
        raise MergeError(f"unit={unit!r} is not supported; merge works on unit='neuron' (FFN neurons, attention "
                         "heads, expert neurons).")
    if keep_other not in ("pull", "tuned"):
        raise MergeError(f"keep_other is 'pull' (parameters no neuron owns follow base + coefficient x delta) or "
                         f"'tuned' (they keep the tuned values), got {keep_other!r}.")
    if not (isinstance(coefficient, (int, float)) and math.isfinite(coefficient)):
        raise MergeError(f"coefficient must be a finite number (0 = base, 1 = tuned), got {coefficient!r}.")
    coefficient = float(coefficient)
    groups, owners = _layout(tuned, scope)
    if shifts is None:
        by_group = _unit_shifts(base, tuned, groups, owners, score)
    else:
        by_group = _from_scores(shifts, groups, base, tuned, scope, score)
    kept_slots: dict[str, torch.Tensor] = {}
    kept: dict[str, dict] = {}
    for key, g in groups.items():
        s = by_group[key]
        chosen = []
        for block in g.blocks:
            vals = s[block.start:block.stop]
            order = torch.sort(-vals, stable=True).indices[:_count(keep, len(block))]
            chosen += sorted((block.start + order).tolist())
        units = torch.zeros(len(g.sites), dtype=torch.bool)
        units[chosen] = True
        slots = units.clone() if g.members is None else (g.members.double() @ units.double()) > 0
        kept_slots[key] = slots
        kept[key] = {"units": chosen, "shift": [float(s[i]) for i in chosen], "of": len(g.sites)}
    edits = []
    pb = dict(base.hf.named_parameters())
    for name, p in tuned.hf.named_parameters():
        t = p.detach()
        b = pb[name].detach().to(t.device)
        if torch.equal(t, b) or (name not in owners and keep_other == "tuned"):
            continue  # the merge leaves it as tuned
        new = _pulled(b, t, coefficient)
        if name in owners:
            owner = owners[name]
            new = torch.where(owner.spread(kept_slots[owner.key], t.shape).to(t.device), t, new)
            k = kept[owner.key]
            note = f"{owner.key}: {len(k['units'])} of {k['of']} units kept"
        else:
            note = "not owned by a neuron: base + coefficient x delta"
        e = _edit(name, new, t, note)
        if e is not None:
            edits.append(e)
    settings = {"keep": keep, "coefficient": coefficient, "unit": unit, "scope": list(scope),
                "keep_other": keep_other, "score": score, "base": base.name, "base_fingerprint": base.fingerprint,
                "kept": kept,
                "expert_units": "for L.expert groups, unit = expert * d_expert + neuron"}
    return Plan(edits=edits, method="merge", fingerprint=tuned.fingerprint, settings=settings)


def _from_scores(shifts: Scores, groups, base, tuned, scope, score) -> dict[str, torch.Tensor]:
    """Per-group shifts read back from a neuron_shifts Scores (checked to match these models and settings)."""
    s = shifts.settings
    sites = [x for g in groups.values() for x in g.sites]
    same = (shifts.method == "neuron_shift" and shifts.fingerprint == tuned.fingerprint
            and s.get("base_fingerprint") == base.fingerprint and s.get("scope") == list(scope)
            and s.get("score") == score and shifts.sites == sites)
    if not same:
        raise MergeError("The shifts given were not made by neuron_shifts for these two models with the same scope "
                         "and score; recompute them with neuron_shifts(base, tuned, scope=..., score=...) or leave "
                         "shifts=None.")
    values = shifts.values.double()
    out, i = {}, 0
    for key, g in groups.items():
        out[key] = values[i:i + len(g.sites)]
        i += len(g.sites)
    return out
