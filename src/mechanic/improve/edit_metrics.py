"""CounterFact-style edit scores: efficacy, paraphrase and neighbourhood success by probability comparison.

For a fact (prompt, subject, target_new, target_true) the log-probability of a target is the sum over
its tokens, teacher forced after the prompt. ES: log p(new) > log p(true) on the edit prompt; PS: the
same on each paraphrase; NS: log p(true) > log p(new) on each neighbourhood prompt (other subjects that
must keep the true answer); score = harmonic mean of the three (Meng et al. 2022).
"""

from __future__ import annotations

import torch


def target_logprobs(model, prompts: list[str], targets: list[str], batch_size: int = 16) -> torch.Tensor:
    """log p(target | prompt), summed over the target's tokens, for each (prompt, target) pair."""
    tok = model.tokenizer
    out = []
    for s in range(0, len(prompts), batch_size):
        rows, spans = [], []
        for p, t in zip(prompts[s:s + batch_size], targets[s:s + batch_size]):
            a, b = tok(p)["input_ids"], tok(t, add_special_tokens=False)["input_ids"]
            rows.append(a + b)
            spans.append((len(a), b))
        inputs = model.inputs(rows)  # left padded
        width = inputs["input_ids"].shape[1]
        logp = torch.log_softmax(model.run(inputs).logits.float(), -1)
        for i, (r, (start, tgt)) in enumerate(zip(rows, spans)):
            shift = width - len(r)
            pos = torch.arange(len(tgt)) + shift + start - 1
            out.append(float(logp[i, pos, torch.tensor(tgt)].sum()))
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
