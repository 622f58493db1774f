"""Before/after evaluation: statistics against hand loops, measures against plain HF forwards, plans undone."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

import mechanic
from mechanic.improve import stats as S
from mechanic.improve.edit_metrics import counterfact
from mechanic.improve.evaluate import (EditMeasure, EvaluateError, FluencyMeasure, KLMeasure, PerplexityMeasure,
                                       TaskMeasure, default_side_effects, evaluate)
from mechanic.improve.fluency import fluency, ngram_entropy, words
from mechanic.steer.edit import Fact
from mechanic.tasks.builtin import load_task
from mechanic.testing.tiny import tiny_model


@pytest.fixture(scope="module")
def worded(word_tokenizer):
    """A tiny random qwen2 that reads words (a BPE tokenizer trained on shipped text; no SmolLM2 needed)."""
    return mechanic.load(tiny_model("qwen2", vocab_size=len(word_tokenizer)), tokenizer=word_tokenizer)


FACTS = [Fact("Paris is a city in the country of", "Paris", " Italy", " France",
              ("Paris is located in the country of", "The city of Paris lies in the country of"),
              ("Lyon is a city in the country of", "Nice is a city in the country of", "Lille is in")),
         Fact("The Eiffel Tower is located in the city of", "Eiffel Tower", " New York", " Paris",
              ("The Eiffel Tower stands in",), ("The Louvre is located in the city of",)),
         Fact("Toyota is a company from", "Toyota", " Germany", " Japan")]


# ---------------------------------------------------------------- statistics
def quantile(sorted_values, q):
    """numpy's default (linear) quantile, by hand."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def hand_bootstrap(values, seed, n_boot, level):
    idx = np.random.default_rng(seed).integers(0, len(values), size=(n_boot, len(values)))
    means = sorted(sum(values[j] for j in row) / len(row) for row in idx.tolist())
    a = (1 - level) / 2
    return {"mean": sum(values) / len(values), "lo": quantile(means, a), "hi": quantile(means, 1 - a)}


def test_bootstrap_ci_equals_hand_loop():
    rng = np.random.default_rng(1)
    before, after = rng.normal(size=13).tolist(), rng.normal(0.5, 1, size=13).tolist()
    got = S.bootstrap_ci(before, seed=3, n_boot=500, level=0.9)
    ref = hand_bootstrap(before, 3, 500, 0.9)
    assert max(abs(got[k] - ref[k]) for k in ref) < 1e-12
    assert got["lo"] < got["mean"] < got["hi"]
    pair = S.paired_ci(before, after, seed=3, n_boot=500, level=0.9)
    diffs = [a - b for a, b in zip(after, before)]
    for key, vals in (("before", before), ("after", after), ("delta", diffs)):
        ref = hand_bootstrap(vals, 3, 500, 0.9)
        assert max(abs(pair[key][k] - ref[k]) for k in ref) < 1e-12


def exact_p(d):
    observed = abs(sum(d))
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= observed - 1e-9
               for signs in itertools.product((1, -1), repeat=len(d)))
    return hits / 2 ** len(d)


def test_paired_test_exact_and_monte_carlo():
    rng = np.random.default_rng(2)
    for n, shift in ((1, 1.0), (5, 0.3), (9, 1.0), (12, 0.0)):
        b = rng.normal(size=n)
        a = b + rng.normal(shift, 1, size=n)
        assert abs(S.paired_test(b, a) - exact_p((a - b).tolist())) < 1e-12
    b = rng.normal(size=15)
    a = b + rng.normal(0.4, 1, size=15)
    ref = exact_p((a - b).tolist())
    mc = S.paired_test(b, a, seed=0, n_perm=20000)   # 2^15 > n_perm: random sign flips
    assert abs(mc - ref) < 0.02 and mc != ref
    assert S.paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0
    assert S.paired_test([0, 0, 0, 0], [1, 1, 1, 1]) == 2 / 16   # only all-plus and all-minus are as extreme


