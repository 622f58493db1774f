"""Dictionary sites (`<base>.sae[f]`, `<base>.sae_error`): grammar, clear errors, parity on every family, feature
interventions and patching against plain torch hooks, and the error node that makes the spliced model the original."""

import pytest
import torch
from naive import block_output_logits, blocks

import mechanic
from mechanic import Site
from mechanic.features import Dictionary, FeaturesError, attach, detach
from mechanic.features.splice import reconstruction, spliced_logits
from mechanic.model.interventions import replace, scale, zero
from mechanic.model.sites import SiteError
from mechanic.testing.tiny import CONFIGS, tiny_model

IDS = torch.randint(3, 101, (2, 12), generator=torch.Generator().manual_seed(0))


def rand(d, seed=0, s=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * s)
        if hasattr(d, "threshold"):
            d.threshold.copy_(torch.rand(d.threshold.shape, generator=g) * 0.1)
    return d


def hand_encode(d, x):
    """A ReLU SAE's latents from the formula relu((x - b_dec) W_enc + b_enc), not from Dictionary.encode."""
    return torch.relu((x - d.b_dec.detach()) @ d.W_enc.detach() + d.b_enc.detach())


# ---------------------------------------------------------------- grammar and errors
@pytest.mark.parametrize("text", ["L6.resid_post.sae17", "L6.resid_post.sae", "L0.resid_pre.sae_error", "L3.head.z.sae5",
                                  "L2.neuron.sae_error", "L1.mlp_in", "L1.mlp_in.sae0", "L0.mlp_out.sae_error",
                                  "L4.resid_mid.sae2", "L4.attn_out.sae"])
def test_dictionary_sites_round_trip(text):
    s = Site.parse(text)
    assert str(s) == text and Site.parse(str(s)) == s


@pytest.mark.parametrize("bad", ["L1.resid_post.sae_error3", "L1.head2.z.sae1", "L1.sae3", "L1.resid_post.sae-1",
                                 "L1.neuron4.sae", "L1.resid_post.sae.sae", "resid_post.sae3", "L1.router.sae"])
def test_bad_dictionary_sites_show_the_grammar(bad):
    with pytest.raises(SiteError, match="grammar"):
        Site.parse(bad)


def test_clear_errors():
    m = mechanic.load(tiny_model("llama"))
    D = m.dims.d_model
    with pytest.raises(SiteError, match="no dictionary is attached at L1.resid_post.*features.attach"):
        m.check("L1.resid_post.sae3")
    with pytest.raises(SiteError, match="no dictionary is attached"):
        m.run(IDS, interventions=[zero("L1.resid_post.sae3")])
    d = rand(Dictionary(D, 3 * D, "relu", site="L1.resid_post"))
    assert str(attach(m, d)) == "L1.resid_post"
    with pytest.raises(SiteError, match=rf"Feature {3 * D} in L1.resid_post.sae{3 * D} is out of range.*0\.\.{3 * D - 1}"):
        m.check(f"L1.resid_post.sae{3 * D}")
    with pytest.raises(SiteError, match="already attached at L1.resid_post.*detach"):
        attach(m, rand(Dictionary(D, 2 * D, "relu", site="L1.resid_post")))
    with pytest.raises(FeaturesError, match="width"):
        attach(m, rand(Dictionary(D + 1, 2 * D, "relu", site="L0.resid_post")))
    with pytest.raises(FeaturesError, match="Dictionary"):
        attach(m, "not a dictionary")
    assert m.shape("L1.resid_post.sae", 2, 5) == (2, 5, 3 * D) and m.shape("L1.resid_post.sae4", 2, 5) == (2, 5)
    assert m.shape("L1.resid_post.sae_error", 2, 5) == (2, 5, D)
    assert detach(m, "L1.resid_post") is d
    with pytest.raises(SiteError, match="No dictionary is attached at L1.resid_post"):
        detach(m, "L1.resid_post")


