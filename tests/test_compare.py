"""Head scans, Comparative Neuron Analysis and in-context heads against plain-hook loops."""

import pytest
import torch

from mechanic.locate.compare import comparative_neurons, head_scan, in_context_heads
from mechanic.locate.neurons import neuron_attribution
from test_project import naive_lp, naive_parts, post_write, tiny_batch


def ld(logits, b):
    r = torch.arange(b.n)
    return (logits[:, -1][r, b.answer] - logits[:, -1][r, b.wrong]).float()


def ablate_hooks(model, heads, means=None):
    """Plain torch hooks that ablate heads at o_proj: zero their z slice, or add (mean - contribution)."""
    a, d = model.arch, model.dims
    handles = []
    for L, h in heads:
        o = model.layer_module(L, a.o_proj)
        sl = slice(h * d.d_head, (h + 1) * d.d_head)
        if means is None:
            def pre(m, args, sl=sl):
                z = args[0].clone()
                z[..., sl] = 0
                return (z,) + args[1:]
            handles.append(o.register_forward_pre_hook(pre))
        else:
            def fwd(m, args, out, sl=sl, mean=means[L, h]):
                contrib = args[0][..., sl] @ a.o_weight(m)[:, sl].T
                return out + (mean - contrib)
            handles.append(o.register_forward_hook(fwd))
    return handles


def naive_logits(model, inputs, heads, means=None):
    hs = ablate_hooks(model, heads, means)
    try:
        with torch.no_grad():
            return model.hf(**inputs, use_cache=False).logits
    finally:
        for h in hs:
            h.remove()


def naive_means(model, inputs):
    """[layers, heads, d_model]: each head's write averaged over real tokens, from plain o_proj pre-hooks."""
    a, d = model.arch, model.dims
    out = torch.zeros(d.n_layers, d.n_heads, d.d_model)
    zs, handles = {}, []
    for L in range(d.n_layers):
        handles.append(model.layer_module(L, a.o_proj).register_forward_pre_hook(
            lambda m, args, L=L: zs.__setitem__(L, args[0].detach())))
    with torch.no_grad():
        model.hf(**inputs, use_cache=False)
    for h in handles:
        h.remove()
    mask = inputs["attention_mask"].bool()
    for L in range(d.n_layers):
        W = a.o_weight(model.layer_module(L, a.o_proj)).detach()
        for h in range(d.n_heads):
            sl = slice(h * d.d_head, (h + 1) * d.d_head)
            out[L, h] = (zs[L][..., sl] @ W[:, sl].T)[mask].mean(0)
    return out


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_head_scan_equals_one_head_at_a_time_loop(tiny, ablation):
    b = tiny_batch()
    scores = head_scan(tiny, b, ablation, batch_rows=7)    # 2 heads per forward, several forwards
    d = tiny.dims
    means = naive_means(tiny, b.clean) if ablation == "mean" else None
    clean = float(ld(naive_logits(tiny, b.clean, []), b).mean())
    want = torch.tensor([float(ld(naive_logits(tiny, b.clean, [(L, h)], means), b).mean()) - clean
                         for L in range(d.n_layers) for h in range(d.n_heads)])
    assert scores.sites == [f"L{L}.head{h}" for L in range(d.n_layers) for h in range(d.n_heads)]
    assert (scores.values - want).abs().max() < 1e-4
    assert abs(scores.settings["metric_clean"] - clean) < 1e-5


