"""Locate methods a recipe can name: each finds components and says what the steer stage should act on."""

from __future__ import annotations

import torch
from typing import Literal

from pydantic import Field

from mechanic.locate.graph.attribute import MAX_FEATURE_NODES
from mechanic.recipes.dictionaries import TrainDictionary
from mechanic.recipes.methods import LOCATE, StageOut, method, scores_heatmap, table
from mechanic.recipes.schema import Strict


def attention_figure(model, prompt: str, head: str, fid: str) -> dict:
    """Attention pattern of one head on one prompt, tokens on both axes."""
    from mechanic.model.sites import Site

    s = Site.parse(head)
    site = f"L{s.layer}.head{s.index}.pattern"
    pat = model.run([prompt], cache=[site]).cache[site][0].float()
    toks = model.tokenizer.convert_ids_to_tokens(model.tokenizer(prompt)["input_ids"])
    labels = [f"{i}:{t}" for i, t in enumerate(toks)]
    return {"kind": "heatmap", "id": fid, "title": f"attention of {head}", "x": labels, "y": labels,
            "z": [[round(v, 4) for v in row] for row in pat.tolist()], "xlabel": "key", "ylabel": "query",
            "colorbar": "attention", "zmid": None}


class CausalTrace(Strict):
    """ROME's causal trace: the MLP layer at the subject's last token (chosen layer) plus an optional full heatmap."""

    samples: int = Field(5, ge=1)
    facts: int = Field(1, ge=1)   # average the MLP trace over this many train facts (ROME/MEMIT: once per model)
    heatmap: bool = True          # also trace hidden states at every layer x position of the first fact
    heatmap_samples: int = Field(3, ge=1)


@method(LOCATE, "causal_trace", CausalTrace)
def causal_trace_layer(ctx) -> StageOut:
    """Trace the first fact (or average over `facts` train facts); the layer with the largest MLP indirect
    effect is where ROME edits (and where MEMIT's and AlphaEdit's layer range ends)."""
    from mechanic.locate.trace import causal_trace
    from mechanic.steer.edit import facts_from_task, trace_layer, trace_layers

    s = ctx.settings
    pool = facts_from_task(ctx.task)[: s.facts]
    fact = pool[0]
    layer, scores = trace_layer(ctx.model, fact, samples=s.samples)
    scores.save(ctx.dir / "mlp_trace.json")
    effects = [round(float(v), 5) for v in scores.values[:, 0]]
    title = f"MLP indirect effect at the last subject token: {fact.prompt!r}"
    if len(pool) > 1:
        layer, mean = trace_layers(ctx.model, pool, s.samples)
        effects, title = [round(float(v), 5) for v in mean], f"MLP indirect effect, mean over {len(pool)} train facts"
    figs = [{"kind": "line", "id": "trace_mlp", "title": title,
             "x": list(range(len(effects))), "series": [{"name": "indirect effect (MLP window)", "y": effects}],
             "xlabel": "layer", "ylabel": "P(restored) - P(noised)"}]
    arts = {"mlp_trace": "mlp_trace.json"}
    if s.heatmap:
        full = causal_trace(ctx.model, fact.prompt, fact.target_true, fact.subject, "hidden", samples=s.heatmap_samples,
                            seed=ctx.seed)
        full.save(ctx.dir / "hidden_trace.json")
        arts["hidden_trace"] = "hidden_trace.json"
        figs.insert(0, scores_heatmap(full, "trace_hidden", f"Causal trace (hidden states): {fact.prompt!r} -> "
                                      f"{fact.target_true!r}", colorbar="indirect effect"))
    p = scores.settings
    text = (f"Causal tracing of \"{fact.prompt}\" -> \"{fact.target_true}\": noising the subject "
            f"\"{fact.subject}\" drops p(answer) from {p.get('p_clean', float('nan')):.3f} to "
            f"{p.get('p_noised', float('nan')):.3f}; restoring the MLP output at the subject's last token recovers "
            f"most at layer {layer} (indirect effect {effects[layer]:.3f}), so the edit goes there.")
    if len(pool) > 1:
        text = (f"Causal tracing averaged over {len(pool)} train facts (noised subject, MLP output restored at the "
                f"subject's last token): the mean indirect effect peaks at layer {layer} ({effects[layer]:.3f}), so "
                "the edit goes there (chosen once for the model, as ROME and MEMIT do).")
    return StageOut(text, figs, {"layer": layer, "effects": effects, "facts": len(pool)}, arts)


