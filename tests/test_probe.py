"""Linear probes: the fit against a plain Newton loop, planted directions, the whole pipeline against a naive
HF-forward reference on every tiny architecture, controls and splits, and sentiment on SmolLM2."""

import pytest
import torch

import mechanic
from mechanic.locate.probe import (ProbeError, control_labels, fit_logistic, probe, split)
from mechanic.testing.tiny import left_padded, tiny_model


def newton_logistic(X, y, weight_decay, steps=50):
    """Reference: plain Newton iterations on mean BCE + wd |w|^2 (closed-form gradient and Hessian)."""
    X = X.double()
    y = y.double()
    n, d = X.shape
    A = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    theta = torch.zeros(d + 1, dtype=torch.float64)
    reg = torch.full((d + 1,), 2 * weight_decay, dtype=torch.float64)
    reg[-1] = 0.0  # no penalty on the bias
    for _ in range(steps):
        p = torch.sigmoid(A @ theta)
        grad = A.T @ (p - y) / n + reg * theta
        H = (A.T * (p * (1 - p))) @ A / n + torch.diag(reg)
        theta = theta - torch.linalg.solve(H, grad)
    return theta[:-1], theta[-1]


def synthetic(n=300, d=8, margin=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    y = (torch.rand(n, generator=g) > 0.5).long()
    X = torch.randn(n, d, generator=g) + margin * (2 * y[:, None] - 1) * u
    return X, y, u


def test_lbfgs_fit_equals_newton_reference():
    X, y, _ = synthetic()
    w, b = fit_logistic(X, y, weight_decay=1e-2)
    w_ref, b_ref = newton_logistic(X, y, 1e-2)
    assert (w - w_ref).abs().max() < 1e-6
    assert abs(float(b - b_ref)) < 1e-6


def test_adam_fit_approaches_newton_reference():
    X, y, _ = synthetic()
    w, b = fit_logistic(X, y, weight_decay=1e-2, optimizer="adam", max_iter=3000, lr=0.02)
    w_ref, b_ref = newton_logistic(X, y, 1e-2)
    assert (w - w_ref).abs().max() < 1e-3


def test_separable_data_recovers_the_planted_direction():
    X, y, u = synthetic(n=400, d=32, margin=3.0, seed=1)
    w, b = fit_logistic(X, y, weight_decay=1e-3)
    cos = float(w @ u.double() / w.norm())
    assert cos > 0.9
    assert float((((X.double() @ w + b) > 0).long() == y).double().mean()) == 1.0


def test_split_keeps_groups_whole_and_is_seeded():
    groups = torch.arange(20).repeat(2)
    train, test = split(groups, 0.25, seed=3)
    assert set(groups[train].tolist()).isdisjoint(groups[test].tolist())
    assert len(set(groups[test].tolist())) == 5
    again = split(groups, 0.25, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])


def test_control_labels():
    labels = torch.tensor([1, 0] * 10)
    perm = control_labels(labels, "example", seed=0)
    assert int(perm.sum()) == 10 and not torch.equal(perm, labels)
    types = ["a", "b", "c", "d"] * 5
    per_type = control_labels(labels, "type", types, seed=0)
    for t in set(types):
        assert len({int(per_type[i]) for i, x in enumerate(types) if x == t}) == 1
    with pytest.raises(ProbeError, match="one type per prompt"):
        control_labels(labels, "type", None)


