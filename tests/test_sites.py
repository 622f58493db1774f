"""The site grammar round-trips, rejects bad input clearly, and shapes are known before running."""

import pytest
import torch

from mechanic import Site
from mechanic.model.sites import SiteError
from mechanic.testing.tiny import left_padded

EXAMPLES = ["embed", "final", "logits", "L0.resid_pre", "L2.resid_mid", "L1.resid_post", "L1.attn_out",
            "L1.mlp_out", "L0.router", "L1.head", "L1.head3", "L1.head3.q", "L0.head.pattern", "L2.head0.z",
            "L1.neuron", "L1.neuron95", "L0.expert", "L0.expert3", "L0.expert3.neuron", "L0.expert.neuron7",
            "L0.expert1.neuron7", "L0.shared_expert", "L0.shared_expert.neuron", "L0.shared_expert.neuron4"]


@pytest.mark.parametrize("text", EXAMPLES)
def test_round_trip(text):
    site = Site.parse(text)
    assert str(site) == text
    assert Site.parse(str(site)) == site


@pytest.mark.parametrize("bad", ["L3.foo", "resid_post", "L.head", "L1.head1.x", "L-1.resid_pre", "head3", ""])
def test_unparseable_site_shows_grammar(bad):
    with pytest.raises(SiteError, match="grammar"):
        Site.parse(bad)


def test_out_of_range_names_valid_range(tiny):
    d = tiny.dims
    with pytest.raises(SiteError, match=rf"0\.\.{d.n_layers - 1}"):
        tiny.check(f"L{d.n_layers}.resid_post")
    with pytest.raises(SiteError, match=rf"0\.\.{d.n_heads - 1}"):
        tiny.check(f"L0.head{d.n_heads}")
    if d.d_mlp and not tiny.is_moe(0):
        with pytest.raises(SiteError, match=rf"0\.\.{d.d_mlp - 1}"):
            tiny.check(f"L0.neuron{d.d_mlp}")


def test_enumerated_sites_have_the_announced_shapes(tiny):
    """Every site in the table runs, and its cached tensor has exactly model.shape(site)."""
    batch = left_padded([5, 3])
    sites = tiny.sites()
    extra = [s for s in ("L0.head1.q", "L0.head1.k", "L0.head1.v", "L0.head1.z", "L0.head.pattern") ]
    if tiny.is_moe(0):
        extra += ["L0.expert1", "L0.expert1.neuron", "L0.expert1.neuron3"]
    run = tiny.run(batch, cache=sites + extra)
    for s in [str(x) for x in sites] + extra:
        expected = tiny.shape(s, 2, 5)
        assert tuple(run[s].shape) == expected, s
    assert len({str(s) for s in tiny.sites("head")}) == tiny.dims.n_layers * tiny.dims.n_heads


@pytest.mark.real
def test_sites_of_kind(smollm2):
    assert len(smollm2.sites("neuron")) == 30 * 1536
    assert len(smollm2.sites("resid_post")) == 30
    assert smollm2.shape("L3.head2.pattern", 8, 15) == (8, 15, 15)
    assert smollm2.shape("L3.neuron", 8, 15) == (8, 15, 1536)
    assert torch.Size(smollm2.shape("L3.head", 1, 4)) == (1, 4, 9, 576)