class NeuronAttribution(Strict):
    """Neurons by attribution, with a causal check: each one zeroed alone, and the selected set zeroed together."""

    scorer: str = Field("atp", pattern="^(atp|logprob)$")   # atp: (a_clean - a_corr) . dmetric/da; logprob: Yu & Ananiadou
    select: str = Field("attribution", pattern="^(attribution|causal)$")   # rank the top_k by score, or by zeroing
    top_k: int = Field(20, ge=1)
    keep: int = Field(10, ge=1)
    layers: list[int] | None = None


@method(LOCATE, "neuron_attribution", NeuronAttribution)
def neuron_attribution(ctx) -> StageOut:
    """Rank FFN neurons by attribution (AtP or log-probability increase), checked by zero-ablation."""
    from mechanic.locate.gradient import atp
    from mechanic.locate.neurons import neuron_attribution as attribute, promoted_tokens
    from mechanic.model.interventions import zero
    from mechanic.tasks import metrics as M

    s, model = ctx.settings, ctx.model
    if s.scorer == "atp":
        scores = atp(model, ctx.task, "neuron")
    else:
        scores = attribute(model, ctx.task, "neuron", layers=s.layers)["neuron"]
    scores.save(ctx.dir / "neurons.json")
    in_layers = lambda site: s.layers is None or int(site.split(".")[0][1:]) in s.layers  # noqa: E731
    top = [t for t in scores.top(len(scores.sites), by="max") if in_layers(t[0])][: s.top_k]
    sites = [site for site, _, _ in top]
    batch = ctx.task.tokenize(model)
    fn = M.get(ctx.task.metric)

    def metric(ivs=()) -> float:
        return float(fn(model.run(batch.clean, interventions=list(ivs), last_only=True).logits[:, -1], batch).mean())
    with torch.no_grad():
        base = metric()
        effects = [metric([zero(site)]) - base for site in sites]
        order = sorted(range(len(sites)), key=lambda i: effects[i]) if s.select == "causal" else range(len(sites))
        keep = [sites[i] for i in order if s.select == "attribution" or effects[i] < 0][: s.keep]
        joint = metric([zero(site) for site in keep]) - base if keep else 0.0
    tokens = promoted_tokens(model, sites, k=3)
    rows = [[sites[i], float(top[i][2]), effects[i], " ".join(tokens[i]), sites[i] in keep] for i in range(len(sites))]
    how = "Attribution patching" if s.scorer == "atp" else "Log-probability attribution"
    text = (f"{how} ranks {len(scores.sites)} FFN neurons on {ctx.task.name} ({batch.n} prompts); the "
            f"{len(keep)} selected by {s.select} are checked causally: zeroed together they move the mean "
            f"{ctx.task.metric} from {base:.3f} by {joint:+.3f} (alone: {min(effects):+.3f} to {max(effects):+.3f}).")
    figs = [table("neurons", "Top neurons: attribution, causal effect of zeroing each alone, promoted tokens",
                  ["neuron", "attribution", f"Δ {ctx.task.metric} when zeroed", "promotes", "selected"], rows)]
    return StageOut(text, figs, {"sites": keep, "base": base, "joint_effect": joint}, {"neurons": "neurons.json"})


