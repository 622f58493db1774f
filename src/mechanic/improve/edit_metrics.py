"""Edit scores. CounterFact (Meng et al. 2022): efficacy, paraphrase and neighbourhood success by probability
comparison; EasyEdit (Wang et al. 2024): reliability, generalization, locality, portability by token accuracy.

For a fact (prompt, subject, target_new, target_true) the log-probability of a target is the sum over
its tokens, teacher forced after the prompt. ES: log p(new) > log p(true) on the edit prompt; PS: the
same on each paraphrase; NS: log p(true) > log p(new) on each neighbourhood prompt (other subjects that
must keep the true answer); score = harmonic mean of the three (Meng et al. 2022). A neighbourhood prompt
that names a subject edited in the same run is left out (edited_apart): its answer is meant to change, so it
cannot measure unintended change (in facts_large, 120 of the test split's 418 neighbourhood prompts are other
test facts' own edit prompts, e.g. Lyon's prompt among Nantes' neighbours).
EasyEdit's token accuracy: the target is teacher forced after the prompt and each of its tokens counts
as right when it is the model's argmax at its position; the score of a pair is the fraction right.
curve_scores: all of these after every batch of a sequential edit, with bootstrap CIs (the curve of issue 12).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import replace

import torch


def edited_apart(facts, edited=None) -> list:
    """`facts` with every neighbourhood prompt that names an edited subject (`edited`, default: the facts' own
    subjects; whole words) left out. CounterFact's neighbours are other subjects that keep their answer; a prompt
    about a subject the same run edits is meant to change, so counting it would score an edit's success as
    another's side effect."""
    facts = list(facts)
    subjects = sorted({f.subject for f in facts} if edited is None else set(edited), key=len, reverse=True)
    if not subjects:
        return facts
    named = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(s) for s in subjects) + r")(?!\w)")
    return [replace(f, neighborhood=tuple(p for p in f.neighborhood if not named.search(p))) for f in facts]


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
        inputs = model.inputs(rows)  # left padded: every target ends the row, so the last k positions hold them
        k = max(max(1, len(tgt)) for _, tgt in spans) + 1
        logp = torch.log_softmax(model.run(inputs, last_only=k).logits.float(), -1)
        width = logp.shape[1]
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


def _pairs(facts) -> tuple[list[str], list[str], list[tuple[int, str]]]:
    """Every CounterFact prompt of `facts` twice (target_new, then target_true) and its (fact index, es|ps|ns)."""
    prompts, targets, tags = [], [], []
    for i, f in enumerate(facts):
        if f.target_true is None:
            raise ValueError(f"Fact {i} ({f.subject!r}) has no target_true; CounterFact scores compare it with "
                             "target_new.")
        for kind, ps in (("es", [f.prompt]), ("ps", list(f.paraphrases)), ("ns", list(f.neighborhood))):
            for p in ps:
                prompts += [p, p]
                targets += [f.target_new, f.target_true]
                tags.append((i, kind))
    return prompts, targets, tags


def counterfact(model, facts, edited=None) -> dict:
    """ES, PS, NS (fractions) and their harmonic mean over `facts` (mechanic.steer.edit.Fact with target_true);
    NS leaves out neighbourhood prompts naming an `edited` subject (default: the facts', see edited_apart)."""
    prompts, targets, kinds = _pairs(edited_apart(facts, edited))
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


def fact_values(model, facts, batch_size: int = 16) -> tuple[dict[str, list[float | None]], list[list[torch.Tensor]]]:
    """Per fact: ES (0/1), PS and NS (fraction of its paraphrases / neighbourhood prompts; None when it has none),
    and the teacher-forced argmax tokens on each neighbourhood prompt + target_true (for EasyEdit's locality)."""
    prompts, targets, tags = _pairs(facts)
    lp, tops = teacher_forced(model, prompts, targets, batch_size)
    wins = {k: [[] for _ in facts] for k in ("es", "ps", "ns")}
    ns_tops: list[list[torch.Tensor]] = [[] for _ in facts]
    for j, (i, kind) in enumerate(tags):
        new, true = float(lp[2 * j]), float(lp[2 * j + 1])
        wins[kind][i].append(new > true if kind != "ns" else true > new)
        if kind == "ns":
            ns_tops[i].append(tops[2 * j + 1])
    values = {k: [sum(w) / len(w) if w else None for w in v] for k, v in wins.items()}
    return values, ns_tops


