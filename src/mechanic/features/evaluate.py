"""How good is a dictionary, on held-out text: reconstruction (FVU, L0, dead/dense latents, density histogram)
and the cost of splicing it into the model (CE loss recovered, KL to the original next-token distribution),
with and without the error term (with it the spliced model must equal the original).

CE loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_original), where CE_zero zero-ablates the
written site: 1 is a perfect dictionary, 0 no better than deleting the site.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from mechanic.features.activations import SiteReader, text_windows
from mechanic.features.dictionary import Dictionary
from mechanic.features.errors import FeaturesError
from mechanic.features.splice import reconstruction, spliced_logits, zero_ablation

HIST_EDGES = [-math.inf] + [x / 2 for x in range(-14, 1)]   # log10 firing frequency bins: ..., -7, -6.5, ..., 0


@dataclass
class Evaluation:
    """The numbers of one evaluation (all on held-out text); `to_json()` for files and --json."""

    tokens: int
    fvu: float
    mse: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    density_histogram: dict
    ce_tokens: int = 0
    ce_original: float | None = None
    ce_spliced: float | None = None
    ce_zero_ablated: float | None = None
    ce_loss_recovered: float | None = None
    kl_spliced: float | None = None
    ce_with_error: float | None = None
    kl_with_error: float | None = None
    max_logit_diff_with_error: float | None = None
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _windows(model, text, seq_len: int, tokens: int) -> torch.Tensor:
    wins = []
    for w in text_windows(model, text, "heldout", seq_len):
        wins.append(w)
        if len(wins) * seq_len >= tokens:
            break
    if not wins:
        raise FeaturesError(f"The evaluation text gives no window of {seq_len} tokens; give more text or a smaller "
                            "seq_len.")
    return torch.stack(wins)


def _ce_kl(logits: torch.Tensor, ref_logp: torch.Tensor, ids: torch.Tensor, s: int) -> tuple[float, float]:
    """Mean next-token CE and KL(original || this) over positions s..P-2."""
    lp = F.log_softmax(logits[:, s:-1].float(), -1)
    ce = -lp.gather(-1, ids[:, s + 1:, None]).squeeze(-1)
    kl = (ref_logp.exp() * (ref_logp - lp)).sum(-1)
    return float(ce.sum()), float(kl.sum())


@torch.no_grad()
def evaluate(model, d: Dictionary, text=None, tokens: int = 32768, ce_tokens: int = 8192, seq_len: int = 128,
             batch: int = 8, skip_first: int = 1, dense_threshold: float = 0.1, splice: bool = True) -> Evaluation:
    """Evaluate `d` on held-out text (default corpus held-out split, or `text`): reconstruction on `tokens`,
    splicing on the first `ce_tokens` of them."""
    d.check(model)
    d.eval()
    wins = _windows(model, text, seq_len, max(tokens, ce_tokens))
    reader = SiteReader(model, [d.site] + ([d.out_site] if d.transcoder else []), skip_first=skip_first)
    n, sq, var_sum, l0_sum = 0, 0.0, None, 0.0
    fires = torch.zeros(d.d_sae, dtype=torch.long)
    ys, yy = 0.0, None
    n_rec = max(1, min(len(wins), math.ceil(tokens / seq_len)))
    for i in range(0, n_rec, batch):
        vals = reader.read(wins[i:i + batch])
        x = vals[d.site]
        y = vals[d.out_site] if d.transcoder else x
        acts = d.encode(x)
        out = d.decode(acts) + d.skip(x)
        sq += float((y - out).pow(2).sum())
        ys = ys + y.double().sum(0)
        yy = (y.double().pow(2).sum(0)) if yy is None else yy + y.double().pow(2).sum(0)
        fired = acts != 0
        l0_sum += float(fired.sum())
        fires += fired.sum(0)
        n += x.shape[0]
    total_var = float((yy - ys.pow(2) / n).sum())
    freq = fires.double() / n
    hist_counts = torch.histc(torch.log10(freq[freq > 0]), bins=len(HIST_EDGES) - 2, min=-7.0, max=0.0).tolist() if (freq > 0).any() else []
    histogram = {"log10_frequency_edges": HIST_EDGES[1:], "counts": [int(c) for c in hist_counts],
                 "never_fired": int((fires == 0).sum())}
    ev = Evaluation(tokens=n, fvu=sq / max(total_var, 1e-30), mse=sq / n / d.d_out, l0=l0_sum / n,
                    dead_fraction=float((fires == 0).double().mean()),
                    dense_fraction=float((freq > dense_threshold).double().mean()), density_histogram=histogram,
                    settings={"seq_len": seq_len, "skip_first": skip_first, "dense_threshold": dense_threshold,
                              "text": "default corpus (GCIDE) held-out split" if text is None else "user text",
                              "dictionary": repr(d)})
    if splice:
        _splice_metrics(model, d, wins[:max(1, min(len(wins), math.ceil(ce_tokens / seq_len)))], ev, batch, skip_first)
    return ev


def _splice_metrics(model, d: Dictionary, wins: torch.Tensor, ev: Evaluation, batch: int, s: int) -> None:
    tot = {"orig": 0.0, "splice": 0.0, "zero": 0.0, "err": 0.0, "kl": 0.0, "kl_err": 0.0}
    n, max_diff = 0, 0.0
    for i in range(0, len(wins), batch):
        ids = wins[i:i + batch]
        orig = model.run(ids).logits
        ref = F.log_softmax(orig[:, s:-1].float(), -1)
        ce_o, _ = _ce_kl(orig, ref, ids, s)
        ce_s, kl_s = _ce_kl(spliced_logits(model, d, ids, reconstruction(d), s), ref, ids, s)
        ce_z, _ = _ce_kl(spliced_logits(model, d, ids, zero_ablation, s), ref, ids, s)
        with_err = spliced_logits(model, d, ids, reconstruction(d, error_term=True), s)
        ce_e, kl_e = _ce_kl(with_err, ref, ids, s)
        max_diff = max(max_diff, float((with_err - orig).abs().max()))
        for k, v in (("orig", ce_o), ("splice", ce_s), ("zero", ce_z), ("err", ce_e), ("kl", kl_s), ("kl_err", kl_e)):
            tot[k] += v
        n += ids.shape[0] * (ids.shape[1] - 1 - s)
    m = {k: v / n for k, v in tot.items()}
    ev.ce_tokens = n
    ev.ce_original, ev.ce_spliced, ev.ce_zero_ablated = m["orig"], m["splice"], m["zero"]
    denom = m["zero"] - m["orig"]
    ev.ce_loss_recovered = (m["zero"] - m["splice"]) / denom if abs(denom) > 1e-12 else None
    ev.kl_spliced, ev.ce_with_error, ev.kl_with_error = m["kl"], m["err"], m["kl_err"]
    ev.max_logit_diff_with_error = max_diff
