"""Weight editing: ROME's update has the rank-one algebra of the paper, neuron edits equal hooks, statistics equal
a plain sum and are cached; on SmolLM2 an edit makes the new target win and leaves neighbours alone."""

import pytest
import torch

import mechanic
from mechanic.model.interventions import scale
from mechanic.steer.edit import Fact, _batch, _fact_rows, facts_from_task, memit, neuron_edit, rome
from mechanic.steer.plan import PlanError
from mechanic.steer.stats import second_moments
from mechanic.testing.tiny import left_padded, tiny_model

FACT = Fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Rome", " Paris",
            ("The Eiffel Tower stands in",), ("The Colosseum is located in the city of",))


@pytest.fixture(scope="module")
def tokenizer(word_tokenizer):
    """A BPE tokenizer trained on shipped text (conftest): real words without SmolLM2."""
    return word_tokenizer


def worded(arch, tokenizer):
    """A tiny random model that reads words."""
    return mechanic.load(tiny_model(arch, vocab_size=len(tokenizer)), tokenizer=tokenizer)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rome_update_is_the_rank_one_solution(arch, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("MECHANIC_CACHE", str(tmp_path))
    m = worded(arch, tokenizer)
    prefixes = ["", "I think so. ", "The weather was fine. "]
    W0 = m.arch.down_weight(m.layer_module(1, m.arch.down_proj)).detach().clone().double()
    plan = rome(m, FACT, layer=1, prefixes=prefixes, steps=5, stats_tokens=2000)
    assert plan.settings["subject_at_first_token"] is False
    texts, ends = _fact_rows(m, FACT, prefixes)
    inputs, last, _ = _batch(m, texts[:3], ends[:3])
    k = m.run(inputs, cache=["L1.neuron"])["L1.neuron"][torch.arange(3), last].mean(0).double()
    C = second_moments(m, [1], max_tokens=2000)[1][0].double()
    delta = torch.tensor(plan.settings["delta"], dtype=torch.float64)
    with m.applied(plan):
        W1 = m.arch.down_weight(m.layer_module(1, m.arch.down_proj)).detach().double()
    assert (W1 @ k - (W0 @ k + delta)).abs().max().item() < 1e-3 * max(1.0, delta.abs().max().item())
    assert torch.linalg.matrix_rank(W1 - W0, rtol=1e-5).item() == 1
    x = torch.randn(k.numel(), dtype=torch.float64)
    ck = torch.linalg.solve(C, k)
    x = x - (x @ ck) / (ck @ ck) * ck  # orthogonal to u: the edit must not see it
    assert ((W1 - W0) @ x).abs().max().item() < 1e-4 * (W1 - W0).abs().max().item() * x.norm().item()
    assert torch.equal(m.arch.down_weight(m.layer_module(1, m.arch.down_proj)).detach().double(), W0)  # undone


def test_second_moments_equal_plain_sum_and_are_cached(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("MECHANIC_CACHE", str(tmp_path))
    m = worded("llama", tokenizer)
    text = ["It was the best of times, it was the worst of times, it was the age of wisdom."] * 4
    got, count = second_moments(m, [0, 2], text, seq_len=16)[2]
    ids = m.tokenizer("\n\n".join(text), add_special_tokens=False)["input_ids"]
    ks = []
    for i in range(0, len(ids), 16):
        chunk = ids[i:i + 16]
        if len(chunk) >= 2:
            ks.append(m.run(torch.tensor([chunk]), cache=["L2.neuron"])["L2.neuron"][0].double())
    K = torch.cat(ks)
    assert count == K.shape[0]
    assert (got.double() - K.T @ K / count).abs().max().item() < 1e-5
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2
    again, _ = second_moments(m, [2], text, seq_len=16)[2]
    assert torch.equal(again, got)
    from safetensors.torch import save_file                 # fresh=True ignores a cached entry and rewrites it
    path = next(q for q in tmp_path.rglob("*.safetensors") if q.name.startswith("L2."))
    save_file({"moment": torch.zeros_like(got), "count": torch.tensor(count)}, str(path))
    assert torch.equal(second_moments(m, [2], text, seq_len=16)[2][0], torch.zeros_like(got))
    assert torch.equal(second_moments(m, [2], text, seq_len=16, fresh=True)[2][0], got)
    assert torch.equal(second_moments(m, [2], text, seq_len=16)[2][0], got)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "gpt_neox"])
def test_neuron_edit_equals_scaling_the_activation(arch):
    m = mechanic.load(tiny_model(arch))
    x = m.inputs(left_padded([5, 3], seed=1))
    plan = neuron_edit(m, ["L1.neuron3", "L1.neuron7", "L0.neuron2"], factor=0.25)
    ref = m.run(x, interventions=[scale("L1.neuron3", 0.25), scale("L1.neuron7", 0.25),
                                  scale("L0.neuron2", 0.25)]).logits
    with m.applied(plan):
        got = m.run(x).logits
    assert (got - ref).abs().max().item() < 1e-5
    with pytest.raises(PlanError, match="single FFN neurons"):
        neuron_edit(m, ["L1.head0"])


