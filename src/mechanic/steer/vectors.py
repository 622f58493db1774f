"""Steering vectors: extraction of a Vector (mechanic.model.vector: per-layer directions + metadata) from contrastive pairs.

Hook point: a vector of site kind `resid_post` at layer L is added to the **output of decoder layer L**
(0-based, `model.layers[L]`), i.e. Hugging Face's `hidden_states[L + 1]` for L < n_layers - 1 (HF's
last hidden state has the final norm applied; ours does not). That is also where llama.cpp adds a
control vector's `direction.L` (see mechanic.model.vector_io and docs/STEERING.md).

Methods (all read the activations of each side of each pair at one read position, see
mechanic.model.readout):
- `caa`: mean over pairs of (positive - negative) (contrastive activation addition, Rimsky et al.).
- `pca_diff`: first principal component of the pair differences (centred, as repeng's PCA does),
  unit norm, sign set so the mean difference projects positively.
- `pca_center`: first principal component of the pair-centred activations (each pair minus its own
  midpoint), unit norm, same sign rule. Pair-centring makes this the *uncentred* PCA of the differences
  (each pair contributes +d/2 and -d/2), i.e. steering-vectors' `pca_aggregator`.
- `actadd`: one pair's difference (ActAdd, Turner et al.).
- `from_probe`: a linear probe's unit direction (mechanic.locate.probe).
"""

from __future__ import annotations

from typing import Iterable

import torch

from mechanic.model.vector import KINDS, Vector, VectorError  # the value type (re-exported here for callers)
from mechanic.model.readout import Read, check_read, describe, read as read_sites

METHODS = ("caa", "pca_diff", "pca_center", "actadd")


# ---------------------------------------------------------------- contrastive pairs
def pairs_from_task(task, answers: bool = False) -> list[tuple]:
    """Contrastive pairs from a mechanic Task: (prompt, corrupted), or (prompt, answer, wrong) when answers=True.

    The first is "the behaviour's prompt vs its opposite" (e.g. sentiment: positive vs negative review);
    the second is CAA's form, one prompt completed with the matching vs the other answer (read="answer").
    """
    from mechanic.tasks.guard import check

    check(f"task {task.name!r} (pairs)", [e.split for e in task.examples])
    if answers:
        missing = [i for i, e in enumerate(task.examples) if e.wrong is None]
        if missing:
            raise VectorError(f"Task {task.name!r}: examples {missing[:5]} have no `wrong` answer, so there is no "
                              "(answer, wrong) contrast; use answers=False for (prompt, corrupted) pairs.")
        return [(e.prompt, e.answer, e.wrong) for e in task.examples]
    missing = [i for i, e in enumerate(task.examples) if e.corrupted is None]
    if missing:
        raise VectorError(f"Task {task.name!r} has no corrupted prompts (examples {missing[:5]}), so there is no "
                          "negative side; give pairs explicitly or use answers=True for (prompt, answer, wrong).")
    return [(e.prompt, e.corrupted) for e in task.examples]


def sides(model, pairs, read: Read = "last"):
    """(positive inputs, negative inputs, positive spans, negative spans) from any accepted form of pairs.

    Forms: a Task; a list of (positive, negative) texts; a list of (prompt, positive answer, negative
    answer) texts (answer spans recorded, for read="answer"); or a (positive, negative) tuple of token-id
    tensors / tokenized dicts with the same number of rows.
    """
    from mechanic.tasks.task import Task

    if isinstance(pairs, Task):
        pairs = pairs_from_task(pairs, answers=read == "answer")
    if isinstance(pairs, tuple) and len(pairs) == 2 and not isinstance(pairs[0], str):
        from mechanic.model.readout import n_rows

        pos, neg = pairs
        if n_rows(pos) != n_rows(neg):
            raise VectorError(f"Positive and negative inputs must have the same number of rows; got {n_rows(pos)} "
                              f"and {n_rows(neg)}.")
        if read == "answer":
            raise VectorError("read='answer' needs text pairs given as (prompt, positive answer, negative answer).")
        return pos, neg, None, None
    pairs = list(pairs)
    if not pairs:
        raise VectorError("No contrastive pairs given; pass a list of (positive, negative) prompts.")
    sizes = {len(p) if isinstance(p, (tuple, list)) else 0 for p in pairs}
    if sizes == {2}:
        if read == "answer":
            raise VectorError("read='answer' needs pairs as (prompt, positive answer, negative answer) so the answer "
                              "tokens are known; with (positive, negative) prompts read 'last', a token or a span.")
        return [p[0] for p in pairs], [p[1] for p in pairs], None, None
    if sizes == {3}:
        pos, pspan = _with_answers(model, [(p[0], p[1]) for p in pairs])
        neg, nspan = _with_answers(model, [(p[0], p[2]) for p in pairs])
        return pos, neg, pspan, nspan
    raise VectorError("Pairs must all be (positive, negative) texts or all (prompt, positive answer, negative "
                      f"answer) texts; got items of lengths {sorted(sizes)}.")


