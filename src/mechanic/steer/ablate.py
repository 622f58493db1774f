"""Amplitude manipulation: zero, mean- or resample-ablate, or scale heads, neurons, experts and layers.

Input is a site list or located `Scores` (their top k); output is a `Plan` of hook interventions.
Mean and resample ablation take their values from real activations of reference prompts (a task's
clean prompts or plain texts): mean = the average over every real token, resample = a value drawn
per token from those activations. A layer (`L3`) means its two residual writes, attn_out and mlp_out
(the layer is skipped). Experts are removed one of two named ways: `zero` (their output zeroed, the
router untouched) or `router_mask` (taken out of the top-k weights, the others rescaled to the same sum).
"""

from __future__ import annotations

import torch

from mechanic.locate.scores import Scores
from mechanic.model.interventions import apply_fn, mean_ablate, scale, zero
from mechanic.model.sites import Site
from mechanic.steer.fns import Resample, RouterMask
from mechanic.steer.plan import Plan, PlanError

HOW = ("zero", "mean", "resample", "scale")
EXPERT_MODES = ("zero", "router_mask")


def _sites(model, sites, k: int | None) -> list[Site]:
    """Sites from a list of names, a Scores (top k by |value|, position ignored) or Scores.top entries."""
    if isinstance(sites, Scores):
        entries = sites.top(k or 10)
        names = list(dict.fromkeys(e[0] for e in entries))
    else:
        names = [s[0] if isinstance(s, tuple) else s for s in ([sites] if isinstance(sites, (str, Site)) else sites)]
    out = []
    for n in names:
        text = str(n)
        if text.startswith("L") and text[1:].isdigit():  # a whole layer: its two residual writes
            out += [model.check(f"{text}.attn_out"), model.check(f"{text}.mlp_out")]
        else:
            out.append(model.check(text))
    if not out:
        raise PlanError("Nothing to ablate: the site list is empty (or k is 0).")
    return out


def _reference(model, reference, sites: list[Site], max_tokens: int) -> dict[str, torch.Tensor]:
    """Every real token's value at each site over the reference prompts: {site: [tokens, ...]}."""
    if reference is None:
        raise PlanError("Mean and resample ablation need reference prompts (a Task, or a list of texts) to take "
                        "activation values from; pass reference=...")
    prompts = [e.prompt for e in reference.examples] if hasattr(reference, "examples") else list(reference)
    vals: dict[str, list[torch.Tensor]] = {str(s): [] for s in sites}
    count = 0
    for i in range(0, len(prompts), 8):
        inputs = model.inputs(prompts[i:i + 8])
        run = model.run(inputs, cache=sites, stop_at="auto")
        real = inputs["attention_mask"].bool()
        for s in sites:
            vals[str(s)].append(run[s][real].float())
        count += int(real.sum())
        if count >= max_tokens:
            break
    return {k: torch.cat(v)[:max_tokens] for k, v in vals.items()}


def ablate(model, sites, how: str = "zero", *, factor: float | None = None, k: int | None = None,
           reference=None, expert_mode: str = "zero", positions=None, max_tokens: int = 4096,
           seed: int = 0) -> Plan:
    """A plan that ablates (zero / mean / resample) or scales (factor) the given sites at `positions`
    (None = every token; "prompt" / "generated" while generating)."""
    if how not in HOW:
        raise PlanError(f"Unknown ablation {how!r}; choose one of {', '.join(HOW)}.")
    if expert_mode not in EXPERT_MODES:
        raise PlanError(f"expert_mode must be one of {', '.join(EXPERT_MODES)}, got {expert_mode!r}.")
    if (how == "scale") != (factor is not None):
        raise PlanError("Give factor= exactly when how='scale' (e.g. 0.5 damps, 2.0 amplifies).")
    targets = _sites(model, sites, k)
    ivs, by_router = [], {}
    for s in targets:
        if s.kind == "expert" and s.neuron is None and expert_mode == "router_mask":
            if how != "zero":
                raise PlanError("expert_mode='router_mask' removes experts from routing; it only goes with how='zero'.")
            by_router.setdefault(s.layer, []).append(s.index)
    for L, experts in by_router.items():
        ivs.append(apply_fn(f"L{L}.router", RouterMask(experts), pos=positions))
    rest = [s for s in targets if not (s.kind == "expert" and s.neuron is None and expert_mode == "router_mask")]
    ref = _reference(model, reference, rest, max_tokens) if how in ("mean", "resample") and rest else {}
    for s in rest:
        if how == "zero":
            ivs.append(zero(s, pos=positions))
        elif how == "scale":
            ivs.append(scale(s, float(factor), pos=positions))
        elif how == "mean":
            ivs.append(mean_ablate(s, ref[str(s)].mean(0), pos=positions))
        else:
            ivs.append(apply_fn(s, Resample(ref[str(s)], seed), pos=positions))
    settings = {"how": how, "factor": factor, "expert_mode": expert_mode, "sites": [str(s) for s in targets],
                "k": k, "positions": positions, "seed": seed,
                "reference_tokens": {k_: int(v.shape[0]) for k_, v in ref.items()} or None}
    if isinstance(sites, Scores):
        settings["from_scores"] = {"method": sites.method, "task": sites.task, "metric": sites.metric}
    return Plan(ivs, method=f"ablate/{how}", fingerprint=model.fingerprint, settings=settings)
