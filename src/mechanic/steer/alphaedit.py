"""AlphaEdit (Fang et al. 2025): MEMIT's update confined to the null space of the preserved keys.

P projects onto the span of the eigenvectors of C = E[k k^T] (the preserved keys' second moment, from
mechanic.steer.stats) whose eigenvalue is below `threshold`; P = U U^T, computed once per layer. Per layer,
with K the new keys [d_mlp, facts], R the residual share [d_model, facts] and Kp Kp^T the accumulated keys
of earlier edits (sequential editing):
    Delta = R K^T P (Kp Kp^T P + K K^T P + alpha I)^-1,
the authors' code's `solve(P (K K^T + Kp Kp^T) + alpha I, P K R^T)^T` (no lambda C term: P carries it).
Delta = Delta P exactly, so W <- W + Delta leaves every key in the null space's complement unmoved.
The threshold is absolute, so it is model-specific: on SmolLM2 (layers 3-5, 8192 tokens) the authors' 2e-2
leaves three quarters of the dimensions and a third to a half of the keys' energy in the "null" space
(benchmarks/editing_sequential.py chooses it on validation facts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mechanic.steer.edit import Fact, _fact_dict, prepare, spread
from mechanic.steer.plan import Plan, PlanError


def null_space(C: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """(P = U U^T over C's eigenvectors with eigenvalue < threshold, float64; the null space's dimension)."""
    vals, vecs = torch.linalg.eigh(C.double())
    U = vecs[:, vals < threshold]
    if U.shape[1] == 0:
        raise PlanError(f"No eigenvalue of the preserved keys' second moment is below the threshold {threshold:g} "
                        f"(smallest {float(vals[0]):.3g}, largest {float(vals[-1]):.3g}), so the null space is "
                        "empty and AlphaEdit could change nothing; raise `threshold`.")
    return U @ U.T, int(U.shape[1])


@dataclass
class NullSpaces:
    """What AlphaEdit carries from one batch to the next: each layer's projection P (computed once) and the
    sum of K K^T over the keys edited so far (Kp Kp^T)."""

    threshold: float = 2e-2
    projections: dict[int, torch.Tensor] = field(default_factory=dict)
    dims: dict[int, int] = field(default_factory=dict)
    previous: dict[int, torch.Tensor] = field(default_factory=dict)

    def projection(self, layer: int, C: torch.Tensor) -> torch.Tensor:
        """P for `layer`, from its second moment C the first time, remembered afterwards."""
        if layer not in self.projections:
            self.projections[layer], self.dims[layer] = null_space(C, self.threshold)
        return self.projections[layer]

    def record(self, keys: dict[int, torch.Tensor]) -> None:
        """Add an applied batch's keys ({layer: K [d_mlp, facts]}) to the preserved ones."""
        for L, K in keys.items():
            K = K.double()
            self.previous[L] = self.previous.get(L, 0) + K @ K.T


def alphaedit_update(P: torch.Tensor, K: torch.Tensor, R: torch.Tensor, previous: torch.Tensor | None,
                     alpha: float) -> torch.Tensor:
    """Delta = R K^T P (Kp Kp^T P + K K^T P + alpha I)^-1 ([d_model, d_mlp]; previous = Kp Kp^T or None)."""
    A = K @ K.T if previous is None else K @ K.T + previous
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    return torch.linalg.solve(P @ A + alpha * eye, P @ K @ R.T).T


def alphaedit(model, facts: list[Fact], layers: list[int] | None = None, *, threshold: float = 2e-2,
              alpha: float = 10.0, state: NullSpaces | None = None, prefixes: list[str] | None = None,
              n_prefixes: int = 10, steps: int = 25, lr: float = 0.5, kl_factor: float = 0.0625,
              weight_decay: float = 0.5, clamp: float = 4.0, stats_tokens: int = 32768, moments: dict | None = None,
              seed: int = 0, prompt_key: bool = False) -> Plan:
    """Many facts at once over `layers` (default: 5 layers ending at the first fact's traced layer), each layer's
    update in the null space of the preserved keys. The authors' defaults: threshold 2e-2, alpha 10.

    Sequential editing: pass one `state` to every batch; its projections are computed once, and this batch's
    keys are added to its preserved keys on return, so apply the returned plan before the next batch.
    prompt_key: each fact also contributes its bare prompt's key and residual (see mechanic.steer.edit.rome).
    """
    if not facts:
        raise PlanError("AlphaEdit needs at least one Fact.")
    state = state if state is not None else NullSpaces(threshold)
    if state.threshold != threshold:
        raise PlanError(f"The state's null spaces were computed with threshold {state.threshold:g}, not "
                        f"{threshold:g}; use one threshold for a whole sequence (or a new NullSpaces).")
    layers, prefixes, moments, rows, Z, opt_losses = prepare(
        model, facts, layers, prefixes, moments, n_prefixes=n_prefixes, stats_tokens=stats_tokens, seed=seed,
        steps=steps, lr=lr, kl_factor=kl_factor, weight_decay=weight_decay, clamp=clamp, prompt_key=prompt_key)

    def solve(L, K, R):
        return alphaedit_update(state.projection(L, moments[L][0]), K, R, state.previous.get(L), alpha)

    edits, keys = spread(model, rows, Z, layers, solve, f"AlphaEdit {len(facts)} facts:")
    settings = {"layers": layers, "facts": [_fact_dict(f) for f in facts], "prefixes": prefixes,
                "threshold": threshold, "alpha": alpha, "prompt_key": Z.shape[1] > len(facts), "null_dims": {L: state.dims[L] for L in layers},
                "previous_edits": bool(state.previous), "losses": opt_losses,
                "stats_tokens": {L: moments[L][1] for L in layers}, "steps": steps, "lr": lr,
                "kl_factor": kl_factor, "weight_decay": weight_decay, "clamp": clamp, "seed": seed}
    state.record(keys)
    return Plan(edits=edits, method="alphaedit", fingerprint=model.fingerprint, settings=settings)
