"""Conditional steering: the gate adds the vector to the right rows, persists while generating, saves, calibrates."""

import pytest
import torch

import mechanic
from mechanic.model.interventions import add, apply_fn
from mechanic.steer.conditional import best_threshold, calibrate_threshold, conditional_vector, gate_scores
from mechanic.steer.fns import FNS, Conditional
from mechanic.steer.plan import Plan, PlanError
from mechanic.testing.tiny import left_padded, tiny_model

L = 1
GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def model():
    return mechanic.load(tiny_model("llama"))


@pytest.fixture(scope="module")
def setup(model):
    """Six left-padded prompts, a steering vector, a condition direction and a threshold that gates half of them."""
    g = torch.Generator().manual_seed(3)
    d = model.dims.d_model
    vector, condition = 4.0 * torch.randn(d, generator=g), torch.randn(d, generator=g)
    batch = left_padded([5, 3, 7, 7, 4, 6], seed=11)
    scores = gate_scores(model, batch, condition, L)
    s = scores.sort().values
    threshold = float((s[2] + s[3]) / 2)
    gate = scores > threshold
    assert int(gate.sum()) == 3
    return batch, vector, condition, threshold, gate


def test_gated_rows_equal_add_and_others_equal_unsteered(model, setup):
    batch, vector, condition, threshold, gate = setup
    plan = conditional_vector(model, vector, condition, L, 1.5, threshold=threshold)
    with model.applied(plan):
        ours = model.run(batch).logits
    steered = model.run(batch, interventions=[add(f"L{L}.resid_post", vector, 1.5)]).logits
    plain = model.run(batch).logits
    assert (ours[gate] - steered[gate]).abs().max() <= 1e-6
    assert (ours[~gate] - plain[~gate]).abs().max() <= 1e-6
    assert (steered[~gate] - plain[~gate]).abs().max() > 1e-3  # the vector matters, so the gate is what keeps it off
    fn = plan.interventions[0].value
    assert torch.equal(fn.gate, gate) and torch.allclose(fn.scores, gate_scores(model, batch, condition, L))


def test_gate_persists_across_cached_generation_steps(model, setup):
    batch, vector, condition, threshold, gate = setup
    plan = conditional_vector(model, vector, condition, L, 1.5, threshold=threshold)
    with model.applied(plan):
        ours = model.generate(batch, **GEN)
    steered = model.generate(batch, interventions=[add(f"L{L}.resid_post", vector, 1.5)], **GEN)
    plain = model.generate(batch, **GEN)
    assert torch.equal(ours[gate], steered[gate]) and torch.equal(ours[~gate], plain[~gate])

    class Recompute(Conditional):  # a gate re-decided on every call, from the newest token
        def __call__(self, x):
            self.gate = None
            return super().__call__(x)
    wrong = model.generate(batch, interventions=[apply_fn(f"L{L}.resid_post",
                                                          Recompute(vector, 1.5, condition, threshold))], **GEN)
    assert not torch.equal(wrong, ours)  # so the comparison above can tell a persistent gate from a per-step one


def test_next_prompt_pass_redecides_the_gate(model, setup):
    batch, vector, condition, threshold, gate = setup
    fn = Conditional(vector, 1.0, condition, threshold)
    d = model.dims.d_model
    x = torch.randn(2, 4, d)
    x[0, -1], x[1, -1] = 5 * fn.condition + threshold * fn.condition, -5 * fn.condition
    out = fn(x)
    assert fn.gate.tolist() == [True, False]
    assert torch.equal(out[0], x[0] + vector) and torch.equal(out[1], x[1])
    step = torch.stack([-5 * fn.condition, 9 * fn.condition])[:, None]  # one-token step: the gate is kept
    assert torch.equal(fn(step), step + torch.stack([vector, torch.zeros(d)])[:, None]) and fn.gate.tolist() == [True, False]
    again = torch.flip(x, [0])  # a new prompt pass: decided afresh
    fn(again)
    assert fn.gate.tolist() == [False, True]


def test_plan_save_load_round_trips(model, setup, tmp_path):
    batch, vector, condition, threshold, gate = setup
    plan = conditional_vector(model, vector, condition, L, -2.0, threshold=threshold, score="cosine")
    back = Plan.load(plan.save(tmp_path / "cond.plan"))
    a, b = plan.interventions[0].value, back.interventions[0].value
    assert isinstance(b, Conditional) and FNS["conditional"] is Conditional
    assert (b.coef, b.threshold, b.score) == (-2.0, threshold, "cosine")
    assert torch.equal(a.vector, b.vector) and torch.equal(a.condition, b.condition)
    assert back.settings == plan.settings and back.method == "conditional"
    with model.applied(plan):
        x = model.generate(batch, **GEN)
    with model.applied(back):
        y = model.generate(batch, **GEN)
    assert torch.equal(x, y)


def _balanced(th, pos, neg):
    return float(((pos > th).double().mean() + (neg <= th).double().mean()) / 2)


