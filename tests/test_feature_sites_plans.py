"""Feature steering and ablation as Plans: the effect matches plain hooks, and plans save, load and undo exactly."""

import pytest
import torch
from naive import block_output_logits

import mechanic
from mechanic.features import Dictionary, attach, detach
from mechanic.model.sites import SiteError
from mechanic.steer.feature_plans import feature_ablate, feature_add, feature_clamp
from mechanic.steer.plan import Plan
from mechanic.testing.tiny import tiny_model
from conftest import randomized as rand

IDS = torch.randint(3, 101, (3, 9), generator=torch.Generator().manual_seed(1))



def plain(m, fn=None, layer=1):
    """Logits of the plain HF forward, with fn applied to decoder block `layer`'s hidden-state output."""
    return block_output_logits(m, IDS, layer, fn)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_feature_plans_match_plain_hooks_and_round_trip(tmp_path, arch):
    m = mechanic.load(tiny_model(arch))
    D = m.dims.d_model
    d = rand(Dictionary(D, 4 * D, "relu", site="L1.resid_post"), 2)
    attach(m, d)
    W, b_dec, W_enc, b_enc = (t.detach() for t in (d.W_dec, d.b_dec, d.W_enc, d.b_enc))
    seen = {}
    original = plain(m, lambda t: seen.setdefault("x", t.clone()))
    a = torch.relu((seen["x"] - b_dec) @ W_enc + b_enc)                          # latents, by hand

    def add(t):
        return t + 3.0 * W[7] / W[7].norm()

    def clamp(t):
        t = t.clone()
        t[:, -1] += (4.0 - a[:, -1, 11])[:, None] * W[11]
        return t

    def ablate_all(t):
        return t - a @ W

    cases = [(feature_add(m, "L1.resid_post.sae7", 3.0), add),
             (feature_clamp(m, "L1.resid_post.sae11", 4.0, pos=-1), clamp),
             (feature_ablate(m, "L1.resid_post.sae"), ablate_all)]
    for i, (plan, ref) in enumerate(cases):
        with m.applied(plan):
            steered = m.run(IDS).logits
        assert (steered - plain(m, ref)).abs().max().item() < 1e-5, plan
        assert (steered - original).abs().max().item() > 1e-3, plan
        path = plan.save(tmp_path / f"plan{i}.safetensors")
        loaded = Plan.load(path)
        assert loaded.method == plan.method and loaded.settings == plan.settings
        handle = loaded.apply(m)
        assert m.run(IDS).logits.equal(steered)
        handle.undo()
        assert m.run(IDS).logits.equal(original) and m.steering == []


def test_feature_plans_need_their_dictionary_and_a_latent_site(tmp_path):
    m = mechanic.load(tiny_model("llama"))
    D = m.dims.d_model
    attach(m, rand(Dictionary(D, 2 * D, "relu", site="L1.resid_post")))
    clamp = feature_clamp(m, "L1.resid_post.sae3", 1.0)
    add = feature_add(m, "L1.resid_post.sae3", 2.0)
    with pytest.raises(SiteError, match="not a dictionary latent site"):
        feature_clamp(m, "L1.resid_post", 1.0)
    with pytest.raises(SiteError, match="one latent"):
        feature_add(m, "L1.resid_post.sae", 1.0)
    path = clamp.save(tmp_path / "clamp.safetensors")
    detach(m, "L1.resid_post")
    with pytest.raises(SiteError, match="no dictionary is attached at L1.resid_post"):
        Plan.load(path).apply(m)
    assert m.steering == []
    with m.applied(add):                  # adding a decoder direction is a plain add: no dictionary needed
        assert not m.run(IDS).logits.equal(plain(m))


def test_a_clamp_plan_steers_generation_token_by_token():
    """generate() with the plan applied equals greedy decoding from full runs with the same interventions."""
    m = mechanic.load(tiny_model("llama"))
    D = m.dims.d_model
    attach(m, rand(Dictionary(D, 2 * D, "relu", site="L1.resid_post"), 4))
    ids = IDS[:2, :5]
    prompt = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    plain_out = m.generate(prompt, max_new_tokens=6, do_sample=False)
    plan = feature_clamp(m, "L1.resid_post.sae3", 50.0)
    with m.applied(plan):
        out = m.generate(prompt, max_new_tokens=6, do_sample=False)
    greedy = m.run(out[:, :-1], interventions=plan.interventions).logits.argmax(-1)[:, 4:]
    assert greedy.equal(out[:, 5:]) and not out.equal(plain_out)
