"""Second moments C = E[k k^T] of down_proj inputs over real text, for ROME and MEMIT; cached on disk.

One pass over the shipped calibration text (or any text) records every real token's FFN activations
at the chosen layers (stopping after the last of them), accumulating k^T k in float64. The result is
saved per model fingerprint, layer, text and token budget under $MECHANIC_CACHE/stats with its sample
count, and reused by later edits; the file is written atomically.
prompt_moments: the same over short prompts each run alone (extra keys AlphaEdit can preserve).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mechanic.files import atomic_path
from mechanic.progress import track


def _key(model, tokens: torch.Tensor, layer: int) -> Path:
    from mechanic.model.load import cache_dir

    text = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:12]
    return cache_dir() / "stats" / model.fingerprint / f"L{layer}.neuron-{text}-{tokens.numel()}.safetensors"


def _cached(path: Path) -> dict | None:
    """A cache entry, or None when absent or unreadable (a damaged entry is recomputed and replaced)."""
    if not path.is_file():
        return None
    try:
        data = load_file(str(path))
        return data if {"moment", "count"} <= set(data) else None
    except Exception:  # noqa: BLE001 - any damage means: compute it again
        return None


def _accumulate(model, inputs, sums: dict[int, torch.Tensor]) -> int:
    """Add k^T k (float64) of the down_proj inputs k at every layer of `sums` over one forward of `inputs`, in
    place; the number of tokens (rows of k) it added."""
    run = model.run(inputs, cache=[f"L{L}.neuron" for L in sums], stop_at="auto")
    for L in sums:
        k = run[f"L{L}.neuron"].reshape(-1, model.dims.d_mlp).double()
        sums[L] += k.T @ k
    return k.shape[0]


def second_moments(model, layers, texts=None, *, max_tokens: int = 32768, seq_len: int = 128,
                   batch_size: int = 8, cache: bool = True, fresh: bool = False,
                   progress: bool = False) -> dict[int, tuple[torch.Tensor, int]]:
    """{layer: (E[k k^T] as float32 [d_mlp, d_mlp], number of tokens)} for the down_proj inputs k of `layers`.

    cache=False neither reads nor writes the cache; fresh=True computes them even when cached and writes the
    cache (to time the one-off cost without computing it twice)."""
    from mechanic.data.text import calibration
    from mechanic.data.windows import batches, token_stream, windows

    layers = sorted({int(x) for x in layers})
    for L in layers:
        if model.is_moe(L):
            raise ValueError(f"Layer {L} is a mixture of experts; ROME/MEMIT statistics are for a dense MLP's "
                             "down_proj. Choose a dense layer.")
    tokens = token_stream(model, calibration() if texts is None else texts)[:max_tokens]
    out: dict[int, tuple[torch.Tensor, int]] = {}
    todo = []
    for L in layers:
        path = _key(model, tokens, L)
        data = _cached(path) if cache and not fresh else None
        if data is not None:
            out[L] = (data["moment"], int(data["count"]))
        else:
            todo.append(L)
    if not todo:
        return out
    d = model.dims.d_mlp
    sums = {L: torch.zeros(d, d, dtype=torch.float64) for L in todo}
    count = 0
    wins = windows(model, tokens, seq_len=seq_len)
    chunks = list(batches(wins, batch_size))
    for ids in track(chunks, f"second moments of {len(todo)} layers", show=progress, unit="batch"):
        count += _accumulate(model, ids, sums)
    for L in todo:
        moment = (sums[L] / count).float()
        out[L] = (moment, count)
        if cache:
            with atomic_path(_key(model, tokens, L)) as tmp:
                save_file({"moment": moment, "count": torch.tensor(count)}, tmp)
    return out


def prompt_moments(model, layers, prompts: list[str]) -> dict[int, torch.Tensor]:
    """{layer: E[k k^T] (float64) over every token of `prompts`, each run alone (keys near a prompt's start, where
    a model without BOS has its attention sink, differ from those in packed text)}: extra keys to preserve."""
    layers = sorted({int(x) for x in layers})
    d = model.dims.d_mlp
    sums = {L: torch.zeros(d, d, dtype=torch.float64) for L in layers}
    count = 0
    for p in prompts:
        count += _accumulate(model, p, sums)
    return {L: s / count for L, s in sums.items()}