class VectorSweep(Strict):
    """A contrastive steering vector at several layers, swept over layers x coefficients on the task."""

    vector: str = Field("caa", pattern="^(caa|pca_diff|pca_center)$")
    layers: list[int] = Field(min_length=1)
    coefficients: list[float] = Field(min_length=1)
    max_kl: float = Field(0.3, gt=0)
    side: str = Field("corrupted", pattern="^(clean|corrupted)$")
    n_pairs: int | None = Field(None, ge=2)
    neutral_tokens: int = Field(512, ge=64)


@method(LOCATE, "vector_sweep", VectorSweep)
def vector_sweep(ctx) -> StageOut:
    """Extract the vector from the task's (prompt, corrupted) pairs, sweep it, pick the best cell under max_kl."""
    from mechanic.steer.parallel import parallel_sweep
    from mechanic.steer.vectors import extract, pairs_from_task

    s, model = ctx.settings, ctx.model
    pairs = pairs_from_task(ctx.task)[: s.n_pairs]
    vec = extract(model, pairs, s.vector, layers=s.layers)
    vec.save(ctx.dir / "vector.safetensors")
    vec.save(ctx.dir / "vector.gguf") if 0 not in s.layers else None
    chosen_on = ctx.validation if ctx.validation is not None else ctx.task   # selection never reads test rows
    sw = parallel_sweep(model, vec, chosen_on, s.layers, s.coefficients, side=s.side,   # cells split over ranks
                        neutral_tokens=s.neutral_tokens)
    best = sw.best(s.max_kl)
    figs = []
    for name, sc, bar in (("target", sw.target, ctx.task.metric), ("kl", sw.kl, "KL"), ("ppl", sw.ppl, "perplexity")):
        f = scores_heatmap(sc, f"sweep_{name}", f"Sweep: {bar} by layer x coefficient", "coefficient", "layer", bar)
        f["x"] = [str(c) for c in s.coefficients]
        f["zmid"] = 0 if name == "target" else None
        figs.append(f)
    if best is None:
        text = (f"No cell of the sweep keeps KL under {s.max_kl}; the smallest coefficient at the first layer is used. "
                "Lower the coefficients or raise max_kl.")
        best = (s.layers[0], min(s.coefficients, key=abs))
    else:
        r, c = s.layers.index(best[0]), s.coefficients.index(best[1])
        text = (f"A {s.vector.upper()} vector from {len(pairs)} train pairs, swept over layers {s.layers} x "
                f"coefficients {s.coefficients} on {len(chosen_on)} validation rows and calibration prose. Unsteered "
                f"{ctx.task.metric} on the {s.side} prompts: "
                f"{sw.baseline['target']:.3f}. Best cell with KL <= {s.max_kl}: layer {best[0]}, coefficient "
                f"{best[1]:g} ({ctx.task.metric} {float(sw.target.values[r, c]):.3f}, KL {float(sw.kl.values[r, c]):.3f}, "
                f"perplexity {sw.baseline['ppl']:.1f} -> {float(sw.ppl.values[r, c]):.1f}).")
    arts = {"vector": "vector.safetensors"} | ({"gguf": "vector.gguf"} if 0 not in s.layers else {})
    return StageOut(text, figs, {"layer": best[0], "coefficient": best[1], "baseline": sw.baseline}, arts)


class EAPCircuit(Strict):
    """EAP-IG edge scores, the faithfulness curve over circuit sizes, and the circuit of `edges` top edges."""

    ig_steps: int = Field(5, ge=1)
    edges: int = Field(200, ge=1)
    curve: list[int] = [50, 100, 200, 500, 1000, 3000]
    heads: int = Field(10, ge=1)      # the top heads (by summed |edge score|) handed to the steer stage