def test_edit_errors(tokenizer):
    with pytest.raises(PlanError, match="does not occur"):
        Fact("Paris is in", "London", " France")
    m = mechanic.load(tiny_model("mixtral", vocab_size=len(tokenizer)), tokenizer=tokenizer)
    with pytest.raises(PlanError, match="mixture of experts"):
        rome(m, FACT, layer=0, prefixes=[""])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rome_prompt_key_holds_the_update_at_both_keys(arch, tokenizer, tmp_path, monkeypatch):
    """prompt_key: W' k = W k + delta at the averaged key and at the bare prompt's own key, still a rank-one
    update (both keys get the same delta); without it the bare prompt's key gets another share of delta."""
    monkeypatch.setenv("MECHANIC_CACHE", str(tmp_path))
    m = worded(arch, tokenizer)
    prefixes = ["", "I think so. ", "The weather was fine. "]
    W0 = m.arch.down_weight(m.layer_module(1, m.arch.down_proj)).detach().clone().double()
    plan = rome(m, FACT, layer=1, prefixes=prefixes, steps=5, stats_tokens=2000, prompt_key=True)
    assert plan.settings["prompt_key"] is True
    texts, ends = _fact_rows(m, FACT, prefixes)
    inputs, last, _ = _batch(m, texts[:3], ends[:3])
    keys = m.run(inputs, cache=["L1.neuron"])["L1.neuron"][torch.arange(3), last].double()
    delta = torch.tensor(plan.settings["delta"], dtype=torch.float64)
    with m.applied(plan):
        W1 = m.arch.down_weight(m.layer_module(1, m.arch.down_proj)).detach().double()
    tol = 1e-3 * delta.abs().max().item()
    for k in (keys.mean(0), keys[0]):
        assert (W1 @ k - (W0 @ k + delta)).abs().max().item() < tol
    assert torch.linalg.matrix_rank(W1 - W0, rtol=1e-5).item() == 1
    one = rome(m, FACT, layer=1, prefixes=prefixes, steps=5, stats_tokens=2000)
    assert one.settings["prompt_key"] is False
    with m.applied(one):
        W2 = m.arch.down_weight(m.layer_module(1, m.arch.down_proj)).detach().double()
    assert ((W2 - W0) @ keys[0] - delta).abs().max().item() > 20 * tol    # the papers' key alone misses it
    with pytest.raises(PlanError, match="prompt_key"):
        rome(m, FACT, layer=1, prefixes=["I think so. ", ""], steps=1, stats_tokens=2000, prompt_key=True)


def test_memit_prompt_key_adds_a_column_per_fact(tokenizer, tmp_path, monkeypatch):
    """MEMIT / AlphaEdit with prompt_key solve for two keys per fact (averaged, bare prompt): the bare prompt's
    output at the last edited layer moves further toward its target than with the averaged key alone."""
    from mechanic.steer.edit import memit_targets, memit_update, spread

    monkeypatch.setenv("MECHANIC_CACHE", str(tmp_path))
    m = worded("llama", tokenizer)
    prefixes = ["", "I think so. ", "The weather was fine. "]
    facts = [FACT, Fact("The Colosseum is located in the city of", "The Colosseum", " Paris", " Rome")]
    C = {L: second_moments(m, [L], max_tokens=2000)[L] for L in (0, 1)}
    opt = dict(steps=5, lr=0.5, kl_factor=0.0625, weight_decay=0.5, clamp=4.0)
    rows, Z, _ = memit_targets(m, facts, 1, prefixes, prompt_key=True, **opt)
    assert Z.shape[1] == 4
    gaps = {}
    for two in (False, True):
        def solve(L, K, R):
            assert K.shape[1] == (4 if two else 2)
            return memit_update(C[L][0], K, R, 10.0)
        cols = Z if two else Z[:, ::2]
        edits, keys = spread(m, rows, cols, [0, 1], solve, "test")
        plan = mechanic.steer.plan.Plan(edits=edits)
        with m.applied(plan):
            h = torch.stack([m.run(inp, cache=["L1.resid_post"])["L1.resid_post"][0, last[0]] for inp, last in rows], 1)
        gaps[two] = float((h.double() - Z[:, 1::2]).norm())
    assert gaps[True] < gaps[False]


def _logprob(m, prompt, target):
    lg = m.run(prompt, last_only=True).logits[0, -1]
    return float(torch.log_softmax(lg, -1)[m.tokenizer(target, add_special_tokens=False)["input_ids"][0]])


@pytest.mark.real
def test_rome_and_memit_on_smollm2(smollm2):
    from mechanic.tasks.builtin import load_task

    from mechanic.locate.trace import subject_positions

    m = smollm2
    # subjects past the first token: SmolLM2's first token is an attention sink with an atypical key
    facts = [f for f in facts_from_task(load_task("facts")) if subject_positions(m, f.prompt, f.subject)[-1] > 0]
    fact = facts[2]  # Toulouse -> Germany
    plan = rome(m, fact, stats_tokens=8192)
    before = {p: m.run(p, last_only=True).logits[0, -1].argmax().item() for p in fact.neighborhood}
    with m.applied(plan):
        new, true = _logprob(m, fact.prompt, fact.target_new), _logprob(m, fact.prompt, fact.target_true)
        para = [_logprob(m, p, fact.target_new) > _logprob(m, p, fact.target_true) for p in fact.paraphrases]
        after = {p: m.run(p, last_only=True).logits[0, -1].argmax().item() for p in fact.neighborhood}
    print(f"\nROME layer {plan.settings['layer']}: log p(new) {new:.2f} vs log p(true) {true:.2f}; paraphrases "
          f"{sum(para)}/{len(para)}; neighbourhood top-1 kept {sum(before[p] == after[p] for p in before)}/"
          f"{len(before)}; losses {[round(x, 2) for x in plan.settings['losses']]}")
    assert new > true
    assert sum(before[p] == after[p] for p in before) >= len(before) - 1
    batch = [facts[i] for i in (0, 10, 25)]
    mp = memit(m, batch, layers=[1, 2, 3, 4, 5], stats_tokens=8192)
    with m.applied(mp):
        wins = [_logprob(m, f.prompt, f.target_new) > _logprob(m, f.prompt, f.target_true) for f in batch]
    print(f"MEMIT layers {mp.settings['layers']}: efficacy {sum(wins)}/{len(wins)}")
    assert sum(wins) >= 2