@pytest.mark.parametrize("seed", range(6))
def test_best_threshold_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(9, generator=g).mul(2).round() / 2 + 0.7   # rounded: ties and shared values
    neg = torch.randn(11, generator=g).mul(2).round() / 2
    th, bal = best_threshold(pos, neg)
    grid = torch.linspace(float(torch.cat([pos, neg]).min()) - 1, float(torch.cat([pos, neg]).max()) + 1, 4001)
    brute = max(_balanced(float(t), pos, neg) for t in grid)
    assert bal == pytest.approx(brute) and _balanced(th, pos, neg) == pytest.approx(bal)
    vals = torch.cat([pos, neg]).double()
    below, above = vals[vals < th], vals[vals > th]
    assert not (vals == th).any()
    if len(below) and len(above):  # a midpoint between neighbouring scores
        assert th == pytest.approx(float(below.max() + above.min()) / 2)


def test_calibrate_threshold_and_plan_settings(model, setup):
    batch, vector, condition, threshold, gate = setup
    pos = {k: v[gate] for k, v in batch.items()}
    neg = {k: v[~gate] for k, v in batch.items()}
    cal = calibrate_threshold(model, condition, L, pos, neg)
    assert cal.balanced_accuracy == 1.0 and (cal.positive > cal.threshold).all() and (cal.negative <= cal.threshold).all()
    plan = conditional_vector(model, vector, condition, L, 1.0, calibrate=(pos, neg))
    assert plan.settings["threshold"] == cal.threshold
    assert plan.settings["calibration"]["balanced_accuracy"] == 1.0 and len(plan.settings["calibration"]["positive"]) == 3


def test_bad_inputs_raise_plan_errors(model, setup):
    batch, vector, condition, threshold, gate = setup
    with pytest.raises(PlanError, match="exactly one of threshold"):
        conditional_vector(model, vector, condition, L, 1.0)
    with pytest.raises(PlanError, match="exactly one of threshold"):
        conditional_vector(model, vector, condition, L, 1.0, threshold=0.0, calibrate=(batch, batch))
    with pytest.raises(PlanError, match="layer must be"):
        conditional_vector(model, vector, condition, 99, 1.0, threshold=0.0)
    with pytest.raises(PlanError, match="d_model"):
        conditional_vector(model, vector[:5], condition, L, 1.0, threshold=0.0)
    with pytest.raises(PlanError, match="zero"):
        conditional_vector(model, vector, torch.zeros_like(condition), L, 1.0, threshold=0.0)
    with pytest.raises(PlanError, match="gate score"):
        conditional_vector(model, vector, condition, L, 1.0, threshold=0.0, score="dot")
    with pytest.raises(PlanError, match="each side"):
        best_threshold(torch.tensor([1.0]), torch.tensor([]))


@pytest.mark.real
def test_conditional_refusal_on_smollm2_held_out(smollm2):
    """docs/SAFETY.md's conditional setting (gate and CAA at layer 16, coefficient 1.25) on 8 + 8 held-out prompts.

    Measured on test[1::4] (greedy, 24 tokens): harmful refusal 0/8 -> 4/8, harmless 0/8 -> 1/8 (the one
    harmless prompt whose gate opens); asserted: harmful gains at least 3, harmless at most 2 of 8, and
    every prompt whose gate stays closed gets exactly its unsteered reply.
    """
    from mechanic.improve import refusal as R
    from mechanic.steer.vectors import caa

    m, layer = smollm2, 16
    H, N = R.instructions("harmful", "train"), R.instructions("harmless", "train")
    cond = R.refusal_direction(m, H[::2], N[::2], layers=[layer])
    v = caa(m, R.refusal_pairs(m, R.rows("harmful", "train")), layers=[layer], read="answer")
    plan = conditional_vector(m, v, cond, layer, 1.25, calibrate=(R.chat_prompts(m, H[1::2]), R.chat_prompts(m, N[1::2])))
    harmful = R.chat_prompts(m, R.instructions("harmful", "test")[1::4])
    harmless = R.chat_prompts(m, R.instructions("harmless", "test")[1::4])
    before = {k: R.replies(m, p, 24) for k, p in (("harmful", harmful), ("harmless", harmless))}
    with m.applied(plan):
        after = {k: R.replies(m, p, 24) for k, p in (("harmful", harmful), ("harmless", harmless))}
    refusals = {k: (sum(map(R.is_refusal, before[k])), sum(map(R.is_refusal, after[k]))) for k in before}
    assert refusals["harmful"][1] >= refusals["harmful"][0] + 3, refusals
    assert refusals["harmless"][1] <= 2, refusals
    for k, prompts in (("harmful", harmful), ("harmless", harmless)):
        closed = (gate_scores(m, prompts, cond, layer) <= plan.settings["threshold"]).tolist()
        assert [a for a, c in zip(after[k], closed) if c] == [b for b, c in zip(before[k], closed) if c]