@method(LOCATE, "eap", EAPCircuit)
def eap_circuit(ctx) -> StageOut:
    """EAP-IG -> top-edge circuit -> faithfulness curve; hands the circuit's strongest heads to steer."""
    from mechanic.locate.circuit import faithfulness_curve
    from mechanic.locate.gradient import eap

    s, model = ctx.settings, ctx.model
    scores = eap(model, ctx.task, ig_steps=s.ig_steps)
    scores.save(ctx.dir / "edges.safetensors")
    ns = sorted(set(s.curve) | {s.edges})
    curve = faithfulness_curve(model, ctx.task, scores, ns)
    senders = scores.sites
    strength: dict[str, float] = {}
    v = scores.values.abs()
    for i, snd in enumerate(senders):
        if ".head" in snd:
            strength[snd] = strength.get(snd, 0.0) + float(v[i].sum())
    heads = sorted(strength, key=strength.get, reverse=True)[: s.heads]
    ys = [round(float(c["faithfulness"]), 5) for c in curve]
    chosen = next(float(c["faithfulness"]) for n, c in zip(ns, curve) if n == s.edges)
    figs = [{"kind": "line", "id": "faithfulness", "title": "Faithfulness of the top-n EAP-IG circuit",
             "x": ns, "series": [{"name": "faithfulness", "y": ys}], "xlabel": "edges kept", "ylabel": "faithfulness",
             "log_x": True},
            table("heads", "Heads with the largest summed |edge score|", ["head", "summed |score|"],
                  [[h, strength[h]] for h in heads])]
    if heads:
        figs.append(attention_figure(model, ctx.task.examples[0].prompt, heads[0], "attention_top_head"))
    text = (f"EAP-IG ({s.ig_steps} steps) scores {v.numel()} edges on {ctx.task.name} ({len(ctx.task)} pairs). "
            f"The top {s.edges} edges keep faithfulness {chosen:.3f} (1 = the full model, 0 = the corrupted run). "
            f"The {len(heads)} heads with the most edge weight are ablated in the steer stage.")
    return StageOut(text, figs, {"heads": heads, "faithfulness": dict(zip(map(str, ns), ys))},
                    {"edges": "edges.safetensors"})


class Outliers(Strict):
    """Massive activations and verified super weights on the shipped calibration prose."""

    max_tokens: int = Field(2048, ge=128)
    max_iter: int = Field(3, ge=1)


@method(LOCATE, "outliers", Outliers)
def outliers(ctx) -> StageOut:
    """Find massive activations and super weights; the verified super weights' neurons must be kept."""
    from mechanic.data.text import calibration
    from mechanic.locate.magnitude import massive_activations, super_weights

    s, model = ctx.settings, ctx.model
    ma = massive_activations(model, calibration(), max_tokens=s.max_tokens)
    sw = super_weights(model, calibration(), max_iter=s.max_iter, seed=ctx.seed)
    protect = sorted({f"L{w.layer}.neuron{w.col}" for w in sw.candidates if w.verified})
    coords = [[w.layer, w.row, w.col] for w in sw.candidates if w.verified]
    rows = [[f"L{w.layer}", w.row, w.col, w.weight, w.ppl, min(w.ppl_random) if w.ppl_random else None, w.verified]
            for w in sw.candidates]
    figs = [table("super_weights", f"Super weight candidates down_proj[row, col] (perplexity {sw.baseline_ppl:.1f} "
                  "with nothing zeroed)", ["layer", "row", "col", "weight", "perplexity zeroed",
                                           "best random control", "verified"], rows),
            scores_heatmap(ma.scores, "massive", "Max |resid_post| by layer and dimension", "dimension", "layer",
                           "max |activation|")]
    big = ma.massive
    first = (f"{len(big)} massive activations, the largest {max(t['abs'] for t in big):.0f} in dimension "
             f"{big[0]['dim']} (median |activation| {min(ma.medians):.2f} to {max(ma.medians):.2f})") if big else \
        "no massive activations"
    text = (f"On the shipped calibration prose: {first}. Verified super weights: {', '.join(protect) or 'none'} "
            f"(baseline perplexity {sw.baseline_ppl:.1f}); compression must keep them.")
    return StageOut(text, figs, {"protect": protect, "super_weights": coords}, {})