def _with_answers(model, items: list[tuple[str, str]]) -> tuple[list[str], torch.Tensor]:
    """prompt + answer texts and the answer's real-token span [start, end) in each."""
    tok = model.tokenizer
    if tok is None:
        raise VectorError("This model has no tokenizer, so text pairs cannot be used; pass token ids instead.")
    texts, spans = [], []
    for prompt, answer in items:
        a = tok(prompt)["input_ids"]
        b = tok(prompt + answer)["input_ids"]
        if b[:len(a)] != a or len(b) == len(a):
            raise VectorError(f"The answer {answer!r} does not tokenize separately after {prompt[-40:]!r} (the "
                              "tokens merge across the boundary); start the answer with a space or end the prompt "
                              "with one.")
        texts.append(prompt + answer)
        spans.append((len(a), len(b)))
    return texts, torch.tensor(spans, dtype=torch.long)


def activations(model, pairs, layers: Iterable[int] | None = None, site: str = "resid_post",
                read: Read = "last", batch_size: int = 16) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """({layer: [n, d] positive activations}, {layer: [n, d] negative activations}) at `L{layer}.{site}`."""
    check_read(read)
    if site not in KINDS:
        raise VectorError(f"Steering site kind {site!r} is not supported; use one of {', '.join(KINDS)}.")
    layers = list(range(model.dims.n_layers)) if layers is None else [int(L) for L in layers]
    pos, neg, pspan, nspan = sides(model, pairs, read)
    names = {L: f"L{L}.{site}" for L in layers}
    a = read_sites(model, pos, list(names.values()), read, pspan, batch_size)
    b = read_sites(model, neg, list(names.values()), read, nspan, batch_size)
    return {L: a[s] for L, s in names.items()}, {L: b[s] for L, s in names.items()}


def direction(pos: torch.Tensor, neg: torch.Tensor, method: str) -> tuple[torch.Tensor, dict]:
    """One layer's direction from [n, d] positive and negative activations, plus diagnostics."""
    diff = (pos - neg).double()
    mean = diff.mean(0)
    if method in ("caa", "actadd"):
        if method == "actadd" and diff.shape[0] != 1:
            raise VectorError(f"actadd uses a single pair; got {diff.shape[0]}. Use caa for the mean of many pairs.")
        return mean.float(), {}
    if method not in ("pca_diff", "pca_center"):
        raise VectorError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)} (or from_probe).")
    if diff.shape[0] < 2:
        raise VectorError(f"{method} needs at least 2 pairs to find a principal component; got {diff.shape[0]}.")
    if method == "pca_diff":
        data = diff
    else:
        mid = (pos.double() + neg.double()) / 2
        data = torch.cat([pos.double() - mid, neg.double() - mid])
    data = data - data.mean(0)
    _, s, vh = torch.linalg.svd(data, full_matrices=False)
    v = vh[0]
    if float(mean @ v) < 0:
        v = -v
    var = s.pow(2)
    return v.float(), {"explained": float(var[0] / var.sum().clamp_min(1e-30))}


def extract(model, pairs, method: str = "caa", layers: Iterable[int] | None = None, site: str = "resid_post",
            read: Read = "last", batch_size: int = 16) -> Vector:
    """A steering vector from contrastive pairs: method caa | pca_diff | pca_center | actadd, at each layer.

    pairs: see `sides` (a Task, (positive, negative) texts, (prompt, positive answer, negative answer)
    texts, or a (positive, negative) tuple of token inputs). layers: default every layer.
    Activations are read in batches of `batch_size` with the forward stopped after the last layer needed.
    """
    if method not in METHODS:
        raise VectorError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)} (or from_probe).")
    pos, neg = activations(model, pairs, layers, site, read, batch_size)
    dirs, diag = {}, {}
    for L in pos:
        dirs[L], info = direction(pos[L], neg[L], method)
        if info:
            diag[L] = info
        diff = pos[L] - neg[L]
        diag.setdefault(L, {})["agree"] = float(((diff @ dirs[L]) > 0).float().mean())  # pairs projecting the right way
    settings = {"n_pairs": int(next(iter(pos.values())).shape[0]), "batch_size": batch_size,
                "per_layer": {str(L): v for L, v in diag.items()}}
    return Vector(dirs, site=site, method=method, read=describe(read), model=model.name,
                  model_type=getattr(model.hf.config, "model_type", None), fingerprint=model.fingerprint,
                  norm="raw" if method in ("caa", "actadd") else "unit", settings=settings)


def caa(model, pairs, **kwargs) -> Vector:
    """Contrastive activation addition: mean of (positive - negative) per layer (see `extract`)."""
    return extract(model, pairs, "caa", **kwargs)


def pca_diff(model, pairs, **kwargs) -> Vector:
    """First principal component of the pair differences, sign-aligned with their mean (see `extract`)."""
    return extract(model, pairs, "pca_diff", **kwargs)


def pca_center(model, pairs, **kwargs) -> Vector:
    """First principal component of pair-centred activations, sign-aligned with the mean difference."""
    return extract(model, pairs, "pca_center", **kwargs)


def actadd(model, positive, negative, **kwargs) -> Vector:
    """ActAdd: the difference of one positive and one negative prompt's activations (texts or token ids)."""
    pairs = [(positive, negative)] if isinstance(positive, str) else (positive, negative)
    return extract(model, pairs, "actadd", **kwargs)


def from_probe(result, sites: Iterable[str] | None = None) -> Vector:
    """The unit directions of a probe result (mechanic.locate.probe.ProbeResult) as one Vector."""
    return result.vector(sites)
