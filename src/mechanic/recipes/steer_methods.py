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


def random_like(ctx, located: list[str], kind: str) -> list[str]:
    """As many sites of `kind` as `located`, drawn uniformly (seed ctx.seed) from the same layer range, none located."""
    from mechanic.model.sites import Site

    layers = [Site.parse(x).layer for x in located]
    lo, hi = min(layers), max(layers)
    pool = [str(x) for x in ctx.model.sites(kind) if lo <= x.layer <= hi and str(x) not in set(located)]
    return sorted(random.Random(ctx.seed).sample(pool, len(located)))


def random_direction(v: torch.Tensor, seed: int) -> torch.Tensor:
    """A direction drawn uniformly on the sphere, with the norm of `v` (the random-vector control)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(v.shape, generator=g, dtype=torch.float32)
    return (r / r.norm() * v.float().norm()).to(v.dtype)


def _edit_layers(ctx) -> list[int] | None:
    """MEMIT/AlphaEdit layers: as set, else the five ending at the traced layer (MEMIT's range, as
    mechanic.steer.edit.layer_range and sequential editing choose it), else the method's default."""
    from mechanic.steer.edit import layer_range

    if ctx.settings.layers is not None or ctx.found is None or "layer" not in ctx.found.data:
        return ctx.settings.layers
    return layer_range(int(ctx.found.data["layer"]))


class Rome(Strict):
    """ROME on every fact of the task, one after the other (each edit computed on the already edited model)."""

    layer: int | None = None        # default: the layer causal tracing chose
    n_prefixes: int = Field(10, ge=0)
    steps: int = Field(25, ge=1)
    stats_tokens: int = Field(32768, ge=512)
    prompt_key: bool = False       # also hold each edit at the bare prompt's own key (models without BOS)


@method(STEER, "rome", Rome)
def rome(ctx) -> StageOut:
    """Sequential ROME edits at the traced layer; the plan holds all of them.

    The context prefixes and the second moment come from the unedited model once, as in ROME's and EasyEdit's code
    (mechanic.steer.sequential): computed per fact on the edited model, the moment was recomputed for every fact
    (an edited model has another fingerprint) and its cache filled with one file per fact."""
    from mechanic.steer.edit import facts_from_task
    from mechanic.steer.sequential import sequential

    s, model = ctx.settings, ctx.model
    layer = s.layer if s.layer is not None else int(_found(ctx, "layer"))
    facts = facts_from_task(ctx.task)
    plan = sequential(model, facts, "rome", len(facts), [layer], n_prefixes=s.n_prefixes, steps=s.steps,
                      stats_tokens=s.stats_tokens, seed=ctx.seed, progress=False, prompt_key=s.prompt_key)
    plan.method, plan.settings = "rome", {"layer": layer, "facts": len(facts), "sequential": True}
    rows = [[f.subject, f.target_true, f.target_new] for f in facts]
    text = (f"ROME rewrote {len(facts)} facts at layer {layer}'s MLP, one after the other (each rank-one update "
            "computed on the model with the earlier ones applied); the plan restores the weights bit for bit on undo.")
    return _out(ctx, plan, text, [table("edits", "Edits", ["subject", "true", "new"], rows)], {"layer": layer})


class Memit(Strict):
    """MEMIT over a range of layers: all facts at once, or in sequential batches of batch_size."""

    layers: list[int] | None = None
    lam: float = Field(1000.0, gt=0)
    batch_size: int | None = Field(None, ge=1)   # default: all facts in one batch
    n_prefixes: int = Field(10, ge=0)
    steps: int = Field(25, ge=1)                 # optimisation steps of each fact's target
    stats_tokens: int = Field(32768, ge=512)
    prompt_key: bool = False       # also hold each edit at the bare prompt's own key (models without BOS)


@method(STEER, "memit", Memit)
def memit(ctx) -> StageOut:
    """MEMIT for every fact of the task, spread over `layers` (default: five ending at the traced layer), at once or in batches."""
    from mechanic.steer.edit import facts_from_task
    from mechanic.steer.sequential import sequential

    s, model = ctx.settings, ctx.model
    facts = facts_from_task(ctx.task)
    batch = s.batch_size or len(facts)
    plan = sequential(model, facts, "memit", batch, _edit_layers(ctx), lam=s.lam, n_prefixes=s.n_prefixes,
                      steps=s.steps, stats_tokens=s.stats_tokens, seed=ctx.seed, progress=False,
                      prompt_key=s.prompt_key)
    layers = plan.settings["layers"]
    how = "at once" if batch >= len(facts) else f"in sequential batches of {batch}"
    return _out(ctx, plan, f"MEMIT rewrote {len(facts)} facts {how} over layers {layers}.", data={"layers": layers})


