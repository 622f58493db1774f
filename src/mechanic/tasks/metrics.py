"""Metrics on last-position logits: logit difference (raw and normalised), probability, log-probability,
accuracy (top-1, or of a two-way choice), probability difference over answer sets and KL to the clean run. Each returns one value per example."""

from __future__ import annotations

from dataclasses import replace

import torch

from mechanic.tasks.task import TaskBatch, TaskError


def logit_diff(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """logit(answer) - logit(wrong) at the last position; logits are [n, vocab]."""
    if batch.wrong is None:
        raise TaskError("The logit difference needs a wrong answer for every example.")
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, batch.answer] - logits[rows, batch.wrong]


def prob(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    rows = torch.arange(logits.shape[0], device=logits.device)
    return torch.softmax(logits.float(), -1)[rows, batch.answer]


def logprob(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    rows = torch.arange(logits.shape[0], device=logits.device)
    return torch.log_softmax(logits.float(), -1)[rows, batch.answer]


def accuracy(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """1 where the answer is the top token (or, when the task gives answer sets, any acceptable one), else 0."""
    top = logits.argmax(-1)
    if batch.answer_sets is not None:
        return (batch.answer_sets == top[:, None]).any(-1).float()
    return (top == batch.answer).float()


def pair_accuracy(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """1 where the answer's logit beats the wrong answer's, else 0: the accuracy of a two-way choice, for suites
    whose answer is a label word the model rarely ranks first over the whole vocabulary."""
    return (logit_diff(logits, batch) > 0).float()


def prob_diff(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """Probability mass on the acceptable answers minus mass on the unacceptable ones (Hanna et al. 2023's
    greater-than metric). The sets come from meta["answers"] / meta["wrongs"]; without them, {answer} and
    {wrong}. In [-1, 1]; differentiable."""
    p = torch.softmax(logits.float(), -1)

    def mass(sets, single):
        if sets is None:
            if single is None:
                return torch.zeros(p.shape[0], device=p.device)
            sets = single[:, None]
        return (p.gather(-1, sets.clamp(min=0)) * (sets >= 0)).sum(-1)

    if batch.answer_sets is None and batch.wrong is None:
        raise TaskError("prob_diff needs a wrong answer (or meta['wrongs']) for every example.")
    return mass(batch.answer_sets, batch.answer) - mass(batch.wrong_sets, batch.wrong)


def kl(logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """KL(clean || run) over the vocabulary, per example."""
    p = torch.log_softmax(clean_logits.float(), -1)
    q = torch.log_softmax(logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1)


def normalise(value: torch.Tensor, clean: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
    """(m - m_corrupted) / (m_clean - m_corrupted): 1 = clean behaviour, 0 = corrupted behaviour."""
    return (value - corrupted) / (clean - corrupted)


METRICS = {"logit_diff": logit_diff, "prob": prob, "logprob": logprob, "accuracy": accuracy,
           "pair_accuracy": pair_accuracy, "prob_diff": prob_diff}


def columns(name: str, batch: TaskBatch) -> torch.Tensor | None:
    """The vocabulary columns metric `name` reads (sorted token ids), or None when it reads them all (a softmax,
    an argmax): a logit difference reads two of the vocabulary, so runs scored by it need no other logits."""
    if name in ("logit_diff", "pair_accuracy") and batch.wrong is not None:
        return torch.unique(torch.cat([batch.answer, batch.wrong]))
    return None


def on_columns(batch: TaskBatch, ids: torch.Tensor) -> TaskBatch:
    """batch with its answer and wrong tokens re-indexed into `ids`, for logits computed at those columns only."""
    return replace(batch, answer=torch.searchsorted(ids, batch.answer), wrong=torch.searchsorted(ids, batch.wrong),
                   answer_sets=None, wrong_sets=None)


def get(name: str):
    """A metric function by name, or a clear error listing the names."""
    if name not in METRICS:
        raise TaskError(f"Unknown metric {name!r}; choose one of {', '.join(METRICS)} "
                        "(normalised logit difference and KL are computed from these against clean/corrupted runs).")
    return METRICS[name]
