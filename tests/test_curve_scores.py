"""Curve scores of sequential editing: every score and CI equals a plain-loop recomputation on a tiny model."""

import math
from dataclasses import replace

import pytest
import torch

import mechanic
from mechanic.improve.edit_metrics import counterfact, curve_scores, edited_apart
from mechanic.improve.evaluate import EditMeasure
from mechanic.improve.fluency import fluency
from mechanic.improve.stats import bootstrap_ci
from mechanic.steer.edit import Fact
from mechanic.steer.plan import Plan, WeightEdit
from mechanic.testing.tiny import tiny_model

PROSE = ["The river ran past the old mill and the children played on the bank until the sun went down. " * 6]
OPENINGS = ["The weather this morning", "A small boat"]
FACTS = [Fact("Paris is in", "Paris", " Italy", " France", ("Paris lies in", "The city of Paris is in"),
              ("Lyon is in", "Nice is in")),
         Fact("Rome is the capital of", "Rome", " Spain", " Italy", ("Rome lies in",), ("Milan is in",)),
         Fact("Tokyo is in", "Tokyo", " Chile", " Japan", (), ("Osaka is in", "Kyoto is a city in"))]


@pytest.fixture(scope="module")
def worded(word_tokenizer):
    return mechanic.load(tiny_model("qwen2", vocab_size=len(word_tokenizer)), tokenizer=word_tokenizer)


def ids(m, text, special=True):
    return m.tokenizer(text, add_special_tokens=special)["input_ids"]


def forward(m, row):
    with torch.no_grad():
        return torch.log_softmax(m.hf(torch.tensor([row])).logits[0].float(), -1)


def logprob_and_tops(m, prompt, target):
    a, b = ids(m, prompt), ids(m, target, False)
    logp = forward(m, a + b)
    lp = sum(float(logp[len(a) - 1 + j, t]) for j, t in enumerate(b))
    return lp, [int(logp[len(a) - 1 + j].argmax()) for j in range(len(b))]


def greedy(m, prompt, n):
    row, eos = ids(m, prompt), m.hf.generation_config.eos_token_id
    out = []
    for _ in range(n):
        t = int(forward(m, row + out)[-1].argmax())
        if t == eos:
            break
        out.append(t)
    return m.tokenizer.decode(out, skip_special_tokens=True)


def naive(m, facts, before_tops, windows):
    """Per-fact ES/PS/NS, locality against `before_tops`, fluency per opening and NLL per window, in plain loops."""
    es, ps, ns, loc, tops = [], [], [], [], []
    for i, f in enumerate(facts):
        def win(p, want_new):
            new, true = logprob_and_tops(m, p, f.target_new)[0], logprob_and_tops(m, p, f.target_true)[0]
            return float(new > true) if want_new else float(true > new)
        es.append(win(f.prompt, True))
        ps.append(sum(win(p, True) for p in f.paraphrases) / len(f.paraphrases) if f.paraphrases else None)
        ns.append(sum(win(p, False) for p in f.neighborhood) / len(f.neighborhood))
        t = [logprob_and_tops(m, p, f.target_true)[1] for p in f.neighborhood]
        tops.append(t)
        if before_tops is not None:
            loc.append(sum(sum(a == b for a, b in zip(x, y)) / len(x) for x, y in zip(t, before_tops[i])) / len(t))
    flu = [fluency(greedy(m, p, 12)) for p in OPENINGS]
    nll = []
    for w in windows:
        logp = forward(m, w.tolist())
        nll.append(-sum(float(logp[j, int(w[j + 1])]) for j in range(len(w) - 1)) / (len(w) - 1))
    return {"es": es, "ps": ps, "ns": ns, "locality": loc, "fluency": flu, "nll": nll}, tops