class HeadAttribution(Strict):
    """Attribution patching over every head: (z_clean - z_corr) . dmetric/dz, the top `top` by value."""

    top: int = Field(5, ge=1)
    by: str = Field("max", pattern="^(max|min|abs)$")


@method(LOCATE, "head_attribution", HeadAttribution)
def head_attribution(ctx) -> StageOut:
    """AtP head scores from two forwards and one backward; the top heads go to the steer stage."""
    from mechanic.locate.gradient import atp

    s, model = ctx.settings, ctx.model
    scores = atp(model, ctx.task, "head")
    scores.save(ctx.dir / "heads.json")
    heads = [site for site, _, _ in scores.top(s.top, by=s.by)]
    figs = [scores_heatmap(scores, "heads_atp", f"Head attribution (AtP) on {ctx.task.name}", "head", "layer"),
            attention_figure(model, ctx.task.examples[0].prompt, heads[0], "attention_top_head")]
    text = (f"Attribution patching scores all {len(scores.sites)} heads on {len(ctx.task)} {ctx.task.name} pairs "
            f"(clean vs corrupted, metric {ctx.task.metric}); the top {s.top} by {s.by}: {', '.join(heads)}.")
    return StageOut(text, figs, {"heads": heads}, {"heads": "heads.json"})


class ICLHeads(Strict):
    """In-context heads (ablation and log-probability scores) on the task."""

    n: int = Field(40, ge=4)
    top: int | None = Field(None, ge=1)
    layers: list[int] | None = None


@method(LOCATE, "in_context_heads", ICLHeads)
def icl_heads(ctx) -> StageOut:
    """Heads whose removal or log-prob contribution matters most for in-context labels."""
    from mechanic.locate.compare import in_context_heads

    s, model = ctx.settings, ctx.model
    res = in_context_heads(model, ctx.task, n=s.n, top=s.top, layers=s.layers)
    for k, sc in res.items():
        sc.save(ctx.dir / f"{k}.json")
    st = next(iter(res.values())).settings
    figs = [scores_heatmap(sc, f"heads_{k}", f"In-context heads: {k}", "head", "layer") for k, sc in res.items()]
    figs.append(attention_figure(model, ctx.task.examples[0].prompt, st["union"][0], "attention_top_head"))
    text = (f"On {st['n_examples']} {ctx.task.name} prompts (accuracy {st['accuracy_clean']:.3f}), the union of the "
            f"top heads by ablation and by log-probability is {', '.join(st['union'])}; zeroing all of them gives "
            f"accuracy {st['accuracy_union_ablated']:.3f}.")
    return StageOut(text, figs, {"heads": st["union"]}, {k: f"{k}.json" for k in res})


class Refusal(Strict):
    """Refusal directions from the train instructions, and the (layer, coefficient) of the gated vector chosen on
    the validation instructions: the most harmful refusals while harmless refusals stay at most `max_harmless`."""

    layers: list[int] = Field([12, 16, 18], min_length=1)
    coefficients: list[float] = Field([0.75, 1.25, 2.0], min_length=1)
    max_harmless: float = Field(0.0625, ge=0, le=1)
    max_new_tokens: int = Field(32, ge=4)
    n: int | None = Field(None, ge=2)   # train prompts per set (default: all)


def _gate_grid(model, steer, cond, s) -> list[list]:
    """Per (layer, coefficient): refusal rates of validation harmful / harmless replies under the gated plan."""
    from mechanic.improve.refusal import chat_prompts, instructions, is_refusal, replies
    from mechanic.steer.conditional import conditional_vector

    cal = (chat_prompts(model, instructions("harmful", "train")[1::2]),
           chat_prompts(model, instructions("harmless", "train")[1::2]))
    val = {k: chat_prompts(model, instructions(k, "validation")) for k in ("harmful", "harmless")}
    grid = []
    for L in s.layers:
        for c in s.coefficients:
            plan = conditional_vector(model, steer, cond, L, c, calibrate=cal)
            with model.applied(plan):
                rate = {k: sum(map(is_refusal, replies(model, p, s.max_new_tokens))) / len(p) for k, p in val.items()}
            grid.append([L, c, rate["harmful"], rate["harmless"]])
    return grid


