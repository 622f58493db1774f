"""Conditional activation steering (CAST, Lee et al. 2024): steer only prompts that meet a condition.

`conditional_vector` returns a Plan with one `Conditional` function intervention at `L{layer}.resid_post`:
on the prompt pass it scores each prompt's hidden state at the last prompt token against the condition
direction (e.g. the harmful-minus-harmless difference of means) and, for the rows above the threshold
only, adds coefficient x the steering vector (e.g. a CAA refusal vector) at every token of the prompt
and the reply. The gate is read at the steering site itself, before the addition (see
mechanic.steer.fns.Conditional for the limitations). `calibrate_threshold` picks the threshold that
best separates two prompt sets. Prompts are used as given: pass chat-formatted prompts
(mechanic.improve.refusal.chat_prompts) when the condition was read from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechanic.model.interventions import apply_fn
from mechanic.model.readout import n_rows, read
from mechanic.steer.fns import Conditional
from mechanic.steer.plan import Plan, PlanError
from mechanic.steer.vectors import Vector


@dataclass
class Calibration:
    """A threshold chosen on two prompt sets, with every prompt's score so a report can show them."""

    threshold: float
    balanced_accuracy: float
    positive: torch.Tensor   # [n_pos] scores of the prompts that should open the gate
    negative: torch.Tensor   # [n_neg] scores of the prompts that should not

    def settings(self) -> dict:
        """JSON-ready: threshold, balanced accuracy and the scores."""
        return {"threshold": self.threshold, "balanced_accuracy": self.balanced_accuracy,
                "positive": [round(float(s), 5) for s in self.positive],
                "negative": [round(float(s), 5) for s in self.negative]}


def _direction(x, layer: int, what: str, model) -> torch.Tensor:
    """The [d_model] float32 tensor of a Vector's layer (or a plain tensor), checked against the model."""
    if isinstance(x, Vector):
        if layer not in x.directions:
            raise PlanError(f"The {what} has no direction at layer {layer} (it has layers {x.layers}); build it "
                            "at the steering layer, e.g. caa(..., layers=[layer]).")
        if x.site != "resid_post" or x.operation != "add":
            raise PlanError(f"The {what} lives at {x.site}/{x.operation}; conditional steering adds at resid_post.")
        x = x.directions[layer]
    t = torch.as_tensor(x).detach().float().cpu()
    if t.dim() != 1 or t.numel() != model.dims.d_model or not bool(torch.isfinite(t).all()):
        raise PlanError(f"The {what} must be a finite [d_model] = [{model.dims.d_model}] vector, got shape "
                        f"{list(t.shape)}.")
    return t


def _layer(model, layer) -> int:
    if not isinstance(layer, int) or not 0 <= layer < model.dims.n_layers:
        raise PlanError(f"layer must be a decoder layer index 0..{model.dims.n_layers - 1}, got {layer!r}.")
    return layer


def gate_scores(model, prompts, condition, layer: int, score: str = "projection", batch_size: int = 16) -> torch.Tensor:
    """[n] the gate score of each prompt: its L{layer}.resid_post at the last token against the condition.

    prompts: texts, a left-padded id tensor or a tokenized dict (anything mechanic.model.readout.read takes).
    """
    layer = _layer(model, layer)
    prompts = list(prompts) if isinstance(prompts, tuple) else prompts
    if not n_rows(prompts):
        raise PlanError("gate_scores needs at least one prompt.")
    if score not in Conditional.SCORES:
        raise PlanError(f"Unknown gate score {score!r}; use one of {', '.join(Conditional.SCORES)}.")
    u = _direction(condition, layer, "condition direction", model)
    if float(u.norm()) == 0.0:
        raise PlanError("The condition direction is zero; it cannot gate anything.")
    site = f"L{layer}.resid_post"
    h = read(model, prompts, [site], "last", batch_size=batch_size)[site]
    probe = Conditional(torch.zeros_like(u), 0.0, u, 0.0, score)
    return probe.scores_of(h.cpu())