def test_cna_equals_difference_of_naive_loops(tiny):
    b = tiny_batch()
    heads = [(1, 0), (2, 3)]
    dense = [L for L in range(tiny.dims.n_layers) if not tiny.is_moe(L)]
    kinds = ["head"] + (["neuron"] if dense else [])
    out = comparative_neurons(tiny, b, [f"L{L}.head{h}" for L, h in heads], kinds=kinds, chunk=50)
    full = naive_parts(tiny, b)
    hs = ablate_hooks(tiny, heads)
    try:
        cut = naive_parts(tiny, b)
    finally:
        for h in hs:
            h.remove()
    a, d = tiny.arch, tiny.dims
    x = full["final"]                                       # sigma* from the full model
    lp = lambda i, u: float(naive_lp(tiny, x[i], u, b.answer[i]))  # noqa: E731

    def imp(parts, L, j, i):
        W = a.down_weight(tiny.layer_module(L, a.down_proj)).detach().float()
        h = parts[f"pre{L}"][i] + parts[f"attn{L}"][i]
        return lp(i, h + post_write(tiny, parts, L, i, parts[f"act{L}"][i, j] * W[:, j], "mlp")) - lp(i, h)

    def head_imp(parts, L, h, i):
        sl = slice(h * d.d_head, (h + 1) * d.d_head)
        W_O = a.o_weight(tiny.layer_module(L, a.o_proj)).detach().float()
        v = post_write(tiny, parts, L, i, parts[f"z{L}"][i, sl] @ W_O[:, sl].T, "attn")
        return lp(i, parts[f"pre{L}"][i] + v) - lp(i, parts[f"pre{L}"][i])

    worst = 0.0
    got = dict(zip(out["head"].sites, out["head"].values.tolist()))
    for L in range(d.n_layers):
        for h in range(d.n_heads):
            want = sum(head_imp(full, L, h, i) - head_imp(cut, L, h, i) for i in range(b.n)) / b.n
            worst = max(worst, abs(got[f"L{L}.head{h}"] - want))
    got = dict(zip(out["neuron"].sites, out["neuron"].values.tolist())) if dense else {}
    for L in dense:
        for j in range(0, a.down_weight(tiny.layer_module(L, a.down_proj)).shape[1], 5):
            want = sum(imp(full, L, j, i) - imp(cut, L, j, i) for i in range(b.n)) / b.n
            worst = max(worst, abs(got[f"L{L}.neuron{j}"] - want))
    assert worst < 2e-5
    heads_cna = dict(zip(out["head"].sites, out["head"].values.tolist()))
    assert heads_cna["L0.head0"] == pytest.approx(0.0, abs=1e-6)      # layer 0 comes before every ablated head
    if not tiny.is_moe(0):
        assert float(out["neuron"].values[:d.d_mlp].abs().max()) < 1e-6
    assert out["head"].settings["heads"] == ["L1.head0", "L2.head3"]


def test_cna_checks_its_input(tiny):
    b = tiny_batch()
    with pytest.raises(ValueError, match="one attention head"):
        comparative_neurons(tiny, b, ["L1.mlp_out"], kinds="head")
    with pytest.raises(ValueError, match="'zero' or 'mean'"):
        comparative_neurons(tiny, b, ["L1.head0"], "resample", kinds="head")
    with pytest.raises(ValueError, match="'zero' or 'mean'"):
        head_scan(tiny, b, "half")


def test_in_context_heads_scores_agree_with_their_definitions(tiny):
    b = tiny_batch(n=4)
    out = in_context_heads(tiny, b, top=2, batch_rows=16)
    acc = head_scan(tiny, b, metric="accuracy")
    assert (out["ablation"].values - acc.values).abs().max() < 1e-6
    imp = neuron_attribution(tiny, b, kinds="head")["head"]
    assert (out["logprob"].values - imp.values).abs().max() < 1e-6
    s = out["ablation"].settings
    assert 2 <= len(s["union"]) <= 4
    heads = [(int(u.split(".")[0][1:]), int(u.split("head")[1])) for u in s["union"]]
    logits = naive_logits(tiny, b.clean, heads)
    assert s["accuracy_union_ablated"] == pytest.approx(float((logits[:, -1].argmax(-1) == b.answer).float().mean()))


@pytest.mark.real
def test_smollm2_head_scan_cna_and_icl(smollm2):
    from mechanic.tasks.builtin import load_task

    facts = load_task("facts", n=2)
    scan = head_scan(smollm2, facts, heads=[f"L{L}.head{h}" for L in (0, 28) for h in range(9)])
    b = facts.tokenize(smollm2)
    for site, value in zip(scan.sites[:2], scan.values[:2].tolist()):
        L, h = int(site.split(".")[0][1:]), int(site.split("head")[1])
        want = float(ld(naive_logits(smollm2, b.clean, [(L, h)]), b).mean()) - scan.settings["metric_clean"]
        assert value == pytest.approx(want, abs=1e-3)
    top = scan.top(1, by="min")[0][0]
    cna = comparative_neurons(smollm2, facts, [top], layers=[29])
    s = cna["neuron"].settings
    assert s["p_target_ablated"] != s["p_target"] and cna["neuron"].values.shape == (1536,)
    icl = in_context_heads(smollm2, n=4, layers=[29])
    s = icl["ablation"].settings
    assert 0.0 <= s["accuracy_clean"] <= 1.0 and len(icl["logprob"].sites) == 9
    assert s["accuracy_union_ablated"] <= s["accuracy_clean"] + 0.25