def check(got, ref):
    for k in ("es", "ps", "ns", "locality", "fluency"):
        xs = [x for x in ref[k] if x is not None]
        ci = bootstrap_ci(xs, 0, 300)
        assert got["values"][k] == pytest.approx(ref[k], abs=1e-9) if k != "fluency" else True, k
        assert abs(got[k] - sum(xs) / len(xs)) < 1e-6, k
        assert max(abs(got["ci"][k][0] - ci["lo"]), abs(got["ci"][k][1] - ci["hi"])) < 1e-6, k
    assert max(abs(a - b) for a, b in zip(got["values"]["fluency"], ref["fluency"])) < 1e-9
    assert max(abs(a - b) for a, b in zip(got["values"]["nll"], ref["nll"])) < 1e-4
    ci = bootstrap_ci(ref["nll"], 0, 300)
    assert abs(got["ppl"] - math.exp(sum(ref["nll"]) / len(ref["nll"]))) < 1e-3 * got["ppl"]
    assert abs(got["ci"]["ppl"][0] - math.exp(ci["lo"])) < 1e-3 * got["ppl"]


def test_curve_scores_equal_plain_loops(worded):
    scores = curve_scores(worded, FACTS, prose=PROSE, fluency_prompts=OPENINGS, windows=3, seq_len=16,
                          new_tokens=12, n_boot=300, values=True)
    assert len(scores.windows) == 3
    ref, tops0 = naive(worded, FACTS, None, scores.windows)
    ref["locality"] = [1.0] * len(FACTS)
    check(scores.before, ref)
    assert scores.before["n"] == {"es": 3, "ps": 2, "ns": 3, "locality": 3, "fluency": 2, "ppl": 3}

    name = "model.layers.1.mlp.down_proj.weight"
    w = dict(worded.hf.named_parameters())[name].detach()
    edit = Plan(edits=[WeightEdit(name, w + 0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))])
    with worded.applied(edit):
        got = scores(worded, 0, FACTS[:2])
        ref, _ = naive(worded, FACTS[:2], tops0, scores.windows)
    check(got, ref)
    assert got["locality"] < 1.0          # the perturbation moved some argmax tokens: locality is not trivially 1
    assert got["n"]["es"] == 2 and set(got) >= {"es", "ps", "ns", "locality", "fluency", "ppl", "score", "ci"}


def test_curve_scores_refuse_unknown_facts(worded):
    scores = curve_scores(worded, FACTS[:1], prose=PROSE, fluency_prompts=OPENINGS[:1], windows=1, seq_len=16,
                          new_tokens=4, n_boot=100)
    with pytest.raises(ValueError, match="set up for other facts"):
        scores(worded, 0, FACTS[1:2])
    with pytest.raises(ValueError, match="target_true"):
        curve_scores(worded, [Fact("Paris is in", "Paris", " Italy")], prose=PROSE, seq_len=16)


def test_neighbours_naming_an_edited_subject_are_left_out(worded):
    """A neighbourhood prompt about a subject the same run edits is meant to change: the curve, EditMeasure and
    counterfact all score neighbourhood and locality on the other prompts only (whole words: "Romeo" stays)."""
    facts = [replace(FACTS[0], neighborhood=("Lyon is in", "Rome is in", "Romeo lives in")), FACTS[1]]
    kept = edited_apart(facts)
    assert kept[0].neighborhood == ("Lyon is in", "Romeo lives in") and kept[1] == FACTS[1]
    assert edited_apart(facts, edited=[]) == facts and edited_apart(facts, edited=["Lyon"])[0].neighborhood == \
        ("Rome is in", "Romeo lives in")
    scores = curve_scores(worded, facts, prose=PROSE, fluency_prompts=OPENINGS[:1], windows=1, seq_len=16,
                          new_tokens=4, n_boot=100, values=True)
    ref, _ = naive(worded, kept, None, scores.windows)
    assert scores.before["values"]["ns"] == pytest.approx(ref["ns"], abs=1e-9)
    assert scores(worded, 0, facts[:1])["values"]["ns"] == pytest.approx(ref["ns"][:1], abs=1e-9)
    measure = EditMeasure(facts)
    assert measure.settings()["left_out"]["prompts"] == ["Rome is in"]
    assert measure.prefixed("Q: ").settings()["left_out"]["prompts"] == ["Q: Rome is in"]
    got = measure.collect(worded, None)
    assert got["neighborhood"].tolist() == pytest.approx(ref["ns"], abs=1e-9)
    r = counterfact(worded, facts)
    assert r["n"]["ns"] == 3 and r["ns"] == pytest.approx((ref["ns"][0] * 2 + ref["ns"][1]) / 3, abs=1e-9)
