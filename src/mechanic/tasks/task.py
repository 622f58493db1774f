"""Task and Example: clean/corrupted prompts with correct/incorrect answer tokens, tokenized aligned."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


class TaskError(ValueError):
    """A task whose examples cannot be used as given (mismatched lengths, empty answers, ...)."""


@dataclass(frozen=True)
class Example:
    """One example: the clean prompt, its answer (first token counts), and optionally a wrong answer
    and a corrupted prompt with the same token length (for patching). meta["answers"] / meta["wrongs"]
    (lists of strings), when given, are the full sets of acceptable / unacceptable answers (prob_diff).
    `split` is "train", "validation", "test" or None (unlabelled: Task.split assigns one from a hash of the
    example's entity, see mechanic.tasks.splits)."""

    prompt: str
    answer: str
    wrong: str | None = None
    corrupted: str | None = None
    meta: dict = field(default_factory=dict, hash=False, compare=False)
    split: str | None = field(default=None, hash=False, compare=False)


@dataclass
class TaskBatch:
    """A task tokenized for one model: clean and corrupted inputs aligned position by position."""

    clean: dict[str, torch.Tensor]
    corrupted: dict[str, torch.Tensor] | None
    answer: torch.Tensor            # [n] token id of each correct answer
    wrong: torch.Tensor | None      # [n] token id of each incorrect answer
    tokens: list[list[str]]         # clean tokens per example (padding included, for plot labels)
    answer_sets: torch.Tensor | None = None  # [n, k] ids of every acceptable answer (-1 pads), from meta["answers"]
    wrong_sets: torch.Tensor | None = None   # [n, k] ids of every unacceptable answer (-1 pads), from meta["wrongs"]

    @property
    def n(self) -> int:
        return int(self.answer.shape[0])

    @property
    def seq(self) -> int:
        return int(self.clean["input_ids"].shape[1])

    def select(self, rows) -> TaskBatch:
        """The examples `rows` (a slice, list or LongTensor) with every per-example field, answer sets included."""
        if isinstance(rows, slice):
            toks = self.tokens[rows]
        else:
            rows = torch.as_tensor(rows, dtype=torch.long)
            toks = [self.tokens[i] for i in rows.tolist()] if self.tokens else []
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        pick_in = lambda d: None if d is None else {k: v[rows] for k, v in d.items()}  # noqa: E731
        return TaskBatch(pick_in(self.clean), pick_in(self.corrupted), self.answer[rows], pick(self.wrong), toks,
                         pick(self.answer_sets), pick(self.wrong_sets))


@dataclass
class Task:
    """A named set of examples and the metric that scores them (see mechanic.tasks.metrics)."""

    name: str
    examples: list[Example]
    metric: str = "logit_diff"
    description: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    def subset(self, n: int | None = None, start: int = 0) -> Task:
        """The first n examples (from start), same metric."""
        end = None if n is None else start + n
        return Task(self.name, self.examples[start:end], self.metric, self.description)

    def split(self, which) -> Task:
        """Only the rows of split `which` ("train", "validation", "test", or a list of them), in their order,
        same name, metric and description. Unlabelled rows get their split from mechanic.tasks.splits
        (a hash of the entity key, so the same on every run and machine); the returned examples carry it."""
        from mechanic.tasks.splits import SPLITS, labels

        names = [which] if isinstance(which, str) else list(which)
        bad = [w for w in names if w not in SPLITS]
        if bad or not names:
            raise TaskError(f"Task {self.name!r}: unknown split {bad[0] if bad else which!r}; the splits are "
                            f"{', '.join(map(repr, SPLITS))} (or a list of them).")
        labelled = labels(self.examples)
        kept = [replace(e, split=s) for e, s in zip(self.examples, labelled) if s in names]
        if not kept:
            have = {s: labelled.count(s) for s in SPLITS}
            raise TaskError(f"Task {self.name!r} has no {' or '.join(names)} rows (rows per split: "
                            f"{', '.join(f'{k} {v}' for k, v in have.items())}).")
        return Task(self.name, kept, self.metric, self.description)

    def tokenize(self, model, align: bool = False) -> TaskBatch:
        """Tokenize for `model`. Clean and corrupted prompts must have equal token lengths (so positions
        match) unless align=True, which left-pads each pair to a common length (ends aligned)."""
        from mechanic.tasks.guard import check

        check(f"task {self.name!r}", [e.split for e in self.examples])   # a recipe stage may read only its splits
        tok = model.tokenizer
        if tok is None:
            raise TaskError("This model has no tokenizer; tasks need one to turn prompts into tokens.")
        if not self.examples:
            raise TaskError(f"Task {self.name!r} has no examples.")
        has_corr = [e.corrupted is not None for e in self.examples]
        if any(has_corr) and not all(has_corr):
            raise TaskError(f"Task {self.name!r}: some examples have a corrupted prompt and some do not; "
                            "give every example one, or none.")
        enc = lambda texts: [tok(t, add_special_tokens=True)["input_ids"] for t in texts]  # noqa: E731
        clean = enc([e.prompt for e in self.examples])
        corr = enc([e.corrupted for e in self.examples]) if all(has_corr) else None
        if corr is not None and not align:
            for i, (a, b) in enumerate(zip(clean, corr)):
                if len(a) != len(b):
                    e = self.examples[i]
                    raise TaskError(
                        f"Task {self.name!r}, example {i}: the clean prompt has {len(a)} tokens and the corrupted "
                        f"prompt {len(b)} ({e.prompt!r} vs {e.corrupted!r}), so positions would not line up. "
                        "Reword one of them to the same token length, or pass align=True to left-pad each pair "
                        "so their last tokens line up.")
        answer = torch.tensor([_first_token(tok, e.answer, self.name, i) for i, e in enumerate(self.examples)])
        wrong = None
        if all(e.wrong is not None for e in self.examples):
            wrong = torch.tensor([_first_token(tok, e.wrong, self.name, i) for i, e in enumerate(self.examples)])
        width = max(len(x) for x in clean + (corr or []))
        clean_in = _pad_left(clean, width, tok.pad_token_id, model.device)
        corr_in = _pad_left(corr, width, tok.pad_token_id, model.device) if corr is not None else None
        tokens = [tok.convert_ids_to_tokens(row.tolist()) for row in clean_in["input_ids"]]
        answer_sets = wrong_sets = None
        if any("answers" in e.meta or "wrongs" in e.meta for e in self.examples):
            answer_sets = _id_sets(tok, [e.meta.get("answers", [e.answer]) for e in self.examples], self.name)
            wrong_sets = _id_sets(tok, [e.meta.get("wrongs", [e.wrong] if e.wrong is not None else [])
                                        for e in self.examples], self.name)
        return TaskBatch(clean_in, corr_in, answer.to(model.device),
                         wrong.to(model.device) if wrong is not None else None, tokens,
                         answer_sets.to(model.device) if answer_sets is not None else None,
                         wrong_sets.to(model.device) if wrong_sets is not None else None)


def _first_token(tok, text: str, task: str, i: int) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TaskError(f"Task {task!r}, example {i}: the answer {text!r} is empty after tokenization.")
    return ids[0]


def _id_sets(tok, sets: list[list[str]], task: str) -> torch.Tensor:
    """First-token ids of each example's answer set, right-padded with -1 to [n, k]."""
    ids = [sorted({_first_token(tok, t, task, i) for t in texts}) for i, texts in enumerate(sets)]
    out = torch.full((len(ids), max(1, max(len(r) for r in ids))), -1, dtype=torch.long)
    for i, r in enumerate(ids):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _pad_left(rows: list[list[int]], width: int, pad: int, device) -> dict[str, torch.Tensor]:
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}