@method(LOCATE, "refusal", Refusal)
def refusal(ctx) -> StageOut:
    """Both refusal directions at `layers`; the gated vector's cell chosen on validation instructions."""
    from mechanic.improve.refusal import chat_prompts, instructions, refusal_direction, refusal_pairs, rows
    from mechanic.model.readout import read
    from mechanic.steer.vectors import caa

    s, model = ctx.settings, ctx.model
    # the CAA vector from every train row; the condition from the even train rows (odd ones calibrate the gate)
    harmful, harmless = instructions("harmful", "train")[: s.n:2], instructions("harmless", "train")[: s.n:2]
    steer = caa(model, refusal_pairs(model, rows("harmful", "train")[: s.n]), layers=s.layers, read="answer")
    cond = refusal_direction(model, harmful, harmless, layers=s.layers)
    steer.save(ctx.dir / "vector.safetensors")
    cond.save(ctx.dir / "condition.safetensors")
    sites = [f"L{L}.resid_post" for L in s.layers]
    a = read(model, chat_prompts(model, harmful), sites, "last")
    b = read(model, chat_prompts(model, harmless), sites, "last")
    acc, cos = [], []
    for L, site in zip(s.layers, sites):
        d = cond.directions[L] / cond.directions[L].norm()
        pa, pb = a[site].float() @ d, b[site].float() @ d
        t = (pa.mean() + pb.mean()) / 2
        acc.append(round(float(((pa > t).float().mean() + (pb <= t).float().mean()) / 2), 4))
        cos.append(round(float(torch.nn.functional.cosine_similarity(steer.directions[L], cond.directions[L], 0)), 4))
    grid = _gate_grid(model, steer, cond, s)
    ok = [g for g in grid if g[3] <= s.max_harmless] or grid
    layer, coef, rh, rl = max(ok, key=lambda g: (g[2] - g[3], -g[1]))
    figs = [{"kind": "line", "id": "separation", "title": "Harmful vs harmless along the difference of means",
             "x": s.layers, "series": [{"name": "balanced accuracy (midpoint threshold)", "y": acc},
                                       {"name": "cosine(CAA, difference of means)", "y": cos}],
             "xlabel": "layer", "ylabel": "value"},
            table("gate_grid", "Validation refusal rates of the gated vector per cell (the choice: most harmful "
                  f"refusals with harmless refusals <= {s.max_harmless:g})",
                  ["layer", "coefficient", "harmful refused", "harmless refused"], grid)]
    i = s.layers.index(layer)
    text = (f"From {len(harmful)} harmful and {len(harmless)} harmless train instructions: the difference of means "
            f"separates them with balanced accuracy {acc[i]:.2f} at layer {layer}, but its cosine with the CAA "
            f"refusal direction (refusing vs complying openings) is {cos[i]:.2f}: the model represents harmfulness "
            "and refusal separately, so the steer stage adds the CAA direction only to prompts the difference of means "
            f"flags (conditional steering). On the validation instructions the cell layer {layer} x {coef:g} refuses "
            f"{rh:.0%} of harmful and {rl:.0%} of harmless requests (the grid below); the control ablates the "
            "difference of means.")
    return StageOut(text, figs, {"layer": layer, "coefficient": coef, "separation": acc, "cosine": cos, "grid": grid},
                    {"vector": "vector.safetensors", "condition": "condition.safetensors"})


class FeatureAttribution(Strict):
    """A sparse dictionary's latents ranked by attribution patching of the task metric (train split); top_k kept."""

    dictionary: str | TrainDictionary   # a SAELens directory, or {train: {site: ..., ...}} (recipes.dictionaries)
    top_k: int = Field(20, ge=1)
    by: str = Field("max", pattern="^(max|min|abs)$")


