"""Causal tracing (ROME, Meng et al. 2022): noise the subject, restore one clean state, measure P(answer).

Recipe. The clean prompt runs once and its states are cached. The subject tokens' embeddings (the
`embed` site: the token-embedding module's output) get Gaussian noise N(0, (noise * sigma_emb)^2),
`samples` draws from a seeded generator, the same draws for every restoration. sigma_emb is the
standard deviation of every entry of the embedding table as the `embed` site outputs it (all
vocabulary tokens; the ROME code instead takes the std of subject-token embeddings over its data
set). Then one clean state is restored in every noised run:

- hidden: `L{l}.resid_post` at token i;
- mlp / attn: `L{j}.mlp_out` / `L{j}.attn_out` at token i for the window of layers
  j in [l - window//2, l + window - window//2), clipped at both ends (ROME's window).

P is the answer's softmax probability at the last position, averaged over the noise samples. The
indirect effect of (l, i) is P_restored - P_noised. Tokens before the first subject token see no noise,
so restoring them changes nothing: their effect is 0 by construction and they are not run.

Under torchrun (mechanic.distributed) the restorations are split over the ranks: every rank runs the clean
and noised runs, then the rows ((layer, token), sample) of each token are dealt round-robin over the ranks
(a balanced share of every start layer), each rank restores its rows, and every rank gathers all the
probabilities and averages them as one process does. A row's probability depends only on its own inputs, so
the result equals one process up to the batching of the rows (~1e-7).

Fast by construction (mechanic.model.reuse, as activation patching): the noised runs (one row per
sample) are recorded once with their key/value cache; a restoration at token i from layer l on changes
neither the columns before i nor the layers below l, so each restoration is one batch row that computes
columns i.. from its lowest restored layer up, and only the last position's logits. A restored resid_post
or mlp_out at that lowest layer l changes layer l's output at token i alone (the later tokens' attention
there reads token i's unchanged input), so those rows add the difference to L{l}.resid_post and start at
layer l + 1.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch

from mechanic import distributed as D
from mechanic.locate.scores import Scores
from mechanic.model.interventions import add, replace
from mechanic.model.reuse import prefix, suffix_logits

KINDS = {"hidden": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}


class TraceError(ValueError):
    """Causal-tracing input that cannot be used as given (no subject, unknown kind, bad layer, ...)."""


# ---------------------------------------------------------------- inputs
def _ids(model, prompt) -> torch.Tensor:
    """The prompt as a [1, T] id tensor, tokenized exactly as model.run tokenizes text."""
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise TraceError("This model has no tokenizer, so the prompt cannot be text: pass its token ids "
                             "(a list of ints or a LongTensor) and the subject as token positions.")
        if not prompt:
            raise TraceError("The prompt is empty; causal tracing needs a prompt that contains the subject.")
        return torch.tensor([model.tokenizer(prompt)["input_ids"]], dtype=torch.long)
    ids = torch.as_tensor(prompt, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise TraceError(f"Causal tracing runs one prompt: pass a string or one non-empty row of token ids, "
                         f"got a tensor of shape {list(ids.shape)}.")
    return ids[None]


def subject_positions(model, prompt, subject) -> list[int]:
    """Token positions of the subject: a substring of the prompt (located through tokenizer offsets) or positions."""
    ids = _ids(model, prompt)
    T = ids.shape[1]
    if isinstance(subject, str):
        if not subject.strip():
            raise TraceError("The subject is empty. Give the subject as a non-empty substring of the prompt "
                             "(e.g. 'The Eiffel Tower') or as a list of token positions.")
        if not isinstance(prompt, str):
            raise TraceError("A subject given as text needs the prompt as text too (to find it through the "
                             "tokenizer's character offsets); with token ids, give the subject's token positions.")
        start = prompt.find(subject)
        if start < 0:
            raise TraceError(f"The subject {subject!r} does not occur in the prompt {prompt!r} (the match is "
                             "exact and case-sensitive). Pass a substring of the prompt, or its token positions.")
        end = start + len(subject)
        try:
            enc = model.tokenizer(prompt, return_offsets_mapping=True)
        except (NotImplementedError, ValueError, TypeError) as e:
            raise TraceError(f"This tokenizer gives no character offsets ({e}); pass the subject's token "
                             "positions instead of its text.") from e
        if enc["input_ids"] != ids[0].tolist():
            raise TraceError("The tokenizer returns different ids with offsets than without; pass the subject's "
                             "token positions instead of its text.")
        pos = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]
        if not pos:
            raise TraceError(f"The subject {subject!r} covers no token of the prompt {prompt!r}.")
        return pos
    if isinstance(subject, int):
        subject = [subject]
    if isinstance(subject, torch.Tensor):
        subject = subject.reshape(-1).tolist()
    if not isinstance(subject, (list, tuple, range)) or not all(isinstance(p, int) for p in subject):
        raise TraceError(f"The subject must be a substring of the prompt or a list of token positions (ints), "
                         f"got {subject!r}.")
    pos = sorted({p % T if -T <= p < T else _bad_pos(p, T) for p in subject})
    if not pos:
        raise TraceError("The subject is empty. Give at least one token position (or the subject's text).")
    return pos


def _bad_pos(p, T: int):
    raise TraceError(f"Subject position {p} is out of range for a prompt of {T} tokens "
                     f"(valid: {-T}..{T - 1}; negative positions count from the end).")


def _answer_id(model, answer) -> tuple[int, str]:
    if isinstance(answer, str):
        if model.tokenizer is None:
            raise TraceError("This model has no tokenizer: give the answer as a token id.")
        ids = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise TraceError(f"The answer {answer!r} is empty after tokenization; causal tracing measures the "
                             "probability of the answer's first token.")
        return int(ids[0]), answer
    a = int(answer)
    if not 0 <= a < model.dims.vocab:
        raise TraceError(f"Answer token id {a} is out of range: the vocabulary has ids 0..{model.dims.vocab - 1}.")
    return a, _label(model, a)


def _label(model, token_id: int) -> str:
    tok = model.tokenizer
    return tok.decode([token_id]) if tok is not None else str(token_id)


def embedding_std(model) -> float:
    """sigma_emb, which sets the noise scale: the std of every entry of the embedding table as `embed` outputs it.

    Remembered per embedding module while its parameters are unchanged (same storage, no in-place write), so
    tracing many facts (ROME/MEMIT's layer choice) reads the table once."""
    emb = model.module(model.arch.embed)
    key = tuple((p.data_ptr(), p._version, p.dtype) for p in emb.parameters())
    hit = _STD.get(emb)
    if hit is not None and hit[0] == key:
        return hit[1]
    n, total, squares = 0, 0.0, 0.0
    with torch.no_grad():  # in blocks of ids, so a large vocabulary never holds a second float64 table
        for start in range(0, model.dims.vocab, 8192):
            ids = torch.arange(start, min(start + 8192, model.dims.vocab), device=model.device)
            block = emb(ids).double().flatten()
            n += block.numel()
            total += float(block.sum())
            squares += float(torch.dot(block, block))
    mean = total / n
    std = ((squares - n * mean * mean) / (n - 1)) ** 0.5
    _STD[emb] = (key, std)
    return std


_STD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # embedding module -> (parameter state, std)


# ---------------------------------------------------------------- last-position logits
def last_logits(model, inputs, interventions: Sequence = ()) -> torch.Tensor:
    """Last-position logits [B, vocab] of a run with interventions (the unembedding runs at that position only)."""
    return model.run(inputs, interventions=list(interventions), last_only=True).logits[:, -1]


# ---------------------------------------------------------------- tracing
def _window(layer: int, window: int, n_layers: int) -> range:
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def _prob(logits: torch.Tensor, answer: int) -> torch.Tensor:
    """The answer's softmax probability per row of last-position logits [B, vocab]."""
    return torch.softmax(logits.float(), -1)[:, answer].cpu()


def _plan(units: list, samples: int, batch_size: int, low, rank: int = 0, world: int = 1) -> list:
    """Forwards of at most batch_size rows ((layer, position), sample): one restored column each, by start layer.

    With world > 1, rank `rank`'s share: every world-th row of each column's rows in start-layer order."""
    plan = []
    for t in sorted({t for _, t in units}):
        rows = sorted(((u, s) for u in units if u[1] == t for s in range(samples)), key=lambda r: low(r[0][0]))
        rows = rows[rank::world]
        plan += [(t, rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    return plan


def causal_trace(model, prompt, answer, subject, kind: str = "hidden", *, samples: int = 10,
                 noise: float = 3.0, noise_std: float | None = None, window: int = 10, seed: int = 0,
                 layers: Sequence[int] | None = None, positions: Sequence[int] | None = None,
                 batch_size: int = 128, progress: bool = False) -> Scores:
    """ROME causal trace: P_restored - P_noised per restored (layer, token) state, to find where a fact is recalled.

    prompt: text or token ids; answer: text (its first token) or a token id; subject: a substring of
    the prompt or its token positions. kind: hidden (resid_post), mlp or attn (a window of `window`
    layers). The noise std is `noise` x sigma_emb (see `embedding_std`), or `noise_std` if given.
    `layers` / `positions` restrict the grid (default: every layer, every token). `batch_size` is the
    number of forward rows per call (one row per restoration and noise sample).
    Returns Scores with values [layers, positions]; settings hold p_clean, p_noised and the recipe.
    """
    if kind not in KINDS:
        raise TraceError(f"Unknown trace kind {kind!r}; choose hidden (restore resid_post), mlp (restore mlp_out "
                         "over a window of layers) or attn (attn_out over a window).")
    if samples < 1 or window < 1 or batch_size < 1:
        raise TraceError(f"samples, window and batch_size must be at least 1 (got samples={samples}, "
                         f"window={window}, batch_size={batch_size}).")
    n_layers = model.dims.n_layers
    ids = _ids(model, prompt).to(model.device)
    T = ids.shape[1]
    subj = subject_positions(model, prompt, subject)
    ans, ans_text = _answer_id(model, answer)
    layer_list = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    for x in layer_list:
        if not 0 <= x < n_layers:
            raise TraceError(f"Layer {x} is out of range: this model has layers 0..{n_layers - 1}.")
    if not layer_list:
        raise TraceError("No layers to trace: `layers` is empty.")
    if positions is None:
        pos_list = list(range(T))
    else:
        pos_list = [int(p) % T if -T <= int(p) < T else _bad_pos(p, T) for p in positions]
        if not pos_list:
            raise TraceError("No positions to trace: `positions` is empty.")
    part = KINDS[kind]
    win = window if kind != "hidden" else 1

    # noise: the same `samples` draws for every restoration
    sigma = embedding_std(model)
    std = float(noise_std) if noise_std is not None else noise * sigma
    g = torch.Generator().manual_seed(seed)
    draws = torch.randn(samples, len(subj), model.dims.d_model, generator=g) * std
    dtype = next(model.hf.parameters()).dtype
    draws = draws.to(device=model.device, dtype=dtype)

    # A restored resid_post / mlp_out at the window's lowest layer j changes only token t's output of layer j
    # (the later tokens of layer j read token t's input, which is unchanged): the row adds the difference to
    # L{j}.resid_post and starts at layer j + 1. A restored attn_out changes token t's MLP input at layer j,
    # so that row starts at layer j.
    low = {l: min(_window(l, win, n_layers)) for l in layer_list}
    fold = kind != "attn"
    start_of = {l: low[l] + fold for l in layer_list}
    first = min(subj)
    units = [(l, t) for l in layer_list for t in pos_list if t >= first]
    split = D.active()   # under torchrun, and not inside one rank's share of other work (D.local)

    def forwards() -> tuple[float, float, list]:
        """P_clean, P_noised and (unit, sample, P_restored) of this rank's rows: every forward of the trace."""
        # clean run: the states to restore and P_clean
        need = sorted({j for l in layer_list for j in _window(l, win, n_layers)})
        clean = model.run(ids, cache=[f"L{j}.{part}" for j in need], last_only=True)
        p_clean = float(torch.softmax(clean.logits[0, -1].float(), -1)[ans])

        # noised runs, one row per sample: P_noised, the prefix every restoration starts from, and (hidden / mlp)
        # the noised state at each window's lowest layer, which a restoration there replaces
        noised = [f"L{j}.{part}" for j in sorted(set(low.values()))] if fold else []
        base = prefix(model, ids.expand(samples, T), cache=noised, interventions=[add("embed", draws, pos=subj)],
                      last_only=True)
        p_noised = float(_prob(base.logits, ans).mean())

        chunks = _plan(units, samples, batch_size, start_of.__getitem__,
                       *((D.rank(), D.world()) if split else (0, 1)))
        if progress:
            from tqdm.auto import tqdm
            chunks = tqdm(chunks, desc=f"causal trace ({kind})")
        out = []
        for t, chunk in chunks:
            rows = torch.tensor([s for _, s in chunk], device=model.device)
            start = torch.tensor([start_of[l] for (l, _), _ in chunk])
            ivs = []
            later = [k for k, q in enumerate(subj) if q >= t]  # subject tokens the suffix still holds: noised
            if later:
                ivs.append(add("embed", draws[rows][:, later], pos=[subj[k] - t for k in later]))
            for j in sorted({j for (l, _), _ in chunk for j in _window(l, win, n_layers)}):
                site = f"L{j}.{part}"
                hit = [r for r, ((l, _), _) in enumerate(chunk) if j in _window(l, win, n_layers)]
                folded = [r for r in hit if fold and low[chunk[r][0][0]] == j]
                rest = [r for r in hit if not (fold and low[chunk[r][0][0]] == j)]
                if folded:
                    delta = clean[site][0, t] - base.cache[site][rows[folded], t]
                    ivs.append(add(f"L{j}.resid_post", delta, pos=0, rows=folded))
                if rest:
                    ivs.append(replace(site, clean[site][0, t], pos=0, rows=rest))
            p = _prob(suffix_logits(model, base, rows, t, start, ivs), ans)
            out += [(unit, s, float(v)) for (unit, s), v in zip(chunk, p)]
        return p_clean, p_noised, out

    shares = D.per_rank(forwards)   # a rank that raises is named on every rank
    p_clean, p_noised, _ = shares[0]
    probs = {u: torch.zeros(samples) for u in units}
    for _, _, share in shares:
        for unit, s, v in share:
            probs[unit][s] = v
    values = torch.zeros(len(layer_list), len(pos_list))
    for a, l in enumerate(layer_list):
        for b, t in enumerate(pos_list):
            if t >= first:
                values[a, b] = float(probs[(l, t)].mean()) - p_noised

    tokens = [_label(model, i) for i in ids[0].tolist()]
    settings = {
        "kind": kind, "prompt": prompt if isinstance(prompt, str) else ids[0].tolist(),
        "answer": ans_text, "answer_id": ans,
        "subject": subject if isinstance(subject, str) else None, "subject_positions": subj,
        "noise": noise, "sigma_emb": sigma, "noise_std": std,
        "sigma_source": "std of all entries of the embedding table (embed site output over the vocabulary)",
        "samples": samples, "seed": seed, "window": win if kind != "hidden" else None,
        "p_clean": p_clean, "p_noised": p_noised,
        "layers": layer_list, "token_positions": pos_list,
        "values": "indirect effect P_restored - P_noised (mean over noise samples); tokens before the subject "
                  "are unaffected by the noise, so their effect is 0 by construction",
    }
    if kind != "hidden":
        settings["windows"] = {str(l): [min(_window(l, win, n_layers)), max(_window(l, win, n_layers))]
                               for l in layer_list}
    return Scores(values=values, sites=[f"L{l}.{part}" for l in layer_list], method=f"causal_trace/{kind}",
                  positions=[tokens[t] for t in pos_list], metric="prob", model=model.name,
                  fingerprint=model.fingerprint, settings=settings)


def causal_traces(model, prompt, answer, subject, kinds: Sequence[str] = ("hidden", "mlp", "attn"),
                  **kwargs) -> dict[str, Scores]:
    """The three ROME traces (hidden, mlp, attn) of one prompt, with the same noise draws, keyed by kind."""
    return {k: causal_trace(model, prompt, answer, subject, k, **kwargs) for k in kinds}
