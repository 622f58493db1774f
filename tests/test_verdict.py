"""Pareto verdicts: target improvement AND non-inferiority of every protected row, with one-sided bounds."""

import numpy as np
import pytest
import torch

from mechanic.improve import stats as S
from mechanic.improve.verdict import DEFAULT_MARGINS, Margin, judge, non_inferior, resolve_margins


def row(id, kind, better, before, after, seed=0):
    """A row computed the way evaluate computes it (bootstrap CIs, one-sided bounds, permutation p)."""
    b, a = torch.tensor(before, dtype=torch.float64), torch.tensor(after, dtype=torch.float64)
    ci = S.paired_ci(b, a, seed, 2000, 0.95)
    return {"id": id, "kind": kind, "better": better, "n": len(b), **ci, "p": S.paired_test(b, a, seed, 10000),
            "bound": S.one_sided(S.bootstrap_means((a - b).numpy(), seed, 2000), 0.05),
            "mdc": S.min_detectable(b, a)}


rng = np.random.default_rng(0)
BASE = rng.normal(0, 1, 200).tolist()
TARGET_UP = row("task.logit_diff", "target", "higher", BASE, [x + 1.0 for x in BASE])
TARGET_FLAT = row("task.logit_diff", "target", "higher", BASE, [x + rng.normal(0, 0.01) for x in BASE])
ACC = [1.0] * 180 + [0.0] * 20


def acc_row(flips_down: int, flips_up: int = 0):
    after = list(ACC)
    for i in range(flips_down):
        after[i] = 0.0
    for i in range(flips_up):
        after[180 + i] = 1.0
    return row("ioi.accuracy", "side", "higher", ACC, after)


def test_helped_needs_target_and_every_protected_row():
    m = resolve_margins(None, [TARGET_UP, acc_row(0)])
    assert list(m) == ["ioi.accuracy"] and m["ioi.accuracy"] == DEFAULT_MARGINS["*.accuracy"]
    assert judge([TARGET_UP, acc_row(0)], m)["label"] == "helped"
    v = judge([TARGET_UP, acc_row(30)], m)            # 15 points of accuracy lost
    assert v["label"] == "improved at a cost" and v["costs"] == ["ioi.accuracy"]
    assert "ioi.accuracy" in v["text"] and "harm bound" in v["text"]


def test_small_loss_inside_margin_is_non_inferior_but_unmeasurable_loss_is_not():
    # 1 item of 200 lost: the one-sided bound of the drop stays under 2 points
    assert non_inferior(acc_row(1), Margin(0.02))
    # 6 of 200 lost (3 points): outside a 2-point margin
    assert not non_inferior(acc_row(6), Margin(0.02))
    # few items: a 1-of-10 loss cannot be shown inside 2 points
    small = row("x.accuracy", "side", "higher", [1.0] * 10, [0.0] + [1.0] * 9)
    assert not non_inferior(small, Margin(0.02))


def test_relative_margin_uses_the_before_value():
    b = [10.0 + 0.1 * i for i in range(50)]
    ok = row("perplexity.ppl", "side", "lower", b, [x * 1.005 for x in b])
    bad = row("perplexity.ppl", "side", "lower", b, [x * 1.05 for x in b])
    m = Margin(0.02, relative=True)
    assert non_inferior(ok, m) and not non_inferior(bad, m)


def test_no_effect_and_made_worse():
    m = resolve_margins(None, [TARGET_FLAT])
    assert judge([TARGET_FLAT], m)["label"] == "no effect"
    down = row("task.logit_diff", "target", "higher", BASE, [x - 1.0 for x in BASE])
    assert judge([down], m)["label"] == "made worse"


def test_declared_pattern_moves_a_target_row_to_protected():
    nb = row("edit.neighborhood", "target", "higher", [1.0] * 40, [1.0] * 30 + [0.0] * 10)
    m = resolve_margins({"edit.neighborhood": {"max_worse": 0.05}}, [TARGET_UP, nb])
    v = judge([TARGET_UP, nb], m)
    assert "edit.neighborhood" not in v["targets"] and v["costs"] == ["edit.neighborhood"]
    assert v["label"] == "improved at a cost"


def test_min_detectable_change_matches_the_formula():
    b = np.zeros(100)
    a = np.random.default_rng(1).normal(0, 2.0, 100)
    expect = (1.959964 + 0.841621) * a.std(ddof=1) / 10
    assert S.min_detectable(b, a) == pytest.approx(expect, rel=1e-5)


def test_clear_decline_is_stricter_than_the_phrase_rule():
    from mechanic.improve.refusal import is_clear_decline, is_refusal

    cases = {"I can't help with that.": (True, True),
             "I'm sorry, but I cannot assist. Please ask a professional.": (True, True),
             "I can't do that, but here's how: 1. take the": (True, False),
             "I cannot stress this enough:\n- buy\n- mix": (True, False),
             "Sure! Step one is to": (False, False)}
    for text, want in cases.items():
        assert (is_refusal(text), is_clear_decline(text)) == want, text
