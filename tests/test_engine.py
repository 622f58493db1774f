"""Truncated forward, gradients at sites (against plain autograd), generation with interventions."""

import pytest
import torch

import mechanic
from mechanic import add
from mechanic.testing.tiny import left_padded, tiny_model

BATCH = left_padded([6, 4])


def metric(logits):
    return logits[:, -1, 5].sum() - logits[:, -1, 7].sum()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_stop_at_skips_later_layers(arch):
    m = mechanic.load(tiny_model(arch))
    calls = []
    h = m.layers[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        run = m.run(BATCH, cache=["L0.resid_post", "L0.head"], stop_at="auto")
    finally:
        h.remove()
    assert run.logits is None and calls == []
    full = m.run(BATCH, cache=["L0.resid_post", "L0.head"])
    assert run["L0.resid_post"].equal(full["L0.resid_post"])
    assert m.run(BATCH, cache=["L1.resid_post"], stop_at=1).logits is None
    with pytest.raises(ValueError, match="out of range"):
        m.run(BATCH, stop_at=7)


def naive_grads(model, modules: dict):
    """d metric / d (module outputs or inputs) with plain autograd and retain_grad."""
    saved, handles = {}, []
    for name, (mod, pre) in modules.items():
        if pre:
            def hook(m, args, name=name):
                args[0].retain_grad()
                saved[name] = args[0]
            handles.append(mod.register_forward_pre_hook(hook))
        else:
            def hook(m, args, out, name=name):
                t = out[0] if isinstance(out, tuple) else out
                t.retain_grad()
                saved[name] = t
            handles.append(mod.register_forward_hook(hook))
    try:
        logits = model.hf(**model.inputs(BATCH), use_cache=False).logits
        metric(logits).backward()
    finally:
        for h in handles:
            h.remove()
        model.hf.zero_grad(set_to_none=True)
    return {k: v.grad for k, v in saved.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2_moe"])
def test_gradients_match_plain_autograd(arch):
    m = mechanic.load(tiny_model(arch))
    a = m.arch
    ref = naive_grads(m, {
        "L1.resid_post": (m.layers[1], False),
        "L0.attn_out": (m.layer_module(0, a.attn_write), False),
        "L2.head": (m.layer_module(2, a.o_proj), False),
        "L2.neuron": (m.layer_module(2, a.down_proj if not m.is_moe(2) else "mlp.shared_expert.down_proj"), True),
    })
    neuron = "L2.neuron" if not m.is_moe(2) else "L2.shared_expert.neuron"
    run = m.run(BATCH, cache=["L1.resid_post", "L0.attn_out", "L2.head", "L2.head3", neuron, "L2.neuron4"
                              if not m.is_moe(2) else "L2.shared_expert.neuron4"], grad=metric)
    for site in ("L1.resid_post", "L0.attn_out"):
        assert (run.grads[site] - ref[site]).abs().max().item() < 1e-5, site
    assert (run.grads["L2.head3"] - ref["L2.head"]).abs().max().item() < 1e-5
    assert run.grads["L2.head"].shape == run["L2.head"].shape
    ref_neuron = ref["L2.neuron"].view(2, 6, -1)  # the shared expert runs on flattened tokens
    assert (run.grads[neuron] - ref_neuron).abs().max().item() < 1e-5
    four = "L2.neuron4" if not m.is_moe(2) else "L2.shared_expert.neuron4"
    assert (run.grads[four] - ref_neuron[..., 4]).abs().max().item() < 1e-5
    assert all(p.grad is None for p in m.hf.parameters())
    assert all(p.requires_grad for p in m.hf.parameters())
    assert run.metric == pytest.approx(metric(m.run(BATCH).logits).item(), abs=1e-5)
    assert m.hook_count() == 0


def test_gradient_run_keeps_no_graph_before_first_site():
    """Nothing upstream of the earliest site needs grad: the embedding output is never part of the graph."""
    m = mechanic.load(tiny_model("llama"))
    seen = {}

    def look(mod, args, out):
        seen["L0"] = out.requires_grad
    h = m.layers[0].register_forward_hook(look)
    try:
        m.run(BATCH, cache=["L2.resid_pre"], grad=metric)
    finally:
        h.remove()
    assert seen["L0"] is False


def test_generate_with_steering_equals_naive_hook():
    m = mechanic.load(tiny_model("llama"))
    v = torch.randn(64) * 3
    kw = dict(max_new_tokens=6, do_sample=False)
    steered = m.generate(BATCH, interventions=[add("L1.resid_post", v)], **kw)
    h = m.layers[1].register_forward_hook(lambda mod, a, out: out + v)
    try:
        b = m.inputs(BATCH)
        b.pop("position_ids")
        ref = m.hf.generate(**b, pad_token_id=0, **kw)
    finally:
        h.remove()
    assert steered.equal(ref)
    b = m.inputs(BATCH)
    b.pop("position_ids")
    assert m.generate(BATCH, **kw).equal(m.hf.generate(**b, pad_token_id=0, **kw))
    assert not m.generate(BATCH, **kw).equal(steered)
    assert m.hook_count() == 0


def naive_generate(m, fn, **kw):
    """Greedy generate with one plain hook on layer 1's output: fn(out, is_prompt_call)."""
    h = m.layers[1].register_forward_hook(lambda mod, a, out: fn(out.clone(), out.shape[1] > 1))
    try:
        b = m.inputs(BATCH)
        b.pop("position_ids")
        return m.hf.generate(**b, pad_token_id=0, **kw)
    finally:
        h.remove()


def test_generate_positions_prompt_generated_and_absolute():
    m = mechanic.load(tiny_model("llama"))
    v = torch.randn(64) * 3
    kw = dict(max_new_tokens=5, do_sample=False)

    def prompt_only(x, first):
        return x + v if first else x

    def generated_only(x, first):
        return x if first else x + v

    def column_2_and_7(x, first):
        if first:
            x[:, 2] += v
        elif x.shape[1] == 1 and column_2_and_7.step == 2:  # column 7 = second decode call (prompt has 6)
            x[:, 0] += v
        column_2_and_7.step += 1
        return x
    column_2_and_7.step = 0
    cases = [("prompt", prompt_only), ("generated", generated_only), ([2, 7], column_2_and_7)]
    outputs = []
    for pos, fn in cases:
        ours = m.generate(BATCH, interventions=[add("L1.resid_post", v, pos=pos)], **kw)
        assert ours.equal(naive_generate(m, fn, **kw)), pos
        outputs.append(ours)
    assert not outputs[0].equal(outputs[1])
    assert m.hook_count() == 0


def test_expert_router_and_qkv_gradients_match_finite_differences():
    """Gradients at computed sites (experts, router weights, q/k/v) against a central finite difference.

    HF norms and the router compute in float32 even in a float64 model, so the step is large and the
    tolerance matches float32 round-off divided by the step."""
    m = mechanic.load(tiny_model("mixtral"))
    m.hf.double()
    m.hf.config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    sites = ["L1.expert2", "L1.expert", "L1.router", "L1.expert2.neuron", "L2.head1.q", "L2.head3.v"]
    run = m.run(BATCH, cache=sites, grad=metric)
    eps = 1e-2
    checks = [("L1.expert2", (0, 5, 3)), ("L1.expert", (1, 4, 2, 7)), ("L1.router", (0, 5, 1)),
              ("L1.expert2.neuron", (1, 5, 11)), ("L2.head1.q", (0, 4, 2)), ("L2.head3.v", (1, 3, 5))]
    from mechanic import apply_fn
    for site, cell in checks:
        if run[site][cell] == 0 and site != "L2.head3.v":
            continue  # expert not routed there: zero value, zero gradient by construction

        def nudge(delta, cell=cell):
            def f(x):
                x = x.clone()
                x[cell] += delta
                return x
            return metric(m.run(BATCH, interventions=[apply_fn(site, f)]).logits).item()
        fd = (nudge(eps) - nudge(-eps)) / (2 * eps)
        assert abs(run.grads[site][cell].item() - fd) < 1e-3 * max(1.0, abs(fd)), site
    assert run.grads["L1.expert"][:, :, 2].equal(run.grads["L1.expert2"])


def test_last_only_logits_equal_the_last_column():
    m = mechanic.load(tiny_model("gemma2"))  # final soft-capping included
    full = m.run(BATCH).logits
    last = m.run(BATCH, last_only=True)
    assert last.logits.shape == (2, 1, full.shape[-1])
    assert (last.logits[:, -1] - full[:, -1]).abs().max().item() < 1e-6
