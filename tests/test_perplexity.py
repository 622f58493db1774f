"""Shipped text and perplexity: the text is real, split disjointly; perplexity equals HF's labels= loss."""

from importlib import resources

import pytest
import torch

import mechanic
from mechanic.data import text
from mechanic.data.windows import TextError, batches, windows
from mechanic.model.perplexity import perplexity
from mechanic.model.interventions import zero
from mechanic.testing.tiny import tiny_model


def test_text_is_shipped_disjoint_and_deterministic():
    root = resources.files("mechanic.data")
    for name in text.FILES + ("SOURCES.md",):
        assert root.joinpath(name).is_file(), name
    cal, held = text.calibration(), text.heldout()
    assert cal == text.calibration() and held == text.heldout()
    assert not set(cal) & set(held)
    assert len(cal) + len(held) == len(text.passages())
    assert sum(map(len, cal)) > 200_000 and sum(map(len, held)) > 50_000
    joined = "\n".join(text.passages())
    assert "We the People of the United States" in joined
    assert "ABSURDITY, n. A statement or belief manifestly inconsistent with one's own opinion." in joined


def naive_nll(hf, wins) -> float:
    """Mean NLL over every predicted token, from HF's own labels= loss, one window at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in wins:
            loss = hf(input_ids=w[None], labels=w[None]).loss
            total += float(loss) * (w.numel() - 1)
            count += w.numel() - 1
    return total / count


def test_perplexity_equals_hf_labels_loss(tiny):
    ids = torch.randint(3, 101, (300,), generator=torch.Generator().manual_seed(0))
    r = perplexity(tiny, ids, seq_len=32, batch_size=4)
    wins = windows(tiny, ids, 32)
    assert [w.numel() for w in wins] == [32] * 9 + [12]  # a shorter tail window is kept
    assert r.tokens == 9 * 31 + 11 and r.windows == 10
    assert abs(r.nll - naive_nll(tiny.hf, wins)) < 1e-5
    assert abs(r.ppl - torch.tensor(r.nll).exp().item()) < 1e-6 * r.ppl


def test_perplexity_with_an_intervention_equals_a_plain_hook():
    m = mechanic.load(tiny_model("llama"))
    ids = torch.randint(3, 101, (130,), generator=torch.Generator().manual_seed(1))
    r = perplexity(m, ids, seq_len=64, interventions=[zero("L1.mlp_out")])
    h = m.layers[1].mlp.register_forward_hook(lambda mod, a, out: out * 0)
    try:
        ref = naive_nll(m.hf, windows(m, ids, 64))
    finally:
        h.remove()
    assert abs(r.nll - ref) < 1e-5
    assert abs(r.nll - perplexity(m, ids, seq_len=64).nll) > 1e-3


def test_max_tokens_and_bad_input():
    m = mechanic.load(tiny_model("llama"))
    ids = torch.arange(3, 100)
    assert perplexity(m, ids, seq_len=16, max_tokens=40).tokens == 15 + 15 + 7
    assert [b.shape for b in batches(windows(m, ids, 16, 40), 2)] == [(2, 16), (1, 8)]
    with pytest.raises(TextError, match="no tokenizer"):
        perplexity(m, ["some text"])
    with pytest.raises(TextError, match="seq_len"):
        perplexity(m, ids, seq_len=1)
    with pytest.raises(TextError, match="No text"):
        perplexity(m, [])


@pytest.mark.real
def test_smollm2_perplexity_on_heldout_text(smollm2):
    r = perplexity(smollm2, text.heldout(), seq_len=64, max_tokens=256)
    ref = naive_nll(smollm2.hf, windows(smollm2, text.heldout(), 64, 256))
    assert abs(r.nll - ref) < 1e-4
    assert r.tokens == 4 * 63
    assert 5 < r.ppl < 1000  # real English prose: far below the vocabulary size (49152)
