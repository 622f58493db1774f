"""Steer methods a recipe can name: each turns what locate found into a Plan saved as plan.safetensors."""

from __future__ import annotations

import random

import torch
from pydantic import Field

from mechanic.recipes.methods import STEER, StageOut, method, table
from mechanic.recipes.schema import RecipeError, Strict


def _out(ctx, plan, text: str, figures=(), data=None) -> StageOut:
    plan.save(ctx.dir / "plan.safetensors")
    return StageOut(text, list(figures), data or {}, {"plan": "plan.safetensors"})


def _found(ctx, key: str):
    """A value the locate stage handed over, or a clear error naming the mismatch."""
    if ctx.found is None or key not in ctx.found.data:
        have = sorted(ctx.found.data) if ctx.found else []
        raise RecipeError(f"This steer method needs {key!r} from the locate stage, which gave {have or 'nothing'}; "
                          "pair it with a locate method that finds it (see docs/RECIPES.md), or set it explicitly.")
    return ctx.found.data[key]


class Rome(Strict):
    """ROME on every fact of the task, one after the other (each edit computed on the already edited model)."""

    layer: int | None = None        # default: the layer causal tracing chose
    n_prefixes: int = Field(10, ge=0)
    steps: int = Field(25, ge=1)
    stats_tokens: int = Field(32768, ge=512)


@method(STEER, "rome", Rome)
def rome(ctx) -> StageOut:
    """Sequential ROME edits at the traced layer; the plan holds all of them."""
    from mechanic.steer.edit import facts_from_task, rome as rome_edit
    from mechanic.steer.plan import Plan

    s, model = ctx.settings, ctx.model
    layer = s.layer if s.layer is not None else int(_found(ctx, "layer"))
    facts = facts_from_task(ctx.task)
    plan, handles = Plan(method="rome", fingerprint=model.fingerprint), []
    try:
        for f in facts:
            p = rome_edit(model, f, layer, n_prefixes=s.n_prefixes, steps=s.steps, stats_tokens=s.stats_tokens,
                           seed=ctx.seed)
            handles.append(p.apply(model))
            plan = plan + p
    finally:
        for h in reversed(handles):
            h.undo()
    plan.method, plan.settings = "rome", {"layer": layer, "facts": len(facts), "sequential": True}
    rows = [[f.subject, f.target_true, f.target_new] for f in facts]
    text = (f"ROME rewrote {len(facts)} facts at layer {layer}'s MLP, one after the other (each rank-one update "
            "computed on the model with the earlier ones applied); the plan restores the weights bit for bit on undo.")
    return _out(ctx, plan, text, [table("edits", "Edits", ["subject", "true", "new"], rows)], {"layer": layer})


class Memit(Strict):
    """MEMIT: all facts at once over a range of layers."""

    layers: list[int] | None = None
    lam: float = Field(1000.0, gt=0)


@method(STEER, "memit", Memit)
def memit(ctx) -> StageOut:
    """One MEMIT update for every fact of the task, spread over `layers` (default around the traced layer)."""
    from mechanic.steer.edit import facts_from_task, memit as memit_edit

    s, model = ctx.settings, ctx.model
    layers = s.layers
    if layers is None and ctx.found is not None and "layer" in ctx.found.data:
        L = int(ctx.found.data["layer"])
        layers = [x for x in range(L - 2, L + 3) if 0 <= x < model.dims.n_layers]
    facts = facts_from_task(ctx.task)
    plan = memit_edit(model, facts, layers, lam=s.lam, seed=ctx.seed)
    return _out(ctx, plan, f"MEMIT rewrote {len(facts)} facts at once over layers {layers}.", data={"layers": layers})


class NeuronEdit(Strict):
    """Scale the located FFN neurons in the weights (0 = remove)."""

    factor: float = 0.0


@method(STEER, "neuron_edit", NeuronEdit)
def neuron_edit(ctx) -> StageOut:
    """Scale (zero by default) the down_proj columns of the neurons locate selected."""
    from mechanic.steer.edit import neuron_edit as edit

    sites = list(_found(ctx, "sites"))
    if not sites:
        raise RecipeError("The locate stage selected no neurons (none lowered the metric when zeroed); there is "
                          "nothing to edit. Raise locate.top_k or check the task.")
    plan = edit(ctx.model, sites, ctx.settings.factor)
    return _out(ctx, plan, f"Scaled {len(sites)} neurons by {ctx.settings.factor:g} in the weights "
                f"({', '.join(sites)}).", data={"sites": sites})


