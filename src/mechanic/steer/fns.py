"""Intervention functions that a plan file can hold: callables with their state as tensors and numbers.

A plan is saved as safetensors plus JSON, so a Python function cannot go into it; these classes can
(each has a NAME, `state()` -> (params, tensors) and `from_state`). Use them as `apply_fn` values.
"""

from __future__ import annotations

import torch


class RouterMask:
    """Remove experts from routing: their top-k weight set to 0, the others rescaled to the same sum."""

    NAME = "router_mask"

    def __init__(self, experts: list[int]):
        self.experts = [int(e) for e in experts]

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        total = w.sum(-1, keepdim=True)
        w = w.clone()
        w[..., self.experts] = 0
        rest = w.sum(-1, keepdim=True)
        return torch.where(rest > 0, w * total / rest.clamp_min(1e-30), w)

    def state(self) -> tuple[dict, dict]:
        return {"experts": self.experts}, {}

    @classmethod
    def from_state(cls, params: dict, tensors: dict) -> RouterMask:
        return cls(params["experts"])


class Resample:
    """Replace each selected value by a value drawn from a pool of real activations (resample ablation).

    Draws come from a generator seeded once, so a run is reproducible given the plan and call order.
    """

    NAME = "resample"

    def __init__(self, pool: torch.Tensor, seed: int = 0):
        self.pool, self.seed = pool, int(seed)
        self._g = torch.Generator().manual_seed(self.seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[: x.dim() - (self.pool.dim() - 1)]
        idx = torch.randint(0, self.pool.shape[0], (int(torch.tensor(lead).prod()) if len(lead) else 1,),
                            generator=self._g)
        return self.pool[idx].reshape(x.shape).to(x.dtype)

    def state(self) -> tuple[dict, dict]:
        return {"seed": self.seed}, {"pool": self.pool}

    @classmethod
    def from_state(cls, params: dict, tensors: dict) -> Resample:
        return cls(tensors["pool"], params["seed"])




class Conditional:
    """Add coef x vector only to prompts whose hidden state reads as "condition met" (conditional steering).

    CAST (Lee et al. 2024): the gate of each row is decided on the prompt pass (a call with more than one
    position) from the hidden state at the last position, which under left padding is the last prompt
    token: score = h . u (score="projection") or cos(h, u) (score="cosine"), u the unit condition
    direction; the gate is open when score > threshold. Cached one-token generation steps (calls with one
    position) reuse the gates of the last prompt pass of the same batch size, so a reply is steered from
    its prompt to its last token or not at all. Limitations: one gate per prompt, decided at the site
    this function sits at (the condition is read before this function's own addition); a generate call
    whose prompt is a single token reuses the previous call's gates when the batch size matches, and a
    generate call without the key-value cache re-decides the gate at every step on the newest token.
    """

    NAME = "conditional"
    SCORES = ("projection", "cosine")

    def __init__(self, vector: torch.Tensor, coef: float, condition: torch.Tensor, threshold: float,
                 score: str = "projection"):
        vector, condition = torch.as_tensor(vector).float().reshape(-1), torch.as_tensor(condition).float().reshape(-1)
        if score not in self.SCORES:
            raise ValueError(f"Unknown gate score {score!r}; use 'projection' (h . u) or 'cosine' (cos(h, u)).")
        if vector.numel() != condition.numel() or float(condition.norm()) == 0.0:
            raise ValueError(f"The steering vector ({vector.numel()}) and the condition direction "
                             f"({condition.numel()}) must have the same width d_model, and the condition must "
                             "be non-zero.")
        self.vector, self.coef, self.score = vector, float(coef), score
        self.condition, self.threshold = condition / condition.norm(), float(threshold)
        self.gate: torch.Tensor | None = None     # [batch] bool, decided on the last prompt pass
        self.scores: torch.Tensor | None = None   # [batch] the scores that decided it

    def scores_of(self, h: torch.Tensor) -> torch.Tensor:
        """[...] gate scores of hidden states h [..., d_model] (float32)."""
        h = h.float()
        s = h @ self.condition.to(h.device)
        return s / h.norm(dim=-1).clamp_min(1e-12) if self.score == "cosine" else s

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"A conditional intervention acts on [batch, pos, d_model] values, got shape "
                             f"{list(x.shape)}; put it on a residual site with every row and position selected.")
        if x.shape[1] > 1 or self.gate is None or self.gate.shape[0] != x.shape[0]:
            self.scores = self.scores_of(x[:, -1])
            self.gate = self.scores > self.threshold
        gate = self.gate.to(x.device)
        if not bool(gate.any()):
            return x
        out = x.clone()
        out[gate] = x[gate] + self.coef * self.vector.to(device=x.device, dtype=x.dtype)
        return out

    def state(self) -> tuple[dict, dict]:
        return {"coef": self.coef, "threshold": self.threshold, "score": self.score}, \
            {"vector": self.vector, "condition": self.condition}

    @classmethod
    def from_state(cls, params: dict, tensors: dict) -> Conditional:
        return cls(tensors["vector"], params["coef"], tensors["condition"], params["threshold"], params["score"])


FNS = {c.NAME: c for c in (RouterMask, Resample, Conditional)}
