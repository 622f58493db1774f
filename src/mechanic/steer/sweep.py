"""Layer x coefficient sweep of a steering vector: the target effect and the side effects, cell by cell.

Each cell adds coefficient x v_layer at one layer's output (every token) and measures, with the same
forwards for every cell: the task metric on the task's prompts (the effect wanted), and on neutral
text (the shipped held-out prose by default) the KL from the unsteered next-token distribution and the
perplexity (the cost). `best(max_kl)` picks the cell with the largest effect whose KL stays under a bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mechanic.locate.scores import Scores
from mechanic.steer.plan import PlanError


@dataclass
class Sweep:
    """target / kl / ppl: Scores with rows = layers (`L.resid_post`) and columns = coefficients."""

    target: Scores
    kl: Scores
    ppl: Scores
    baseline: dict
    settings: dict = field(default_factory=dict)

    def best(self, max_kl: float = 0.1, maximize: bool = True) -> tuple[int, float] | None:
        """(layer, coefficient) with the largest (or smallest) target metric among cells with KL <= max_kl."""
        ok = self.kl.values <= max_kl
        if not bool(ok.any()):
            return None
        v = self.target.values.masked_fill(~ok, float("-inf") if maximize else float("inf"))
        i = int(v.argmax() if maximize else v.argmin())
        r, c = divmod(i, v.shape[1])
        return int(self.target.sites[r].split(".")[0][1:]), self.settings["coefficients"][c]


def _neutral(model, texts, max_tokens: int, seq_len: int) -> torch.Tensor:
    from mechanic.data.text import calibration
    from mechanic.data.windows import windows

    wins = windows(model, calibration() if texts is None else texts, seq_len=seq_len, max_tokens=max_tokens)
    wins = [w for w in wins if w.numel() == seq_len] or wins[:1]
    return torch.stack(wins) if len({w.numel() for w in wins}) == 1 else wins[0][None]


def _side(model, ids: torch.Tensor, base_logp: torch.Tensor | None, ivs) -> tuple[torch.Tensor, float, float]:
    """(log-probs, mean KL(base || steered) per token, perplexity) on the neutral windows."""
    logp = torch.log_softmax(model.run(ids, interventions=ivs).logits.float(), -1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    kl = 0.0 if base_logp is None else float((base_logp.exp() * (base_logp - logp)).sum(-1).mean())
    return logp, kl, float(nll.exp())


def sweep(model, vector, task, layers, coefficients, *, side: str = "clean", neutral=None,
          neutral_tokens: int = 512, seq_len: int = 128, positions=None) -> Sweep:
    """Sweep `vector` (a mechanic Vector with directions at `layers`) over layers x coefficients."""
    from mechanic.tasks import metrics as M

    layers, coefficients = [int(x) for x in layers], [float(c) for c in coefficients]
    if not layers or not coefficients:
        raise PlanError("A sweep needs at least one layer and one coefficient.")
    missing = [L for L in layers if L not in vector.directions]
    if missing:
        raise PlanError(f"The vector has no direction at layers {missing} (it has {sorted(vector.directions)}); "
                        "extract it at every layer you sweep.")
    batch = task.tokenize(model)
    prompts = getattr(batch, side)
    if prompts is None:
        raise PlanError(f"The task has no {side} prompts; sweep side='clean' or give corrupted prompts.")
    fn = M.get(task.metric)
    ids = _neutral(model, neutral, neutral_tokens, seq_len)

    def target(ivs) -> float:
        return float(fn(model.run(prompts, interventions=ivs, last_only=True).logits[:, -1], batch).mean())
    base_logp, _, base_ppl = _side(model, ids, None, [])
    base = {"target": target([]), "ppl": base_ppl}
    shape = (len(layers), len(coefficients))
    out = {k: torch.zeros(shape) for k in ("target", "kl", "ppl")}
    for i, L in enumerate(layers):
        for j, c in enumerate(coefficients):
            ivs = vector.interventions(c, layers=[L], positions=positions)
            out["target"][i, j] = target(ivs)
            _, out["kl"][i, j], out["ppl"][i, j] = _side(model, ids, base_logp, ivs)
    sites = [f"L{L}.{vector.site}" for L in layers]
    labels = [f"{c:g}" for c in coefficients]
    settings = {"layers": layers, "coefficients": coefficients, "side": side, "neutral_tokens": int(ids.numel()),
                "positions": positions, "vector": vector.method, "baseline": base}
    make = lambda v, metric: Scores(v, sites, "steer/sweep", positions=labels, task=task.name,  # noqa: E731
                                    metric=metric, model=model.name, fingerprint=model.fingerprint,
                                    settings=settings)
    return Sweep(make(out["target"], task.metric), make(out["kl"], "kl_neutral"), make(out["ppl"], "ppl_neutral"),
                 base, settings)
