"""Normalisation layers with their scale frozen at the real forward's value, so they are affine in their input.

RMSNorm (Llama, Qwen, Mistral, Phi-3, OLMoE; Gemma's `1 + weight` gain) and LayerNorm (GPT-2, GPT-NeoX)
are recognised by class; `frozen_norm` checks that the frozen map reproduces the module's real output
on the real input, so a norm mechanic reads wrongly fails loudly instead of giving a wrong graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mechanic.locate.graph.errors import GraphError


@dataclass
class FrozenNorm:
    """y = ((x - mean x) if centred) * scale * weight + bias, with `scale` a constant from the real forward."""

    scale: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    centre: bool

    def prefix(self, n: int, n_pos: int) -> "FrozenNorm":
        """The same norm for the first n positions of the prompt (position is dim 1 of every norm's input)."""
        if n == n_pos or self.scale.dim() < 2 or self.scale.shape[1] != n_pos:
            return self
        return FrozenNorm(self.scale[:, :n], self.weight, self.bias, self.centre)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.centre:
            x = x - x.mean(-1, keepdim=True)
        y = x * self.scale
        if self.weight is not None:
            y = y * self.weight
        return y + self.bias if self.bias is not None else y


def is_norm(module: nn.Module) -> bool:
    """Whether `module` is a normalisation layer (by class: nn.LayerNorm, or a name ending in Norm)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def frozen_norm(module: nn.Module, x0: torch.Tensor, y0: torch.Tensor, name: str) -> FrozenNorm:
    """The affine map `module` applies at the real input x0 (its output y0), with its scale frozen."""
    cls = type(module).__name__
    dtype = torch.promote_types(x0.dtype, torch.float32)     # fp32 for half-precision models, fp64 stays fp64
    x = x0.detach().to(dtype)
    w = getattr(module, "weight", None)
    w = None if w is None else w.detach().to(dtype)
    layer_norm = isinstance(module, nn.LayerNorm) or (cls.endswith("LayerNorm") and getattr(module, "bias", None) is not None)
    eps = getattr(module, "variance_epsilon", None)
    eps = getattr(module, "eps", 1e-6) if eps is None else eps
    if layer_norm:
        scale = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
        b = getattr(module, "bias", None)
        frozen = FrozenNorm(scale, w, None if b is None else b.detach().to(dtype), True)
    else:
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        if w is not None and cls.startswith("Gemma"):
            w = 1.0 + w
        frozen = FrozenNorm(scale, w, None, False)
    err = (frozen(x) - y0.to(dtype)).abs().max().item()
    if not err <= 1e-4 * (1.0 + y0.abs().max().item()):
        raise GraphError(
            f"The normalisation layer {name} ({cls}) does not compute what mechanic expects of an RMSNorm or "
            f"LayerNorm: freezing its scale changes its output by {err:.3g} on the real input. An attribution "
            "graph needs every norm frozen exactly. Add this norm class to mechanic/locate/graph/norms.py "
            "(frozen_norm: its scale and gain) and check it with tests/test_graph_replacement.py.")
    return frozen
