"""Validation of attribution graphs by intervention: the graph's predicted logit changes equal a matrix-inverse
reference, the measured ones equal a plain forward hook, and where nothing the graph freezes lies downstream
(a last-layer feature at the last position, a final norm whose scale does not depend on its input) the two agree."""

import pytest
import torch
from test_graph_attribute import random_transcoders

import mechanic
from mechanic.locate.graph import GraphError, attribute
from mechanic.locate.graph.validate import agreement, measure, predict, top_features, validate
from mechanic.testing.tiny import tiny_model

IDS = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(1))


def build(linear_final_norm: bool):
    hf = tiny_model("llama")
    if linear_final_norm:      # rms = sqrt(mean x^2 + 1e8) ~ 1e4 (relative change ~1e-8): the norm is linear
        with torch.no_grad():
            hf.model.norm.variance_epsilon = 1e8
            hf.model.norm.weight.mul_(1e4)
    m = mechanic.load(hf)
    tc = random_transcoders(m, d_sae=32, architecture="relu", skip=True, scale=0.3)
    return m, tc, attribute(m, tc, IDS, max_logits=5, logit_mass=0.99)


@pytest.fixture(scope="module")
def exact():
    return build(True)


@pytest.fixture(scope="module")
def general():
    m = mechanic.load(tiny_model("llama"))
    tc = random_transcoders(m, d_sae=32, architecture="relu", scale=0.05)
    return m, tc, attribute(m, tc, IDS, max_logits=5, logit_mass=0.99)


def last_layer_last_pos(g, L, P):
    feats = range(*g.span("feature").indices(len(g)))
    return [i for i in feats if int(g.layer[i]) == L - 1 and int(g.pos[i]) == P - 1]


@pytest.mark.parametrize("factor", [0.0, 3.0])
def test_exact_where_nothing_frozen_is_downstream(exact, factor):
    m, tc, g = exact
    nodes = last_layer_last_pos(g, m.dims.n_layers, IDS.shape[1])
    assert len(nodes) >= 5
    v = validate(m, tc, g, nodes=nodes, factor=factor)
    assert v.agreement["max_abs_measured"] > 0.05          # the features matter, so agreement is not 0 == 0
    assert v.agreement["max_abs_diff"] < 1e-4               # measured ~1e-7
    assert v.agreement["sign"] == 1.0 and v.agreement["pearson"] > 0.9999


def naive_prediction(g, nodes, factor):
    """(I - M)^-1 by matrix inverse, M[t, s] = adjacency[t, s] / activation[s] over feature sources."""
    A = g.adjacency.double()
    F = g.span("feature")
    M = torch.zeros_like(A)
    M[:, F] = A[:, F] / g.value.double()[F]
    T = torch.linalg.inv(torch.eye(len(g), dtype=torch.float64) - M)
    logits = g.span("logit")
    return torch.stack([T[logits, i] * (factor - 1) * float(g.value[i]) for i in nodes])


def test_prediction_equals_matrix_inverse(general):
    m, tc, g = general
    nodes = top_features(g, 12)
    for factor in (0.0, 0.5, 2.0):
        got, want = predict(g, nodes, factor), naive_prediction(g, nodes, factor)
        assert (got - want).abs().max() <= 1e-9 * (1 + want.abs().max())
    # top features are the most influential ones
    layer_mix = {int(g.layer[i]) for i in nodes}
    assert len(layer_mix) >= 2


def test_measurement_equals_forward_hook(general):
    m, tc, g = general
    nodes = top_features(g, 6)
    factor = 0.25
    got = measure(m, tc, g, nodes, factor)
    assert not m.dictionaries                              # attached only while measuring
    tokens = g.logit_tokens

    def demeaned(z):
        z = z.double()
        return z[tokens] - z.mean()
    with torch.no_grad():
        base = demeaned(m.hf(IDS).logits[0, -1])
        for r, i in enumerate(nodes):
            L, p, f = int(g.layer[i]), int(g.pos[i]), int(g.feature[i])
            d = tc[L]
            # a plain hook on the MLP: the latent's activation (read from the real MLP input) times factor
            def hook(mod, args, out, d=d, p=p, f=f):
                a = d.encode(args[0])[0, p, f]
                out = out.clone()
                out[0, p] += (factor - 1) * a * d.W_dec[f]
                return out
            h = m.hf.model.layers[L].mlp.register_forward_hook(hook)
            try:
                want = demeaned(m.hf(IDS).logits[0, -1]) - base
            finally:
                h.remove()
            assert (got[r] - want).abs().max() < 1e-5
    assert got.abs().max() > 1e-3


def test_agreement_equals_reference(general):
    m, tc, g = general
    v = validate(m, tc, g, top=8)
    p, q = v.predicted.flatten(), v.measured.flatten()
    assert v.agreement["pearson"] == pytest.approx(float(torch.corrcoef(torch.stack([p, q]))[0, 1]), abs=1e-9)
    rank = lambda x: x.argsort().argsort().double()  # noqa: E731  (no ties among floats here)
    assert v.agreement["spearman"] == pytest.approx(float(torch.corrcoef(torch.stack([rank(p), rank(q)]))[0, 1]),
                                                    abs=1e-9)
    assert v.agreement["sign"] == pytest.approx(sum((a > 0) == (b > 0) for a, b in zip(p, q)) / len(p))
    assert v.agreement["max_abs_diff"] == pytest.approx(float((p - q).abs().max()))
    assert len(v.rows()) == 8 * len(g.logit_tokens) and "pearson" in repr(v)
    print(v.agreement)        # the general case: frozen attention and norms, real downstream MLPs -> only reported


def test_ties_and_bad_input(general):
    m, tc, g = general
    a = agreement(torch.tensor([1.0, 1.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 5.0, 7.0]))
    assert a["spearman"] == pytest.approx(1.0) and a["sign"] == 0.5
    with pytest.raises(GraphError, match="not feature nodes"):
        validate(m, tc, g, nodes=[g.span("error").start])
    with pytest.raises(GraphError, match="no transcoder"):
        validate(m, [None] * len(tc), g, top=2)
