"""Before/after evaluation of a plan: every measure with the plan off, then on, as a table with CIs and p-values.

    from mechanic.improve.evaluate import evaluate, EditMeasure, TaskMeasure, default_side_effects
    ev = evaluate(model, plan, [EditMeasure(facts), *default_side_effects(model, exclude=["facts"])])
    ev.table()       # rich Table: before / after / delta with 95% CIs, p, n per row
    ev.to_dict()     # EVALUATION in docs/RUNS.md (rows, samples, measure settings, seeds)
    ev.figures()     # report figures: target bars, side-effect bars, generation samples

evaluate(model, plan, measures, *, seed=0, n_boot=2000, level=0.95, n_perm=10000) runs each measure's
collect(model, None) with the plan off, then collect(model, before) inside `with model.applied(plan)`
(plan None: after is before, so every delta is 0 and p = 1). The plan is undone afterwards, weights bit
for bit. A row is one metric of one measure, id "measure.metric"; its items (prompts, facts, windows)
are paired, so before, after and delta CIs are percentile bootstraps over the same resampled items
(mechanic.improve.stats, seeded with `seed`) and p is a paired sign-flip permutation test on
after - before. Every collect runs under torch.manual_seed(seed). A measure's `derived` rows
(PerplexityMeasure's ppl) are functions of another row's mean: their CIs are the bootstrap means
transformed (ppl = exp(mean NLL), CI = exp of the NLL CI bounds, delta = the bootstrap of
exp(after) - exp(before)), and their p is the source row's.

Measures (mechanic.improve.measures.Measure; every one takes name= to rename its rows):
- TaskMeasure(task, metrics=None, kind="target"): per example, the task's metric and accuracy on the
  last-position logits.
- EditMeasure(facts, kind="target", portability=None): per fact, two families. "CounterFact
  (probability comparison)": efficacy (0/1), paraphrase, neighborhood (fractions of the fact's
  prompts), as improve.edit_metrics.counterfact, for facts with target_true. "EasyEdit (token
  accuracy)": reliability, generalization (teacher-forced argmax = target_new tokens on the edit
  prompt / paraphrases), locality (fraction of argmax tokens on neighbourhood prompts + target_true
  unchanged from before; the next token when target_true is missing) and portability, only when
  `portability` (per fact, a list of (prompt, answer) pairs) is given. `facts` are the facts the plan
  edits: neighbourhood prompts naming one of their subjects are left out of neighborhood and locality
  (edit_metrics.edited_apart; settings()["left_out"] lists them).
- PerplexityMeasure(texts=None, max_tokens=4096, seq_len=128): per window of held-out prose, mean NLL;
  plus a derived ppl row.
- KLMeasure(texts=None, max_tokens=1024, seq_len=128): per window, mean KL(before || after) of the
  next-token distributions on neutral text (before = 0).
- FluencyMeasure(prompts=None, max_new_tokens=40, seed=0): greedy continuations of neutral openings,
  per prompt ROME's n-gram entropy (improve.fluency); the texts become the report's samples.
- default_side_effects(model, exclude=(), size="small"|"full"): perplexity, KL, fluency and task
  metric + accuracy on spread subsets of every built-in suite not in `exclude`.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mechanic import distributed as D
from mechanic.improve import stats as S
from mechanic.improve.measures import Measure


class EvaluateError(ValueError):
    """Measures, plans or settings that evaluate cannot use as given."""


# ---------------------------------------------------------------- measures
class TaskMeasure(Measure):
    """A task's own metric and accuracy per example, on last-position logits.

    contrast=True scores each example as metric(clean prompt) - metric(corrupted prompt) with the clean
    answer tokens: for a bias suite whose corrupted prompt swaps in the other stereotype (gender), a
    global shift towards one answer cancels and only the prompt-dependent part (the bias) remains.
    """

    def __init__(self, task, metrics=None, kind: str = "target", name: str | None = None, batch_size: int = 32,
                 contrast: bool = False):
        from mechanic.tasks import metrics as M

        if not len(task):
            raise EvaluateError(f"Task {task.name!r} has no examples; a TaskMeasure needs at least one.")
        self.task, self.kind, self.name, self.batch_size = task, _kind(kind), name or task.name, batch_size
        self.contrast = contrast
        if contrast and any(e.corrupted is None for e in task.examples):
            raise EvaluateError(f"contrast=True needs a corrupted prompt for every example of {task.name!r}.")
        from mechanic.tasks.builtin import accuracy_metric

        accuracy = [] if contrast else [accuracy_metric(task.name)]
        self.metrics = list(dict.fromkeys(metrics or [task.metric] + accuracy))
        for m in self.metrics:
            M.get(m)  # unknown names fail here, with the list of known ones
        bias = task.name == "gender"  # a bias score: neither direction is "better"
        self.better = {m: "none" if bias else "higher" for m in self.metrics}
        self.description = f"{task.name}: {task.description or 'task'} One value per example."

    def collect(self, model, before):
        from mechanic.tasks import metrics as M

        batch = self.task.tokenize(model, align=True)   # last-position metrics: pairs need not match in length
        out = {m: [] for m in self.metrics}
        for s in range(0, batch.n, self.batch_size):
            part = batch.select(slice(s, s + self.batch_size))
            logits = model.run(part.clean, last_only=True).logits[:, -1]
            other = model.run(part.corrupted, last_only=True).logits[:, -1] if self.contrast else None
            for m in self.metrics:
                v = M.get(m)(logits, part)
                if other is not None:
                    v = v - M.get(m)(other, part)
                out[m].append(v.detach().float().cpu())
        return {m: torch.cat(v) for m, v in out.items()}

    def settings(self):
        return {"task": self.task.name, "n": len(self.task), "metrics": self.metrics, "contrast": self.contrast,
                "prompts": [e.prompt for e in self.task.examples]}

    def prefixed(self, prefix: str) -> TaskMeasure:
        from dataclasses import replace

        from mechanic.tasks.task import Task

        t = self.task
        ex = [replace(e, prompt=prefix + e.prompt, corrupted=None if e.corrupted is None else prefix + e.corrupted)
              for e in t.examples]
        out = copy.copy(self)
        out.task = Task(t.name, ex, t.metric, t.description)
        return out


class EditMeasure(Measure):
    """Per-fact edit success: CounterFact probability comparisons and EasyEdit token accuracies."""

    better = {m: "higher" for m in ("efficacy", "paraphrase", "neighborhood", "reliability", "generalization",
                                    "locality", "portability")}
    descriptions = {
        "efficacy": "CounterFact (probability comparison): 1 when p(target_new) > p(target_true) after the edit "
                    "prompt; one value per fact.",
        "paraphrase": "CounterFact (probability comparison): fraction of a fact's paraphrases with "
                      "p(target_new) > p(target_true).",
        "neighborhood": "CounterFact (probability comparison): fraction of a fact's neighbourhood prompts (other "
                        "subjects) with p(target_true) > p(target_new).",
        "reliability": "EasyEdit (token accuracy): fraction of target_new tokens that are the teacher-forced "
                       "argmax after the edit prompt; one value per fact.",
        "generalization": "EasyEdit (token accuracy): reliability on the fact's paraphrases (mean over them).",
        "locality": "EasyEdit (token accuracy): fraction of teacher-forced argmax tokens on the neighbourhood "
                    "prompts (+ target_true) that are unchanged from before the change.",
        "portability": "EasyEdit (token accuracy): answer tokens predicted on the fact's portability prompts.",
    }
    description = "Edited facts: CounterFact (probability comparison) and EasyEdit (token accuracy) scores."

    def __init__(self, facts, kind: str = "target", portability=None, name: str = "edit", batch_size: int = 16):
        from mechanic.improve.edit_metrics import edited_apart

        facts = list(facts)
        self.facts, self.kind, self.name, self.batch_size = edited_apart(facts), _kind(kind), name, batch_size
        self.left_out = [p for g, f in zip(facts, self.facts) for p in g.neighborhood if p not in f.neighborhood]
        if not self.facts:
            raise EvaluateError("EditMeasure needs at least one fact (mechanic.steer.edit.Fact).")
        if portability is not None:
            portability = [[(str(p), str(a)) for p, a in qs] for qs in portability]
            if len(portability) != len(self.facts):
                raise EvaluateError(f"portability must hold one list of (prompt, answer) pairs per fact: "
                                    f"{len(self.facts)} facts, {len(portability)} lists (use [] for none).")
        self.portability = portability

    def _pairs(self) -> tuple[list[str], list[str], list[tuple]]:
        """(prompts, targets, tags): every teacher-forced row; tag = (fact, family, role)."""
        prompts, targets, tags = [], [], []

        def row(p, t, *tag):
            prompts.append(p)
            targets.append(t)
            tags.append(tag)
        for i, f in enumerate(self.facts):
            true = f.target_true
            for fam, ps in (("es", [f.prompt]), ("ps", f.paraphrases), ("ns", f.neighborhood)):
                for p in ps:
                    row(p, f.target_new, i, fam, "new")
                    row(p, true if true is not None else "", i, fam, "true")
            for p, a in (self.portability[i] if self.portability else []):
                row(p, a, i, "port", "answer")
        return prompts, targets, tags

    def collect(self, model, before):
        from mechanic.improve.edit_metrics import teacher_forced

        prompts, targets, tags = self._pairs()
        lp, tops = teacher_forced(model, prompts, targets, self.batch_size)
        tok = model.tokenizer
        ids = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"] if t else [], dtype=torch.long)
               for t in targets]
        per: dict[str, dict[int, list[float]]] = {k: {} for k in self.better}
        old = before["_tops"] if before else tops
        j = 0
        while j < len(tags):
            i, fam, role = tags[j]
            f = self.facts[i]
            if fam == "port":
                per["portability"].setdefault(i, []).append(float((tops[j] == ids[j]).float().mean()))
                j += 1
                continue
            new, true = j, j + 1   # rows come in (new, true) pairs
            acc = float((tops[new] == ids[new]).float().mean())
            same = float((tops[true] == old[true]).float().mean())
            if f.target_true is not None:
                win = lp[new] > lp[true] if fam != "ns" else lp[true] > lp[new]
                key = {"es": "efficacy", "ps": "paraphrase", "ns": "neighborhood"}[fam]
                per[key].setdefault(i, []).append(float(win))
            if fam == "ns":
                per["locality"].setdefault(i, []).append(same)
            else:
                per["reliability" if fam == "es" else "generalization"].setdefault(i, []).append(acc)
            j += 2
        out = {k: torch.tensor([sum(v[i]) / len(v[i]) for i in sorted(v)], dtype=torch.float64)
               for k, v in per.items() if v}
        out["_tops"] = tops
        return out

    def settings(self):
        return {"facts": [{"prompt": f.prompt, "subject": f.subject, "target_new": f.target_new,
                           "target_true": f.target_true, "paraphrases": list(f.paraphrases),
                           "neighborhood": list(f.neighborhood)} for f in self.facts],
                "left_out": {"why": "neighbourhood prompts naming a subject these facts edit: their answer is "
                                    "meant to change", "prompts": self.left_out},
                "portability": self.portability, "batch_size": self.batch_size,
                "families": {"CounterFact (probability comparison)": ["efficacy", "paraphrase", "neighborhood"],
                             "EasyEdit (token accuracy)": ["reliability", "generalization", "locality",
                                                           "portability"]}}

    def prefixed(self, prefix: str) -> EditMeasure:
        from dataclasses import replace

        out = copy.copy(self)
        out.facts = [replace(f, prompt=prefix + f.prompt, paraphrases=tuple(prefix + p for p in f.paraphrases),
                             neighborhood=tuple(prefix + p for p in f.neighborhood)) for f in self.facts]
        out.left_out = [prefix + p for p in self.left_out]
        out.portability = None if self.portability is None else [[(prefix + p, a) for p, a in qs]
                                                                 for qs in self.portability]
        return out


def _windows(model, texts, max_tokens: int, seq_len: int) -> torch.Tensor:
    """[n, seq_len] token windows of `texts` (held-out prose by default); a shorter tail window is dropped."""
    from mechanic.data.text import heldout
    from mechanic.data.windows import windows

    wins = windows(model, heldout() if texts is None else texts, seq_len=seq_len, max_tokens=max_tokens)
    full = [w for w in wins if w.numel() == seq_len]
    if not full:
        raise EvaluateError(f"The text gives no full window of seq_len={seq_len} tokens within max_tokens="
                            f"{max_tokens}; give more text, a larger max_tokens or a smaller seq_len.")
    return torch.stack(full)


class PerplexityMeasure(Measure):
    """Mean next-token NLL per window of held-out prose, and ppl = exp(mean NLL)."""

    better = {"nll": "lower", "ppl": "lower"}
    derived = {"ppl": ("nll", "exp")}
    descriptions = {"nll": "Mean next-token negative log-likelihood (nats) per window of held-out prose.",
                    "ppl": "Perplexity exp(mean NLL) over the windows; CIs are exp of the NLL CI bounds."}

    def __init__(self, texts=None, max_tokens: int = 4096, seq_len: int = 128, batch_size: int = 8,
                 name: str = "perplexity", kind: str = "side"):
        self.texts, self.max_tokens, self.seq_len, self.batch_size = texts, max_tokens, seq_len, batch_size
        self.name, self.kind = name, _kind(kind)
        self.description = self.descriptions["nll"]

    def collect(self, model, before):
        ids = _windows(model, self.texts, self.max_tokens, self.seq_len)
        out = []
        for s in range(0, len(ids), self.batch_size):
            x = ids[s:s + self.batch_size].to(model.device)
            logits = model.run(x).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
            out.append(nll.view(len(x), -1).double().mean(1).cpu())
        return {"nll": torch.cat(out)}

    def settings(self):
        return {"text": "mechanic.data.text.heldout()" if self.texts is None else "given", "max_tokens":
                self.max_tokens, "seq_len": self.seq_len, "batch_size": self.batch_size}


class KLMeasure(Measure):
    """Mean KL(before || after) of next-token distributions per window of neutral text."""

    better = {"kl": "lower"}

    def __init__(self, texts=None, max_tokens: int = 1024, seq_len: int = 128, batch_size: int = 8,
                 name: str = "kl", kind: str = "side"):
        self.texts, self.max_tokens, self.seq_len, self.batch_size = texts, max_tokens, seq_len, batch_size
        self.name, self.kind = name, _kind(kind)
        self.description = ("KL(before || after) of the next-token distribution, mean over the tokens of each "
                            "window of neutral text (held-out prose); 0 before by definition.")

    def collect(self, model, before):
        ids = _windows(model, self.texts, self.max_tokens, self.seq_len)
        logp = torch.cat([torch.log_softmax(model.run(ids[s:s + self.batch_size].to(model.device)).logits.float(), -1)
                          .cpu() for s in range(0, len(ids), self.batch_size)])
        if before is None:
            return {"kl": torch.zeros(len(ids)), "_logp": logp}
        base = before["_logp"]
        return {"kl": (base.exp() * (base - logp)).sum(-1).mean(-1)}

    def settings(self):
        return {"text": "mechanic.data.text.heldout()" if self.texts is None else "given", "max_tokens":
                self.max_tokens, "seq_len": self.seq_len, "batch_size": self.batch_size}


NEUTRAL_OPENINGS = ("The weather this morning", "My favourite way to spend a weekend is", "The history of the city",
                    "Scientists studying the ocean have", "When I was a child, I", "The best way to learn a new skill",
                    "At the market yesterday,", "The old house at the end of the street",
                    "The train to the coast", "Our neighbours planted a garden", "The first thing I noticed about the town",
                    "In the library there is", "The recipe my grandmother used", "After the meeting ended, we",
                    "The river that runs through the valley", "On the first day of school,", "The museum opened a new room",
                    "Every summer the village", "The letter arrived on a Tuesday", "The painter spent the afternoon",
                    "A small boat crossed the lake", "The shop on the corner sells", "During the long winter,",
                    "The teacher asked the class", "The bridge was built", "My brother likes to",
                    "The forest behind the farm", "The concert last night", "The new bakery in town",
                    "The children ran to the", "The map showed a road", "Late in the evening, the")


VALIDATION_OPENINGS = ("The kitchen smelled of", "Our plan for the holiday was", "The road into the mountains",
                       "Yesterday the library announced", "The garden in spring", "A fisherman on the pier",
                       "The students in the hall", "The price of bread", "My aunt told me that",
                       "The lighthouse on the island", "Before the storm arrived,", "The local football team",
                       "The story begins in a", "Walking through the park, I", "The factory at the edge of town",
                       "The doctor explained that")


class FluencyMeasure(Measure):
    """ROME's n-gram entropy of greedy continuations of neutral openings, one value per prompt."""

    better = {"entropy": "higher"}

    def __init__(self, prompts=None, max_new_tokens: int = 40, seed: int = 0, name: str = "fluency",
                 kind: str = "side"):
        self.prompts = list(NEUTRAL_OPENINGS if prompts is None else prompts)
        if not self.prompts or not all(isinstance(p, str) and p for p in self.prompts):
            raise EvaluateError("FluencyMeasure needs a non-empty list of non-empty prompt strings.")
        self.max_new_tokens, self.seed, self.name, self.kind = max_new_tokens, seed, name, _kind(kind)
        self.description = (f"n-gram entropy (2/3 bigram, 4/3 trigram; bits; Meng et al. 2022) of {max_new_tokens} "
                             "greedily generated tokens per neutral opening; repetition lowers it.")

    def collect(self, model, before):
        from mechanic.improve.fluency import fluency

        if model.tokenizer is None:
            raise EvaluateError("FluencyMeasure generates text; this model has no tokenizer.")
        width = model.inputs(self.prompts)["input_ids"].shape[1]
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            ids = model.generate(self.prompts, max_new_tokens=self.max_new_tokens, do_sample=False)
        texts = model.tokenizer.batch_decode(ids[:, width:], skip_special_tokens=True)
        return {"entropy": torch.tensor([fluency(t) for t in texts], dtype=torch.float64),
                "_samples": [{"prompt": p, "text": t} for p, t in zip(self.prompts, texts)]}

    def settings(self):
        return {"prompts": self.prompts, "max_new_tokens": self.max_new_tokens, "seed": self.seed,
                "decoding": "greedy", "ngrams": [2, 3], "weights": [2 / 3, 4 / 3]}

    def prefixed(self, prefix: str) -> FluencyMeasure:
        out = copy.copy(self)
        out.prompts = [prefix + p for p in self.prompts]
        return out


