"""The residual stream read out through the vocabulary: frozen-scale norms, the unembedding, and one cached run.

Vocabulary projection (logit lens, DLA, neuron attribution, logit flow) needs the final norm as a
*linear* map so that parts of the residual can be projected one by one and add up. Convention used
everywhere here: a norm's scale (1/rms, or 1/std for LayerNorm) is frozen at its value for the real
input at that position (sigma* of the full residual), and the rest (centering, gain, bias) is kept
exactly. Gemma 2's post-norms on the attention and MLP writes are linearised the same way (scale frozen
from the block's actual output), so heads and neurons add up to the block's write there too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechanic.tasks.task import TaskBatch


class ReadoutError(ValueError):
    """A norm or model layout the frozen-scale readout cannot represent exactly."""


@dataclass
class FrozenNorm:
    """norm(x) = center(x) * weight * inv + bias, with inv = 1/scale frozen per position (shape [...])."""

    weight: torch.Tensor          # [d]: the effective gain (Gemma's 1 + w, LayerNorm's weight, ...)
    inv: torch.Tensor             # [...]: 1 / sigma* per position
    center: bool                  # LayerNorm subtracts the mean first
    bias: torch.Tensor | None     # [d] (LayerNorm) or None

    def linear(self, v: torch.Tensor, inv: bool = True) -> torch.Tensor:
        """The linear part applied to writes v [..., d] (inv broadcast over v's leading dims), no bias."""
        if self.center:
            v = v - v.mean(-1, keepdim=True)
        v = v * self.weight
        return v * _expand(self.inv, v) if inv else v

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out + self.bias if self.bias is not None else out

    def adjoint(self, c: torch.Tensor) -> torch.Tensor:
        """c' with c' . v == c . linear(v) for every v (c is [..., d], matching inv's leading dims)."""
        u = c * self.weight * _expand(self.inv, c)
        return u - u.mean(-1, keepdim=True) if self.center else u


def _expand(inv: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """inv [lead] shaped to broadcast against v [lead, ..., d]."""
    return inv.reshape(*inv.shape, *([1] * (v.dim() - inv.dim())))


def _eps(module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        if isinstance(getattr(module, name, None), (int, float)):
            return float(getattr(module, name))
    raise ReadoutError(f"{type(module).__name__}: no epsilon attribute (variance_epsilon / eps) found, so its "
                       "scale cannot be frozen. Vocabulary projection supports RMSNorm- and LayerNorm-style norms.")


@torch.no_grad()
def freeze(module: torch.nn.Module, x: torch.Tensor) -> FrozenNorm:
    """The norm `module` as a linear map with its scale frozen at the inputs x [..., d]; checked against module(x)."""
    x = x.float()
    eps = _eps(module)
    d = x.shape[-1]
    if isinstance(module, torch.nn.LayerNorm):
        weight = module.weight.detach().float() if module.weight is not None else torch.ones(d, device=x.device)
        bias = module.bias.detach().float() if module.bias is not None else None
        inv = torch.rsqrt(x.var(-1, unbiased=False) + eps)
        frozen = FrozenNorm(weight, inv, True, bias)
    else:  # RMS-style: read the effective gain off the module itself (covers Gemma's 1 + w)
        ones = torch.ones(1, d, device=x.device, dtype=next(module.parameters()).dtype)
        weight = module(ones)[0].float() * (1.0 + eps) ** 0.5
        inv = torch.rsqrt(x.pow(2).mean(-1) + eps)
        frozen = FrozenNorm(weight, inv, False, None)
    want = module(x.to(next(module.parameters()).dtype)).float()
    err = float((frozen(x) - want).abs().max()) if x.numel() else 0.0
    if err > 1e-4 * max(1.0, float(want.abs().max())):
        raise ReadoutError(f"{type(module).__name__} is not a plain RMSNorm or LayerNorm (re-applying it with a "
                           f"frozen scale differs from the module by {err:.3g}), so its output cannot be split "
                           "into parts that add up. Vocabulary projection supports RMSNorm- and LayerNorm-style norms.")
    return frozen


class Readout:
    """Final norm (scale frozen at the final residual x [n, d]) + unembedding (+ bias, + Gemma 2 soft-capping)."""

    def __init__(self, model, x_final: torch.Tensor):
        self.norm = freeze(model.module(model.arch.final_norm), x_final)
        head = model.module(model.arch.unembed)
        self.W_U = head.weight.detach().float()                        # [vocab, d]
        self.b_U = head.bias.detach().float() if getattr(head, "bias", None) is not None else None
        self.softcap = getattr(model.hf.config, "final_logit_softcapping", None)

    def pre_logits(self, u: torch.Tensor) -> torch.Tensor:
        """lm_head(norm*(u)) for residuals u [n, ..., d] (the logits site; before soft-capping)."""
        out = self.norm(u) @ self.W_U.T
        return out + self.b_U if self.b_U is not None else out

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's final logit soft-capping (Gemma 2), or identity."""
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def logprob(self, u: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(target | u) for residuals u [n, ..., d] and targets [n]."""
        lp = torch.log_softmax(self.cap(self.pre_logits(u)), -1)
        idx = target.reshape(-1, *([1] * (lp.dim() - 1))).expand(*lp.shape[:-1], 1)
        return lp.gather(-1, idx)[..., 0]

    def logit_direction(self, answer: torch.Tensor, wrong: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(c [n, d], const [n]): the pre-cap logit (difference) of residual x is c . x + const."""
        diff = self.W_U[answer] - (self.W_U[wrong] if wrong is not None else 0)
        const = torch.zeros(diff.shape[0], device=diff.device)
        if self.norm.bias is not None:
            const = const + diff @ self.norm.bias
        if self.b_U is not None:
            const = const + self.b_U[answer] - (self.b_U[wrong] if wrong is not None else 0)
        return self.norm.adjoint(diff), const


# ---------------------------------------------------------------- one run, everything at the last position
@dataclass
class Collected:
    """Values at the last position of one run: residuals, block writes, heads, neurons, experts, post-norms."""

    resid_pre: list[torch.Tensor]                 # [n, d] per layer
    attn_out: list[torch.Tensor]
    mlp_out: list[torch.Tensor]
    heads: list[torch.Tensor]                     # [n, H, d] head writes to o_proj's output space
    z: list[torch.Tensor]                         # [n, H * d_head] o_proj input
    neurons: dict[int, torch.Tensor]              # dense layer -> [n, d_mlp]
    experts: dict[int, torch.Tensor]              # MoE layer -> [n, E, d] weighted expert outputs
    attn_post: list[FrozenNorm | None]            # Gemma 2 post-norms, scale frozen at this run's block output
    mlp_post: list[FrozenNorm | None]
    final: torch.Tensor                           # [n, d] final residual (input of the final norm)
    logits: torch.Tensor                          # [n, vocab] the model's own last-position logits

    def mlp_in(self, layer: int) -> torch.Tensor:
        """The residual the MLP's write is added to: resid_pre + attn_out (resid_mid; also for parallel blocks)."""
        return self.resid_pre[layer] + self.attn_out[layer]


def post_norms(model) -> tuple[bool, bool]:
    """Whether attention / MLP writes pass a post-norm before the residual add (Gemma 2)."""
    a = model.arch
    return a.attn_write != a.attn, a.mlp_write != a.mlp


def collect(model, inputs, interventions=(), neurons: bool = True) -> Collected:
    """One forward with everything vocabulary projection needs cached at the last position."""
    d, a = model.dims, model.arch
    N = d.n_layers
    cache = ["L0.resid_pre", f"L{N - 1}.resid_post"]
    for L in range(N):
        cache += [f"L{L}.resid_pre", f"L{L}.attn_out", f"L{L}.mlp_out", f"L{L}.head", f"L{L}.head.z"]
        if model.is_moe(L):
            cache += [f"L{L}.expert", f"L{L}.router"]
        elif neurons:
            cache.append(f"L{L}.neuron")
    attn_pn, mlp_pn = post_norms(model)
    calls = [f"{a.layers}.{L}.{p}" for L in range(N) for p, on in ((a.attn_write, attn_pn), (a.mlp_write, mlp_pn))
             if on]
    run = model.run(inputs, cache=list(dict.fromkeys(cache)), interventions=interventions, pos=-1,
                    capture_calls=calls, last_only=True)
    c = {k: v.float() for k, v in run.cache.items()}
    experts = {L: c[f"L{L}.expert"] * c[f"L{L}.router"][..., None] for L in range(N) if model.is_moe(L)}

    def post(L, path, on):
        if not on:
            return None
        args, kwargs = run.calls[f"{a.layers}.{L}.{path}"][0]
        x = args[0] if args else kwargs["hidden_states"]
        return freeze(model.layer_module(L, path), x[:, -1].float())

    return Collected(
        resid_pre=[c[f"L{L}.resid_pre"] for L in range(N)], attn_out=[c[f"L{L}.attn_out"] for L in range(N)],
        mlp_out=[c[f"L{L}.mlp_out"] for L in range(N)], heads=[c[f"L{L}.head"] for L in range(N)],
        z=[c[f"L{L}.head.z"].flatten(1) for L in range(N)],
        neurons={L: c[f"L{L}.neuron"] for L in range(N) if f"L{L}.neuron" in c}, experts=experts,
        attn_post=[post(L, a.attn_write, attn_pn) for L in range(N)],
        mlp_post=[post(L, a.mlp_write, mlp_pn) for L in range(N)],
        final=c[f"L{N - 1}.resid_post"], logits=run.logits[:, -1].float())


def write(post: FrozenNorm | None, v: torch.Tensor) -> torch.Tensor:
    """A block-internal vector v [n, ..., d] as it reaches the residual (through a frozen post-norm, if any)."""
    return v if post is None else post.linear(v)


def targets(batch: TaskBatch, logits: torch.Tensor, target: str) -> torch.Tensor:
    """Token ids w per example: the task's answers ("answer") or the model's own top prediction ("predicted")."""
    if target == "answer":
        return batch.answer
    if target == "predicted":
        return logits.argmax(-1)
    raise ValueError(f"target must be 'answer' (the task's answer token) or 'predicted' (the model's top-1 "
                     f"token), got {target!r}.")
