"""Edit scores. CounterFact (Meng et al. 2022): efficacy, paraphrase and neighbourhood success by probability
comparison; EasyEdit (Wang et al. 2024): reliability, generalization, locality, portability by token accuracy.

For a fact (prompt, subject, target_new, target_true) the log-probability of a target is the sum over
its tokens, teacher forced after the prompt. ES: log p(new) > log p(true) on the edit prompt; PS: the
same on each paraphrase; NS: log p(true) > log p(new) on each neighbourhood prompt (other subjects that
must keep the true answer); score = harmonic mean of the three (Meng et al. 2022).
EasyEdit's token accuracy: the target is teacher forced after the prompt and each of its tokens counts
as right when it is the model's argmax at its position; the score of a pair is the fraction right.
"""

from __future__ import annotations

import torch


def teacher_forced(model, prompts: list[str], targets: list[str], batch_size: int = 16
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(log p(target | prompt) summed over the target's tokens, the argmax token at each target position)
    per (prompt, target) pair, from one left-padded forward per batch.

    The argmax at target position j is the model's top prediction given the prompt and target tokens < j
    (teacher forcing, EasyEdit's token accuracy). An empty target gives log-prob 0 and one argmax: the
    next token after the prompt.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"Give one target per prompt: {len(prompts)} prompts, {len(targets)} targets.")
    tok = model.tokenizer
    sums, tops = [], []
    for s in range(0, len(prompts), batch_size):
        rows, spans = [], []
        for p, t in zip(prompts[s:s + batch_size], targets[s:s + batch_size]):
            a, b = tok(p)["input_ids"], tok(t, add_special_tokens=False)["input_ids"] if t else []
            rows.append(a + b)
            spans.append((len(a), b))
        inputs = model.inputs(rows)  # left padded
        width = inputs["input_ids"].shape[1]
        logp = torch.log_softmax(model.run(inputs).logits.float(), -1)
        for i, (r, (start, tgt)) in enumerate(zip(rows, spans)):
            pos = torch.arange(max(1, len(tgt))) + width - len(r) + start - 1
            sums.append(float(logp[i, pos[:len(tgt)], torch.tensor(tgt, dtype=torch.long)].sum()))
            tops.append(logp[i, pos].argmax(-1).cpu())
    return torch.tensor(sums), tops


def target_logprobs(model, prompts: list[str], targets: list[str], batch_size: int = 16) -> torch.Tensor:
    """log p(target | prompt), summed over the target's tokens, for each (prompt, target) pair."""
    return teacher_forced(model, prompts, targets, batch_size)[0]


def token_accuracy(model, prompts: list[str], targets: list[str], batch_size: int = 16) -> torch.Tensor:
    """EasyEdit's token accuracy per pair: the fraction of the target's tokens that are the teacher-forced argmax."""
    tok = model.tokenizer
    _, tops = teacher_forced(model, prompts, targets, batch_size)
    out = []
    for t, top in zip(targets, tops):
        ids = torch.tensor(tok(t, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if not ids.numel():
            raise ValueError(f"Token accuracy needs a non-empty target; got {t!r}.")
        out.append(float((top == ids).float().mean()))
    return torch.tensor(out)


def counterfact(model, facts) -> dict:
    """ES, PS, NS (fractions) and their harmonic mean over `facts` (mechanic.steer.edit.Fact with target_true)."""
    prompts, targets, kinds = [], [], []
    for i, f in enumerate(facts):
        if f.target_true is None:
            raise ValueError(f"Fact {i} ({f.subject!r}) has no target_true; CounterFact scores compare it with "
                             "target_new.")
        for kind, ps in (("es", [f.prompt]), ("ps", list(f.paraphrases)), ("ns", list(f.neighborhood))):
            for p in ps:
                prompts += [p, p]
                targets += [f.target_new, f.target_true]
                kinds.append((i, kind))
    lp = target_logprobs(model, prompts, targets).view(-1, 2)
    wins: dict[str, list[bool]] = {"es": [], "ps": [], "ns": []}
    for (i, kind), (new, true) in zip(kinds, lp.tolist()):
        wins[kind].append(new > true if kind != "ns" else true > new)
    out = {k: (sum(v) / len(v) if v else None) for k, v in wins.items()}
    parts = [v for v in out.values() if v is not None]
    out["score"] = len(parts) / sum(1 / v for v in parts) if parts and all(v > 0 for v in parts) else 0.0
    out["n"] = {k: len(v) for k, v in wins.items()}
    return out


def running_scores(model, step: int, done) -> dict:
    """The `on_batch` of mechanic.steer.sequential: CounterFact ES, PS, NS and score over the facts edited so far."""
    return counterfact(model, done)