# small: >= 8 items per row (the smallest n whose sign-flip test can reach p < 0.01), one SmolLM2 pass in seconds;
# full: every row of each suite outside its validation split (>= 112 each, so a 2-point accuracy margin is testable)
# and 64 windows of prose
SIZES = {"small": {"examples": 12, "ppl_tokens": 512, "kl_tokens": 512, "seq_len": 64, "prompts": 8, "new_tokens": 32},
         "full": {"examples": None, "ppl_tokens": 8192, "kl_tokens": 4096, "seq_len": 128, "prompts": 32,
                  "new_tokens": 40}}


# Suites that share entities: excluding one (as a recipe's own task) excludes the other, since an edit of one's
# facts changes the other's answers. facts_large (made for editing at scale) is never a default side effect: it
# repeats facts's subjects.
SHARED = {"facts": ("facts_large",), "facts_large": ("facts",)}
NOT_SIDE = ("facts_large",)


def default_side_effects(model, exclude=(), size: str = "small", selection: bool = False) -> list[Measure]:
    """Perplexity, KL and fluency on neutral text, and every built-in suite not in `exclude` (kind "side";
    a suite that shares entities with an excluded one is excluded too, see SHARED).

    The validation rows of every suite are kept for selections: `selection=True` gives those rows,
    calibration prose and the validation openings (what a selection may read); the default gives every
    other row, held-out prose and the evaluation openings (what the evaluation reads).
    """
    from mechanic.data.text import calibration
    from mechanic.tasks.builtin import list_tasks, load_task
    from mechanic.tasks.task import Task

    if size not in SIZES:
        raise EvaluateError(f"size must be one of {', '.join(SIZES)}, got {size!r}.")
    if model.tokenizer is None:
        raise EvaluateError("The default side effects read text; this model has no tokenizer.")
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    known = ["perplexity", "kl", "fluency", *list_tasks()]
    bad = [x for x in exclude if x not in known]
    if bad:
        raise EvaluateError(f"Cannot exclude {bad}: the default side effects are {', '.join(known)}.")
    exclude += [y for x in exclude for y in SHARED.get(x, ())] + list(NOT_SIDE)
    z = SIZES[size]
    out: list[Measure] = []
    prose = calibration() if selection else None
    openings = VALIDATION_OPENINGS if selection else NEUTRAL_OPENINGS
    if "perplexity" not in exclude:
        out.append(PerplexityMeasure(prose, max_tokens=z["ppl_tokens"], seq_len=z["seq_len"]))
    if "kl" not in exclude:
        out.append(KLMeasure(prose, max_tokens=z["kl_tokens"], seq_len=z["seq_len"]))
    if "fluency" not in exclude:
        out.append(FluencyMeasure(list(openings[:z["prompts"]]), max_new_tokens=z["new_tokens"]))
    for name in list_tasks():
        if name in exclude:
            continue
        task = load_task(name)
        rows = [e for e in task.examples if (e.split == "validation") == selection]
        k = len(rows) if z["examples"] is None else min(z["examples"], len(rows))
        pick = np.unique(np.linspace(0, len(rows) - 1, k).round().astype(int))
        out.append(TaskMeasure(Task(task.name, [rows[i] for i in pick], task.metric, task.description),
                               kind="side"))
    return out