def test_stats_reject_bad_input():
    with pytest.raises(ValueError, match="one before and one after"):
        S.paired_test([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        S.bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        S.bootstrap_ci([])
    with pytest.raises(ValueError, match="level"):
        S.bootstrap_ci([1.0, 2.0], level=95)


# ---------------------------------------------------------------- fluency
def test_ngram_entropy_equals_hand_count():
    text = "the cat sat on the mat. the cat sat"
    assert words(text) == ["the", "cat", "sat", "on", "the", "mat", ".", "the", "cat", "sat"]
    h2 = -(2 * (2 / 9) * math.log2(2 / 9) + 5 * (1 / 9) * math.log2(1 / 9))   # 9 bigrams: 2 seen twice
    h3 = -((2 / 8) * math.log2(2 / 8) + 6 * (1 / 8) * math.log2(1 / 8))       # 8 trigrams: 1 seen twice
    toks = words(text)
    assert abs(ngram_entropy(toks, 2) - h2) < 1e-12 and abs(ngram_entropy(toks, 3) - h3) < 1e-12
    assert abs(fluency(text) - (2 / 3 * h2 + 4 / 3 * h3) / 2) < 1e-12
    assert fluency("go go go go go go") == 0.0 and fluency("hello") == 0.0
    assert fluency("one two three four five six") > fluency("one two one two one two")


# ---------------------------------------------------------------- measures
def hf_last_logits(m, prompt):
    with torch.no_grad():
        return m.hf(torch.tensor([m.tokenizer(prompt)["input_ids"]])).logits[0, -1].float()


def test_task_measure_equals_plain_forward(worded):
    task = load_task("facts", n=6)
    got = TaskMeasure(task, batch_size=4).collect(worded, None)
    tok = worded.tokenizer
    first = lambda t: tok(t, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    ld, acc = [], []
    for e in task.examples:
        lg = hf_last_logits(worded, e.prompt)
        ld.append(float(lg[first(e.answer)] - lg[first(e.wrong)]))
        acc.append(float(int(lg.argmax()) == first(e.answer)))
    assert set(got) == {"logit_diff", "accuracy"}
    assert (got["logit_diff"] - torch.tensor(ld)).abs().max().item() < 1e-4
    assert got["accuracy"].tolist() == acc


def hf_token_accuracy(m, prompt, target):
    a = m.tokenizer(prompt)["input_ids"]
    b = m.tokenizer(target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        top = m.hf(torch.tensor([a + b])).logits[0].argmax(-1)
    return sum(int(top[len(a) - 1 + j]) == t for j, t in enumerate(b)) / len(b)


def test_edit_measure_counterfact_and_easyedit(worded):
    port = [[("The tower's country is", " America")], [], []]
    got = EditMeasure(FACTS, portability=port, batch_size=3).collect(worded, None)
    per = [counterfact(worded, [f]) for f in FACTS]
    assert got["efficacy"].tolist() == [r["es"] for r in per]
    assert got["paraphrase"].tolist() == [r["ps"] for r in per if r["ps"] is not None]
    assert got["neighborhood"].tolist() == [r["ns"] for r in per if r["ns"] is not None]
    assert abs(got["efficacy"].mean().item() - counterfact(worded, FACTS)["es"]) < 1e-12
    rel = [hf_token_accuracy(worded, f.prompt, f.target_new) for f in FACTS]
    gen = [np.mean([hf_token_accuracy(worded, p, f.target_new) for p in f.paraphrases]) for f in FACTS[:2]]
    assert (got["reliability"] - torch.tensor(rel)).abs().max().item() < 1e-12
    assert (got["generalization"] - torch.tensor(gen)).abs().max().item() < 1e-12
    assert got["locality"].tolist() == [1.0, 1.0]   # before the change: unchanged from itself
    assert got["portability"].tolist() == [hf_token_accuracy(worded, *port[0][0])]
    with pytest.raises(ValueError, match="one list of"):
        EditMeasure(FACTS, portability=[[]])
    bare = EditMeasure([Fact("Paris is in", "Paris", " Italy", neighborhood=("Lyon is in",))]).collect(worded, None)
    assert sorted(k for k in bare if not k.startswith("_")) == ["locality", "reliability"]   # no target_true


LOCAL = [Fact("Paris is a city in the country of", "Paris", " Italy", " the French Republic of Europe", (),
              ("Lyon is a city in the country of", "Nice is a city in the country of", "Lille is in",
               "Marseille lies in")),
         Fact("Toyota is a company from", "Toyota", " Germany", " the island nation of Japan", (),
              ("Honda is a company from", "Sony was founded in"))]


def hf_teacher_forced(m, prompt, target):
    """(lm_head inputs, argmax tokens) at the positions that predict target's tokens, from a plain HF forward."""
    a = m.tokenizer(prompt)["input_ids"]
    b = m.tokenizer(target, add_special_tokens=False)["input_ids"]
    saved = {}
    h = m.hf.lm_head.register_forward_pre_hook(lambda mod, args: saved.__setitem__("h", args[0][0].detach()))
    try:
        with torch.no_grad():
            logits = m.hf(torch.tensor([a + b])).logits[0]
    finally:
        h.remove()
    pos = torch.arange(len(b)) + len(a) - 1
    return saved["h"][pos], logits[pos].argmax(-1)


def hand_locality(m, facts, before_tops):
    """(per fact: mean over its neighbourhood prompts of the fraction of target_true tokens whose teacher-forced
    argmax is the same as before, how many argmax tokens changed in all)."""
    out, changed = [], 0
    for f, olds in zip(facts, before_tops):
        now = [hf_teacher_forced(m, p, f.target_true)[1] for p in f.neighborhood]
        out.append(sum(float((a == b).float().mean()) for a, b in zip(now, olds)) / len(olds))
        changed += sum(int((a != b).sum()) for a, b in zip(now, olds))
    return torch.tensor(out, dtype=torch.float64), changed


def test_easyedit_locality_after_weight_edits(worded):
    """Locality after real weight edits: an unembedding edit that makes one token win at some (not all)
    neighbourhood positions drops it by exactly the fraction of changed argmax tokens; doubling the unembedding
    (every logit x 2, argmax unchanged) keeps it at 1."""
    from mechanic.steer.plan import Plan, WeightEdit

    m = worded
    measure = EditMeasure(LOCAL)
    before = measure.collect(m, None)
    assert before["locality"].tolist() == [1.0, 1.0]
    runs = [[hf_teacher_forced(m, p, f.target_true) for p in f.neighborhood] for f in LOCAL]
    before_tops = [[top for _, top in fact] for fact in runs]
    H = torch.cat([h for fact in runs for h, _ in fact])                 # [positions, d]
    tops = torch.cat([t for t in before_tops for t in t])
    assert len(tops) >= 20
    W = m.hf.lm_head.weight.detach().clone()
    logits = H @ W.T
    # token z (never the argmax): push its logit along u = mean hidden state; z wins where alpha * (h . u) > margin
    z = next(int(t) for t in logits.mean(0).argsort(descending=True) if not bool((tops == t).any()))
    u = H.mean(0)
    proj, margin = H @ u, logits.gather(1, tops[:, None])[:, 0] - logits[:, z]
    need = torch.where(proj > 0, margin / proj, torch.tensor(float("inf"))).sort().values
    k = len(need) // 2                                                    # about half the positions flip
    alpha = float((need[k - 1] + need[k]) / 2)
    flips_designed = int((proj * alpha > margin).sum())
    assert 0 < flips_designed < len(tops)
    edit = Plan(edits=[WeightEdit("lm_head.weight", (W[z] + alpha * u)[None].clone(), index=([z], None))],
                method="unembed_edit")
    with m.applied(edit):
        after = measure.collect(m, before)
        want, changed = hand_locality(m, LOCAL, before_tops)
    print(f"\nlocality after the unembedding edit: {after['locality'].tolist()} (by hand {want.tolist()}), "
          f"{changed} of {len(tops)} argmax tokens changed")
    assert changed == flips_designed                                  # the edit did what it was built to do
    assert (after["locality"] - want).abs().max().item() < 1e-12
    assert ((want > 0) & (want < 1)).all()                            # each drop is a real fraction, not 0 or 1
    ev = evaluate(m, edit, [measure], n_boot=200)
    row = ev.row("edit.locality")
    assert row["before"]["mean"] == 1.0 and abs(row["after"]["mean"] - want.mean().item()) < 1e-12
    assert abs(row["delta"]["mean"] - (want.mean().item() - 1.0)) < 1e-12
    # doubling every unembedding row doubles every logit exactly: the argmax, hence locality, cannot change
    double = Plan(edits=[WeightEdit("lm_head.weight", 2 * W)], method="unembed_x2")
    ids = torch.tensor([m.tokenizer("Lille is in the north of")["input_ids"]])
    with torch.no_grad():
        plain = m.hf(ids).logits
        with m.applied(double):
            same = measure.collect(m, before)
            assert torch.equal(m.hf(ids).logits, 2 * plain)               # a real edit: every logit doubled
    assert same["locality"].tolist() == [1.0, 1.0]
    assert (same["reliability"] == before["reliability"]).all()
    assert evaluate(m, double, [measure], n_boot=200).row("edit.locality")["after"]["mean"] == 1.0


def test_perplexity_and_kl_measures(worded):
    from mechanic.data.text import heldout
    from mechanic.data.windows import windows
    from mechanic.improve.perplexity import perplexity
    from mechanic.steer.ablate import ablate

    pm = PerplexityMeasure(max_tokens=256, seq_len=64)
    nll = pm.collect(worded, None)["nll"]
    ref = perplexity(worded, heldout(), seq_len=64, max_tokens=256)
    assert len(nll) == 4 and abs(nll.mean().item() - ref.nll) < 1e-5
    km = KLMeasure(max_tokens=128, seq_len=64)
    base = km.collect(worded, None)
    assert base["kl"].tolist() == [0.0, 0.0]
    plan = ablate(worded, ["L1.mlp_out"], "zero")
    with worded.applied(plan):
        after = km.collect(worded, base)["kl"]
    ids = torch.stack(windows(worded, heldout(), 64, 128))
    with torch.no_grad():
        p = torch.log_softmax(worded.hf(ids).logits.float(), -1)
        with worded.applied(plan):
            q = torch.log_softmax(worded.run(ids).logits.float(), -1)
    ref_kl = (p.exp() * (p - q)).sum(-1).mean(-1)
    assert (after - ref_kl).abs().max().item() < 1e-5 and after.min().item() > 0


# ---------------------------------------------------------------- evaluate
def small_measures(worded):
    return [TaskMeasure(load_task("facts", n=8)), EditMeasure(FACTS),
            PerplexityMeasure(max_tokens=256, seq_len=64), KLMeasure(max_tokens=128, seq_len=64),
            FluencyMeasure(["The weather", "Once upon a time"], max_new_tokens=8)]


def test_evaluate_without_plan_changes_nothing(worded):
    ev = evaluate(worded, None, small_measures(worded), n_boot=200)
    ids = [r["id"] for r in ev.rows]
    assert ids[:2] == ["facts.logit_diff", "facts.accuracy"]
    assert {"edit.efficacy", "edit.locality", "perplexity.nll", "perplexity.ppl", "kl.kl",
            "fluency.entropy"} <= set(ids)
    for r in ev.rows:
        assert r["before"] == r["after"] and r["delta"]["mean"] == 0 and r["p"] == 1.0, r["id"]
        assert set(r) == {"id", "measure", "metric", "kind", "better", "n", "before", "after", "delta", "p",
                          "bound", "mdc", "description"}
        assert r["bound"] == {"lo": 0.0, "hi": 0.0} and r["mdc"] == 0.0, r["id"]
    assert ev.row("edit.efficacy")["n"] == 3 and ev.row("edit.paraphrase")["n"] == 2
    assert "CounterFact (probability comparison)" in ev.row("edit.efficacy")["description"]
    assert "EasyEdit (token accuracy)" in ev.row("edit.reliability")["description"]
    assert [s["before"] == s["after"] for s in ev.samples] == [True, True]
    d = json.loads(json.dumps(ev.to_dict()))
    assert d["seed"] == 0 and d["n_boot"] == 200 and d["measures"]["fluency"]["max_new_tokens"] == 8
    assert [f["kind"] for f in ev.figures()] == ["bars", "bars", "samples"]


def test_evaluate_with_plans_measures_change_and_undoes(worded):
    from mechanic.steer.ablate import ablate
    from mechanic.steer.edit import neuron_edit

    weights = {k: v.clone() for k, v in worded.hf.state_dict().items()}
    hooks = ablate(worded, ["L1.mlp_out", "L2.head0"], "zero")
    edit = neuron_edit(worded, [f"L1.neuron{j}" for j in range(0, 96, 2)], 0.0)
    for plan in (hooks, edit):
        ev = evaluate(worded, plan, small_measures(worded), n_boot=200)
        assert ev.plan == plan.method
        nll, ppl = ev.row("perplexity.nll"), ev.row("perplexity.ppl")
        assert nll["after"]["mean"] != nll["before"]["mean"] and ev.row("kl.kl")["after"]["mean"] > 0
        assert ev.row("facts.logit_diff")["delta"]["mean"] != 0
        for when in ("before", "after"):
            assert max(abs(ppl[when][k] - math.exp(nll[when][k])) for k in ("mean", "lo", "hi")) < 1e-9
        assert ppl["p"] == nll["p"] and ppl["delta"]["lo"] <= ppl["delta"]["mean"] <= ppl["delta"]["hi"]
        assert worded.steering == [] and worded.hook_count() == 0
        assert all(torch.equal(v, weights[k]) for k, v in worded.hf.state_dict().items())
    t = ev.table()
    assert t.row_count == len(ev.rows)


def test_evaluate_rejects_bad_input(worded):
    m = TaskMeasure(load_task("facts", n=2))
    with pytest.raises(EvaluateError, match="unique"):
        evaluate(worded, None, [m, TaskMeasure(load_task("facts", n=3))])
    with pytest.raises(EvaluateError, match="a Plan, a Prompt"):
        evaluate(worded, [m], [m])
    with pytest.raises(EvaluateError, match="at least one measure"):
        evaluate(worded, None, [])
    with pytest.raises(EvaluateError, match="size"):
        default_side_effects(worded, size="medium")
    with pytest.raises(EvaluateError, match="Cannot exclude"):
        default_side_effects(worded, exclude=["facs"])
    names = [m.name for m in default_side_effects(worded, exclude=["facts", "fluency"])]
    assert names == ["perplexity", "kl", "ioi", "greater_than", "gender", "sentiment", "icl_labels"]
    # facts_large is never a default side effect, and excluding it (an editing recipe's task) excludes facts,
    # whose subjects it shares
    assert "facts_large" not in [m.name for m in default_side_effects(worded)]
    names = [m.name for m in default_side_effects(worded, exclude=["facts_large"])]
    assert "facts" not in names and "ioi" in names


# ---------------------------------------------------------------- real model
@pytest.mark.real
def test_rome_evaluation_on_smollm2(smollm2):
    from mechanic.steer.edit import facts_from_task, rome

    fact = next(f for f in facts_from_task(load_task("facts")) if not f.prompt.startswith(f.subject))
    plan = rome(smollm2, fact)
    assert plan.settings["subject_at_first_token"] is False
    weights = {k: v.clone() for k, v in smollm2.hf.state_dict().items()}
    ev = evaluate(smollm2, plan, [EditMeasure([fact]), *default_side_effects(smollm2, exclude=["facts"])])
    eff = ev.row("edit.efficacy")
    assert eff["after"]["mean"] > eff["before"]["mean"]
    assert ev.row("edit.reliability")["after"]["mean"] > ev.row("edit.reliability")["before"]["mean"]
    assert {r["kind"] for r in ev.rows} == {"target", "side"} and "facts.accuracy" not in [r["id"] for r in ev.rows]
    assert ev.row("kl.kl")["after"]["mean"] > 0
    assert all(torch.equal(v, weights[k]) for k, v in smollm2.hf.state_dict().items())


def test_prompt_baseline_prefixes_every_prompt_and_leaves_prose_alone(worded):
    from dataclasses import replace

    from mechanic.improve.evaluate import Prompt
    from mechanic.tasks.task import Task

    task = load_task("facts", n=6)
    prefix = "Answer with the true country. "
    ev = evaluate(worded, Prompt(prefix), [TaskMeasure(task), PerplexityMeasure(max_tokens=256, seq_len=64)],
                  n_boot=200)
    manual = Task(task.name, [replace(e, prompt=prefix + e.prompt, corrupted=prefix + e.corrupted)
                              for e in task.examples], task.metric)
    want = evaluate(worded, None, [TaskMeasure(manual)], n_boot=200).row("facts.logit_diff")["before"]["mean"]
    got = ev.row("facts.logit_diff")
    assert got["after"]["mean"] == pytest.approx(want, abs=1e-5)
    assert got["after"]["mean"] != pytest.approx(got["before"]["mean"], abs=1e-4)   # the prefix changes the logits
    assert ev.row("perplexity.nll")["delta"]["mean"] == 0.0 and ev.plan == "prompt"


@pytest.mark.real
def test_sentiment_accuracy_is_a_two_way_choice(smollm2):
    """SmolLM2's top token after a review is ' a', so top-1 accuracy on sentiment is 0 whatever a plan does (a
    protected row that cannot move); the suite reports whether the right label beats the wrong one instead."""
    from mechanic.tasks import metrics as M

    task = load_task("sentiment", split="validation").subset(24)
    m = TaskMeasure(task, kind="side")
    assert m.metrics == ["logit_diff", "pair_accuracy"]
    got = m.collect(smollm2, None)
    batch = task.tokenize(smollm2, align=True)
    logits = smollm2.run(batch.clean, last_only=True).logits[:, -1]
    assert float(M.accuracy(logits, batch).sum()) == 0          # the old row: dead
    naive = torch.tensor([float(logits[i, batch.answer[i]] > logits[i, batch.wrong[i]]) for i in range(batch.n)])
    assert torch.equal(got["pair_accuracy"], naive) and 0 < float(naive.mean()) <= 1
    assert TaskMeasure(load_task("ioi").subset(4)).metrics == ["logit_diff", "accuracy"]    # top-1 where it means something
