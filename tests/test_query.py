"""Query neurons: value keys against the engine's v, and the score against a plain loop over neurons and positions."""

import pytest
import torch

from mechanic.locate.query import keys, query_neurons
from test_project import grab, naive_lp, tiny_batch


def test_value_keys_reproduce_the_values(tiny):
    """v[p, h, k] = kappa[h, k] . x_p / sigma_p + a constant (biases), for every family's W_V layout."""
    b = tiny_batch()
    run = tiny.run(b.clean, cache=["L1.resid_pre", "L1.head.v"])
    x, v = run["L1.resid_pre"].float(), run["L1.head.v"].float()         # [n, P, d], [n, P, H, dh]
    kappa, inv = keys(tiny, 1, x)
    pred = torch.einsum("npd,hkd->nphk", x, kappa) * inv[..., None, None]
    rest = (v - pred)[b.clean["attention_mask"].bool()]                    # [tokens, H, dh]
    assert (rest - rest[:1]).abs().max() < 1e-4
    biased = tiny.hf.config.model_type in ("gpt2", "gpt_neox", "qwen2", "qwen2_moe")
    assert biased or rest.abs().max() < 1e-4


def test_query_neurons_equal_a_plain_loop(tiny):
    b = tiny_batch()
    L, h, k = 2, 1, 3
    scores = query_neurons(tiny, b, value_neurons=[(L, h, k)])
    a, d = tiny.arch, tiny.dims
    dense = [Lp for Lp in range(L) if not tiny.is_moe(Lp)]
    assert scores.sites == [f"L{Lp}.neuron{j}" for Lp in dense
                            for j in range(a.down_weight(tiny.layer_module(Lp, a.down_proj)).shape[1])]
    mods = {"final": (tiny.module(a.final_norm), "in"), "x": (tiny.layers[L], "in"),
            "z": (tiny.layer_module(L, a.o_proj), "in")}
    mods |= {f"act{Lp}": (tiny.layer_module(Lp, a.down_proj), "in") for Lp in dense}
    got = grab(tiny, b.clean, mods)
    run = tiny.run(b.clean, cache=[f"L{L}.head.pattern", f"L{L}.head.v"])
    av = run[f"L{L}.head.pattern"][:, -1, h] * run[f"L{L}.head.v"][:, :, h, k]          # [n, P]
    assert (av.sum(1) - got["z"][:, -1, h * d.d_head + k]).abs().max() < 1e-5          # terms add up to z
    W_O = a.o_weight(tiny.layer_module(L, a.o_proj)).detach().float()[:, h * d.d_head + k]
    kappa, _ = keys(tiny, L, got["x"].float())
    kap = kappa[h, k]
    n, P = b.clean["input_ids"].shape
    post = tiny.arch.attn_write != tiny.arch.attn
    if post:  # Gemma 2: the write passes the post-norm, scale frozen at the real attention output
        from test_project import frozen
        pn = tiny.layer_module(L, a.attn_write)
        pin = grab(tiny, b.clean, {"p": (pn, "in")})["p"][:, -1].float()
    worst, checked = 0.0, 0
    for Lp in dense:
        W = a.down_weight(tiny.layer_module(Lp, a.down_proj)).detach().float()
        rows = dict(zip(scores.sites, scores.values))
        for j in range(0, W.shape[1], 7):
            want = torch.zeros(P)
            for i in range(n):
                x_T = got["x"][i, -1].float()
                for p in range(P):
                    if not b.clean["attention_mask"][i, p]:
                        continue
                    term = av[i, p] * W_O
                    if post:
                        term = frozen(pn, pin[i], term)
                    I = float(naive_lp(tiny, got["final"][i, -1].float(), x_T + term, b.answer[i])
                              - naive_lp(tiny, got["final"][i, -1].float(), x_T, b.answer[i]))
                    share = float(got[f"act{Lp}"][i, p, j] * (W[:, j] @ kap) / (got["x"][i, p].float() @ kap))
                    want[p] += I * share / n
            worst = max(worst, float((rows[f"L{Lp}.neuron{j}"] - want).abs().max()))
            checked += 1
    assert checked > 0 or not dense
    assert worst < 1e-4
    assert scores.settings["value_neurons"][0]["site"] == f"L{L}.head{h}.z"


def test_query_neurons_default_picks_top_attention_neurons(tiny):
    from mechanic.locate.neurons import neuron_attribution

    b = tiny_batch()
    scores = query_neurons(tiny, b, top=2)
    an = neuron_attribution(tiny, b, "attn_neuron")["attn_neuron"]
    best = an.top(2, by="max")
    assert [(v["site"], v["dim"]) for v in scores.settings["value_neurons"]] == [(s, p) for s, p, _ in best]
    with pytest.raises(ValueError, match="out of range"):
        query_neurons(tiny, b, value_neurons=[(9, 0, 0)])


@pytest.mark.real
def test_smollm2_query_neurons(smollm2):
    from mechanic.tasks.builtin import load_task

    scores = query_neurons(smollm2, load_task("facts", n=1), top=3)
    vn = scores.settings["value_neurons"]
    assert len(vn) == 3 and all(v["importance"] > 0 for v in vn)
    deepest = max(int(v["site"].split(".")[0][1:]) for v in vn)
    assert len(scores.sites) == deepest * 1536 and torch.isfinite(scores.values).all()
    site, pos, value = scores.top(1)[0]
    assert int(site.split(".")[0][1:]) < deepest and value != 0.0
