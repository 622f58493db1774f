"""Transcoders in circuit-tracer's transcoder_set format: mechanic writes files whose maths (read the way
circuit-tracer reads them) equals mechanic's own, reads them back exactly, and builds the same graph from them."""

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from test_graph_attribute import prompt, random_transcoders

import mechanic
from mechanic.locate.graph import GraphError, Replacement, attribute
from mechanic.locate.graph.transcoders import (load_circuit_tracer, load_transcoders,
                                                  save_circuit_tracer)
from mechanic.testing.tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mechanic.load(tiny_model("llama"))


@pytest.mark.parametrize("architecture,skip", [("topk", True), ("jumprelu", False), ("relu", True)])
def test_round_trip_and_circuit_tracer_maths(model, tmp_path, architecture, skip):
    tcs = random_transcoders(model, architecture=architecture, skip=skip)
    cfg_path = save_circuit_tracer(tcs, tmp_path / "ct")
    cfg = yaml.safe_load(cfg_path.read_text())
    assert cfg["model_kind"] == "transcoder_set" and len(cfg["transcoders"]) == model.dims.n_layers
    assert (cfg.get("activation_function"), cfg.get("k")) == (("topk", 3) if architecture == "topk" else (None, None))
    x = torch.randn(5, model.dims.d_model)
    for i, d in enumerate(tcs):
        # circuit-tracer's SingleLayerTranscoder: pre = F.linear(x, W_enc, b_enc); out = acts @ W_dec + b_dec + x @ W_skip.T
        w = load_file(cfg["transcoders"][i])
        pre = F.linear(x, w["W_enc"], w["b_enc"])
        assert (pre - d.pre(x)).abs().max() <= 1e-5
        acts = d.encode(x)
        if architecture == "jumprelu":       # circuit-tracer's JumpReLU: x * (x > threshold), on the same pre-activations
            h = d.pre(x)                      # (F.linear's rounding differs from d.pre's by ~1e-7, asserted above)
            assert torch.equal(h * (h > w["activation_function.threshold"]), acts)
        out = acts @ w["W_dec"] + w["b_dec"] + (x @ w["W_skip"].T if skip else 0)
        assert (out - d(x)).abs().max() <= 1e-5
    back = load_circuit_tracer(tmp_path / "ct")
    for d, e in zip(tcs, back):
        assert (e.architecture, e.k, e.site, e.out_site) == (d.architecture, d.k, d.site, d.out_site)
        for name, p in d.state_dict().items():
            assert torch.equal(p, e.state_dict()[name]), name
    # the CLI's loader reads the set, and the graph from it equals the graph from the originals
    loaded, where = load_transcoders(model, tmp_path / "ct")
    a = attribute(model, Replacement(model, tcs, prompt()), None)
    b = attribute(model, Replacement(model, loaded, prompt()), None)
    assert len(a) == len(b) and torch.equal(a.adjacency, b.adjacency)


def test_what_circuit_tracer_cannot_hold_is_refused(model, tmp_path):
    tcs = random_transcoders(model)
    with pytest.raises(GraphError, match="every layer"):
        save_circuit_tracer(tcs[:1] + [None] * (len(tcs) - 1), tmp_path / "a")
    with pytest.raises(GraphError, match="gated"):
        save_circuit_tracer(random_transcoders(model, architecture="gated"), tmp_path / "b")
    neg = random_transcoders(model, architecture="jumprelu")
    with torch.no_grad():
        neg[1].threshold[0] = -0.1
    with pytest.raises(GraphError, match="negative"):
        save_circuit_tracer(neg, tmp_path / "c")
    save_circuit_tracer(tcs, tmp_path / "d")
    (tmp_path / "d" / "config.yaml").write_text("model_kind: cross_layer_transcoder\n")
    with pytest.raises(GraphError, match="transcoder_set"):
        load_circuit_tracer(tmp_path / "d")