def _kind(kind: str) -> str:
    if kind not in ("target", "side"):
        raise EvaluateError(f"A measure's kind is 'target' (what the change should move) or 'side' (what it "
                            f"should not), got {kind!r}.")
    return kind


# ---------------------------------------------------------------- evaluation
TRANSFORMS = {"exp": np.exp}


@dataclass(frozen=True)
class Prompt:
    """The prompting baseline: `prefix` (an instruction or few-shot demonstrations) before every prompt, no plan.

    `evaluate(model, Prompt(prefix), measures)` compares each measure without and with the prefix
    (Measure.prefixed); measures of raw prose (perplexity, KL windows) are read without it.
    """

    prefix: str
    method: str = "prompt"


@dataclass
class Evaluation:
    """Rows (one per measure metric, before/after/delta with CIs and p), generation samples and settings."""

    rows: list[dict]
    samples: list[dict] = field(default_factory=list)
    measures: dict = field(default_factory=dict)
    seed: int = 0
    n_boot: int = 2000
    level: float = 0.95
    n_perm: int = 10000
    plan: str | None = None
    seconds: dict = field(default_factory=dict)

    def row(self, id: str) -> dict:
        """The row with this id ("measure.metric")."""
        for r in self.rows:
            if r["id"] == id:
                return r
        raise KeyError(f"No row {id!r}; rows: {', '.join(r['id'] for r in self.rows)}.")

    def to_dict(self) -> dict:
        """EVALUATION of docs/RUNS.md (plus n_perm, the plan's method and seconds per measure)."""
        return {"seed": self.seed, "n_boot": self.n_boot, "level": self.level, "n_perm": self.n_perm,
                "plan": self.plan, "rows": self.rows, "samples": self.samples, "measures": self.measures,
                "seconds": self.seconds}

    def table(self):
        """A rich Table: one line per row with before, after and delta (CIs), p and n."""
        from rich.table import Table

        pct = f"{self.level:.0%}"
        t = Table(title=f"Evaluation (plan: {self.plan or 'none'}; {pct} bootstrap CIs, seed {self.seed})")
        for c in ("row", "kind", "better", "n", "before", "after", "delta", "p"):
            t.add_column(c, justify="left" if c in ("row", "kind", "better") else "right")
        for r in self.rows:
            d = r["delta"]
            moved = d["lo"] > 0 or d["hi"] < 0
            good = (d["mean"] > 0) == (r["better"] == "higher")
            style = "" if not moved or r["better"] == "none" else ("green" if good else "red")
            t.add_row(r["id"], r["kind"], r["better"], str(r["n"]), _ci(r["before"]), _ci(r["after"]),
                      f"[{style}]{_ci(d)}[/]" if style else _ci(d), f"{r['p']:.3g}")
        return t

    def figures(self) -> list[dict]:
        """Report figures (docs/RUNS.md): bars for target rows, bars for side-effect rows, generation samples."""
        figs = []
        for kind, title in (("target", "Target: before vs after"), ("side", "Side effects: before vs after")):
            rows = [r for r in self.rows if r["kind"] == kind]
            if rows:
                figs.append({"kind": "bars", "id": f"evaluation-{kind}", "title": title,
                             "caption": f"Means with {self.level:.0%} bootstrap CIs (seed {self.seed}); "
                                        "each bar is one row of the evaluation table.",
                             "labels": [r["id"] for r in rows], "ylabel": "value",
                             "series": [{"name": s, **{k: [r[s][k] for r in rows] for k in ("mean", "lo", "hi")}}
                                        for s in ("before", "after")]})
        if self.samples:
            items = []
            for s in self.samples:
                items += [{"label": "prompt", "text": s["prompt"]}, {"label": "before", "text": s["before"]},
                          {"label": "after", "text": s["after"]}]
            figs.append({"kind": "samples", "id": "evaluation-samples", "title": "Generations before and after",
                         "caption": "Greedy continuations of the same prompts with the plan off and on.",
                         "items": items})
        return figs