def _planted_dataset(n=48, seed=0):
    """Token prompts whose label is the identity of the last token (two token types), left padded."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 9, (n,), generator=g).tolist()
    batch = left_padded(lengths, seed=seed)
    labels = (torch.rand(n, generator=g) > 0.5).long()
    batch["input_ids"][:, -1] = torch.where(labels == 1, 7, 11)
    return batch, labels


def naive_probe_accuracy(model, batch, labels, layer, test_fraction, seed, weight_decay):
    """Reference pipeline: HF forward with hidden states, last token, same split and scaling, same fit."""
    with torch.no_grad():
        hs = model.hf(**model.inputs(batch), output_hidden_states=True, use_cache=False).hidden_states
    X = hs[layer + 1][:, -1].double()
    train, test = split(torch.arange(labels.numel()), test_fraction, seed)
    mu = X[train].mean(0)
    Z = (X - mu) / (X[train] - mu).pow(2).mean().sqrt()
    w, b = fit_logistic(Z[train], labels[train], weight_decay)
    return float((((Z[test] @ w + b) > 0).long() == labels[test]).double().mean()), w


def test_probe_equals_naive_pipeline(tiny):
    batch, labels = _planted_dataset()
    L = tiny.dims.n_layers - 2  # HF's last hidden state has the final norm applied; compare below it
    res = probe(tiny, (batch, labels), [f"L{L}.resid_post"], test_fraction=0.25, seed=0, batch_size=20)
    acc, w = naive_probe_accuracy(tiny, batch, labels, L, 0.25, 0, 1e-3)
    assert abs(float(res.scores.values[0]) - acc) < 1e-6
    assert (res.directions[f"L{L}.resid_post"].double() - w / w.norm()).abs().max() < 1e-5
    assert acc >= 0.8  # the label is a token identity every prompt shows at the read position
    s = res.scores.settings
    assert s["n_train"] + s["n_test"] == labels.numel()
    assert res.selectivity.values[0] == res.scores.values[0] - res.control.values[0]


def test_probe_weights_act_on_raw_activations_and_make_a_vector():
    model = mechanic.load(tiny_model("llama"))
    batch, labels = _planted_dataset()
    res = probe(model, (batch, labels), "resid_post", batch_size=64)
    assert res.scores.sites == [f"L{i}.resid_post" for i in range(model.dims.n_layers)]
    site = res.best()
    w, b = res.weights[site]
    run = model.run(batch, cache=[site], pos=-1)
    pred = ((run.cache[site] @ w + b) > 0).long()
    assert float((pred == labels).double().mean()) >= float(res.scores.values[res.scores.sites.index(site)]) - 0.1
    v = res.vector()
    assert v.method == "probe" and v.norm == "unit" and v.layers == list(range(model.dims.n_layers))
    assert all(abs(n - 1.0) < 1e-5 for n in v.norms().values())
    from mechanic.steer import from_probe
    one = from_probe(res, [site])
    assert torch.equal(one.directions[one.layers[0]], res.directions[site])
    with pytest.raises(ProbeError, match="one kind"):
        res.vector(["L0.resid_post", "L0.mlp_out"])


def test_probe_refuses_bad_input():
    model = mechanic.load(tiny_model("llama"))
    batch, labels = _planted_dataset()
    with pytest.raises(ProbeError, match="two classes"):
        probe(model, (batch, labels % 3 + torch.arange(labels.numel()) % 3), ["L0.resid_post"])
    with pytest.raises(ProbeError, match="labels"):
        probe(model, (batch, labels[:-1]), ["L0.resid_post"])
    with pytest.raises(ProbeError, match="test_fraction"):
        probe(model, (batch, labels), ["L0.resid_post"], test_fraction=1.5)
    with pytest.raises(ValueError, match="read position"):
        probe(model, (batch, labels), ["L0.resid_post"], read="middle")


@pytest.mark.real
def test_sentiment_probe_on_smollm2(smollm2):
    from mechanic.steer import caa
    from mechanic.tasks.builtin import load_task

    task = load_task("sentiment", n=32)
    sites = ["L3.resid_post", "L12.resid_post"]
    res = probe(smollm2, task, sites, seed=0)
    assert float(res.scores.values.min()) >= 0.9
    # the control task (labels permuted over prompts) cannot be predicted on held-out prompts: selectivity is
    # clearly positive (the margin is loose: 16 held-out prompts in 8 near-identical pairs make control noisy)
    assert float(res.selectivity.values[1]) >= 0.3
    # Token 0 ("We", "I") is the same in a positive prompt and its negative twin and, being first, sees nothing
    # else: both get the same features, so on held-out pairs the probe is right on exactly one of each pair.
    first = probe(smollm2, task, ["L12.resid_post"], read=0, seed=0)
    assert float(first.scores.values[0]) == 0.5
    # the probe direction and the mean difference agree in the middle of the model
    v = caa(smollm2, task, layers=[12])
    assert res.vector(["L12.resid_post"]).cosine(v)[12] > 0.7