# ---------------------------------------------------------------- parity
def family_dictionaries(m):
    """An SAE on the residual, one on the MLP input, a skip transcoder MLP-in -> MLP-out, one on all heads' z."""
    D, Z = m.dims.d_model, m.dims.n_heads * m.dims.d_head
    return [rand(Dictionary(D, 3 * D, "topk", k=5, site="L1.resid_post")),
            rand(Dictionary(D, 2 * D, "relu", site="L2.mlp_in"), 1),
            rand(Dictionary(D, 2 * D, "jumprelu", site="L0.mlp_in", out_site="L0.mlp_out", skip=True), 2),
            rand(Dictionary(Z, 64, "relu", site="L1.head.z"), 3)]


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_with_the_error_term_the_spliced_model_is_the_original(arch):
    """Reading latents and errors changes nothing (bit for bit), reconstruction + error is the site's value, and
    without the error node the model is the splice of mechanic.features.splice (the two-run reference)."""
    m = mechanic.load(tiny_model(arch))
    orig = m.run(IDS).logits
    dicts = family_dictionaries(m)
    bases = [str(attach(m, d)) for d in dicts]
    assert bases == ["L1.resid_post", "L2.mlp_in", "L0.mlp_out", "L1.head.z"]
    sites = [x for b in bases for x in (b, b + ".sae", b + ".sae_error", b + ".sae3")] + ["L0.mlp_in"]
    run = m.run(IDS, cache=sites)
    assert run.logits.equal(orig)
    grad_run = m.run(IDS, cache=sites, grad=lambda lg: lg[:, -1, 5].sum())
    assert (grad_run.logits - orig).abs().max().item() < 1e-5
    for d, b in zip(dicts, bases):
        x_in = run[d.site]
        rec = (d.decode(run[b + ".sae"]) + d.skip(x_in)).reshape(run[b].shape)
        assert (rec + run[b + ".sae_error"] - run[b]).abs().max().item() < 1e-5, (arch, b)
        assert run[b + ".sae3"].equal(run[b + ".sae"][..., 3])
        assert (run[b + ".sae"] - d.encode(x_in)).abs().max().item() < 1e-6
        without = m.run(IDS, interventions=[zero(b + ".sae_error", pos=slice(1, None))]).logits
        assert (without - spliced_logits(m, d, IDS, reconstruction(d))).abs().max().item() < 1e-5, (arch, b)
        assert (without - orig).abs().max().item() > 1e-3, (arch, b)          # the splice is really in the forward


# ---------------------------------------------------------------- interventions and patching
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_ablating_and_clamping_latents_match_plain_hooks(arch):
    m = mechanic.load(tiny_model(arch))
    D = m.dims.d_model
    d = rand(Dictionary(D, 4 * D, "relu", site="L1.resid_post"), 5, s=0.3)
    attach(m, d)
    W = d.W_dec.detach()
    x = {}
    block_output_logits(m, IDS, 1, lambda t: x.setdefault("v", t.clone()))
    a = hand_encode(d, x["v"])
    on = [f for f in range(4 * D) if a[:, 1:, f].gt(0).any()][:3]
    assert len(on) == 3                                                           # latents that really fire

    def ablated(t):
        t = t.clone()
        t[:, 1:] -= a[:, 1:, on] @ W[on]
        return t

    def clamped(t):
        t = t.clone()
        t[:, -1] += (2.5 - a[:, -1, on[0]])[:, None] * W[on[0]]
        return t
    ivs = [zero(f"L1.resid_post.sae{f}", pos=slice(1, None)) for f in on]
    got = m.run(IDS, interventions=ivs).logits
    assert (got - block_output_logits(m, IDS, 1, ablated)).abs().max().item() < 1e-5
    assert (got - block_output_logits(m, IDS)).abs().max().item() > 1e-3
    got = m.run(IDS, interventions=[replace(f"L1.resid_post.sae{on[0]}", 2.5, pos=-1)]).logits
    assert (got - block_output_logits(m, IDS, 1, clamped)).abs().max().item() < 1e-5
    run = m.run(IDS, cache=["L1.resid_post.sae"], interventions=[scale("L1.resid_post.sae", 0.5)])
    assert (run["L1.resid_post.sae"] - 0.5 * a).abs().max().item() < 1e-5     # reads see the changed latents


