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


FNS = {c.NAME: c for c in (RouterMask, Resample)}
