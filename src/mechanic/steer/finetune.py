"""FT-L: constrained fine-tuning of one layer's MLP down-projection, the ROME paper's baseline (Zhu et al. 2020).

The down_proj weight W of one layer (by default the layer ROME would edit: causal tracing averaged over the facts)
is trained with Adam on the edit requests, loss = the new target's negative log-likelihood after the prompt
(teacher forced, averaged over each target's tokens, then over the facts), and after every step clamped to the
L-infinity ball |W - W0| <= eps around its value at the start (exactly: checked in float64). Training stops
early when the loss is below 1e-2, as in ROME's code. The result is a Plan of one weight edit, like ROME's, so
save, load and undo work unchanged; the model is left as it was. eps is absolute, so it is model-specific: ROME
used eps = lr = 5e-4 (25 steps) on GPT-2 XL; SmolLM2's down_proj weights are larger (mean |w| 0.14), and there
5e-4 leaves two test facts' answers unchanged (target NLL 7.5 -> 5.7 and stuck) while the
default 5e-3 makes both new targets the greedy answer. The forward is the plain Hugging Face forward, so hook
interventions of applied plans are refused.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from mechanic.progress import track
from mechanic.steer.edit import Fact, _fact_dict, _target_ids, trace_layers
from mechanic.steer.plan import Plan, PlanError, WeightEdit

STOP_LOSS = 1e-2   # ROME's FT stops once the mean NLL is below this


def as_facts(facts, what: str) -> list[Fact]:
    """A list of Facts from one Fact or a sequence of them, or a one-paragraph error."""
    facts = [facts] if isinstance(facts, Fact) else list(facts)
    if not facts or not all(isinstance(f, Fact) for f in facts):
        raise PlanError(f"{what} trains on edit requests: give one or more mechanic.steer.edit.Fact objects "
                        "(prompt, subject, target_new), e.g. from facts_from_task(task).")
    return facts


def edit_layers(model, layers, facts: list[Fact], what: str) -> tuple[list[int], bool]:
    """The layers to train (given, or the one causal tracing averaged over `facts` chooses) and whether traced;
    each must exist and have a dense MLP."""
    n = model.dims.n_layers
    dense = [L for L in range(n) if not model.is_moe(L)]
    if not dense:
        raise PlanError(f"{what} trains a dense MLP's down-projection, but every layer of this model is a mixture "
                        "of experts (none has one); use a dense model.")
    given, traced = layers, layers is None
    if traced:
        layers = [trace_layers(model, facts)[0]]
    elif isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    try:
        layers = sorted({int(x) for x in layers if not isinstance(x, bool) and int(x) == x})
    except (TypeError, ValueError):
        layers = []
    bad = [L for L in layers if not 0 <= L < n]
    if not layers or bad:
        raise PlanError(f"{what} cannot train layer(s) {bad or given!r}: this model has layers 0..{n - 1}. Give "
                        "a layer index in that range (or a list of them), or None for the layer causal tracing "
                        "chooses (the one ROME would edit).")
    moe = [L for L in layers if model.is_moe(L)]
    if moe:
        raise PlanError(f"{what} trains a dense MLP's down-projection, but layer(s) {moe} are mixtures of experts. "
                        f"Choose a dense layer ({', '.join(map(str, dense))}).")
    return layers, traced


def down_param(model, layer: int) -> tuple[str, torch.nn.Parameter]:
    """(name as named_parameters spells it, the parameter) of layer `layer`'s down_proj weight."""
    mod = model.layer_module(layer, model.arch.down_proj)
    name = {id(p): n for n, p in model.hf.named_parameters()}[id(mod.weight)]
    return name, mod.weight


def requests(model, facts: list[Fact]):
    """Left-padded inputs of prompt + new target (all but its last token) and the (row, position, token) triples
    at which the target's tokens are read."""
    if model.tokenizer is None:
        raise PlanError("Fine-tuning on edit requests reads prompts as text; this model has no tokenizer.")
    tok = model.tokenizer
    rows, spans = [], []
    for f in facts:
        a, b = tok(f.prompt)["input_ids"], _target_ids(model, f.target_new)
        rows.append(list(a) + list(b)[:-1])
        spans.append((len(a), b))
    inputs = model.inputs(rows)
    width = inputs["input_ids"].shape[1]
    reads = [(i, width - len(r) + start - 1 + j, t)
             for i, (r, (start, tgt)) in enumerate(zip(rows, spans)) for j, t in enumerate(tgt)]
    return inputs, torch.tensor(reads, dtype=torch.long)


def target_nll(logits: torch.Tensor, reads: torch.Tensor, n_facts: int) -> torch.Tensor:
    """The new targets' NLL: mean over each target's tokens, then over the facts."""
    logp = torch.log_softmax(logits.float(), -1)
    reads = reads.to(logp.device)
    tok_nll = -logp[reads[:, 0], reads[:, 1], reads[:, 2]]
    per_fact = torch.zeros(n_facts, device=logp.device).index_add(0, reads[:, 0], tok_nll)
    counts = torch.zeros(n_facts, device=logp.device).index_add(0, reads[:, 0], torch.ones_like(tok_nll))
    return (per_fact / counts).mean()


