"""Attribution patching over dictionary latents plus the error node, against a naive loop with plain torch hooks."""

import pytest
import torch
from naive import blocks
from test_gradient import tiny_batch

import mechanic
from mechanic.features import Dictionary, attach
from mechanic.locate.gradient import atp
from mechanic.testing.tiny import tiny_model
from conftest import randomized as rand



def diff(lg, b):
    rows = torch.arange(lg.shape[0])
    return lg[rows, b.answer] - lg[rows, b.wrong]


def naive_sae_atp(m, d, b, layer: int):
    """Per-latent and error scores (a_clean - a_corr) . dmetric/da at the corrupted run, summed over positions and
    averaged over examples, from a plain forward hook that replaces block `layer`'s output by
    relu((x - b_dec) W_enc + b_enc) W_dec + b_dec + error, with latents and error as autograd leaves."""
    blk = blocks(m.hf)[layer]
    W_enc, b_enc, W_dec, b_dec = (t.detach() for t in (d.W_enc, d.b_enc, d.W_dec, d.b_dec))
    got = {}

    def split(x):
        a = torch.relu((x - b_dec) @ W_enc + b_enc)
        return a, x - (a @ W_dec + b_dec)

    def read(mod, args, out):
        got["x"] = (out[0] if isinstance(out, tuple) else out).detach()
    h = blk.register_forward_hook(read)
    try:
        with torch.no_grad():
            m.hf(**b.clean)
            a_c, e_c = split(got["x"])
            m.hf(**b.corrupted)
            a_x, e_x = split(got["x"])
    finally:
        h.remove()
    A, E = a_x.clone().requires_grad_(), e_x.clone().requires_grad_()

    def write(mod, args, out):
        new = A @ W_dec + b_dec + E
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
    h = blk.register_forward_hook(write)
    try:
        metric = diff(m.hf(**b.corrupted).logits[:, -1], b).sum()
        gA, gE = torch.autograd.grad(metric, [A, E])
    finally:
        h.remove()
    n = b.clean["input_ids"].shape[0]
    return ((a_c - a_x) * gA).sum((0, 1)) / n, ((e_c - e_x) * gE).sum() / n


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_atp_over_latents_and_error_equals_naive_loop_and_adds_up(arch):
    m = mechanic.load(tiny_model(arch))
    D = m.dims.d_model
    d = rand(Dictionary(D, 3 * D, "relu", site="L1.resid_post"), 4)
    attach(m, d)
    b = tiny_batch(n=5, seed=3)
    out = atp(m, b, ["sae", "resid_post"], metric=diff, per_position=False, batch_size=2)
    sae = out["sae"]
    assert sae.sites[:2] == ["L1.resid_post.sae0", "L1.resid_post.sae1"] and sae.sites[-1] == "L1.resid_post.sae_error"
    latents, error = naive_sae_atp(m, d, b, 1)
    got = sae.values
    scale = max(latents.abs().max().item(), error.abs().item())
    assert scale > 1e-3                                                             # not all ~0
    assert (got[:-1] - latents).abs().max().item() < 1e-4 * scale
    assert abs(got[-1].item() - error.item()) < 1e-4 * scale
    resid = out["resid_post"].values[out["resid_post"].sites.index("L1.resid_post")]
    assert abs(got.sum().item() - resid.item()) < 1e-4 * got.abs().sum().item()      # latents + error add up


def test_transcoder_latents_and_error_add_up_to_the_mlp_output():
    """(A skip transcoder's skip term is a linear function of the MLP input, not a node: it is left out here.)"""
    m = mechanic.load(tiny_model("qwen3"))
    D = m.dims.d_model
    attach(m, rand(Dictionary(D, 2 * D, "relu", site="L1.mlp_in", out_site="L1.mlp_out"), 6))
    b = tiny_batch(n=4, seed=5)
    out = atp(m, b, ["sae", "mlp_out"], metric=diff, per_position=False)
    total = out["mlp_out"].values[out["mlp_out"].sites.index("L1.mlp_out")].item()
    assert abs(out["sae"].values.sum().item() - total) < 1e-4 * out["sae"].values.abs().sum().item()
    assert out["sae"].values[:-1].abs().max().item() > 1e-4


def test_atp_over_latents_needs_an_attached_dictionary():
    m = mechanic.load(tiny_model("llama"))
    with pytest.raises(ValueError, match="features.attach"):
        atp(m, tiny_batch(), "sae")