class CurveScores:
    """The `on_batch` of mechanic.steer.sequential that scores the facts edited so far after every batch, each
    score with a seeded 95% percentile-bootstrap CI over its items (facts, openings, windows).

    ES / PS / NS: CounterFact's probability comparison per fact (0/1 for ES, the fraction of a fact's prompts for
    PS and NS; neighbourhood prompts naming any subject the sequence edits are left out, edited_apart). locality:
    EasyEdit's, per fact the fraction of teacher-forced argmax tokens on its neighbourhood
    prompts (+ target_true) unchanged from the unedited model, whose tokens are computed once, here. fluency: ROME's
    n-gram entropy of greedy continuations of `fluency_prompts`; ppl: exp(mean NLL) over `windows` held-out windows
    (CI: exp of the NLL CI). `before` holds the unedited model's scores over all the facts (the curve's 0 point).
    """

    def __init__(self, model, facts, *, prose=None, fluency_prompts=None, windows: int = 4, seq_len: int = 128,
                 new_tokens: int = 32, n_boot: int = 1000, level: float = 0.95, seed: int = 0, batch_size: int = 16,
                 values: bool = False):
        from mechanic.data.text import heldout
        from mechanic.data.windows import windows as cut
        from mechanic.improve.evaluate import NEUTRAL_OPENINGS, FluencyMeasure

        self.facts = edited_apart(facts)     # one neighbourhood for the whole curve: no subject the sequence edits
        if not self.facts:
            raise ValueError("Curve scores need at least one fact (mechanic.steer.edit.Fact with target_true).")
        if windows < 1 or seq_len < 2:
            raise ValueError(f"Perplexity needs at least one window of at least 2 tokens; got windows={windows}, "
                             f"seq_len={seq_len}.")
        self.n_boot, self.level, self.seed, self.batch_size, self.values = n_boot, level, seed, batch_size, values
        self.fluency = FluencyMeasure(list(NEUTRAL_OPENINGS[:4]) if fluency_prompts is None else fluency_prompts,
                                      max_new_tokens=new_tokens, seed=seed)
        wins = [w for w in cut(model, heldout() if prose is None else prose, seq_len=seq_len,
                               max_tokens=windows * seq_len) if w.numel() == seq_len]
        if not wins:
            raise ValueError(f"The prose gives no full window of {seq_len} tokens; give more text or a smaller "
                             "seq_len.")
        self.windows = wins
        self.index = {self._key(f): i for i, f in enumerate(self.facts)}
        t = time.perf_counter()
        vals, self._tops = fact_values(model, self.facts, batch_size)
        self.before = self._scores(model, vals, [1.0 if t_ else None for t_ in self._tops], t)

    @staticmethod
    def _key(f) -> tuple:
        return f.prompt, f.subject, f.target_new

    def __call__(self, model, step: int, done) -> dict:
        """Scores of the facts in `done` (edited so far) on `model` (edits applied)."""
        t = time.perf_counter()
        missing = [f.subject for f in done if self._key(f) not in self.index]
        if missing:
            raise ValueError(f"Curve scores were set up for other facts; not among them: {missing[:5]}. Build "
                             "curve_scores(model, facts) with every fact the sequence will edit.")
        idx = [self.index[self._key(f)] for f in done]
        vals, tops = fact_values(model, [self.facts[i] for i in idx], self.batch_size)
        local = []
        for i, now in zip(idx, tops):
            same = [float((a == b).double().mean()) for a, b in zip(now, self._tops[i])]
            local.append(sum(same) / len(same) if same else None)
        return self._scores(model, vals, local, t)

    def _ci(self, xs) -> dict | None:
        from mechanic.improve.stats import bootstrap_ci

        xs = [x for x in xs if x is not None]
        return bootstrap_ci(xs, self.seed, self.n_boot, self.level) if xs else None

    def _scores(self, model, vals: dict, local: list, t0: float) -> dict:
        from mechanic.improve.perplexity import perplexity

        per = {**vals, "locality": local,
               "fluency": self.fluency.collect(model, None)["entropy"].tolist(),
               "nll": [perplexity(model, w, seq_len=len(w)).nll for w in self.windows]}
        cis = {k: self._ci(v) for k, v in per.items()}
        nll = cis.pop("nll")
        cis["ppl"] = {k: math.exp(v) for k, v in nll.items()}
        out: dict = {k: (None if c is None else c["mean"]) for k, c in cis.items()}
        parts = [out[k] for k in ("es", "ps", "ns") if out[k] is not None]
        out["score"] = len(parts) / sum(1 / v for v in parts) if parts and all(v > 0 for v in parts) else 0.0
        out["ci"] = {k: (None if c is None else [c["lo"], c["hi"]]) for k, c in cis.items()}
        out["n"] = {k: sum(x is not None for x in v) for k, v in per.items() if k != "nll"} | {"ppl": len(per["nll"])}
        if self.values:
            out["values"] = per
        out["scoring_seconds"] = round(time.perf_counter() - t0, 3)
        return out


def curve_scores(model, facts, **options) -> CurveScores:
    """The `on_batch` for sequential editing that scores ES, PS, NS, locality, fluency and perplexity with CIs
    after every batch (see CurveScores; the unedited model's locality tokens and scores are computed here)."""
    return CurveScores(model, facts, **options)