@method(LOCATE, "feature_attribution", FeatureAttribution)
def feature_attribution(ctx) -> StageOut:
    """AtP over the attached dictionary's latents (and its error node); the top_k latents go to the steer stage."""
    from mechanic.locate.gradient import atp
    from mechanic.recipes.dictionaries import attach_dir
    from mechanic.recipes.schema import RecipeError

    s, model = ctx.settings, ctx.model
    if not isinstance(s.dictionary, str):
        raise RecipeError("locate.dictionary {train: ...} is trained by the recipe runner (its `dictionary` stage), "
                          "which hands this method the trained directory; run the recipe with `mechanic run`, or give "
                          "a SAELens-format directory.")
    site = attach_dir(model, s.dictionary)
    scores = atp(model, ctx.task, "sae", per_position=False)
    keep = [i for i, n in enumerate(scores.sites) if n.startswith(f"{site}.sae") and not n.endswith("_error")]
    error = next(float(scores.values[i]) for i, n in enumerate(scores.sites) if n == f"{site}.sae_error")
    scores.save(ctx.dir / "latents.json")
    vals = scores.values[keep]
    key = {"abs": vals.abs(), "max": vals, "min": -vals}[s.by]
    order = key.argsort(descending=True)[: s.top_k].tolist()
    latents = [scores.sites[keep[i]] for i in order]
    total = float(vals.sum())
    rows = [[scores.sites[keep[i]], float(vals[i])] for i in order]
    text = (f"Attribution patching through the {len(keep)}-latent dictionary at {site} on {len(ctx.task)} "
            f"{ctx.task.name} pairs (metric {ctx.task.metric}): the latents carry {total:+.3f} of the clean - corrupted "
            f"difference and the error node {error:+.3f}. The top {len(latents)} by {s.by} "
            f"({latents[0]} at {rows[0][1]:+.4f}) go to the steer stage.")
    figs = [table("latents", f"Top latents by attribution ({s.by})", ["latent", "attribution"], rows)]
    return StageOut(text, figs, {"latents": latents, "dictionary": str(s.dictionary), "site": site,
                                 "error": error, "latents_total": total}, {"latents": "latents.json"})


class GraphFeatures(Strict):
    """Transcoder features ranked by an attribution graph of one prompt (mechanic.locate.graph); top_k kept."""

    transcoders: str                 # a directory of per-layer transcoders (one SAELens subdirectory per layer)
    prompt: str | None = None        # default: the task's first train prompt
    target: str = Field("logits", pattern="^(logits|answer)$")   # probability-weighted top logits, or the answer's
    top_k: int = Field(10, ge=1)
    by: str = Field("max", pattern="^(max|min|abs)$")
    layer: int | Literal["all"] | None = None   # whose features are kept: one layer (default: the top feature's)
    logit_mass: float = Field(0.95, gt=0, le=1)
    max_logits: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    max_feature_nodes: int | None = Field(MAX_FEATURE_NODES, ge=0)   # the most influential features kept (None: all)
    zero_first: bool = True          # position 0 (the attention sink) has no feature nodes


