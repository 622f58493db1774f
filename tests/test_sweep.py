"""Layer x coefficient sweep: every cell equals a plain steered run; coefficient 0 is the baseline; real steering."""

import pytest
import torch

import mechanic
from mechanic.steer.sweep import sweep
from mechanic.steer.vectors import caa, pairs_from_task
from mechanic.tasks import Example, Task
from mechanic.testing.tiny import tiny_model

TEXT = ["It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity."] * 3


@pytest.fixture(scope="module")
def worded(word_tokenizer):
    return mechanic.load(tiny_model("llama", vocab_size=len(word_tokenizer)), tokenizer=word_tokenizer)


TASK = Task("t", [Example("I loved this film, it was", " great", " awful", "I hated this film, it was"),
                  Example("What a good day, so", " happy", " sad", "What a bad day, so")])


def test_cells_equal_plain_steered_runs(worded):
    m, task = worded, TASK
    v = caa(m, pairs_from_task(task), layers=[0, 1, 2])
    s = sweep(m, v, task, [1, 2], [0.0, 3.0], neutral=TEXT, neutral_tokens=64, seq_len=32)
    assert s.target.values.shape == (2, 2) and s.target.positions == ["0", "3"]
    assert torch.allclose(s.target.values[:, 0], torch.tensor(s.baseline["target"]))
    assert s.kl.values[:, 0].abs().max().item() < 1e-6 and (s.kl.values[:, 1] > 1e-4).all()
    # cell (L2, 3.0) by hand: a plain forward hook on layer 2's output
    b = task.tokenize(m)
    h = m.layers[2].register_forward_hook(lambda mod, a, out: (out[0] if isinstance(out, tuple) else out)
                                          + 3.0 * v.directions[2])
    try:
        with torch.no_grad():
            lg = m.hf(**b.clean).logits[:, -1]
    finally:
        h.remove()
    rows = torch.arange(b.n)
    ld = (lg[rows, b.answer] - lg[rows, b.wrong]).mean().item()
    assert abs(s.target.values[1, 1].item() - ld) < 1e-4


def hand_best(s, layers, coefs, max_kl, maximize=True):
    """The cells (layer, coefficient) with the largest (smallest) target among those with KL <= max_kl, from the
    sweep's own per-cell table; [] when no cell is under the bound."""
    t, kl = s.target.values.tolist(), s.kl.values.tolist()
    ok = [(i, j) for i in range(len(layers)) for j in range(len(coefs)) if kl[i][j] <= max_kl]
    if not ok:
        return []
    pick = max if maximize else min
    best = pick(t[i][j] for i, j in ok)
    return [(layers[i], coefs[j]) for i, j in ok if t[i][j] == best]


def test_best_is_the_strongest_cell_under_the_kl_bound(worded):
    """best(max_kl) against the selection rule applied by hand to every bound that separates the cells."""
    m, task = worded, TASK
    layers, coefs = [0, 1, 2], [0.0, -4.0, 2.0, 6.0]
    v = caa(m, pairs_from_task(task), layers=layers)
    s = sweep(m, v, task, layers, coefs, neutral=TEXT, neutral_tokens=64, seq_len=32)
    kl = sorted(set(s.kl.values.flatten().tolist()))
    assert len(kl) >= 6                                   # the cells differ in KL: the bound has work to do
    bounds = kl + [(a + b) / 2 for a, b in zip(kl, kl[1:])] + [kl[-1] + 1.0]
    chosen = {True: set(), False: set()}
    for bound in bounds:                                  # every KL value (KL <= bound is in), every gap between
        for maximize in (True, False):
            want = hand_best(s, layers, coefs, bound, maximize)
            got = s.best(max_kl=bound, maximize=maximize)
            # ties only between coefficient-0 cells (the same unsteered run); any of them is the same choice
            assert got in want and (len(want) == 1 or {c for _, c in want} == {0.0}), (bound, maximize, got, want)
            chosen[maximize].add(got)
    # the bound did exclude the unconstrained winner somewhere (if the max is unsteered, the min is steered)
    assert max(len(chosen[True]), len(chosen[False])) >= 2
    # no cell under the bound: the documented outcome is None (KL is >= 0, so a negative bound excludes all)
    assert s.best(max_kl=-1e-3) is None and s.best(max_kl=-1e-3, maximize=False) is None


@pytest.mark.real
def test_sentiment_sweep_on_smollm2(smollm2):
    from mechanic.tasks.builtin import load_task

    m = smollm2
    task = load_task("sentiment").subset(24)
    v = caa(m, pairs_from_task(task.subset(16)), layers=[6, 12])
    held = task.subset(8, start=16)
    s = sweep(m, v, held, [6, 12], [0.0, 4.0, 8.0], side="corrupted", neutral_tokens=256)
    print("\ntarget", s.target.values.tolist(), "kl", s.kl.values.tolist(), "ppl", s.ppl.values.tolist())
    assert (s.target.values[:, 2] > s.target.values[:, 0]).all()  # negative reviews pushed toward positive
    assert (s.kl.values[:, 2] > s.kl.values[:, 1]).all() and (s.kl.values[:, 1] > 0).all()
