"""Self-checks a user can run on their own model (like nnterp's): parity, decompositions, batching."""

from __future__ import annotations

import torch

PROMPTS = ["The capital of France is", "When Mary and John went to the store, John gave a drink to",
           "One, two, three,"]


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def validate(model, prompts: list[str] | None = None) -> list[dict]:
    """Run the parity checks of the test suite on `model`; each result has check, max_abs_diff, tolerance, ok."""
    prompts = prompts or PROMPTS
    if model.tokenizer is None:
        raise ValueError("validate needs a model with a tokenizer (it runs text prompts).")
    batch = model.inputs(prompts)
    with torch.no_grad():
        ref = model.hf(**batch, use_cache=False).logits
    last = model.dims.n_layers - 1
    mid = last // 2
    cache = [str(s) for s in model.sites() if s.kind not in ("expert", "router")]
    run = model.run(prompts, cache=cache)
    out = [("no-intervention logits equal the HF forward", _diff(run.logits, ref), 0.0)]
    o = model.layer_module(mid, model.arch.o_proj)
    bias = o.bias if getattr(o, "bias", None) is not None else 0.0
    if model.arch.attn_write == model.arch.attn:
        out.append((f"heads of layer {mid} sum to attn_out", _diff(run[f"L{mid}.head"].sum(2) + bias,
                                                                    run[f"L{mid}.attn_out"]), 1e-4))
    if not model.parallel:
        out.append((f"resid_post = resid_mid + mlp_out (layer {last})",
                    _diff(run[f"L{last}.resid_mid"] + run[f"L{last}.mlp_out"], run[f"L{last}.resid_post"]), 0.0))
    worst = 0.0
    for i, p in enumerate(prompts):
        worst = max(worst, _diff(run.logits[i, -1], model.run(p).logits[0, -1]))
    out.append(("left-padded batch equals prompts alone (last token)", worst, 1e-4))
    moe = [i for i in range(model.dims.n_layers) if model.is_moe(i)]
    if moe:
        L = moe[0]
        r = model.run(prompts, cache=[f"L{L}.expert", f"L{L}.router"])
        total = (r[f"L{L}.expert"] * r[f"L{L}.router"][..., None]).sum(2)
        if not model.arch.shared_expert:
            out.append((f"experts x router = MoE output (layer {L})", _diff(total, run[f"L{L}.mlp_out"]), 1e-4))
    out.append(("hooks left after runs", float(model.hook_count()), 0.0))
    return [{"check": c, "max_abs_diff": d, "tolerance": t, "ok": d <= t} for c, d, t in out]
