"""Directional ablation: the weight-baked form equals the hook form, undoes exactly, and saves as a plain model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import mechanic
from mechanic.steer.directions import baked_directional_ablation, directional_ablation
from mechanic.steer.plan import Plan, PlanError
from mechanic.testing.tiny import CONFIGS, left_padded, tiny_model

BAKEABLE = [a for a in CONFIGS if a != "gemma2"]


def direction(m, seed=0):
    return torch.randn(m.dims.d_model, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", BAKEABLE)
def test_baked_equals_hooks_and_undoes_exactly(arch):
    m = mechanic.load(tiny_model(arch))
    x = m.inputs(left_padded([6, 4], seed=1))
    d = direction(m)
    before = {n: p.detach().clone() for n, p in m.hf.named_parameters()}
    plain = m.run(x).logits
    with m.applied(directional_ablation(m, d)):
        hooked = m.run(x, cache=["L1.resid_post"])
    with m.applied(baked_directional_ablation(m, d)):
        baked = m.run(x, cache=["L1.resid_post"])
    assert (baked.logits - hooked.logits).abs().max().item() < 1e-4
    assert (hooked.logits - plain).abs().max().item() > 1e-3  # the ablation does something
    unit = d / d.norm()
    if arch != "gpt2":  # GPT-2's learned position embeddings are not a site and keep writing along d
        assert (baked["L1.resid_post"] @ unit).abs().max().item() < 1e-4  # nothing left along d
    after = dict(m.hf.named_parameters())
    assert set(after) == set(before) and all(torch.equal(before[n], after[n]) for n in before)
    tied = m.hf.get_output_embeddings()
    if getattr(m.hf.config, "tie_word_embeddings", False) and tied is not None:
        assert tied.weight is m.hf.get_input_embeddings().weight  # re-tied after undo


def test_errors_and_plan_file_is_small(tmp_path):
    m = mechanic.load(tiny_model("llama"))
    with pytest.raises(PlanError, match="d_model"):
        directional_ablation(m, torch.zeros(m.dims.d_model))
    with pytest.raises(PlanError, match="hook form"):
        baked_directional_ablation(mechanic.load(tiny_model("gemma2")), direction(m))
    plan = baked_directional_ablation(m, direction(m))
    path = plan.save(tmp_path / "dir.safetensors")
    assert path.stat().st_size < 64 * 1024  # directions only, not matrices
    x = m.inputs(left_padded([5], seed=2))
    with m.applied(plan):
        a = m.run(x).logits
    with m.applied(Plan.load(path)):
        b = m.run(x).logits
    assert torch.equal(a, b)


@pytest.mark.real
def test_baked_directional_ablation_on_smollm2_saves_and_reloads(smollm2, tmp_path):
    m = smollm2
    x = m.inputs(["The capital of France is", "Write a poem about the sea."])
    d = direction(m, 3)
    with m.applied(directional_ablation(m, d)):
        hooked = m.run(x, last_only=True).logits
    with m.applied(baked_directional_ablation(m, d)):
        baked = m.run(x, last_only=True).logits
        out = m.save(tmp_path / "ablated")
    assert (baked - hooked).abs().max().item() < 1e-3
    plain = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        again = plain(**{k: v for k, v in x.items()}).logits[:, -1]
    assert (again - baked[:, -1]).abs().max().item() < 1e-3
    assert m.hf.get_output_embeddings().weight is m.hf.get_input_embeddings().weight
