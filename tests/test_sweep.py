"""Layer x coefficient sweep: every cell equals a plain steered run; coefficient 0 is the baseline; real steering."""

import pytest
import torch
from transformers import AutoTokenizer

import mechanic
from mechanic.steer.sweep import sweep
from mechanic.steer.vectors import caa, pairs_from_task
from mechanic.tasks import Example, Task
from mechanic.testing.tiny import tiny_model

TEXT = ["It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity."] * 3


@pytest.fixture(scope="module")
def worded():
    from mechanic.model.load import resolve

    tok = AutoTokenizer.from_pretrained(str(resolve("smollm2")))
    return mechanic.load(tiny_model("llama", vocab_size=len(tok)), tokenizer=tok)


def test_cells_equal_plain_steered_runs(worded):
    m = worded
    task = Task("t", [Example("I loved this film, it was", " great", " awful", "I hated this film, it was"),
                      Example("What a wonderful day, so", " happy", " sad", "What a terrible day, so")])
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
    assert s.best(max_kl=1e9) in [(1, 0.0), (1, 3.0), (2, 0.0), (2, 3.0)]
    assert s.best(max_kl=-1.0) is None


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
