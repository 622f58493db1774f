"""Read one vector per prompt from sites at a read position (last token, one token, a span mean), in batches.

Probes and steering vectors both need "the activation of prompt i at site s", read at a position
that means the same thing in every prompt whatever its length. Positions here count *real* tokens
of each prompt (left padding is skipped), so a batch gives the same rows as its prompts run alone.

Read positions (`read=`):
- `"last"`: the last token (the default; what CAA and repeng read).
- an int k: the k-th token of each prompt (negative counts from the end).
- a slice: the mean over those tokens of each prompt, e.g. `slice(-3, None)` = mean of the last 3.
- `"mean"`: the mean over every token of the prompt.
- `"answer"`: the mean over each prompt's answer tokens, given as `spans` ([n, 2] real-token
  start/end); a one-token answer reads that token (CAA's answer-letter position).
"""

from __future__ import annotations

from typing import Union

import torch

Read = Union[str, int, slice]


class ReadError(ValueError):
    """A read position that does not fit the prompts (out of range, empty span, missing answer spans)."""


def describe(read: Read) -> str:
    """A short, stable text form of a read position (for metadata)."""
    if isinstance(read, slice):
        return f"mean[{'' if read.start is None else read.start}:{'' if read.stop is None else read.stop}]"
    return str(read)


def check_read(read: Read) -> None:
    """Refuse a read position that is not one of the forms above."""
    ok = (read in ("last", "mean", "answer") if isinstance(read, str) else
          isinstance(read, (int, slice)) and not isinstance(read, bool))
    if not ok or (isinstance(read, slice) and read.step not in (None, 1)):
        raise ReadError(f"Unknown read position {read!r}. Use 'last', 'mean', 'answer' (with answer spans), "
                        "an int (the k-th token of each prompt, negative from the end) or a slice of tokens "
                        "to average, e.g. slice(-3, None).")


def n_rows(inputs) -> int:
    """How many prompts `inputs` holds (texts, an id tensor, or a dict with input_ids)."""
    if isinstance(inputs, str):
        return 1
    if isinstance(inputs, (list, tuple)):
        return len(inputs)
    ids = inputs["input_ids"] if isinstance(inputs, dict) or hasattr(inputs, "keys") else inputs
    return int(ids.shape[0]) if ids.dim() == 2 else 1


def take_rows(inputs, sl: slice):
    """Rows `sl` of texts, an id tensor or a dict of [batch, ...] tensors."""
    if isinstance(inputs, str):
        return [inputs][sl]
    if isinstance(inputs, (list, tuple)):
        return list(inputs[sl])
    if isinstance(inputs, dict) or hasattr(inputs, "keys"):
        return {k: v[sl] for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    return (inputs if inputs.dim() == 2 else inputs[None])[sl]


def read(model, inputs, sites, read: Read = "last", spans: torch.Tensor | None = None,
         batch_size: int = 16) -> dict[str, torch.Tensor]:
    """{site: [n, d] float32}, one row per prompt read at `read`; batched forwards stopped after the deepest site."""
    check_read(read)
    sites = [str(model.check(s)) for s in ([sites] if isinstance(sites, str) else sites)]
    n = n_rows(inputs)
    if read == "answer":
        if spans is None:
            raise ReadError("read='answer' needs the answer's token span in each prompt: give prompts as "
                            "(prompt, answer) pieces (see mechanic.steer.vectors) or pass spans=[n, 2].")
        spans = torch.as_tensor(spans, dtype=torch.long)
        if spans.shape != (n, 2):
            raise ReadError(f"spans must have shape [n, 2] = [{n}, 2] (real-token start, end of each answer); "
                            f"got {list(spans.shape)}.")
    if batch_size < 1:
        raise ReadError(f"batch_size must be at least 1, got {batch_size}.")
    out: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        batch = model.inputs(take_rows(inputs, sl))
        mask = batch["attention_mask"]
        if not bool(mask[:, -1].all()):
            raise ReadError("Inputs must be left padded (every prompt's last column a real token); tokenize with "
                            "the model's tokenizer (mechanic pads left) or pad your id tensors on the left.")
        last = read == "last"
        run = model.run(batch, cache=sites, stop_at="auto", pos=-1 if last else None)
        for s in sites:
            x = run.cache[s]
            if last:
                out[s].append(x.float())
            else:
                out[s].append(_reduce(x, mask, read, None if spans is None else spans[sl], start))
    return {s: torch.cat(v) for s, v in out.items()}


def _reduce(x: torch.Tensor, mask: torch.Tensor, read: Read, spans, first_row: int) -> torch.Tensor:
    """[b, seq, d] -> [b, d]: the token or the mean of the tokens `read` selects in each row."""
    b, seq = mask.shape
    n_real = mask.sum(1)
    pad = seq - n_real
    if isinstance(read, int):
        k = torch.full((b,), read, dtype=torch.long)
        bad = (k >= n_real) | (k < -n_real)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ReadError(f"read={read}: prompt {first_row + i} has only {int(n_real[i])} tokens (valid: "
                            f"{-int(n_real[i])}..{int(n_real[i]) - 1}).")
        cols = torch.where(k >= 0, pad + k, seq + k)
        return x[torch.arange(b), cols].float()
    weights = torch.zeros(b, seq, dtype=torch.float32)
    for i in range(b):
        idx = torch.arange(int(n_real[i]))
        if read == "mean":
            chosen = idx
        elif read == "answer":
            a, e = int(spans[i, 0]), int(spans[i, 1])
            chosen = idx[a:e] if 0 <= a < e <= int(n_real[i]) else idx[:0]
        else:
            chosen = idx[read]
        if chosen.numel() == 0:
            raise ReadError(f"read={describe(read)}: prompt {first_row + i} ({int(n_real[i])} tokens) has no token "
                            "in that span; choose a span every prompt covers.")
        weights[i, int(pad[i]) + chosen] = 1.0 / chosen.numel()
    return torch.einsum("bs,bsd->bd", weights, x.float())