def best_threshold(positive: torch.Tensor, negative: torch.Tensor) -> tuple[float, float]:
    """(threshold, balanced accuracy) of "score > threshold means positive", the best over all cuts.

    Candidates are the midpoints between neighbouring distinct scores (and one below / above all); ties in
    balanced accuracy go to the widest gap between the two scores a cut sits between, then to the lowest.
    """
    pos, neg = positive.double().reshape(-1), negative.double().reshape(-1)
    if not pos.numel() or not neg.numel():
        raise PlanError("Threshold calibration needs at least one prompt on each side.")
    vals = torch.unique(torch.cat([pos, neg]))            # sorted
    lo, hi = vals[:1] - 1.0, vals[-1:] + 1.0
    cuts = torch.cat([lo, (vals[1:] + vals[:-1]) / 2, hi])
    gaps = torch.cat([torch.tensor([float("inf")], dtype=torch.float64), vals[1:] - vals[:-1],
                      torch.tensor([float("inf")], dtype=torch.float64)])
    tpr = (pos[None, :] > cuts[:, None]).double().mean(1)
    tnr = (neg[None, :] <= cuts[:, None]).double().mean(1)
    bal = (tpr + tnr) / 2
    best = bal.max()
    ok = (bal >= best - 1e-12).nonzero().reshape(-1)
    i = int(ok[torch.argmax(gaps[ok])])  # argmax returns the first (lowest) of equal gaps
    return float(cuts[i]), float(bal[i])


def calibrate_threshold(model, condition, layer: int, positive, negative, score: str = "projection",
                        batch_size: int = 16) -> Calibration:
    """The threshold that best separates `positive` from `negative` prompts (max balanced accuracy, midpoint)."""
    pos = gate_scores(model, positive, condition, layer, score, batch_size)
    neg = gate_scores(model, negative, condition, layer, score, batch_size)
    threshold, bal = best_threshold(pos, neg)
    return Calibration(threshold, bal, pos, neg)


def conditional_vector(model, vector, condition, layer: int, coefficient: float, threshold: float | None = None,
                       calibrate=None, score: str = "projection", batch_size: int = 16) -> Plan:
    """A plan adding coefficient x vector at L{layer}.resid_post only for prompts whose condition score > threshold.

    vector / condition: Vectors with a direction at `layer`, or [d_model] tensors. Give `threshold`, or
    `calibrate=(positive prompts, negative prompts)` to choose it with `calibrate_threshold`; the plan's
    settings then hold the calibration scores.
    """
    layer = _layer(model, layer)
    if (threshold is None) == (calibrate is None):
        raise PlanError("Give exactly one of threshold= (a number) and calibrate=(positive prompts, negative "
                        "prompts) to choose it from data.")
    v = _direction(vector, layer, "steering vector", model)
    u = _direction(condition, layer, "condition direction", model)
    if float(u.norm()) == 0.0:
        raise PlanError("The condition direction is zero; it cannot gate anything.")
    if score not in Conditional.SCORES:
        raise PlanError(f"Unknown gate score {score!r}; use one of {', '.join(Conditional.SCORES)}.")
    settings = {"layer": layer, "coefficient": float(coefficient), "score": score}
    if calibrate is not None:
        if not (isinstance(calibrate, (tuple, list)) and len(calibrate) == 2):
            raise PlanError("calibrate must be a pair (positive prompts, negative prompts).")
        cal = calibrate_threshold(model, u, layer, calibrate[0], calibrate[1], score, batch_size)
        threshold = cal.threshold
        settings["calibration"] = cal.settings()
    threshold = float(threshold)
    if threshold != threshold:
        raise PlanError("The threshold is NaN; give a number.")
    settings["threshold"] = threshold
    fn = Conditional(v, float(coefficient), u, threshold, score)
    return Plan([apply_fn(f"L{layer}.resid_post", fn)], method="conditional", fingerprint=model.fingerprint,
                settings=settings)
