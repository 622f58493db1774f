"""Plans: hook plans equal explicit interventions, weight edits undo bit for bit, files round-trip, models save anew."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import mechanic
from mechanic.model.interventions import add, project_out, scale
from mechanic.steer.plan import Plan, PlanError, WeightEdit
from mechanic.testing.tiny import left_padded, tiny_model


def weights(m):
    return {n: p.detach().clone() for n, p in m.hf.named_parameters()}


def edits_for(m, g):
    """A full-matrix edit, a column slice, a single scalar and a row slice, on real parameter names."""
    names = [n for n, p in m.hf.named_parameters() if p.dim() == 2]
    p0, p1 = dict(m.hf.named_parameters())[names[1]], dict(m.hf.named_parameters())[names[2]]
    return [WeightEdit(names[1], torch.randn(p0.shape, generator=g)),
            WeightEdit(names[2], torch.randn(p1.shape[0], 2, generator=g), index=(None, [0, 3])),
            WeightEdit(names[2], torch.tensor([[7.5]]), index=([1], [1])),
            WeightEdit(names[-1], torch.zeros(1, dict(m.hf.named_parameters())[names[-1]].shape[1]), index=([2], None))]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_hook_plan_equals_explicit_interventions_and_undoes(arch):
    m = mechanic.load(tiny_model(arch))
    x = m.inputs(left_padded([5, 3], seed=0))
    g = torch.Generator().manual_seed(0)
    ivs = [add("L1.resid_post", torch.randn(m.dims.d_model, generator=g), coef=3.0),
           scale("L0.head1", 0.0), project_out("L0.resid_post", torch.randn(m.dims.d_model, generator=g))]
    plan = Plan(ivs, method="test", fingerprint=m.fingerprint)
    plain = m.run(x).logits
    explicit = m.run(x, interventions=ivs).logits
    with m.applied(plan):
        steered = m.run(x).logits
        assert m.hook_count() == 0  # plans live in mechanic runs, not in resident hooks
    assert (steered - explicit).abs().max().item() == 0
    assert (steered - plain).abs().max().item() > 1e-3
    assert torch.equal(m.run(x).logits, plain) and m.steering == []


def test_weight_edits_undo_bit_for_bit_even_after_errors():
    m = mechanic.load(tiny_model("llama"))
    before = weights(m)
    plan = Plan(edits=edits_for(m, torch.Generator().manual_seed(1)))
    x = m.inputs(left_padded([4], seed=1))
    plain = m.run(x).logits
    with pytest.raises(RuntimeError, match="boom"):
        with m.applied(plan):
            assert not torch.equal(m.run(x).logits, plain)
            assert float(dict(m.hf.named_parameters())[plan.edits[2].param][1, 1].detach()) == 7.5
            raise RuntimeError("boom")
    after = weights(m)
    assert all(torch.equal(before[n], after[n]) for n in before)
    handle = plan.apply(m)
    handle.undo()
    handle.undo()  # a second undo does nothing
    assert all(torch.equal(before[n], p) for n, p in weights(m).items())
    # a failing edit in the middle leaves nothing applied
    bad = Plan(edits=[plan.edits[0], WeightEdit(plan.edits[1].param, torch.zeros(3, 3))])
    with pytest.raises(PlanError, match="shape"):
        bad.apply(m)
    assert all(torch.equal(before[n], p) for n, p in weights(m).items())


def test_plan_file_round_trip(tmp_path):
    m = mechanic.load(tiny_model("qwen2"))
    g = torch.Generator().manual_seed(2)
    plan = Plan([add("L1.resid_post", torch.randn(m.dims.d_model, generator=g), coef=2.0, pos="prompt"),
                 scale("L0.neuron3", 0.5, pos=[1, 2])], edits_for(m, g), "test", m.fingerprint, {"k": [1, 2]})
    back = Plan.load(plan.save(tmp_path / "p.safetensors"))
    assert back.method == "test" and back.settings == {"k": [1, 2]} and back.fingerprint == m.fingerprint
    x = m.inputs(left_padded([5, 4], seed=2))
    with m.applied(plan):
        a = m.run(x).logits
    with m.applied(back):
        b = m.run(x).logits
    assert torch.equal(a, b)
    with pytest.raises(PlanError, match="not a readable plan"):
        Plan.load(tmp_path / "missing.safetensors")
    with pytest.raises(PlanError, match="Python function"):
        Plan([mechanic.model.interventions.apply_fn("L0.resid_post", lambda t: t)]).save(tmp_path / "f.safetensors")


def test_plan_errors_are_clear():
    m = mechanic.load(tiny_model("llama"))
    with pytest.raises(PlanError, match="fingerprint"):
        Plan([scale("L0.resid_post", 2.0)], fingerprint="0" * 16).apply(m)
    with pytest.raises(PlanError, match="no parameter"):
        Plan(edits=[WeightEdit("model.layers.0.mlp.nope.weight", torch.zeros(1))]).apply(m)
    with pytest.raises(PlanError, match="out of range"):
        Plan(edits=[WeightEdit("model.embed_tokens.weight", torch.zeros(1, 1), index=([10 ** 6], [0]))]).apply(m)
    twice = Plan([scale("L0.resid_post", 2.0)])
    h1, h2 = twice.apply(m), twice.apply(m)
    h1.undo()
    assert len(m.steering) == 1
    h2.undo()
    assert m.steering == []


def test_saved_edited_model_loads_in_plain_transformers(tmp_path):
    m = mechanic.load(tiny_model("llama"))
    plan = Plan(edits=edits_for(m, torch.Generator().manual_seed(3)))
    x = m.inputs(left_padded([5], seed=3))
    handle = plan.apply(m)
    edited = m.run(x).logits
    out = m.save(tmp_path / "edited")
    handle.undo()
    plain = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        again = plain(**x).logits
    assert (again - edited).abs().max().item() < 1e-5
    with pytest.raises(FileExistsError, match="not empty"):
        m.save(out)
    with m.applied(Plan([scale("L0.resid_post", 2.0)])):
        with pytest.raises(ValueError, match="hooks"):
            m.save(tmp_path / "other")
