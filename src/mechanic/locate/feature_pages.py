"""What a feature page shows, as JSON: each feature's top contexts (tokens as text, activations), histogram, firing
rate and logit effect. mechanic.report.feature_pages draws it; `mechanic features` writes both.

Layout (every number a plain JSON value; activations not read, the first token of a window, are null):
{"model", "dictionary": {...}, "text", "tokens", "windows", "seq_len", "selection", "features": [
  {"id", "count", "frequency", "max", "mean_active",
   "contexts": [{"value", "window", "position", "at", "tokens": [str], "acts": [float | null]}],
   "histogram": {"width", "counts"}            # counts[i]: activations in [i * width, (i + 1) * width)
   "logits": {"promoted": [{"id", "token", "logit"}], "suppressed": [...]}}]}
"""

from __future__ import annotations

import math

import torch

from mechanic.features.contexts import Scan, scan
from mechanic.features.dictionary import Dictionary
from mechanic.features.errors import FeaturesError
from mechanic.locate.feature_logits import logit_effect

INCOMPLETE = "\ufffd"


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text such that the pieces join to the decoded text; a token ending inside a multi-byte
    character gives "" and the token that completes it carries the character."""
    if tokenizer is None:
        return [f"#{i} " for i in ids]
    out, shown = [], ""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])
        if text.endswith(INCOMPLETE) and n < len(ids):
            out.append("")
            continue
        out.append(text[len(shown):] if text.startswith(shown) else tokenizer.decode(ids[n - 1:n]))
        shown = text
    return out


def choose(model, d: Dictionary, features, text, **kw) -> tuple[Scan, str]:
    """Scan for a list of feature ids, or for the `features` most frequently firing latents (an int)."""
    if isinstance(features, int) and not isinstance(features, bool):
        if features < 1:
            raise FeaturesError(f"Show at least one feature, got {features}.")
        every = scan(model, d, text, None, **kw)
        top = sorted(range(d.d_sae), key=lambda f: (-int(every.count[f]), f))[:features]
        return _subset(every, top), f"the {len(top)} most frequently firing of {d.d_sae:,} latents"
    ids = [int(f) for f in features]
    if len(set(ids)) != len(ids):
        raise FeaturesError(f"Feature ids are listed twice: {sorted({f for f in ids if ids.count(f) > 1})}.")
    return scan(model, d, text, ids, **kw), f"{len(ids)} listed latents of {d.d_sae:,}"


def _subset(s: Scan, rows: list[int]) -> Scan:
    """The scan restricted to feature rows `rows` (positions in s.features)."""
    i = torch.tensor(rows, dtype=torch.long)
    return Scan(s.features[i], s.tokens, s.windows, s.seq_len, s.count[i], s.max[i], s.total[i], s.top_value[i],
                s.top_place[i], s.top_ids[i], s.top_acts[i], s.hist[i], s.width[i], s.before)


def _num(x: float):
    return None if math.isnan(x) else x


def feature_pages(model, d: Dictionary, text=None, features=16, tokens: int = 32768, contexts: int = 10,
                  logits: int = 10, seq_len: int = 128, batch: int = 8, before: int = 24, after: int = 8) -> dict:
    """The page data of `features` (a list of latent ids, or N for the N most frequently firing) read on
    `tokens` held-out tokens (default corpus held-out split, or `text`)."""
    s, selection = choose(model, d, features, text, tokens=tokens, k=contexts, seq_len=seq_len, batch=batch,
                          before=before, after=after)
    tok = model.tokenizer
    effects = logit_effect(model, d, s.features, logits)
    pages = []
    for i, f in enumerate(s.features.tolist()):
        ctx = [{"value": v, "window": p // s.seq_len, "position": p % s.seq_len, "at": at,
                "tokens": token_pieces(tok, ids), "acts": [_num(a) for a in acts]}
               for v, p, ids, acts, at in s.contexts(i)]
        n = int(s.count[i])
        hist = s.hist[i].tolist()
        last = max((j for j, c in enumerate(hist) if c), default=-1)
        pages.append({"id": f, "count": n, "frequency": n / s.tokens, "max": float(s.max[i]),
                      "mean_active": float(s.total[i]) / n if n else 0.0, "contexts": ctx,
                      "histogram": {"width": float(s.width[i]), "counts": hist[: last + 1]},
                      "logits": {side: [{"id": t, "token": token_pieces(tok, [t])[0], "logit": v} for t, v in rows]
                                 for side, rows in effects[i].items()}})
    return {"model": model.name, "dictionary": {"description": repr(d), "site": d.site, "out_site": d.out_site,
                                                "kind": d.kind, "architecture": d.architecture, "d_sae": d.d_sae},
            "text": "default corpus (GCIDE) held-out split" if text is None else "user text",
            "tokens": s.tokens, "windows": s.windows, "seq_len": s.seq_len, "selection": selection,
            "settings": {"contexts": contexts, "logits": logits, "before": before, "after": after, "batch": batch},
            "features": pages}
