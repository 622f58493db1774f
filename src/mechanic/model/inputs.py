"""Turn prompts into model inputs: left padding, attention mask and matching position_ids."""

from __future__ import annotations

import torch


class InputError(ValueError):
    """Inputs the model cannot take as given."""


def prepare(tokenizer, inputs, device=None) -> dict[str, torch.Tensor]:
    """Tokenize str / list[str] (left padded), or complete a dict / id tensor with mask and position_ids.

    position_ids count real tokens only, so a left-padded prompt sees the same positions as when
    it runs alone (the batching bug class of nnsight issue 672).
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str):
        if tokenizer is None:
            raise InputError("This model has no tokenizer; pass token ids (a LongTensor [batch, pos]) instead of text.")
        enc = tokenizer(list(inputs), return_tensors="pt", padding=True)
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    elif isinstance(inputs, (list, tuple)) and inputs and all(isinstance(r, (list, tuple)) for r in inputs):
        width = max(len(r) for r in inputs)  # ragged token-id lists: left padded with pad id (or 0)
        pad = getattr(tokenizer, "pad_token_id", None) or 0
        ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in inputs], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in inputs], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask}
    elif isinstance(inputs, torch.Tensor):
        ids = inputs if inputs.dim() == 2 else inputs[None]
        batch = {"input_ids": ids}
    elif isinstance(inputs, dict) or hasattr(inputs, "keys"):
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
    else:
        raise TypeError(f"Inputs must be a string, a list of strings, lists of token ids, a LongTensor of token ids "
                        f"or a dict with input_ids; got {type(inputs).__name__}.")
    ids = batch["input_ids"]
    if "attention_mask" not in batch:
        batch["attention_mask"] = torch.ones_like(ids)
    if "position_ids" not in batch:
        mask = batch["attention_mask"]
        batch["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch
