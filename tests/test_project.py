"""Vocabulary projection (logit lens, DLA, neuron attribution, logit flow) against plain-hook references."""

import pytest
import torch

from mechanic.locate.neurons import neuron_attribution, promoted_tokens
from mechanic.locate.project import direct_logit_attribution, logit_flow, logit_lens
from mechanic.locate.readout import Readout, collect
from mechanic.tasks.task import TaskBatch


def tiny_batch(n=3, P=6, seed=0, vocab=101, pad=2):
    """Random prompts (the first one left padded by `pad`), answers and wrong answers."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, P), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    return TaskBatch(inputs, None, torch.randint(3, vocab, (n,), generator=g),
                     torch.randint(3, vocab, (n,), generator=g), [[str(t) for t in r.tolist()] for r in ids])


# ---------------------------------------------------------------- plain-hook references
def grab(model, inputs, modules):
    """Inputs ("in") or outputs ("out") of HF modules in one plain forward: {key: tensor}, plus logits."""
    saved, handles = {}, []
    for key, (module, where) in modules.items():
        if where == "in":
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kw, key=key: saved.__setitem__(key, (args[0] if args else kw["hidden_states"]).detach()),
                with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(
                lambda m, args, out, key=key: saved.__setitem__(key, (out[0] if isinstance(out, tuple) else out).detach())))
    try:
        with torch.no_grad():
            saved["logits"] = model.hf(**inputs, use_cache=False).logits.detach()
    finally:
        for h in handles:
            h.remove()
    return saved


def norm_gain(norm):
    """The effective gain of a final/post norm, written out per family (Gemma stores w with gain 1 + w)."""
    w = norm.weight.detach().float()
    return 1 + w if "Gemma" in type(norm).__name__ else w


@torch.no_grad()
def frozen(norm, x, v, bias=True):
    """norm(v) with the scale of x frozen, written out for LayerNorm and RMSNorm ([..., d])."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if isinstance(norm, torch.nn.LayerNorm):
        out = (v - v.mean(-1, keepdim=True)) * norm.weight / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
        return out + norm.bias if bias else out
    return v * norm_gain(norm) / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def naive_parts(model, b):
    """Last-position values from plain hooks: final residual, resid_pre/attn/mlp per layer, z, neurons, post-norm inputs."""
    a, N = model.arch, model.dims.n_layers
    mods = {"final": (model.module(a.final_norm), "in")}
    for L in range(N):
        mods[f"pre{L}"] = (model.layers[L], "in")
        mods[f"attn{L}"] = (model.layer_module(L, a.attn_write), "out")
        mods[f"mlp{L}"] = (model.layer_module(L, a.mlp_write), "out")
        mods[f"z{L}"] = (model.layer_module(L, a.o_proj), "in")
        if not model.is_moe(L):
            mods[f"act{L}"] = (model.layer_module(L, a.down_proj), "in")
        if a.attn_write != a.attn:
            mods[f"apost{L}"] = (model.layer_module(L, a.attn_write), "in")
            mods[f"mpost{L}"] = (model.layer_module(L, a.mlp_write), "in")
    got = grab(model, b.clean, mods)
    return {k: v[:, -1].float() for k, v in got.items()}


@torch.no_grad()
def naive_lp(model, x_final, u, w):
    """log p(w | u) with the final norm's scale frozen at x_final; soft-capping as the model does."""
    logits = model.module(model.arch.unembed)(frozen(model.module(model.arch.final_norm), x_final, u)).float()
    cap = getattr(model.hf.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, -1)[w]


def post_write(model, parts, L, i, v, which):
    """A block-internal vector as it reaches the residual (Gemma 2 post-norm with its scale frozen)."""
    a = model.arch
    if a.attn_write == a.attn:
        return v
    path = a.attn_write if which == "attn" else a.mlp_write
    return frozen(model.layer_module(L, path), parts[f"{'apost' if which == 'attn' else 'mpost'}{L}"][i], v)


# ---------------------------------------------------------------- readout and DLA
def test_frozen_readout_reproduces_the_model_logits(tiny):
    b = tiny_batch()
    col = collect(tiny, b.clean)
    R = Readout(tiny, col.final)
    want = tiny.run(b.clean, cache=["logits"], pos=-1)["logits"]
    assert (R.pre_logits(col.final) - want).abs().max() < 1e-4
    assert (R.logprob(col.final, b.answer) - torch.log_softmax(col.logits, -1)[torch.arange(3), b.answer]).abs().max() < 1e-5


def test_dla_parts_sum_to_the_final_logit_difference(tiny):
    b = tiny_batch()
    out = direct_logit_attribution(tiny, b)
    comp, s = out["component"], out["component"].settings
    lg = tiny.run(b.clean, cache=["logits"], pos=-1)["logits"]        # lm_head output (before any soft-capping)
    r = torch.arange(b.n)
    want = float((lg[r, b.answer] - lg[r, b.wrong]).mean())
    assert abs(float(comp.values.sum()) + sum(s["attn_bias"]) + s["constant"] - want) < 1e-4
    assert abs(s["total"] - want) < 1e-4
    mlp = dict(zip(comp.sites, comp.values.tolist()))
    kinds = [k for k in ("neuron", "expert") if k in out]
    assert kinds == (["expert"] if all(tiny.is_moe(L) for L in range(3)) else
                     ["neuron", "expert"] if any(tiny.is_moe(L) for L in range(3)) else ["neuron"])
    for L in range(tiny.dims.n_layers):
        parts = sum(v for k in kinds for site, v in zip(out[k].sites, out[k].values.tolist())
                    if site.startswith(f"L{L}."))
        assert abs(parts + s["mlp_rest"][L] - mlp[f"L{L}.mlp_out"]) < 1e-5
    if tiny.arch.down_proj == "mlp.down_proj" and tiny.hf.config.model_type in ("llama", "qwen2", "gemma"):
        assert max(abs(x) for x in s["mlp_rest"] + s["attn_bias"]) < 1e-5   # no biases in these families


def test_dla_without_wrong_answers_splits_the_answer_logit(tiny):
    b = tiny_batch()
    b.wrong = None
    out = direct_logit_attribution(tiny, b)["component"]
    lg = tiny.run(b.clean, cache=["logits"], pos=-1)["logits"]
    want = float(lg[torch.arange(b.n), b.answer].mean())
    s = out.settings
    assert out.metric == "logit" and abs(float(out.values.sum()) + sum(s["attn_bias"]) + s["constant"] - want) < 1e-4


def test_dla_heads_and_neurons_equal_plain_hook_reference(tiny):
    b = tiny_batch()
    out = direct_logit_attribution(tiny, b)
    parts = naive_parts(tiny, b)
    a, d = tiny.arch, tiny.dims
    W_U = tiny.module(a.unembed).weight.detach().float()
    norm = tiny.module(a.final_norm)
    got = {**dict(zip(out["component"].sites, out["component"].values.tolist()))}
    if "neuron" in out:
        got.update(zip(out["neuron"].sites, out["neuron"].values.tolist()))
    for L in range(d.n_layers):
        W_O = a.o_weight(tiny.layer_module(L, a.o_proj)).float()
        for h in (0, d.n_heads - 1):
            sl = slice(h * d.d_head, (h + 1) * d.d_head)
            vals = []
            for i in range(b.n):
                v = post_write(tiny, parts, L, i, parts[f"z{L}"][i, sl] @ W_O[:, sl].T, "attn")
                y = frozen(norm, parts["final"][i], v, bias=False)
                vals.append(float(y @ (W_U[b.answer[i]] - W_U[b.wrong[i]])))
            assert abs(sum(vals) / b.n - got[f"L{L}.head{h}"]) < 1e-5
        if not tiny.is_moe(L):
            W = a.down_weight(tiny.layer_module(L, a.down_proj)).float()
            for j in (0, 7):
                vals = []
                for i in range(b.n):
                    v = post_write(tiny, parts, L, i, parts[f"act{L}"][i, j] * W[:, j], "mlp")
                    vals.append(float(frozen(norm, parts["final"][i], v, bias=False) @ (W_U[b.answer[i]] - W_U[b.wrong[i]])))
                assert abs(sum(vals) / b.n - got[f"L{L}.neuron{j}"]) < 1e-5


