"""A feature's logit effect: the tokens its decoder direction promotes and suppresses, read as in direct logit attribution.

The decoder row (the write of one unit of activation) is taken to the residual stream where it lives
elsewhere (a `head.z` row through o_proj, a `neuron` row through down_proj), then through the final norm's
gain and centering with its scale left out (it only rescales every token alike, see promoted_tokens) and
the unembedding: effect = W_U · norm*(W_dec[f]). Biases are the same for every feature and are left out; the
values are pre-soft-capping logits. A dictionary at `mlp_in` (the MLP's normalised input) has its row
read as a residual direction.
"""

from __future__ import annotations

import torch

from mechanic.features.dictionary import Dictionary
from mechanic.features.hooknames import parse_site
from mechanic.locate.readout import freeze


def residual_rows(model, d: Dictionary, features: torch.Tensor) -> torch.Tensor:
    """The decoder rows of `features` as residual-stream writes [F, d_model] (float32)."""
    rows = d.W_dec.detach()[features].float()
    layer, kind = parse_site(d.out_site if d.transcoder else d.site)
    if kind == "head.z":
        return rows @ model.arch.o_weight(model.layer_module(layer, model.arch.o_proj)).float().T
    if kind == "neuron":
        return rows @ model.arch.down_weight(model.layer_module(layer, model.arch.down_proj)).float().T
    return rows


@torch.no_grad()
def logit_effect(model, d: Dictionary, features, k: int = 10) -> list[dict]:
    """Per feature, the k most promoted and k most suppressed tokens as {"promoted": [[token id, logit], ...],
    "suppressed": [...]} (promoted descending, suppressed ascending)."""
    features = torch.as_tensor(features, dtype=torch.long).reshape(-1)
    norm, head = model.module(model.arch.final_norm), model.module(model.arch.unembed)
    shape = freeze(norm, torch.ones(1, model.dims.d_model))
    effect = shape.linear(residual_rows(model, d, features), inv=False) @ head.weight.detach().float().T  # [F, vocab]
    k = min(k, effect.shape[-1])
    up, down = effect.topk(k, dim=-1), effect.topk(k, dim=-1, largest=False)
    return [{"promoted": [[int(i), float(v)] for v, i in zip(up.values[j], up.indices[j])],
             "suppressed": [[int(i), float(v)] for v, i in zip(down.values[j], down.indices[j])]}
            for j in range(len(features))]
