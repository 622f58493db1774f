"""A transcoder's active features as linear maps: encoder rows (what a feature reads) and decoder rows (what it writes).

Both include the dictionary's own scalings (gated magnitude path, activations rescaled by decoder norm,
an old SAELens scaling factor), so `pre(x) = x @ encoder_rows.T + const` and
`decode(a) = a @ decoder_rows + b_dec` hold exactly for the selected features.
"""

from __future__ import annotations

import torch

from mechanic.features import Dictionary


def encoder_rows(d: Dictionary, idx: torch.Tensor) -> torch.Tensor:
    """[len(idx), d_in]: the gradient of feature idx's pre-activation with respect to the dictionary input."""
    rows = d.W_enc.detach()[:, idx].T
    if d.architecture == "gated":
        return rows * d.r_mag.detach()[idx].exp()[:, None]
    if d.rescale_acts_by_decoder_norm:
        rows = rows * d.W_dec.detach()[idx].norm(dim=-1, keepdim=True)
    return rows


def decoder_rows(d: Dictionary, idx: torch.Tensor) -> torch.Tensor:
    """[len(idx), d_out]: what one unit of feature idx's activation adds to the dictionary output."""
    rows = d.W_dec.detach()[idx]
    if d.scaling_factor is not None:
        rows = rows * d.scaling_factor.detach()[idx, None]
    if d.rescale_acts_by_decoder_norm:
        rows = rows / d.W_dec.detach()[idx].norm(dim=-1, keepdim=True)
    return rows