# ---------------------------------------------------------------- neuron attribution
def test_neuron_attribution_equals_one_neuron_at_a_time_loop(tiny):
    b = tiny_batch()
    out = neuron_attribution(tiny, b, chunk=40)    # chunk < d_mlp: several projection chunks
    parts = naive_parts(tiny, b)
    a, d = tiny.arch, tiny.dims
    x = parts["final"]
    lp = lambda i, u: float(naive_lp(tiny, x[i], u, b.answer[i]))  # noqa: E731
    worst = 0.0
    for L in range(d.n_layers):
        h_attn = parts[f"pre{L}"]
        h_mlp = h_attn + parts[f"attn{L}"]
        got = dict(zip(out["attn"].sites, out["attn"].values.tolist()))
        want = sum(lp(i, h_attn[i] + parts[f"attn{L}"][i]) - lp(i, h_attn[i]) for i in range(b.n)) / b.n
        worst = max(worst, abs(got[f"L{L}.attn_out"] - want))
        got = dict(zip(out["mlp"].sites, out["mlp"].values.tolist()))
        want = sum(lp(i, h_mlp[i] + parts[f"mlp{L}"][i]) - lp(i, h_mlp[i]) for i in range(b.n)) / b.n
        worst = max(worst, abs(got[f"L{L}.mlp_out"] - want))
        W_O = a.o_weight(tiny.layer_module(L, a.o_proj)).float()
        heads = dict(zip(out["head"].sites, out["head"].values.tolist()))
        an = dict(zip(out["attn_neuron"].sites, out["attn_neuron"].values))
        for h in range(d.n_heads):
            sl = slice(h * d.d_head, (h + 1) * d.d_head)
            want = 0.0
            for i in range(b.n):
                v = post_write(tiny, parts, L, i, parts[f"z{L}"][i, sl] @ W_O[:, sl].T, "attn")
                want += (lp(i, h_attn[i] + v) - lp(i, h_attn[i])) / b.n
            worst = max(worst, abs(heads[f"L{L}.head{h}"] - want))
            for k in (0, d.d_head - 1):
                col = h * d.d_head + k
                want = sum(lp(i, h_attn[i] + post_write(tiny, parts, L, i, parts[f"z{L}"][i, col] * W_O[:, col], "attn"))
                           - lp(i, h_attn[i]) for i in range(b.n)) / b.n
                worst = max(worst, abs(float(an[f"L{L}.head{h}.z"][k]) - want))
        if not tiny.is_moe(L):
            W = a.down_weight(tiny.layer_module(L, a.down_proj)).float()
            got = dict(zip(out["neuron"].sites, out["neuron"].values.tolist()))
            for j in range(W.shape[1]):
                want = sum(lp(i, h_mlp[i] + post_write(tiny, parts, L, i, parts[f"act{L}"][i, j] * W[:, j], "mlp"))
                           - lp(i, h_mlp[i]) for i in range(b.n)) / b.n
                worst = max(worst, abs(got[f"L{L}.neuron{j}"] - want))
    assert worst < 2e-5