def forward(model, inputs, keep: int = 0) -> torch.Tensor:
    """The plain Hugging Face forward's logits (gradients reach whichever parameters require them); keep > 0: at the
    last `keep` positions only."""
    return model.hf(**inputs, use_cache=False, logits_to_keep=keep).logits


def kept(inputs, reads: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(how many last positions hold every read, the reads with positions counted within them): the targets sit at
    the end of each left-padded row, so the unembedding and softmax of the other positions can be skipped."""
    width = inputs["input_ids"].shape[1]
    keep = int(width - reads[:, 1].min())
    local = reads.clone()
    local[:, 1] -= width - keep
    return keep, local


def no_hooks(model, what: str) -> None:
    """Refuse to train under hook interventions: the plain forward would not see them."""
    if getattr(model, "steering", None):
        raise PlanError(f"{what} trains with the plain forward, but {len(model.steering)} hook interventions of an "
                        "applied plan are active and it would not see them. Undo that plan first (weight-edit plans "
                        "such as earlier edits are fine: they live in the weights).")


@contextmanager
def trainable(model, params: list[torch.nn.Parameter]):
    """Only `params` require grad for the duration; every flag is restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.hf.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
            p.grad = None


def fit(model, params: list[torch.nn.Parameter], inputs, reads, n_facts: int, *, lr: float, steps: int, desc: str,
        after_step=None) -> list[float]:
    """Adam on the requests' target NLL until it is below STOP_LOSS or `steps` ran; after_step() (no grad) after
    each step (FT-L's clamp). Returns the loss of every step run."""
    opt = torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    keep, reads = kept(inputs, reads)
    for _ in track(range(steps), desc, unit="step"):
        opt.zero_grad()
        loss = target_nll(forward(model, inputs, keep), reads, n_facts)
        losses.append(float(loss.detach()))
        if losses[-1] < STOP_LOSS:
            break
        loss.backward()
        opt.step()
        if after_step is not None:
            with torch.no_grad():
                after_step()
    return losses


def clamp_linf(W: torch.Tensor, W0: torch.Tensor, eps: float) -> torch.Tensor:
    """W clamped to |W - W0| <= eps elementwise, exactly (checked in float64): the clamp is computed in float64
    and a value that rounding to W's dtype put past the bound is moved an ulp at a time back towards W0."""
    base = W0.double()
    out = torch.minimum(torch.maximum(W.double(), base - eps), base + eps).to(W.dtype)
    for _ in range(8):   # one step suffices after float64 clamping; the loop guards the double-rounding edge
        over = (out.double() - base).abs() > eps
        if not bool(over.any()):
            break
        out = torch.where(over, torch.nextafter(out, W0), out)
    return out


def _positive(name: str, value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise PlanError(f"{what}: {name} must be a positive finite number, got {value!r}. {HINTS[name]}")
    return float(value)


HINTS = {"eps": "It is the L-infinity radius of the allowed weight change (default 5e-3; ROME's FT-L on GPT-2 "
                "XL: 5e-4); larger lets the edit move each weight further.",
         "lr": "It is Adam's learning rate (default 5e-3 for FT-L and LoRA).",
         "alpha": "It is LoRA's scale numerator: the update is B @ A * alpha / rank (default 2 x rank)."}


def _steps(steps, what: str) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PlanError(f"{what}: steps must be a whole number >= 1 (optimiser steps), got {steps!r}.")
    return steps


def ft(model, facts, layer: int | list[int] | None = None, *, eps: float = 5e-3, lr: float = 5e-3,
       steps: int = 25, seed: int = 0) -> Plan:
    """FT-L: fine-tune layer `layer`'s down_proj (default: the traced layer) on the facts' new targets, each weight
    kept within eps of its start (L-infinity); a Plan of the weight edit."""
    what = "FT-L"
    facts = as_facts(facts, what)
    eps, lr, steps = _positive("eps", eps, what), _positive("lr", lr, what), _steps(steps, what)
    no_hooks(model, what)
    layers, traced = edit_layers(model, layer, facts, what)
    inputs, reads = requests(model, facts)
    named = [down_param(model, L) for L in layers]
    starts = [p.detach().clone() for _, p in named]
    def clamp():
        for (_, p), W0 in zip(named, starts):
            p.copy_(clamp_linf(p, W0, eps))
    try:
        with torch.random.fork_rng(), trainable(model, [p for _, p in named]):
            torch.manual_seed(seed)
            losses = fit(model, [p for _, p in named], inputs, reads, len(facts), lr=lr, steps=steps,
                         desc=f"FT-L on {len(facts)} facts", after_step=clamp)
        finals = [p.detach().clone() for _, p in named]
    finally:
        with torch.no_grad():
            for (_, p), W0 in zip(named, starts):
                p.copy_(W0)
    edits = [WeightEdit(name, new, note=f"FT-L layer {L}: {len(facts)} facts, |dW| <= {eps:g}")
             for L, (name, _), new in zip(layers, named, finals)]
    change = [float((new.double() - W0.double()).abs().max()) for new, W0 in zip(finals, starts)]
    settings = {"layers": layers, "layer_from_trace": traced, "eps": eps, "lr": lr, "steps": steps,
                "steps_run": len(losses), "losses": losses, "max_abs_change": change, "seed": seed,
                "facts": [_fact_dict(f) for f in facts]}
    return Plan(edits=edits, method="ft", fingerprint=model.fingerprint, settings=settings)