@method(LOCATE, "graph_features", GraphFeatures)
def graph_features(ctx) -> StageOut:
    """Build the prompt's attribution graph and hand the top features of one layer (its transcoder the
    dictionary) to the steer stage: feature plans act through one attached dictionary."""
    from mechanic.locate.graph import attribute, load_transcoders, scores
    from mechanic.recipes.schema import RecipeError

    s, model = ctx.settings, ctx.model
    if s.prompt is None and (ctx.task is None or not len(ctx.task)):
        raise RecipeError("graph_features needs a prompt: set locate.prompt, or give the recipe a task (its first "
                          "train prompt is used).")
    prompt = s.prompt if s.prompt is not None else ctx.task.examples[0].prompt
    tcs, where = load_transcoders(model, s.transcoders)
    token = None
    if s.target == "answer":
        if ctx.task is None:
            raise RecipeError("graph_features target: answer needs a task (the answer of its first train prompt).")
        token = int(ctx.task.subset(1).tokenize(model).answer[0])
    g = attribute(model, tcs, prompt, logit_mass=s.logit_mass, max_logits=s.max_logits, batch_size=s.batch_size,
                  max_feature_nodes=s.max_feature_nodes, zero_first=s.zero_first)
    g.save(ctx.dir / "graph")
    sc = scores(g, token=token)
    sc.save(ctx.dir / "features.json")
    key = {"abs": sc.values.abs(), "max": sc.values, "min": -sc.values}[s.by]
    layer_of = [int(x.split(".")[0][1:]) for x in sc.sites]
    if s.layer == "all":        # the top features of any layer: one dictionary per layer they come from
        order = key.argsort(descending=True)[: s.top_k].tolist()
        layers = list(dict.fromkeys(layer_of[i] for i in order))
    else:
        if isinstance(s.layer, int) and s.layer < 0:
            raise RecipeError(f"graph_features layer must be a layer index >= 0, 'all', or unset; got {s.layer}.")
        layers = [s.layer if s.layer is not None else layer_of[int(key.argmax())]]
        mine = [i for i, L in enumerate(layer_of) if L == layers[0]]
        if layers[0] in where and not mine:
            raise RecipeError(f"No feature of layer {layers[0]} is active on the prompt; pick another layer (or none).")
        order = sorted(mine, key=lambda i: -float(key[i]))[: s.top_k]
    missing = [L for L in layers if L not in where]
    if missing:
        raise RecipeError(f"graph_features layer {missing[0]}: {s.transcoders} has no transcoder for it (it has layers "
                          f"{sorted(where)}).")
    latents = [sc.sites[i] for i in order]
    rows = [[sc.sites[i], float(sc.values[i])] for i in order]
    every = [[sc.sites[i], float(sc.values[i])] for i in key.argsort(descending=True)[: 2 * s.top_k].tolist()]
    what = "the probability-weighted top logits" if token is None else f"the answer's logit (token {token})"
    where_from = f"layer {layers[0]}" if len(layers) == 1 else f"every layer (from layers {', '.join(map(str, layers))})"
    tops = ", ".join(f"{model.tokenizer.decode([t])!r} p={p:.3f}" if model.tokenizer is not None else f"#{t}"
                     for t, p in zip(g.logit_tokens.tolist(), g.logit_probs.tolist()))
    text = (f"The attribution graph of {prompt!r} ({g.count('feature')} active features of "
            f"{len(where)} transcoders; top logits {tops}; replacement score {g.scores['replacement']:.3f}, "
            f"completeness {g.scores['completeness']:.3f}) scores each feature by its total effect on {what} "
            f"through the graph (direct + indirect, summed over positions). The top {len(latents)} by {s.by} of "
            f"{where_from} ({latents[0]} at {rows[0][1]:+.4f}) go to the steer stage, through the transcoder"
            f"{'s' if len(layers) > 1 else ''} attached at the MLP output (error kept).")
    figs = [table("latents", f"Top features of {where_from} by graph effect ({s.by})", ["latent", "effect"], rows),
            table("graph_features", "Top features of every layer by graph effect", ["latent", "effect"], every)]
    one = len(layers) == 1          # one layer: a dictionary and a site; several: lists of them, in latent order
    dicts, sites = [str(where[L]) for L in layers], [f"L{L}.mlp_out" for L in layers]
    return StageOut(text, figs, {"latents": latents, "dictionary": dicts[0] if one else dicts,
                                 "site": sites[0] if one else sites, "layer": layers[0] if one else layers,
                                 "prompt": prompt, "token": token, "graph_scores": dict(g.scores),
                                 "logit_tokens": g.logit_tokens.tolist()},
                    {"graph": "graph/graph.json", "features": "features.json"})