def _ci(c: dict) -> str:
    return f"{c['mean']:.4g} [{c['lo']:.3g}, {c['hi']:.3g}]"


def _collect(model, m: Measure, before, seed: int) -> dict:
    """m.collect under a fixed torch seed, checked against the Measure contract."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = m.collect(model, before)
    if not isinstance(out, dict):
        raise EvaluateError(f"Measure {m.name!r}: collect must return a dict of metric -> per-item values, got "
                            f"{type(out).__name__}.")
    for k, v in out.items():
        if k.startswith("_"):
            continue
        if not torch.is_tensor(v) or v.dim() != 1 or v.numel() == 0:
            raise EvaluateError(f"Measure {m.name!r}, metric {k!r}: expected a non-empty 1-D tensor with one value "
                                f"per item, got {getattr(v, 'shape', type(v).__name__)}.")
    return out


def _row(m: Measure, metric: str, b, a, seed, n_boot, level, n_perm) -> dict:
    if len(b) != len(a):
        raise EvaluateError(f"Measure {m.name!r}, metric {metric!r}: {len(b)} items before but {len(a)} after; a "
                            "measure must score the same items with the plan off and on.")
    ci = S.paired_ci(b, a, seed, n_boot, level)
    nb, na = S._paired(b, a)
    descriptions = getattr(m, "descriptions", {})
    return {"id": f"{m.name}.{metric}", "measure": m.name, "metric": metric, "kind": m.kind,
            "better": m.better.get(metric, "none"), "n": len(b), **ci, "p": S.paired_test(b, a, seed, n_perm),
            "bound": S.one_sided(S.bootstrap_means(na - nb, seed, n_boot), 1 - level),
            "mdc": S.min_detectable(b, a, level), "description": descriptions.get(metric, m.description)}


def _derived(m: Measure, metric: str, source: dict, b, a, how: str, seed, n_boot, level) -> dict:
    """A row for f(mean of the source metric): CIs from the transformed bootstrap means, p of the source."""
    f = TRANSFORMS[how]
    mb, ma = S.bootstrap_means(b, seed, n_boot), S.bootstrap_means(a, seed, n_boot)
    cb, ca = source["before"], source["after"]
    before = {k: float(f(cb[k])) for k in ("mean", "lo", "hi")}
    after = {k: float(f(ca[k])) for k in ("mean", "lo", "hi")}
    delta = S.interval(f(ma) - f(mb), after["mean"] - before["mean"], level)
    return {**source, "id": f"{m.name}.{metric}", "metric": metric, "better": m.better.get(metric, "none"),
            "before": before, "after": after, "delta": delta, "bound": S.one_sided(f(ma) - f(mb), 1 - level),
            "mdc": source["mdc"] * float(f(cb["mean"])),   # first order: d exp(x) = exp(x) dx
            "description": getattr(m, "descriptions", {}).get(metric, f"{how}({source['metric']})")}


def collect_before(model, measures, seed: int = 0) -> dict:
    """Every measure's values with no plan: pass as evaluate(..., before=) to score many plans against one baseline."""
    if D.active():
        from mechanic.improve.parallel import spread_before

        return spread_before(model, measures, seed, _collect)
    return {m.name: _collect(model, m, None, seed) for m in measures}


