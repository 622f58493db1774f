"""Token windows from text: one stream of tokens cut into equal non-overlapping windows (no padding).

Shared by perplexity and the calibration statistics so both see text the same way: passages are
joined with a blank line, tokenized once, capped at `max_tokens` and cut into `seq_len` windows;
a shorter tail window (at least 2 tokens) is kept.
"""

from __future__ import annotations

from typing import Iterator

import torch


class TextError(ValueError):
    """Text that cannot be turned into token windows, with what was expected."""


def token_stream(model, texts) -> torch.Tensor:
    """A 1-D LongTensor of token ids from passages (list of str), one str, or token ids (1-D tensor or id lists)."""
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, torch.Tensor):
        if texts.dtype not in (torch.long, torch.int, torch.int32):
            raise TextError(f"Token ids must be an integer tensor, got dtype {texts.dtype}.")
        return texts.reshape(-1).long()
    texts = list(texts)
    if not texts:
        raise TextError("No text given: pass a non-empty list of passages (e.g. mechanic.data.text.calibration()).")
    if all(isinstance(t, str) for t in texts):
        if model.tokenizer is None:
            raise TextError("This model has no tokenizer, so it cannot read text; pass token ids instead "
                            "(a 1-D LongTensor or lists of ids).")
        ids = model.tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)
    if all(isinstance(t, (list, tuple, torch.Tensor)) for t in texts):
        return torch.cat([torch.as_tensor(t, dtype=torch.long).reshape(-1) for t in texts])
    raise TextError(f"Expected passages (a list of str) or token ids; got a list of {type(texts[0]).__name__}.")


def windows(model, texts, seq_len: int = 128, max_tokens: int | None = None) -> list[torch.Tensor]:
    """The stream cut into `seq_len` windows (1-D tensors); the last may be shorter (>= 2 tokens)."""
    if seq_len < 2:
        raise TextError(f"seq_len must be at least 2 (one token predicts the next), got {seq_len}.")
    stream = token_stream(model, texts)
    if max_tokens is not None:
        if max_tokens < 2:
            raise TextError(f"max_tokens must be at least 2, got {max_tokens}.")
        stream = stream[:max_tokens]
    if stream.numel() < 2:
        raise TextError(f"The text has {stream.numel()} token(s); at least 2 are needed.")
    out = list(stream.split(seq_len))
    if out[-1].numel() < 2:
        out.pop()
    return out


def batches(wins: list[torch.Tensor], batch_size: int = 8) -> Iterator[torch.Tensor]:
    """[b, L] batches of equal-length windows (a shorter tail window forms its own batch)."""
    if batch_size < 1:
        raise TextError(f"batch_size must be a positive number of windows, got {batch_size}.")
    full = [w for w in wins if w.numel() == wins[0].numel()]
    rest = wins[len(full):]
    for i in range(0, len(full), batch_size):
        yield torch.stack(full[i:i + batch_size])
    for w in rest:
        yield w[None]