def test_patching_latents_and_error_from_the_clean_run_restores_it():
    m = mechanic.load(tiny_model("qwen2"))
    D = m.dims.d_model
    attach(m, rand(Dictionary(D, 3 * D, "topk", k=6, site="L1.resid_post"), 7))
    clean_ids, corr_ids = IDS, IDS.clone()
    corr_ids[:, 4] = (corr_ids[:, 4] + 7) % 98 + 3
    clean = m.run(clean_ids, cache=["L1.resid_post.sae", "L1.resid_post.sae_error"])
    corr = m.run(corr_ids).logits
    both = m.run(corr_ids, interventions=[replace("L1.resid_post.sae", clean["L1.resid_post.sae"]),
                                          replace("L1.resid_post.sae_error", clean["L1.resid_post.sae_error"])]).logits
    assert (both - clean.logits).abs().max().item() < 1e-5
    latents_only = m.run(corr_ids, interventions=[replace("L1.resid_post.sae", clean["L1.resid_post.sae"])]).logits
    assert (latents_only - clean.logits).abs().max().item() > 1e-4 and (corr - clean.logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_mlp_in_is_the_mlp_modules_input(arch):
    """L.mlp_in reads and changes the MLP module's input (plain pre-hook reference); the residual keeps its value."""
    m = mechanic.load(tiny_model(arch))
    mlp = blocks(m.hf)[1].mlp
    seen = {}
    h = mlp.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].clone()))
    try:
        orig = block_output_logits(m, IDS)
    finally:
        h.remove()
    run = m.run(IDS, cache=["L1.mlp_in"])
    assert run["L1.mlp_in"].equal(seen["x"]) and run.logits.equal(orig)
    h = mlp.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,) + tuple(args[1:]))
    try:
        ref = block_output_logits(m, IDS)
    finally:
        h.remove()
    got = m.run(IDS, interventions=[scale("L1.mlp_in", 0.5)]).logits
    assert (got - ref).abs().max().item() < 1e-6 and (got - orig).abs().max().item() > 1e-4


def test_sites_of_dictionary_kinds():
    m = mechanic.load(tiny_model("llama"))
    assert m.sites("sae") == [] and m.sites("sae_error") == []
    attach(m, rand(Dictionary(m.dims.n_heads * m.dims.d_head, 8, "relu", site="L2.head.z")))
    assert [str(s) for s in m.sites("sae")] == [f"L2.head.z.sae{f}" for f in range(8)]
    assert [str(s) for s in m.sites("sae_error")] == ["L2.head.z.sae_error"]
    assert all(m.check(s) == s for s in m.sites("sae"))


def test_causal_reuse_with_latent_patches_equals_full_runs():
    """The fast patching path (prefix + suffix, sub-batches of rows per layer) handles latent interventions."""
    from mechanic.model.reuse import prefix, suffix_logits

    m = mechanic.load(tiny_model("llama"))
    attach(m, rand(Dictionary(m.dims.d_model, 2 * m.dims.d_model, "relu", site="L1.resid_post"), 3))
    base = prefix(m, IDS)
    got = suffix_logits(m, base, torch.tensor([0, 1]), 4, torch.tensor([1, 2]),
                        [replace("L1.resid_post.sae5", 3.0, pos=0, rows=[0])])
    full = m.run(IDS, interventions=[replace("L1.resid_post.sae5", 3.0, pos=4, rows=[0])]).logits[:, -1]
    assert (got - full).abs().max().item() < 1e-5 and (full[0] - base.logits[0]).abs().max().item() > 1e-4
    assert (got[1] - base.logits[1]).abs().max().item() < 1e-5