class AlphaEdit(Strict):
    """AlphaEdit: MEMIT's update in the null space of the preserved keys; batch_size edits the facts sequentially."""

    layers: list[int] | None = None
    threshold: float = Field(2e-2, gt=0)    # eigenvalues of E[k k^T] below it span the null space
    alpha: float = Field(10.0, gt=0)
    batch_size: int | None = Field(None, ge=1)   # default: all facts in one batch
    n_prefixes: int = Field(10, ge=0)
    steps: int = Field(25, ge=1)
    stats_tokens: int = Field(32768, ge=512)
    prompt_key: bool = False       # also hold each edit at the bare prompt's own key (models without BOS)


@method(STEER, "alphaedit", AlphaEdit)
def alphaedit(ctx) -> StageOut:
    """AlphaEdit over `layers` (default: five ending at the traced layer), all facts at once or in sequential batches."""
    from mechanic.steer.edit import facts_from_task
    from mechanic.steer.sequential import sequential

    s, model = ctx.settings, ctx.model
    layers = _edit_layers(ctx)
    facts = facts_from_task(ctx.task)
    batch = s.batch_size or len(facts)
    plan = sequential(model, facts, "alphaedit", batch, layers, threshold=s.threshold, alpha=s.alpha, seed=ctx.seed,
                      n_prefixes=s.n_prefixes, steps=s.steps, stats_tokens=s.stats_tokens, progress=False,
                      prompt_key=s.prompt_key)
    text = (f"AlphaEdit rewrote {len(facts)} facts over layers {plan.settings['layers']} in batches of {batch}, each "
            "update confined to the null space of the preserved keys' second moment.")
    return _out(ctx, plan, text, data={"layers": plan.settings["layers"]})


def _trained(ctx, method: str, layers, **options):
    """(plan, facts, batch size): a fine-tuning baseline (ft, lora) on the task's facts, all at once or in
    sequential batches; layers default to the one locate traced, else to causal tracing over the facts."""
    from mechanic.steer.edit import facts_from_task
    from mechanic.steer.sequential import sequential

    if layers is None and ctx.found is not None and "layer" in ctx.found.data:
        layers = [int(ctx.found.data["layer"])]
    facts = facts_from_task(ctx.task)
    batch = ctx.settings.batch_size or len(facts)
    plan = sequential(ctx.model, facts, method, batch, layers, seed=ctx.seed, progress=False, **options)
    return plan, facts, batch


class FineTune(Strict):
    """FT-L: fine-tune one layer's down_proj on the facts, each weight within eps of its start (L-infinity)."""

    layer: int | None = None        # default: the layer locate traced, else causal tracing over the facts
    eps: float = Field(5e-3, gt=0)
    lr: float = Field(5e-3, gt=0)
    steps: int = Field(25, ge=1)
    batch_size: int | None = Field(None, ge=1)   # default: all facts in one batch


@method(STEER, "ft", FineTune)
def ft(ctx) -> StageOut:
    """The FT-L baseline (ROME paper) at the traced layer, all facts at once or in sequential batches."""
    s = ctx.settings
    plan, facts, batch = _trained(ctx, "ft", None if s.layer is None else [s.layer], eps=s.eps, lr=s.lr,
                                  steps=s.steps)
    text = (f"FT-L fine-tuned layer {plan.settings['layers'][0]}'s down_proj on {len(facts)} facts in batches of "
            f"{batch} (up to {s.steps} Adam steps, lr {s.lr:g}), every weight kept within {s.eps:g} of its value "
            "before each batch.")
    return _out(ctx, plan, text, data={"layers": plan.settings["layers"]})


class Lora(Strict):
    """LoRA (peft) adapters on the down_proj of `layers`, trained on the facts and merged into the weights."""

    layers: list[int] | None = None     # default: the layer locate traced, else causal tracing over the facts
    rank: int = Field(8, ge=1)
    alpha: float | None = Field(None, gt=0)     # default 2 x rank
    lr: float = Field(5e-3, gt=0)
    steps: int = Field(50, ge=1)
    batch_size: int | None = Field(None, ge=1)


@method(STEER, "lora", Lora)
def lora(ctx) -> StageOut:
    """The LoRA baseline: rank-r adapters trained on the facts, merged (B @ A * alpha / r) into a weight-edit plan."""
    s = ctx.settings
    plan, facts, batch = _trained(ctx, "lora", s.layers, rank=s.rank, alpha=s.alpha, lr=s.lr, steps=s.steps)
    text = (f"LoRA rank {s.rank} on the down_proj of layer(s) {plan.settings['layers']}, trained on {len(facts)} "
            f"facts in batches of {batch} (up to {s.steps} Adam steps, lr {s.lr:g}) and merged into the weights.")
    return _out(ctx, plan, text, data={"layers": plan.settings["layers"]})