def _collect_all(model, plan, measures, seed: int, given: dict | None):
    """(before, after, seconds): every measure with the plan off (unless in `given`), then on."""
    seconds: dict[str, dict[str, float]] = {m.name: {} for m in measures}
    after: dict = {}
    before: dict = {}
    for m in measures:
        if given is not None and m.name in given:
            before[m.name] = given[m.name]
            continue
        t = time.perf_counter()
        before[m.name] = _collect(model, m, None, seed)
        seconds[m.name]["before"] = time.perf_counter() - t
    if plan is None:
        after = before
    else:
        prompted = isinstance(plan, Prompt)
        with contextlib.nullcontext() if prompted else model.applied(plan):
            for m in measures:
                now = m.prefixed(plan.prefix) if prompted else m
                if now is m and prompted:        # a prompt cannot reach raw prose: after is before, no second pass
                    after[m.name] = before[m.name]
                    continue
                t = time.perf_counter()
                after[m.name] = _collect(model, now, before[m.name], seed)
                seconds[m.name]["after"] = time.perf_counter() - t
    return before, after, seconds


def evaluate(model, plan, measures, *, seed: int = 0, n_boot: int = 2000, level: float = 0.95,
             n_perm: int = 10000, before: dict | None = None) -> Evaluation:
    """Every measure before (plan off) and after (plan on): rows with paired bootstrap CIs and permutation p.

    `before` (from collect_before with the same measures and seed) skips the plan-off pass.
    """
    from mechanic.steer.plan import Plan

    if plan is not None and not isinstance(plan, (Plan, Prompt)):
        raise EvaluateError(f"evaluate takes a Plan, a Prompt (the prompting baseline) or None, got "
                            f"{type(plan).__name__}; wrap interventions as mechanic.steer.plan.Plan(interventions=[...]).")
    measures = list(measures)
    if not measures:
        raise EvaluateError("evaluate needs at least one measure (e.g. TaskMeasure(task) or default_side_effects).")
    names = [m.name for m in measures]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EvaluateError(f"Measure names must be unique (they prefix row ids); {dup} occur more than once. "
                            "Pass name= to tell them apart.")
    S._check_level(level, n_boot)
    if D.active():      # torchrun: each measure collected by one rank, the values gathered (improve.parallel)
        from mechanic.improve.parallel import spread

        before, after, seconds = spread(model, plan, measures, seed, before, _collect_all)
    else:
        before, after, seconds = _collect_all(model, plan, measures, seed, before)
    rows, samples = [], []
    for m in measures:
        b, a = before[m.name], after[m.name]
        mine = {}
        for metric, v in b.items():
            if metric.startswith("_"):
                continue
            if metric not in a:
                raise EvaluateError(f"Measure {m.name!r} returned {metric!r} before the change but not after.")
            mine[metric] = _row(m, metric, v, a[metric], seed, n_boot, level, n_perm)
            rows.append(mine[metric])
            for name, (src, how) in getattr(m, "derived", {}).items():
                if src == metric:
                    rows.append(_derived(m, name, mine[metric], v, a[metric], how, seed, n_boot, level))
        for sb, sa in zip(b.get("_samples", []), a.get("_samples", [])):
            samples.append({"measure": m.name, "prompt": sb["prompt"], "before": sb["text"], "after": sa["text"]})
    settings = {m.name: {"kind": m.kind, **m.settings()} for m in measures}
    return Evaluation(rows, samples, settings, seed, n_boot, level, n_perm, None if plan is None else
                      (plan.method or "custom"), {k: {s: round(x, 3) for s, x in v.items()} for k, v in seconds.items()})


__all__ = ["Evaluation", "EvaluateError", "evaluate", "collect_before", "Prompt", "TaskMeasure", "EditMeasure", "PerplexityMeasure", "KLMeasure",
           "FluencyMeasure", "default_side_effects"]
