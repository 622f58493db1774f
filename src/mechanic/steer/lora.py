"""LoRA baseline for knowledge editing: rank-r adapters (Hu et al. 2021, through `peft`) on the down-projection of
the edited layer(s), trained on the edit requests like FT-L, merged into a weight-edit Plan.

peft wraps the chosen modules only while training (its dropout 0, B initialised at zero so training starts at
the unedited model); the trained factors A [r, d_in] and B [d_out, r] give the merged update
Delta = B @ A * alpha / r, stored as the new weight W + Delta, and peft's wrapper is removed (even on errors), so
the user's model is never left wrapped and the plan saves, loads and undoes like any other.
"""

from __future__ import annotations

import math
import warnings

import torch

from mechanic.steer.edit import _fact_dict
from mechanic.steer.finetune import (_positive, _steps, as_facts, down_param, edit_layers, fit, no_hooks, requests,
                                     trainable)
from mechanic.steer.plan import Plan, PlanError, WeightEdit


def merged_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, conv1d: bool = False) -> torch.Tensor:
    """B @ A * scaling in the parameter's layout (transposed for GPT-2's Conv1D, stored [in, out]), float64."""
    delta = (B.double() @ A.double()) * scaling
    return delta.T if conv1d else delta


def lora_factors(model, facts, layers: int | list[int] | None = None, *, rank: int = 8, alpha: float | None = None,
                 lr: float = 5e-3, steps: int = 50, seed: int = 0) -> tuple[dict, dict]:
    """Train LoRA adapters on the facts' new targets; ({param name: (A, B, scaling)}, settings). The model is left
    exactly as it was (no wrapper, same modules, same requires_grad flags)."""
    what = "LoRA"
    facts = as_facts(facts, what)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise PlanError(f"{what}: rank must be a whole number >= 1 (the adapters' rank r), got {rank!r}.")
    alpha = 2.0 * rank if alpha is None else _positive("alpha", alpha, what)
    lr, steps = _positive("lr", lr, what), _steps(steps, what)
    no_hooks(model, what)
    layers, traced = edit_layers(model, layers, facts, what)
    from peft import LoraConfig, get_peft_model

    mods = {id(m): n for n, m in model.hf.named_modules()}
    paths = [mods[id(model.layer_module(L, model.arch.down_proj))] for L in layers]
    names = [down_param(model, L)[0] for L in layers]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=paths, lora_dropout=0.0, bias="none",
                        fan_in_fan_out=model.arch.conv1d, init_lora_weights=True)
    inputs, reads = requests(model, facts)
    with torch.random.fork_rng(), trainable(model, []):
        torch.manual_seed(seed)   # A's random initialisation
        with warnings.catch_warnings():   # peft 0.21 calls a transformers method deprecated in v5
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = get_peft_model(model.hf, config)
        try:
            layer_mods = [wrapped.get_submodule("base_model.model." + p) for p in paths]
            params = [x for m in layer_mods for x in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
            for x in params:
                x.requires_grad_(True)
            losses = fit(model, params, inputs, reads, len(facts), lr=lr, steps=steps,
                         desc=f"LoRA on {len(facts)} facts")
            factors = {n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone(),
                           float(m.scaling["default"])) for n, m in zip(names, layer_mods)}
        finally:
            wrapped.unload()   # the original modules back in place, unmerged
    left = [p for p in paths if type(model.hf.get_submodule(p)).__module__.startswith("peft")]
    if left:
        raise PlanError(f"peft left adapter modules at {left} after unloading; this peft version does not restore "
                        "the model. Install peft >= 0.21.")
    settings = {"layers": layers, "layer_from_trace": traced, "rank": rank, "alpha": alpha,
                "scaling": alpha / rank, "lr": lr, "steps": steps, "steps_run": len(losses), "losses": losses,
                "seed": seed, "facts": [_fact_dict(f) for f in facts]}
    return factors, settings


def lora_plan(model, factors: dict, settings: dict) -> Plan:
    """The Plan that sets each adapted weight to W + B @ A * scaling (the merged LoRA update)."""
    params = dict(model.hf.named_parameters())
    edits, norms = [], {}
    for name, (A, B, scaling) in factors.items():
        W = params[name].detach()
        delta = merged_delta(A, B, scaling, model.arch.conv1d)
        edits.append(WeightEdit(name, (W.double() + delta).to(W.dtype),
                                note=f"LoRA rank {A.shape[0]} merged: {len(settings['facts'])} facts"))
        norms[name] = float(delta.norm())
    if not all(math.isfinite(v) for v in norms.values()):
        raise PlanError("LoRA training diverged (the merged update is not finite); lower lr or steps.")
    return Plan(edits=edits, method="lora", fingerprint=model.fingerprint,
                settings={**settings, "delta_norms": norms})


def lora(model, facts, layers: int | list[int] | None = None, *, rank: int = 8, alpha: float | None = None,
         lr: float = 5e-3, steps: int = 50, seed: int = 0) -> Plan:
    """Rank-`rank` LoRA on the down_proj of `layers` (default: the traced layer) trained on the facts' new targets,
    merged into a weight-edit Plan."""
    factors, settings = lora_factors(model, facts, layers, rank=rank, alpha=alpha, lr=lr, steps=steps, seed=seed)
    return lora_plan(model, factors, settings)
