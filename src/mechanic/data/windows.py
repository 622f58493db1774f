"""Token windows from text: one stream of tokens cut into equal non-overlapping windows (no padding).

The one place text becomes windows, so perplexity, the calibration statistics and the dictionaries
(training, evaluation, feature pages) see text the same way: passages are joined with a blank line,
tokenized, capped at `max_tokens` and cut into `seq_len` windows. `windows` tokenizes the whole text
at once and keeps a shorter tail window (at least 2 tokens); `stream_windows` reads `chunk` passages
at a time (bounded memory for a corpus of millions of tokens) and drops the tail.
"""

from __future__ import annotations

from itertools import islice
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


def _id_chunks(model, texts, chunk: int | None) -> Iterator[torch.Tensor]:
    """Token ids of the text, `chunk` passages at a time (None: all at once); every chunk but the last ends with
    the blank line that joins it to the next, so the chunks add up to the joined text."""
    if isinstance(texts, (str, torch.Tensor)) or chunk is None:
        yield token_stream(model, texts)
        return
    it = iter(texts)
    part = list(islice(it, chunk))
    while part:
        nxt = list(islice(it, chunk))
        if not all(isinstance(t, str) for t in part):
            yield token_stream(model, part)
        else:
            yield token_stream(model, ["\n\n".join(part) + ("\n\n" if nxt else "")])
        part = nxt


def stream_windows(model, texts, seq_len: int = 128, max_tokens: int | None = None, chunk: int | None = 64,
                   tail: bool = False) -> Iterator[torch.Tensor]:
    """Windows of `seq_len` token ids (1-D tensors) as the text is read, `chunk` passages tokenized at a time;
    with `tail` a last shorter window (>= 2 tokens) too."""
    if seq_len < 2:
        raise TextError(f"seq_len must be at least 2 (one token predicts the next), got {seq_len}.")
    if max_tokens is not None and max_tokens < 2:
        raise TextError(f"max_tokens must be at least 2, got {max_tokens}.")
    carry, left = torch.empty(0, dtype=torch.long), max_tokens
    for ids in _id_chunks(model, texts, chunk):
        if left is not None:
            ids, left = ids[:left], left - min(left, ids.numel())
        buf = torch.cat([carry, ids])
        full = buf.numel() // seq_len * seq_len
        yield from buf[:full].view(-1, seq_len)
        carry = buf[full:]
        if left == 0:
            break
    if tail and carry.numel() >= 2:
        yield carry


def windows(model, texts, seq_len: int = 128, max_tokens: int | None = None) -> list[torch.Tensor]:
    """The whole text tokenized at once and cut into `seq_len` windows (1-D tensors); the last may be shorter (>= 2 tokens)."""
    out = list(stream_windows(model, texts, seq_len, max_tokens, chunk=None, tail=True))
    if not out:
        n = token_stream(model, texts).numel()
        raise TextError(f"The text has {n} token(s); at least 2 are needed.")
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
