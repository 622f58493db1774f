"""The local replacement model: reproduces the real logits on every architecture, is affine in its sources,
and its transcoder read/write rows equal the dictionary's own maths."""

import pytest
import torch

import mechanic
from mechanic.features import Dictionary
from mechanic.locate.graph import GraphError, Replacement
from mechanic.locate.graph.codes import decoder_rows, encoder_rows
from mechanic.locate.graph.norms import frozen_norm
from mechanic.testing.tiny import tiny_model
from test_graph_attribute import prompt, random_transcoders


def test_replacement_reproduces_real_logits(tiny):
    """tiny: every architecture of tests/conftest.py (dense and MoE), fp32; skip transcoders on every layer."""
    rep = Replacement(tiny, random_transcoders(tiny, skip=True, scale=0.15), prompt(7))
    with torch.no_grad():
        out = rep.run(rep.sources.expand(2))
    real = tiny.run(rep.batch["input_ids"], cache=["logits"]).cache["logits"][0, -1]   # lm_head output
    assert sum(len(a) for a in rep.sources.acts) > 50
    assert (out.logits - real).abs().max() <= 1e-4
    assert max(e.abs().max() for e in rep.sources.errors) > 1e-2     # random transcoders: the errors do real work


def test_replacement_is_affine_in_its_sources():
    model = mechanic.load(tiny_model("gemma2"))     # pre- and post-norms, soft-capping: the most to freeze
    rep = Replacement(model, random_transcoders(model), prompt())
    x = rep.sources
    g = torch.Generator().manual_seed(3)
    noise = lambda t: torch.randn(t.shape, generator=g) * t.abs().mean()   # noqa: E731
    y = type(x)(noise(x.embed), [noise(a) for a in x.acts], [noise(e) for e in x.errors])
    mix = type(x)(2 * x.embed - y.embed, [2 * a - b for a, b in zip(x.acts, y.acts)],
                  [2 * a - b for a, b in zip(x.errors, y.errors)])
    with torch.no_grad():
        fx, fy, fm, f0 = (rep.run(s.expand(1)) for s in (x, y, mix, x.zeros()))
    # f(2x - y) = 2 f(x) - f(y) for an affine f (the constant cancels: 2 - 1 = 1)
    assert (fm.logits - (2 * fx.logits - fy.logits)).abs().max() <= 1e-4
    for a, b, c in zip(fm.mlp_in, fx.mlp_in, fy.mlp_in):
        assert (a - (2 * b - c)).abs().max() <= 1e-4
    assert (fx.logits - f0.logits).abs().max() > 1e-2          # and it is not constant


@pytest.mark.parametrize("architecture,extra", [("relu", {}), ("topk", {}), ("jumprelu", {}), ("gated", {}),
                                                ("relu", {"rescale_acts_by_decoder_norm": True})])
def test_encoder_and_decoder_rows_are_the_dictionary_jacobians(architecture, extra):
    d = Dictionary(16, 24, architecture, k=4 if architecture == "topk" else None, d_out=12, **extra)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    if architecture == "relu" and not extra:
        d.scaling_factor = torch.rand(24, generator=g) + 0.5
    idx = torch.tensor([0, 5, 23])
    J_pre = torch.autograd.functional.jacobian(lambda x: d.pre(x), torch.randn(16, generator=g))     # [24, 16]
    J_dec = torch.autograd.functional.jacobian(lambda a: d.decode(a), torch.rand(24, generator=g))   # [12, 24]
    assert (encoder_rows(d, idx) - J_pre[idx]).abs().max() <= 1e-5
    assert (decoder_rows(d, idx) - J_dec[:, idx].T).abs().max() <= 1e-5


def test_bad_transcoders_say_what_is_wrong():
    model = mechanic.load(tiny_model("llama"))
    tcs = random_transcoders(model)
    with pytest.raises(GraphError, match="3 layers"):
        Replacement(model, tcs[:2], prompt())
    with pytest.raises(GraphError, match="must read L0.mlp_in"):
        Replacement(model, [tcs[1], tcs[1], tcs[2]], prompt())
    sae = Dictionary(64, 8, "relu", site="L0.resid_post")
    with pytest.raises(GraphError, match="not a mechanic transcoder"):
        Replacement(model, {0: sae}, prompt())
    with pytest.raises(GraphError, match="one prompt"):
        Replacement(model, tcs, torch.randint(3, 100, (2, 5)))
    padded = {"input_ids": torch.tensor([[0, 5, 6]]), "attention_mask": torch.tensor([[0, 1, 1]])}
    with pytest.raises(GraphError, match="padding"):
        Replacement(model, tcs, padded)
    model.steering.append(object())
    with pytest.raises(GraphError, match="applied plan"):
        Replacement(model, tcs, prompt())
    model.steering.clear()
    narrow = Dictionary(32, 8, "relu", d_out=64, site="L0.mlp_in", out_site="L0.mlp_out")
    with pytest.raises(GraphError, match="residual width is 64"):
        Replacement(model, {0: narrow}, prompt())


def test_a_norm_mechanic_cannot_freeze_is_refused():
    norm = torch.nn.LayerNorm(8)
    x = torch.randn(3, 8)
    frozen_norm(norm, x, norm(x), "ok")                            # a real LayerNorm passes its own check
    with pytest.raises(GraphError, match="does not compute what mechanic expects"):
        frozen_norm(norm, x, norm(x) * 1.5, "model.norm")


@pytest.mark.parametrize("name", ["qwen3", "gpt2"])
def test_a_prefix_run_equals_the_full_run_on_its_positions(name):
    model = mechanic.load(tiny_model(name))
    rep = Replacement(model, random_transcoders(model, layers={0, 2}), prompt(7))
    with torch.no_grad():
        full = rep.run(rep.sources.expand(2))
        part = rep.run(rep.prefix(rep.sources.expand(2), 4))
    for a, b in zip(part.mlp_in, full.mlp_in):
        assert a.shape[1] == 4 and (a - b[:, :4]).abs().max() <= 1e-5
    assert (part.final - full.final[:, :4]).abs().max() <= 1e-5
