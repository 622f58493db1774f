"""Shared harness for the steered-generation benchmark: the vector, the prompts, greedy generation, the report."""

from __future__ import annotations

import argparse

import torch

from _common import log, report, time_interleaved

LAYER, COEF, NEW = 10, 4.0, 40
PROMPTS = ["I think that the weather today", "My favourite book is"]


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True)
    p.add_argument("--repeats", type=int, default=15)  # about 2.5 s a generate; fewer rounds leave +-3% noise
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args()


def vector(d_model: int) -> torch.Tensor:
    """The same direction in every process: seeded, norm 8 (a typical CAA norm at layer 10)."""
    v = torch.randn(d_model, generator=torch.Generator().manual_seed(0))
    return v / v.norm() * 8.0


def batch(tok):
    """Left-padded ids and mask only (transformers 4 tokenizers add token_type_ids, which generate refuses)."""
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def run(peer: str, package: str, plain_fn, steered_fn, args) -> None:
    """Time plain vs steered greedy generation (interleaved rounds) and report the steered tokens."""
    times = time_interleaved({"plain": plain_fn, "tool": steered_fn}, args.repeats, args.warmup)
    plain, steered = plain_fn(), steered_fn()
    changed = int((plain != steered).any(-1).sum()) if plain.shape == steered.shape else len(PROMPTS)
    log(f"{peer}: steering changed {changed} of {len(PROMPTS)} generations")
    report(peer, package, times, 0.0, {"tokens": steered.tolist(), "layer": LAYER, "coefficient": COEF,
                                       "new_tokens": NEW, "prompts": PROMPTS, "changed": changed})