class NeuronEdit(Strict):
    """Scale the located FFN neurons in the weights (0 = remove); random=True scales as many random neurons."""

    factor: float = 0.0
    count: int | None = Field(None, ge=1)   # the top `count` located neurons (default: all of them)
    random: bool = False


@method(STEER, "neuron_edit", NeuronEdit)
def neuron_edit(ctx) -> StageOut:
    """Scale (zero by default) the down_proj columns of the neurons locate selected."""
    from mechanic.steer.edit import neuron_edit as edit

    sites = list(_found(ctx, "sites"))[: ctx.settings.count]
    if not sites:
        raise RecipeError("The locate stage selected no neurons (none lowered the metric when zeroed); there is "
                          "nothing to edit. Raise locate.top_k or check the task.")
    if ctx.settings.random:
        sites = random_like(ctx, sites, "neuron")
    plan = edit(ctx.model, sites, ctx.settings.factor)
    return _out(ctx, plan, f"Scaled {len(sites)} neurons by {ctx.settings.factor:g} in the weights "
                f"({', '.join(sites)}).", data={"sites": sites})


class AddVector(Strict):
    """Add coefficient x the located vector at one layer (default: the sweep's best cell), at every token."""

    layer: int | None = None
    coefficient: float | None = None
    random: bool = False            # a random direction of the same norm (the random-vector control)


@method(STEER, "add_vector", AddVector)
def add_vector(ctx) -> StageOut:
    """The located steering vector as a saved plan of one `add` intervention."""
    from mechanic.steer.plan import Plan
    from mechanic.steer.vectors import Vector

    s = ctx.settings
    layer = s.layer if s.layer is not None else int(_found(ctx, "layer"))
    coef = s.coefficient if s.coefficient is not None else float(_found(ctx, "coefficient"))
    vec = Vector.load(ctx.found_dir / ctx.found.artifacts["vector"])
    if s.random:
        vec.directions[layer] = random_direction(vec.directions[layer], ctx.seed)
    plan = Plan(vec.interventions(coef, layers=[layer]), method="add_vector", fingerprint=ctx.model.fingerprint,
                settings={"layer": layer, "coefficient": coef, "vector": vec.method, "random": s.random})
    return _out(ctx, plan, f"Adding {coef:g} x the vector at layer {layer}'s output, at every token.",
                data={"layer": layer, "coefficient": coef})


class ConditionalVector(Strict):
    """Add the located vector only to prompts whose `condition` score passes a threshold calibrated on held-in prompts."""

    layer: int | None = None
    coefficient: float | None = None
    condition: str = "condition"    # the locate artifact holding the condition direction
    score: str = Field("projection", pattern="^(projection|cosine)$")
    random: bool = False            # the added vector replaced by a random direction of the same norm (same gate)


@method(STEER, "conditional_vector", ConditionalVector)
def conditional_vector(ctx) -> StageOut:
    """CAST-style plan: gate per prompt on the condition direction, calibrated on the odd train instructions."""
    from mechanic.improve.refusal import chat_prompts, instructions
    from mechanic.steer.conditional import conditional_vector as build
    from mechanic.steer.vectors import Vector

    s, model = ctx.settings, ctx.model
    layer = s.layer if s.layer is not None else int(_found(ctx, "layer"))
    coef = s.coefficient if s.coefficient is not None else float(_found(ctx, "coefficient"))
    vec = Vector.load(ctx.found_dir / ctx.found.artifacts["vector"])
    cond = Vector.load(ctx.found_dir / ctx.found.artifacts[s.condition])
    if s.random:
        vec.directions[layer] = random_direction(vec.directions[layer], ctx.seed)
    pos = chat_prompts(model, instructions("harmful", "train")[1::2])
    neg = chat_prompts(model, instructions("harmless", "train")[1::2])
    plan = build(model, vec, cond, layer, coef, calibrate=(pos, neg), score=s.score)
    cal = plan.settings.get("calibration", {})
    figs = [{"kind": "bars", "id": "gate", "title": "Gate scores of the calibration prompts (the threshold separates them)",
             "labels": ["harmful (should open)", "harmless (should stay closed)"],
             "series": [{"name": "score", "mean": [float(torch.tensor(cal[k]).mean()) for k in ("positive", "negative")],
                         "lo": [min(cal[k]) for k in ("positive", "negative")],
                         "hi": [max(cal[k]) for k in ("positive", "negative")]}], "ylabel": f"{s.score} (min-max)"}] \
        if cal.get("positive") else []
    text = (f"Adding {coef:g} x the vector at layer {layer}, only for prompts whose {s.score} on the condition direction "
            f"exceeds {plan.settings.get('threshold', float('nan')):.3g} (calibrated on {len(pos)} + {len(neg)} held-in "
            f"prompts, balanced accuracy {cal.get('balanced_accuracy', float('nan')):.2f}).")
    return _out(ctx, plan, text, figs, {"layer": layer, "coefficient": coef, "threshold": plan.settings.get("threshold")})


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
    """Ablate or scale the located heads; random=True picks as many other heads from the same layer range (a control)."""

    how: str = Field("mean", pattern="^(zero|mean|scale)$")
    factor: float | None = None
    count: int | None = Field(None, ge=1)   # the top `count` located heads (default: all of them)
    random: bool = False


@method(STEER, "ablate_heads", AblateHeads)
def ablate_heads(ctx) -> StageOut:
    """Zero, mean-ablate or scale the heads locate handed over (or as many random other heads)."""
    from mechanic.steer.ablate import ablate

    s, model = ctx.settings, ctx.model
    heads = list(_found(ctx, "heads"))[: s.count]
    if s.random:
        heads = random_like(ctx, heads, "head")
    factor = s.factor if s.how == "scale" else None
    if s.how == "scale" and factor is None:
        raise RecipeError("steer.how: scale needs steer.factor (e.g. 0 to remove, 0.5 to damp, 2 to amplify).")
    plan = ablate(model, heads, s.how, factor=factor, reference=ctx.task if s.how == "mean" else None, seed=ctx.seed)
    what = f"scaled by {factor:g}" if s.how == "scale" else f"{s.how}-ablated"
    return _out(ctx, plan, f"{len(heads)} {'random ' if s.random else ''}heads {what}: {', '.join(heads)}.",
                data={"heads": heads})


class ClipWeights(Strict):
    """Round-to-nearest quantization of every down_proj row with its scale set by clipping the largest weights."""

    fraction: float = Field(0.003, ge=0, lt=1)     # of each row's weights, the largest |w| clipped to the bound
    curve: list[float] = [0.0, 0.001, 0.003, 0.01]
    bits: int = Field(8, ge=0, le=16)              # 0: clip only, no rounding
    max_tokens: int = Field(1024, ge=128)
    protect: bool = True
    random: bool = False            # keep as many random down_proj weights of the same layers instead (a control)


def clip_plan(model, fraction: float, bits: int, keep: list):
    """Clip each down_proj row at its (1 - fraction) |w| quantile and round to `bits`; `keep` weights stay exact."""
    from mechanic.steer.edit import down_proj_edit
    from mechanic.steer.plan import Plan

    edits = []
    for L in range(model.dims.n_layers):
        if model.is_moe(L):
            continue
        W = model.arch.down_weight(model.layer_module(L, model.arch.down_proj)).detach().float()   # [d_model, d_ff]
        bound = W.abs().quantile(1 - fraction, dim=1, keepdim=True) if fraction else W.abs().amax(1, keepdim=True)
        new = W.clamp(-bound, bound)
        if bits:
            step = bound.clamp_min(1e-12) / (2 ** (bits - 1) - 1)
            new = (new / step).round() * step
        for layer, row, col in keep:
            if layer == L:
                new[row, col] = W[row, col]
        edits.append(down_proj_edit(model, L, new, f"L{L}: top {fraction:.2%} of |w| per row clipped, "
                                                  f"{bits or 'no'}-bit rounding"))
    return Plan(edits=edits, method="clip_weights", fingerprint=model.fingerprint,
                settings={"fraction": fraction, "bits": bits, "kept": [list(x) for x in keep]})


