"""AlphaEdit (Fang et al. 2025): MEMIT's update confined to the null space of the preserved keys.

P projects onto the span of the eigenvectors of C = E[k k^T] (the preserved keys' second moment, from
mechanic.steer.stats) whose eigenvalue is below `threshold`; P = U U^T, computed once per layer. Per layer,
with K the new keys [d_mlp, facts], R the residual share [d_model, facts] and Kp Kp^T the accumulated keys
of earlier edits (sequential editing):
    Delta = R K^T P (Kp Kp^T P + K K^T P + alpha I)^-1,
the authors' code's `solve(P (K K^T + Kp Kp^T) + alpha I, P K R^T)^T` (no lambda C term: P carries it).
Delta = Delta P exactly, so W <- W + Delta leaves every key in the null space's complement unmoved.
The threshold is absolute, so it is model-specific: on SmolLM2 (layers 1-5, 16384 tokens) the authors' 2e-2
leaves three quarters of the dimensions and 7-52% of the keys' energy in the "null" space. `energy` instead keeps
the smallest eigenvalues holding at most that share of C's trace, a model-independent bound on how much of the
preserved keys the update can reach; `preserve` adds the keys of given prompts (every token, each prompt alone)
to C, e.g. prompts like those whose answers must not move. On SmolLM2 neither moved neighbourhood success after 30
validation edits (benchmarks/results/editing_ns_validation.json): most neighbours that flipped were other edited
facts' own prompts; scored without them (improve.edit_metrics.edited_apart) NS is 0.96 against 0.97 unedited.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mechanic.steer.edit import Fact, _fact_dict, prepare, spread
from mechanic.steer.plan import Plan, PlanError
from mechanic.steer.stats import prompt_moments


def null_space(C: torch.Tensor, threshold: float, energy: float | None = None) -> tuple[torch.Tensor, int]:
    """(P = U U^T over C's eigenvectors with eigenvalue < threshold, or with energy: the smallest eigenvalues
    summing to at most `energy` x trace(C), float64; the null space's dimension)."""
    vals, vecs = torch.linalg.eigh(C.double())
    if energy is None:
        keep, rule = vals < threshold, f"below the threshold {threshold:g}"
    else:
        if not 0 < energy < 1:
            raise PlanError(f"energy is the share of the preserved keys' energy the null space may hold, between 0 "
                            f"and 1 (e.g. 1e-2); got {energy:g}.")
        pos = vals.clamp_min(0)
        keep, rule = torch.cumsum(pos, 0) <= energy * pos.sum(), f"within {energy:g} of its trace"
    U = vecs[:, keep]
    if U.shape[1] == 0:
        raise PlanError(f"No eigenvalue of the preserved keys' second moment is {rule} (smallest "
                        f"{float(vals[0]):.3g}, largest {float(vals[-1]):.3g}), so the null space is empty and "
                        "AlphaEdit could change nothing; raise `threshold` (or `energy`).")
    return U @ U.T, int(U.shape[1])


def with_preserved(C: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """C plus the extra keys' second moment scaled to C's trace: both sets of keys weigh the same."""
    return C.double() + extra.double() * (C.double().trace() / extra.double().trace())


@dataclass
class NullSpaces:
    """What AlphaEdit carries from one batch to the next: each layer's projection P (computed once) and the
    sum of K K^T over the keys edited so far (Kp Kp^T)."""

    threshold: float = 2e-2
    energy: float | None = None
    projections: dict[int, torch.Tensor] = field(default_factory=dict)
    dims: dict[int, int] = field(default_factory=dict)
    previous: dict[int, torch.Tensor] = field(default_factory=dict)

    def projection(self, layer: int, C: torch.Tensor) -> torch.Tensor:
        """P for `layer`, from its second moment C the first time, remembered afterwards."""
        if layer not in self.projections:
            self.projections[layer], self.dims[layer] = null_space(C, self.threshold, self.energy)
        return self.projections[layer]

    def held(self, layer: int) -> torch.Tensor | None:
        """Kp Kp^T at `layer`: the keys the next update must keep in place (the edits so far; None before any)."""
        return self.previous.get(layer)

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
              energy: float | None = None, preserve: list[str] | None = None,
              alpha: float = 10.0, state: NullSpaces | None = None, prefixes: list[str] | None = None,
              n_prefixes: int = 10, steps: int = 25, lr: float = 0.5, kl_factor: float = 0.0625,
              weight_decay: float = 0.5, clamp: float = 4.0, stats_tokens: int = 32768, moments: dict | None = None,
              seed: int = 0, prompt_key: bool = False, targets: dict | None = None) -> Plan:
    """Many facts at once over `layers` (default: 5 layers ending at the first fact's traced layer), each layer's
    update in the null space of the preserved keys. The authors' defaults: threshold 2e-2, alpha 10.

    Sequential editing: pass one `state` to every batch; its projections are computed once, and this batch's
    keys are added to its preserved keys on return, so apply the returned plan before the next batch.
    prompt_key: each fact also contributes its bare prompt's key and residual (see mechanic.steer.edit.rome).
    energy: the null space holds at most this share of C's trace (instead of eigenvalues below `threshold`).
    preserve: prompts whose keys (every token, each prompt run alone) are preserved besides the text's, their
    second moment added to C with C's weight (with_preserved); read on the model as the first batch finds it.
    targets: a dict keeping the optimised targets across calls (see mechanic.steer.edit.memit).
    """
    if not facts:
        raise PlanError("AlphaEdit needs at least one Fact.")
    if preserve is not None and (isinstance(preserve, str) or not preserve):
        raise PlanError("preserve takes a non-empty list of prompts (strings) whose keys the edit must not move, "
                        f"e.g. other subjects' prompts of the same relations; got {preserve!r}.")
    state = state if state is not None else NullSpaces(threshold, energy)
    if (state.threshold, state.energy) != (threshold, energy):
        raise PlanError(f"The state's null spaces were computed with threshold {state.threshold:g} and energy "
                        f"{state.energy}, not {threshold:g} and {energy}; use one setting for a whole sequence (or a "
                        "new NullSpaces).")
    layers, prefixes, moments, rows, Z, opt_losses = prepare(
        model, facts, layers, prefixes, moments, n_prefixes=n_prefixes, stats_tokens=stats_tokens, seed=seed,
        steps=steps, lr=lr, kl_factor=kl_factor, weight_decay=weight_decay, clamp=clamp, prompt_key=prompt_key,
        targets=targets)
    missing = [L for L in layers if L not in state.projections]
    extra = prompt_moments(model, missing, preserve) if preserve and missing else {}

    def solve(L, K, R):
        C = moments[L][0] if L not in extra else with_preserved(moments[L][0], extra[L])
        return alphaedit_update(state.projection(L, C), K, R, state.held(L), alpha)

    edits, keys = spread(model, rows, Z, layers, solve, f"AlphaEdit {len(facts)} facts:")
    settings = {"layers": layers, "facts": [_fact_dict(f) for f in facts], "prefixes": prefixes,
                "threshold": threshold, "energy": energy, "preserved_prompts": len(preserve or []), "alpha": alpha,
                "prompt_key": Z.shape[1] > len(facts), "null_dims": {L: state.dims[L] for L in layers},
                "previous_edits": bool(state.previous), "losses": opt_losses,
                "stats_tokens": {L: moments[L][1] for L in layers}, "steps": steps, "lr": lr,
                "kl_factor": kl_factor, "weight_decay": weight_decay, "clamp": clamp, "seed": seed}
    state.record(keys)
    return Plan(edits=edits, method="alphaedit", fingerprint=model.fingerprint, settings=settings)
