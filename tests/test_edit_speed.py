"""The fast target optimisation of ROME / MEMIT / AlphaEdit (facts batched, only the columns and layers a delta can
change recomputed, logits at the target positions only) equals the plain loop it replaced: one fact at a time, a
full forward and backward per step."""

import pytest
import torch

import mechanic
from mechanic.model.interventions import add
from mechanic.steer import edit
from mechanic.steer.edit import Fact, _batch, _fact_rows, _target_ids
from mechanic.testing.tiny import tiny_model

FACTS = [
    Fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Rome", " Paris"),
    Fact("The river Thames flows through the city of", "The river Thames", " Berlin", " London"),
    Fact("In the morning the old castle was built by the king of", "the old castle", " Spain", " France"),
]
PREFIXES = ["", "I think so. ", "The weather was fine and the long day was over. "]
OPT = dict(steps=6, lr=0.5, kl_factor=0.0625, weight_decay=0.5, clamp=4.0)


def naive(model, fact, prefixes, site, scale_ref, *, steps, lr, kl_factor, weight_decay, clamp, stop=5e-2):
    """The previous implementation (mechanic 2026-11-30): one fact, the whole model forward and backward per step."""
    texts, ends = _fact_rows(model, fact, prefixes)
    target = _target_ids(model, fact.target_new)
    n = len(prefixes)
    inputs, last, reads = _batch(model, texts, ends, [target] * n + [[]])
    ess_pos = int(inputs["attention_mask"].shape[1] - 1)
    with torch.no_grad():
        base = torch.log_softmax(model.run(inputs).logits[n, ess_pos].float(), -1)
    pos_idx = torch.tensor([p for rd in reads[:n] for p, _ in rd])
    row_idx = torch.tensor([i for i, rd in enumerate(reads[:n]) for _ in rd])
    tok_idx = torch.tensor([t for rd in reads[:n] for _, t in rd])
    delta = torch.zeros(model.dims.d_model, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    losses, nlls = [], []
    limit = clamp * scale_ref
    for _ in range(steps):
        opt.zero_grad()
        parts = {}

        def loss_fn(logits):
            logp = torch.log_softmax(logits.float(), -1)
            nll = -logp[row_idx, pos_idx, tok_idx].mean()
            kl = torch.sum(base.exp() * (base - logp[n, ess_pos]))
            wd = weight_decay * delta.norm() / scale_ref ** 2
            parts["nll"] = float(nll.detach())
            return nll + kl_factor * kl + wd
        run = model.run(inputs, interventions=[add(site, delta, pos=last)], grad=loss_fn)
        losses.append(run.metric)
        nlls.append(parts["nll"])
        if parts["nll"] < stop:
            break
        opt.step()
        with torch.no_grad():
            if delta.norm() > limit:
                delta.mul_(limit / delta.norm())
    return delta.detach(), losses, nlls


@pytest.fixture(scope="module")
def model(word_tokenizer):
    return mechanic.load(tiny_model("llama", vocab_size=len(word_tokenizer)), tokenizer=word_tokenizer)


@pytest.mark.parametrize("site", ["L1.mlp_out", "L0.resid_post", "L0.mlp_out"])  # (the last layer: no gradient)
def test_batched_optimisation_equals_one_fact_at_a_time(model, site):
    refs = [3.0, 1.5, 0.7]    # clamp radius 0.7 x 4 binds on the third fact: the clamp is compared too
    got, curves = edit._optimise(model, FACTS, PREFIXES, site, refs, **OPT)
    worst = 0.0
    for f, r, d, c in zip(FACTS, refs, got, curves):
        want, losses, _ = naive(model, f, PREFIXES, site, r, **OPT)
        assert len(c) == len(losses) == OPT["steps"]
        worst = max(worst, (d - want).abs().max().item(), max(abs(a - b) for a, b in zip(c, losses)))
        assert d.norm() > 0
    print(f"\n{site}: max abs diff (deltas, losses) {worst:.2e}")
    assert worst < 1e-4


def test_a_fact_that_reaches_its_target_stops_alone(model, monkeypatch):
    """Early stopping per fact: with a threshold one fact reaches and the others do not, every fact's steps and
    delta equal its own plain run's (the stopped fact's delta stays put while the others move on)."""
    lows = sorted(min(naive(model, f, PREFIXES, "L1.mlp_out", 3.0, **OPT)[2]) for f in FACTS)
    stop = (lows[0] + lows[1]) / 2       # the fact with the lowest NLL reaches it, the others never do
    monkeypatch.setattr(edit, "STOP_NLL", stop)
    got, curves = edit._optimise(model, FACTS, PREFIXES, "L1.mlp_out", [3.0] * 3, **OPT)
    worst = 0.0
    for f, d, c in zip(FACTS, got, curves):
        want, losses, _ = naive(model, f, PREFIXES, "L1.mlp_out", 3.0, **OPT, stop=stop)
        assert len(c) == len(losses)
        worst = max(worst, (d - want).abs().max().item())
    assert sorted(len(c) for c in curves)[1:] == [OPT["steps"]] * 2 and min(len(c) for c in curves) < OPT["steps"]
    print(f"\nsteps per fact with a stop at NLL {stop:.3g}: {[len(c) for c in curves]}; max abs diff {worst:.2e}")
    assert worst < 1e-4