@method(STEER, "clip_weights", ClipWeights)
def clip_weights(ctx) -> StageOut:
    """Quantize down_proj with outlier clipping; the perplexity curve shows what keeping the super weights buys."""
    from mechanic.data.text import calibration
    from mechanic.improve.perplexity import perplexity

    s, model = ctx.settings, ctx.model
    keep = [tuple(x) for x in _found(ctx, "super_weights")] if s.protect else []
    if s.random and keep:
        rng = random.Random(ctx.seed)
        d_model, d_ff = model.dims.d_model, model.dims.d_mlp
        keep = [(layer, rng.randrange(d_model), rng.randrange(d_ff)) for layer, _, _ in keep]

    def ppl(fraction: float, kept: list) -> float:
        with model.applied(clip_plan(model, fraction, s.bits, kept)):
            return perplexity(model, calibration(), max_tokens=s.max_tokens).ppl

    base = perplexity(model, calibration(), max_tokens=s.max_tokens).ppl
    fracs = sorted(set(s.curve) | {s.fraction})
    plain = [ppl(f, []) for f in fracs]
    kept = [ppl(f, keep) for f in fracs] if keep else plain
    plan = clip_plan(model, s.fraction, s.bits, keep)
    bits = f"{s.bits}-bit round-to-nearest" if s.bits else "clipping"
    figs = [{"kind": "line", "id": "clip_curve", "title": f"Held-out perplexity by clipped fraction ({bits}; "
             f"unquantized {base:.1f}; calibration prose, not the evaluation's held-out text)", "x": fracs,
             "series": [{"name": "clip every outlier", "y": [round(v, 3) for v in plain]},
                        {"name": "same, located super weights kept", "y": [round(v, 3) for v in kept]}],
             "xlabel": "fraction of each down_proj row clipped", "ylabel": "perplexity"}]
    i = fracs.index(s.fraction)
    text = (f"{bits} of every down_proj row with the largest {s.fraction:.2%} of its weights clipped to set the scale: "
            f"held-out perplexity {base:.1f} -> {plain[i]:.1f}, and {kept[i]:.1f} when the {len(keep)} located super "
            "weight(s) are kept exact.")
    return _out(ctx, plan, text, figs, {"base_ppl": base, "fractions": fracs, "ppl_plain": plain,
                                        "ppl_protected": kept})


class FeatureSteer(Strict):
    """Scale, clamp or ablate the top located dictionary latents; random=True acts on as many random latents."""

    how: str = Field("scale", pattern="^(scale|clamp|ablate)$")
    factor: float = 0.0             # scale: the latents' activations times factor (0 removes them)
    value: float | None = None      # clamp: the activation each latent is held at
    count: int | None = Field(None, ge=1)   # the top `count` located latents (default: all of them)
    random: bool = False


def random_latents(ctx, located: list[str], width: int, site: str) -> list[str]:
    """As many latents of the same dictionary as `located`, drawn uniformly (seed ctx.seed), none of them located."""
    pool = [f"{site}.sae{f}" for f in range(width) if f"{site}.sae{f}" not in set(located)]
    return random.Random(ctx.seed).sample(pool, len(located))


@method(STEER, "feature_steer", FeatureSteer)
def feature_steer(ctx) -> StageOut:
    """One feature plan (mechanic.steer.feature_plans) per located latent, summed into one saved plan."""
    from mechanic.features import attached
    from mechanic.recipes.dictionaries import attach_dir, paths
    from mechanic.steer.feature_plans import feature_ablate, feature_clamp, feature_scale
    from mechanic.steer.plan import Plan

    s, model = ctx.settings, ctx.model
    latents = list(_found(ctx, "latents"))[: s.count]
    dictionaries = paths(_found(ctx, "dictionary"))
    sites = [attach_dir(model, d) for d in dictionaries]
    if s.how == "clamp" and s.value is None:
        raise RecipeError("steer.how: clamp needs steer.value, the activation to hold each latent at (e.g. 0 to "
                          "remove, or a typical active value to turn the feature on).")
    if s.random:       # per dictionary, as many random latents as it has located ones
        latents = [x for site in sites for x in random_latents(
            ctx, [y for y in latents if y.startswith(site + ".")], attached(model, site).d_sae, site)]
    act = {"scale": lambda x: feature_scale(model, x, s.factor), "clamp": lambda x: feature_clamp(model, x, s.value),
           "ablate": lambda x: feature_ablate(model, x)}[s.how]
    plan = Plan(method="feature_steer", fingerprint=model.fingerprint)
    for x in latents:
        plan = plan + act(x)
    plan.method = "feature_steer"
    one = len(sites) == 1
    plan.settings = {"how": s.how, "factor": s.factor, "value": s.value, "latents": latents,
                     "site": sites[0] if one else sites, "dictionary": dictionaries[0] if one else dictionaries,
                     "random": s.random}
    what = f"scaled by {s.factor:g}" if s.how == "scale" else f"clamped at {s.value:g}" if s.how == "clamp" \
        else "ablated"
    at = f"the dictionary at {sites[0]}" if one else f"the dictionaries at {', '.join(sites)}"
    return _out(ctx, plan, f"{len(latents)} {'random ' if s.random else ''}latents of {at} "
                f"{what} at every token ({', '.join(latents)}); the reconstruction error is kept, so everything "
                "else the site carries is unchanged.", data={"latents": latents})