class AddVector(Strict):
    """Add coefficient x the located vector at one layer (default: the sweep's best cell), at every token."""

    layer: int | None = None
    coefficient: float | None = None


@method(STEER, "add_vector", AddVector)
def add_vector(ctx) -> StageOut:
    """The located steering vector as a saved plan of one `add` intervention."""
    from mechanic.steer.plan import Plan
    from mechanic.steer.vectors import Vector

    s = ctx.settings
    layer = s.layer if s.layer is not None else int(_found(ctx, "layer"))
    coef = s.coefficient if s.coefficient is not None else float(_found(ctx, "coefficient"))
    vec = Vector.load(ctx.found_dir / ctx.found.artifacts["vector"])
    plan = Plan(vec.interventions(coef, layers=[layer]), method="add_vector", fingerprint=ctx.model.fingerprint,
                settings={"layer": layer, "coefficient": coef, "vector": vec.method})
    return _out(ctx, plan, f"Adding {coef:g} x the vector at layer {layer}'s output, at every token.",
                data={"layer": layer, "coefficient": coef})


class DirectionalAblation(Strict):
    """Project the located direction out of the residual stream at every layer (refusal-direction style)."""

    layer: int | None = None
    vector: str = "vector"          # which of the locate stage's vector artifacts (e.g. "condition")


@method(STEER, "directional_ablation", DirectionalAblation)
def directional_ablation(ctx) -> StageOut:
    """Directional ablation of the located vector's direction at `layer` (default: the sweep's layer)."""
    from mechanic.steer.directions import directional_ablation as ablate_dir
    from mechanic.steer.vectors import Vector

    s = ctx.settings
    layer = s.layer if s.layer is not None else int(_found(ctx, "layer"))
    if s.vector not in ctx.found.artifacts:
        raise RecipeError(f"steer.vector {s.vector!r} is not an artifact of the locate stage "
                          f"(it has {', '.join(ctx.found.artifacts)}).")
    vec = Vector.load(ctx.found_dir / ctx.found.artifacts[s.vector])
    plan = ablate_dir(ctx.model, vec.directions[layer])
    return _out(ctx, plan, f"Projecting the layer-{layer} {vec.method} direction out of every residual-stream write.",
                data={"layer": layer})


class AblateHeads(Strict):
    """Ablate or scale the located heads; random=True picks the same number of other heads (a control)."""

    how: str = Field("mean", pattern="^(zero|mean|scale)$")
    factor: float | None = None
    random: bool = False


@method(STEER, "ablate_heads", AblateHeads)
def ablate_heads(ctx) -> StageOut:
    """Zero, mean-ablate or scale the heads locate handed over (or as many random other heads)."""
    from mechanic.steer.ablate import ablate

    s, model = ctx.settings, ctx.model
    heads = list(_found(ctx, "heads"))
    if s.random:
        pool = [str(h) for h in model.sites("head") if str(h) not in heads]
        heads = sorted(random.Random(ctx.seed).sample(pool, len(heads)))
    factor = s.factor if s.how == "scale" else None
    if s.how == "scale" and factor is None:
        raise RecipeError("steer.how: scale needs steer.factor (e.g. 0 to remove, 0.5 to damp, 2 to amplify).")
    plan = ablate(model, heads, s.how, factor=factor, reference=ctx.task if s.how == "mean" else None, seed=ctx.seed)
    what = f"scaled by {factor:g}" if s.how == "scale" else f"{s.how}-ablated"
    return _out(ctx, plan, f"{len(heads)} {'random ' if s.random else ''}heads {what}: {', '.join(heads)}.",
                data={"heads": heads})