def test_expert_importance_covers_the_moe_block(tiny_moe):
    b = tiny_batch()
    out = neuron_attribution(tiny_moe, b, kinds=["expert", "mlp"])
    dla = direct_logit_attribution(tiny_moe, b)["expert"]
    assert out["expert"].sites == dla.sites
    col = collect(tiny_moe, b.clean, neurons=False)
    for L in col.experts:  # the weighted experts (+ the gated shared expert) are the whole block's write
        if not tiny_moe.arch.shared_expert:
            assert (col.experts[L].sum(1) - col.mlp_out[L]).abs().max() < 1e-5
    # an expert never routed to the last token has exactly zero importance
    zero = [s for s, v in zip(dla.sites, dla.values.tolist()) if v == 0.0]
    imp = dict(zip(out["expert"].sites, out["expert"].values.tolist()))
    assert zero and all(abs(imp[s]) < 1e-6 for s in zero)


def test_predicted_target_and_bad_input(tiny):
    b = tiny_batch()
    out = neuron_attribution(tiny, b, kinds=["mlp"], target="predicted")
    assert out["mlp"].settings["target_ids"] == tiny.run(b.clean).logits[:, -1].argmax(-1).tolist()
    with pytest.raises(ValueError, match="choose from"):
        neuron_attribution(tiny, b, kinds=["neurons"])
    with pytest.raises(ValueError, match="'answer'"):
        neuron_attribution(tiny, b, kinds=["mlp"], target="best")


def test_promoted_tokens_are_the_top_of_the_value_vector_projection():
    import mechanic
    from mechanic.testing.tiny import tiny_model

    m = mechanic.load(tiny_model("llama"))
    W = m.layer_module(1, "mlp.down_proj").weight[:, 5]
    g = m.module("model.norm").weight
    want = int((m.module("lm_head").weight @ (g * W)).argmax())
    assert promoted_tokens(m, ["L1.neuron5"]) == [[str(want)]]
    assert promoted_tokens(m, ["L1.neuron5"], [-2.0]) == [[str(int((m.module("lm_head").weight @ (-g * W)).argmax()))]]
    with pytest.raises(ValueError, match="FFN neuron sites"):
        promoted_tokens(m, ["L1.head2"])


# ---------------------------------------------------------------- logit lens and flow
def test_logit_lens_equals_norm_and_unembedding_of_each_layer_output(tiny):
    b = tiny_batch()
    lens = logit_lens(tiny, b, k=3)
    a = tiny.arch
    mods = {"pre0": (tiny.layers[0], "in")} | {f"post{L}": (tiny.layers[L], "out") for L in range(tiny.dims.n_layers)}
    got = grab(tiny, b.clean, mods)
    norm, head = tiny.module(a.final_norm), tiny.module(a.unembed)
    cap = getattr(tiny.hf.config, "final_logit_softcapping", None)
    mask = b.clean["attention_mask"].bool()
    for r, key in enumerate(["pre0"] + [f"post{L}" for L in range(tiny.dims.n_layers)]):
        with torch.no_grad():
            logits = head(norm(got[key])).float()
        logits = torch.tanh(logits / cap) * cap if cap else logits
        p = torch.softmax(logits, -1).gather(-1, b.answer.view(-1, 1, 1).expand(-1, b.seq, 1))[..., 0]
        want = (p * mask).sum(0) / mask.sum(0)
        assert (lens.prob.values[r] - want).abs().max() < 1e-5
        top = torch.softmax(logits, -1)[1, -1].topk(3)
        assert [t for t, _ in lens.top[1][r][-1]] == [str(i) for i in top.indices.tolist()]
    final = torch.softmax(got["logits"][:, -1].float(), -1).gather(-1, b.answer[:, None])[:, 0].mean()
    assert abs(float(lens.prob.values[-1, -1]) - float(final)) < 1e-5
    assert lens.top[0][0][0] == []              # padding cells have no top tokens
    with pytest.raises(ValueError, match="out of range"):
        logit_lens(tiny, b, layers=[99])


