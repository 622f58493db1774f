"""CounterFact scores: target log-probabilities equal a one-prompt-at-a-time reference; ES/PS/NS counted right."""

import pytest
import torch

import mechanic
from conftest import ARCHS
from mechanic.improve.edit_metrics import counterfact, target_logprobs
from mechanic.steer.edit import Fact
from mechanic.testing.tiny import tiny_model


@pytest.fixture(scope="module")
def worded(word_tokenizer):
    """A tiny random qwen2 that reads words (a BPE tokenizer trained on shipped text; no SmolLM2 needed)."""
    return mechanic.load(tiny_model("qwen2", vocab_size=len(word_tokenizer)), tokenizer=word_tokenizer)


def naive(m, prompt, target):
    a = m.tokenizer(prompt)["input_ids"]
    b = m.tokenizer(target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(m.hf(torch.tensor([a + b])).logits[0].float(), -1)
    return sum(float(logp[len(a) - 1 + j, t]) for j, t in enumerate(b))


def test_target_logprobs_equal_one_at_a_time(worded):
    prompts = ["The capital of France is", "A", "Once upon a time there was a very long sentence that"]
    targets = [" Paris", " New York City", " ended"]
    got = target_logprobs(worded, prompts, targets, batch_size=2)
    ref = torch.tensor([naive(worded, p, t) for p, t in zip(prompts, targets)])
    assert (got - ref).abs().max().item() < 1e-4


def test_counterfact_counts(worded):
    f = Fact("Paris is in", "Paris", " Italy", " France", ("Paris lies in", "The city of Paris is in"),
             ("Lyon is in",))
    r = counterfact(worded, [f])
    lp = lambda p, t: naive(worded, p, t)  # noqa: E731
    assert r["es"] == float(lp(f.prompt, " Italy") > lp(f.prompt, " France"))
    assert r["ps"] == sum(lp(p, " Italy") > lp(p, " France") for p in f.paraphrases) / 2
    assert r["ns"] == float(lp("Lyon is in", " France") > lp("Lyon is in", " Italy"))
    assert r["n"] == {"es": 1, "ps": 2, "ns": 1}
    with pytest.raises(ValueError, match="target_true"):
        counterfact(worded, [Fact("Paris is in", "Paris", " Italy")])


@pytest.mark.parametrize("arch", ARCHS)
def test_run_keeps_the_last_k_logits(arch):
    """run(last_only=k) computes the unembedding at the last k positions only, equal to the full logits there
    (teacher_forced reads the targets at the end of left-padded rows this way)."""
    m = mechanic.load(tiny_model(arch))
    ids = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    full = m.run(ids).logits
    for k in (1, 3):
        got = m.run(ids, last_only=k).logits
        assert got.shape[1] == k
        assert (got - full[:, -k:]).abs().max().item() < 1e-5