class PruneNeurons(Strict):
    """Structured FFN pruning by a typical |activation| x |down_proj column|, keeping the located neurons."""

    fraction: float = Field(0.1, gt=0, lt=1)
    curve: list[float] = [0.02, 0.05, 0.1, 0.2]
    criterion: str = Field("median", pattern="^(median|mean)$")
    max_tokens: int = Field(1024, ge=128)
    protect: bool = True


def _neuron_importance(model, max_tokens: int, criterion: str = "median") -> dict[str, float]:
    """Median (or mean) |activation| x ||down_proj column|| of every dense FFN neuron on the calibration prose."""
    from mechanic.data.text import calibration
    from mechanic.data.windows import batches, windows

    layers = [L for L in range(model.dims.n_layers) if not model.is_moe(L)]
    acts: dict[int, list] = {L: [] for L in layers}
    with torch.no_grad():
        for ids in batches(windows(model, calibration(), 128, max_tokens), 8):
            run = model.run(ids, cache=[f"L{L}.neuron" for L in layers])
            for L in layers:
                acts[L].append(run[f"L{L}.neuron"].abs().flatten(0, 1).float())
    out = {}
    for L in layers:
        a = torch.cat(acts.pop(L))
        typical = a.median(0).values if criterion == "median" else a.mean(0)
        W = model.arch.down_weight(model.layer_module(L, model.arch.down_proj))
        col = W.norm(dim=1) if model.arch.conv1d else W.norm(dim=0)
        out.update({f"L{L}.neuron{j}": v for j, v in enumerate((typical * col.float()).tolist())})
    return out


@method(STEER, "prune_neurons", PruneNeurons)
def prune_neurons(ctx) -> StageOut:
    """Zero the least important fraction of FFN neurons; the perplexity curve shows what protection buys."""
    from mechanic.data.text import heldout
    from mechanic.improve.perplexity import perplexity
    from mechanic.steer.edit import neuron_edit

    s, model = ctx.settings, ctx.model
    protect = set(_found(ctx, "protect")) if s.protect else set()
    imp = _neuron_importance(model, s.max_tokens, s.criterion)
    order = sorted(imp, key=imp.get)
    rank = {n: i for i, n in enumerate(order)}

    def pruned(frac: float, keep: set) -> list[str]:
        return [n for n in order if n not in keep][:int(round(frac * len(order)))]

    def ppl(sites) -> float:
        with model.applied(neuron_edit(model, sites, 0.0)):
            return perplexity(model, heldout(), max_tokens=s.max_tokens).ppl

    base = perplexity(model, heldout(), max_tokens=s.max_tokens).ppl
    fracs = sorted(set(s.curve) | {s.fraction})
    plain = [ppl(pruned(f, set())) for f in fracs]
    kept = [ppl(pruned(f, protect)) for f in fracs] if protect else plain
    sites = pruned(s.fraction, protect)
    plan = neuron_edit(model, sites, 0.0)
    plan.method, plan.settings = "prune_neurons", {"fraction": s.fraction, "protected": sorted(protect),
                                                   "pruned": len(sites)}
    ranks = {n: rank[n] / len(order) for n in protect}
    figs = [{"kind": "line", "id": "prune_curve", "title": f"Held-out perplexity by pruned fraction (unpruned {base:.1f})",
             "x": fracs, "series": [{"name": "prune by importance", "y": [round(v, 3) for v in plain]},
                                    {"name": "same, located neurons kept", "y": [round(v, 3) for v in kept]}],
             "xlabel": "fraction of FFN neurons zeroed", "ylabel": "perplexity"},
            table("protected", "Located neurons: where the importance ranking puts them",
                  ["neuron", "importance rank (0 = pruned first)"], [[n, r] for n, r in sorted(ranks.items())])]
    i = fracs.index(s.fraction)
    text = (f"Pruning the {s.fraction:.0%} least important FFN neurons ({len(sites)} of {len(order)}) by {s.criterion} "
            f"|activation| x |down_proj column|: held-out perplexity {base:.1f} -> {plain[i]:.1f}, and "
            f"{kept[i]:.1f} when the {len(protect)} located neuron(s) are kept.")
    return _out(ctx, plan, text, figs, {"base_ppl": base, "fractions": fracs, "ppl_plain": plain,
                                        "ppl_protected": kept, "pruned": len(sites)})
