"""Dictionary: one sparse autoencoder or transcoder (relu, topk, batchtopk, jumprelu, gated) as a torch module.

The inference maths follows SAELens so files move between the two tools unchanged (see saelens.py):
encode = act(norm(x) - b_dec·apply_b_dec_to_input) @ W_enc + b_enc), decode = acts @ W_dec + b_dec
(denormalised for SAEs), and a transcoder adds a skip `x @ W_skip.T` on the raw input. BatchTopK
infers with a per-latent threshold, like JumpReLU (SAELens saves it as a JumpReLU).
`site` is where it reads (a mechanic dictionary site), `out_site` where a transcoder writes.
"""

from __future__ import annotations

import torch
from torch import nn

from mechanic.features.errors import FeaturesError
from mechanic.features.hooknames import check_width, parse_site

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "gated")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")


class Dictionary(nn.Module):
    """A sparse dictionary: W_enc [d_in, d_sae], W_dec [d_sae, d_out] (rows are decoder directions), biases.

    Encode/decode work on any leading shape ([..., d_in] -> [..., d_sae] -> [..., d_out]). For a
    `head.z` site an input [..., n_heads, d_head] is flattened first and decode returns it flat.
    """

    def __init__(self, d_in: int, d_sae: int, architecture: str = "topk", *, k: int | float | None = None,
                 site: str | None = None, out_site: str | None = None, d_out: int | None = None,
                 skip: bool = False, transcoder: bool | None = None, apply_b_dec_to_input: bool | None = None, normalize: str = "none",
                 rescale_acts_by_decoder_norm: bool = False, dtype: torch.dtype = torch.float32,
                 metadata: dict | None = None):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise FeaturesError(f"Unknown dictionary architecture {architecture!r}; mechanic supports "
                                f"{', '.join(ARCHITECTURES)}.")
        if normalize not in NORMALIZATIONS:
            raise FeaturesError(f"Unknown activation normalisation {normalize!r}; mechanic supports "
                                f"{', '.join(NORMALIZATIONS)} (fold a constant scaling factor into the weights).")
        if architecture in ("topk", "batchtopk") and (k is None or k <= 0):
            raise FeaturesError(f"A {architecture} dictionary needs k > 0 (active latents per token), got {k}.")
        for s in (site, out_site):
            if s is not None:
                parse_site(s)
        self.transcoder = bool(transcoder) if transcoder is not None else (
            out_site is not None or (d_out is not None and d_out != d_in) or skip)
        if self.transcoder and apply_b_dec_to_input:
            raise FeaturesError("A transcoder cannot subtract b_dec from its input (b_dec lives at the output "
                                "site); set apply_b_dec_to_input=False.")
        self.architecture = architecture
        self.k = k
        self.site, self.out_site = site, out_site
        self.d_in, self.d_sae, self.d_out = d_in, d_sae, d_out or d_in
        self.apply_b_dec_to_input = (not self.transcoder) if apply_b_dec_to_input is None else bool(apply_b_dec_to_input)
        self.normalize = normalize
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        self.metadata = dict(metadata or {})
        z = lambda *shape: nn.Parameter(torch.zeros(*shape, dtype=dtype))  # noqa: E731
        self.W_enc = z(d_in, d_sae)
        self.W_dec = z(d_sae, self.d_out)
        self.b_dec = z(self.d_out)
        if architecture == "gated":
            self.b_gate, self.b_mag, self.r_mag = z(d_sae), z(d_sae), z(d_sae)
        else:
            self.b_enc = z(d_sae)
        if architecture in ("jumprelu", "batchtopk"):
            self.threshold = z(d_sae)
        self.W_skip = z(self.d_out, d_in) if skip else None
        self.scaling_factor: torch.Tensor | None = None   # old SAELens finetuning scale, multiplies latents
        self._norm_state: tuple | None = None

    # ---- description -----------------------------------------------------
    @property
    def kind(self) -> str:
        return "transcoder" if self.transcoder else "sae"

    def __repr__(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        where = f"{self.site} -> {self.out_site}" if self.transcoder else f"{self.site}"
        return (f"Dictionary({self.kind}, {self.architecture}{k}, {self.d_in} -> {self.d_sae} -> {self.d_out}, "
                f"site={where}{', skip' if self.W_skip is not None else ''})")

    def check(self, model) -> "Dictionary":
        """Raise a clear error unless this dictionary's sites exist in `model` with matching widths."""
        if self.site is None:
            raise FeaturesError("This dictionary has no site (where it reads in the model); pass site= when "
                                "loading it, e.g. site='L3.resid_post'.")
        check_width(model, self.site, self.d_in, "input")
        if self.transcoder:
            if self.out_site is None:
                raise FeaturesError("This transcoder has no out_site (where it writes); pass out_site= when "
                                    "loading it, e.g. out_site='L3.mlp_out'.")
            check_width(model, self.out_site, self.d_out, "output")
        return self

    def direction(self, latent: int) -> torch.Tensor:
        """Latent `latent`'s decoder direction (a row of W_dec, unit norm) in the output site's space."""
        row = self.W_dec[latent].detach()
        return row / row.norm().clamp_min(1e-12)

    # ---- maths -----------------------------------------------------------
    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """x as [..., d_in]: a head.z input [..., n_heads, d_head] is flattened."""
        if x.shape[-1] != self.d_in and x.dim() >= 2 and x.shape[-2] * x.shape[-1] == self.d_in:
            x = x.flatten(-2)
        if x.shape[-1] != self.d_in:
            raise FeaturesError(f"Input width {x.shape[-1]} does not match the dictionary's d_in {self.d_in}.")
        return x

    def _normalize_in(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize == "constant_norm_rescale":
            coeff = self.d_in ** 0.5 / x.norm(dim=-1, keepdim=True)
            self._norm_state = ("scale", coeff)
            return x * coeff
        if self.normalize == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            x = x - mu
            std = x.std(-1, keepdim=True)
            self._norm_state = ("ln", mu, std)
            return x / (std + 1e-5)
        return x

    def _normalize_out(self, y: torch.Tensor) -> torch.Tensor:
        if self.normalize == "none" or self.transcoder:
            return y
        state, self._norm_state = self._norm_state, None
        if state is None:
            raise FeaturesError(f"decode() of a dictionary with normalize={self.normalize!r} needs the scale of "
                                "its input: call encode() on the same input first, or use forward().")
        return y / state[1] if state[0] == "scale" else y * state[2] + state[1]

    def sae_in(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the encoder sees it: flattened, in the dictionary's dtype, normalised, minus b_dec."""
        x = self._normalize_in(self.flat(x).to(self.W_enc.dtype))
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations (for gated: the magnitude path)."""
        s = self.sae_in(x)
        if self.architecture == "gated":
            return s @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        h = s @ self.W_enc + self.b_enc
        if self.rescale_acts_by_decoder_norm:
            h = h * self.W_dec.norm(dim=-1)
        return h

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations [..., d_sae] (inference form of every architecture)."""
        a = self.architecture
        if a == "gated":
            s = self.sae_in(x)
            gate = (s @ self.W_enc + self.b_gate) > 0
            return gate.to(s.dtype) * torch.relu(s @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
        h = self.pre(x)
        if a == "relu":
            return torch.relu(h)
        if a == "topk":
            return topk_acts(h, int(self.k))
        return torch.relu(h) * (h > self.threshold).to(h.dtype)   # jumprelu, batchtopk at inference

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction [..., d_out] from latents (no skip term; see forward)."""
        if self.scaling_factor is not None:
            acts = acts * self.scaling_factor
        if self.rescale_acts_by_decoder_norm:
            acts = acts / self.W_dec.norm(dim=-1)
        return self._normalize_out(acts @ self.W_dec + self.b_dec)

    def skip(self, x: torch.Tensor) -> torch.Tensor | float:
        """The skip term x @ W_skip.T of a skip transcoder on the raw input (0 without one)."""
        if self.W_skip is None:
            return 0.0
        return self.flat(x).to(self.W_skip.dtype) @ self.W_skip.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)), plus the skip term of a skip transcoder."""
        return self.decode(self.encode(x)) + self.skip(x)


def topk_acts(h: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest pre-activations per row, ReLU'd; zeros elsewhere."""
    vals, idx = h.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(h).scatter(-1, idx, vals.relu())