def test_logit_flow_adds_up_and_matches_head_dla(tiny):
    b = tiny_batch()
    flow = logit_flow(tiny, b)
    s = flow.settings
    assert abs(float(flow.values.sum()) + sum(s["attn_bias"]) + s["constant"] - s["total"]) < 1e-4
    dla = direct_logit_attribution(tiny, b)["component"]
    heads = dict(zip(dla.sites, dla.values.tolist()))
    rows = dict(zip(flow.sites, flow.values))
    for L in range(tiny.dims.n_layers):
        want = sum(heads[f"L{L}.head{h}"] for h in range(tiny.dims.n_heads))
        assert abs(float(rows[f"L{L}.attn_out"].sum()) - want) < 1e-5
        assert abs(float(rows[f"L{L}.mlp_out"][-1]) - heads[f"L{L}.mlp_out"]) < 1e-5
        assert float(rows[f"L{L}.mlp_out"][:-1].abs().max()) == 0.0
    lp = logit_flow(tiny, b, score="logprob")
    imp = neuron_attribution(tiny, b, kinds=["mlp"])["mlp"]
    lrows = dict(zip(lp.sites, lp.values))
    for L in range(tiny.dims.n_layers):
        assert abs(float(lrows[f"L{L}.mlp_out"][-1]) - float(imp.values[L])) < 1e-5
    with pytest.raises(ValueError, match="score must be"):
        logit_flow(tiny, b, score="prob")


# ---------------------------------------------------------------- SmolLM2
@pytest.mark.real
def test_smollm2_facts(smollm2):
    from mechanic.tasks.builtin import load_task

    task = load_task("facts", n=3)
    dla = direct_logit_attribution(smollm2, task)
    s = dla["component"].settings
    assert abs(float(dla["component"].values.sum()) + sum(s["attn_bias"]) + s["constant"] - s["total"]) < 1e-4
    lens = logit_lens(smollm2, task.subset(1), k=5)
    assert lens.rank.values[-1, -1] == 0 and lens.top[0][-1][-1][0][0] == "ĠFrance"
    assert float(lens.prob.values[0, -1]) < 0.01      # the embedding stream alone does not know the answer
    text = logit_lens(smollm2, ["The capital of France is the city of"], answers=[" Paris"], layers=[29])
    assert text.prob.sites == ["L0.resid_pre", "L29.resid_post"] and float(text.prob.values[-1, -1]) > 0.3
    out = neuron_attribution(smollm2, task.subset(1), kinds=["neuron", "mlp"], layers=range(20, 30))
    neurons = out["neuron"]
    assert neurons.values.shape == (10 * 1536,) and len(out["mlp"].sites) == 10
    b = task.subset(1).tokenize(smollm2)
    parts = naive_parts(smollm2, b)
    W_all = {}
    top = neurons.top(3, by="max") + [(f"L{L}.neuron{j}", None, None) for L, j in ((21, 10), (29, 700))]
    for site, _, _ in top:
        L, j = int(site.split(".")[0][1:]), int(site.split("neuron")[1])
        W_all.setdefault(L, smollm2.layer_module(L, "mlp.down_proj").weight.float())
        h = parts[f"pre{L}"][0] + parts[f"attn{L}"][0]
        v = parts[f"act{L}"][0, j] * W_all[L][:, j]
        want = float(naive_lp(smollm2, parts["final"][0], h + v, b.answer[0]) -
                     naive_lp(smollm2, parts["final"][0], h, b.answer[0]))
        assert abs(float(neurons.values[neurons.sites.index(site)]) - want) < 1e-4
    best = neurons.top(10, by="max")
    assert best[0][2] > 0.1                          # some neuron clearly raises log p(France)
    acts = smollm2.run(b.clean, cache=[f"L{L}.neuron" for L in range(20, 30)], pos=-1)
    signs = [float(acts[s.split(".")[0] + ".neuron"][0, int(s.split("neuron")[1])]) for s, _, _ in best]
    tokens = promoted_tokens(smollm2, [s for s, _, _ in best], signs, k=3)
    assert any("Fren" in t or "France" in t for ts in tokens for t in ts), tokens
