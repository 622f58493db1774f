"""Row and position selection for caches and interventions: one indexing rule for every site."""

from __future__ import annotations

from typing import Union

import torch

# None = all; int = one position (negative counts from the end); slice; list of positions;
# LongTensor [batch] = one position per row; BoolTensor [batch, pos] = any cells;
# "prompt" / "generated" = the prompt's tokens / the tokens generated after it (generate).
Pos = Union[None, int, slice, list, torch.Tensor]
Rows = Union[None, int, list, torch.Tensor]


def index(batch: int, seq: int, rows: Rows = None, pos: Pos = None, device=None) -> tuple:
    """An index tuple into the leading [batch, pos] dims of a site tensor."""
    if isinstance(pos, torch.Tensor) and pos.dtype == torch.bool:
        mask = pos.to(device)
        if mask.shape != (batch, seq):
            raise ValueError(f"A boolean position mask must have shape [batch, pos] = [{batch}, {seq}], "
                             f"got {list(mask.shape)}.")
        if rows is not None:
            keep = torch.zeros(batch, 1, dtype=torch.bool, device=mask.device)
            keep[_rows(rows, batch, mask.device)] = True
            mask = mask & keep
        return (mask,)
    if isinstance(pos, torch.Tensor) and pos.dim() == 1 and pos.numel() == batch and batch > 1 and pos.dtype != torch.bool:
        r = torch.arange(batch, device=pos.device) if rows is None else _rows(rows, batch, pos.device)
        return (r, pos.to(r.device)[r] % seq)
    if isinstance(pos, int):
        _check_pos(pos, seq)
        return (slice(None) if rows is None else _rows(rows, batch, device), pos)
    if pos is None:
        pos = slice(None)
    if isinstance(pos, (list, tuple)) or isinstance(pos, torch.Tensor):
        p = torch.as_tensor(list(pos) if not isinstance(pos, torch.Tensor) else pos, dtype=torch.long, device=device)
        for q in p.tolist():
            _check_pos(q, seq)
        p = p % seq
    else:
        p = pos
    if rows is None:
        return (slice(None), p)
    r = _rows(rows, batch, device)
    if isinstance(p, slice):
        p = torch.arange(seq, device=device)[p]
    return (r[:, None], p[None, :])


def _rows(rows: Rows, batch: int, device) -> torch.Tensor:
    r = torch.as_tensor([rows] if isinstance(rows, int) else rows, dtype=torch.long, device=device)
    if r.numel() and (r.max() >= batch or r.min() < -batch):
        raise ValueError(f"Row {r.tolist()} is out of range for a batch of {batch} prompts (valid: 0..{batch - 1}).")
    return r % batch


def _check_pos(p: int, seq: int) -> None:
    if not -seq <= p < seq:
        raise ValueError(f"Position {p} is out of range for a sequence of {seq} tokens "
                         f"(valid: {-seq}..{seq - 1}; negative positions count from the end).")


SKIP = object()  # this forward call holds none of the selected positions


def local(pos: Pos, seq: int, offset: int, generating: bool = False):
    """Translate a position spec to one forward call that covers absolute columns offset..offset+seq-1.

    A plain run has offset 0 and sees everything at once. During generate, the prompt is one call and
    each new token another: non-negative positions are absolute columns, negative ones count from the
    newest token of the call, masks and per-row tensors apply to the prompt call only.
    """
    if pos is None or (isinstance(pos, int) and pos < 0):
        return pos
    if isinstance(pos, str) and pos == "prompt":
        return None if offset == 0 else SKIP
    if isinstance(pos, str) and pos == "generated":
        return SKIP if offset == 0 else None
    if not generating:
        return pos
    if offset > 0 and not isinstance(pos, (int, list, tuple)):
        return SKIP
    if isinstance(pos, int):
        return pos - offset if offset <= pos < offset + seq else SKIP
    if isinstance(pos, (list, tuple)):
        kept = [p - offset for p in pos if offset <= p < offset + seq]
        return kept or SKIP
    return pos
