"""Path patching against naive versions: the direct path to the logits computed by hand, and head-input /
residual receivers through a plain-torch-hook loop (one sender, one forward at a time)."""

import pytest
import torch

import mechanic
from mechanic.locate.path import PathError, path_patch
from mechanic.tasks.task import Example, Task, TaskBatch
from mechanic.testing.tiny import left_padded, tiny_model

ANSWER, WRONG = 5, 7


@pytest.fixture(scope="module")
def llama():
    return mechanic.load(tiny_model("llama", initializer_range=0.2))


def task_batch(model, lengths=(6, 4)):
    clean = model.inputs(left_padded(list(lengths), seed=0))
    corr = model.inputs(left_padded(list(lengths), seed=9))
    n = len(lengths)
    return TaskBatch(clean, corr, torch.full((n,), ANSWER), torch.full((n,), WRONG), [[""] * max(lengths)] * n)


def logit_diff(logits):
    return logits[:, -1, ANSWER] - logits[:, -1, WRONG]


def capture(model, inputs, modules, pre=False):
    """Outputs (or inputs) of modules in one plain forward."""
    got, hs = {}, []
    for name, mod in modules.items():
        if pre:
            hs.append(mod.register_forward_pre_hook(lambda m, a, name=name: got.__setitem__(name, a[0].clone())))
        else:
            hs.append(mod.register_forward_hook(
                lambda m, a, o, name=name: got.__setitem__(name, (o[0] if isinstance(o, tuple) else o).clone())))
    try:
        with torch.no_grad():
            logits = model.hf(**inputs, use_cache=False).logits
    finally:
        for h in hs:
            h.remove()
    return got, logits


def writes(model, inputs):
    """Per-layer z (o_proj input), attention output and MLP output, and the final residual, by plain hooks."""
    L = model.dims.n_layers
    z, _ = capture(model, inputs, {l: model.layer_module(l, "self_attn.o_proj") for l in range(L)}, pre=True)
    attn, _ = capture(model, inputs, {l: model.layer_module(l, "self_attn") for l in range(L)})
    mlp, _ = capture(model, inputs, {l: model.layer_module(l, "mlp") for l in range(L)})
    final, logits = capture(model, inputs, {"x": model.module("model.norm")}, pre=True)
    return z, attn, mlp, final["x"], logits


def head_write(model, z, l, h):
    dh = model.dims.d_head
    W = model.layer_module(l, "self_attn.o_proj").weight
    return z[l][..., h * dh:(h + 1) * dh] @ W[:, h * dh:(h + 1) * dh].T


def test_logits_receiver_is_the_direct_path_by_hand(llama):
    """With everything after the sender frozen, the final residual is clean + (corrupted - clean) of the
    sender's write; the logits are the model's own final norm and unembedding of that."""
    batch = task_batch(llama)
    zc, ac, mc, xc, lc = writes(llama, batch.clean)
    zk, ak, mk, _, _ = writes(llama, batch.corrupted)
    senders = ["L0.head1", "L1.head3", "L0.mlp_out", "L1.attn_out", ["L0.head0", "L1.head2"], "L2.mlp_out", "L1.head"]
    deltas = [head_write(llama, zk, 0, 1) - head_write(llama, zc, 0, 1),
              head_write(llama, zk, 1, 3) - head_write(llama, zc, 1, 3),
              mk[0] - mc[0], ak[1] - ac[1],
              head_write(llama, zk, 0, 0) - head_write(llama, zc, 0, 0)
              + head_write(llama, zk, 1, 2) - head_write(llama, zc, 1, 2),
              mk[2] - mc[2], ak[1] - ac[1]]
    base = logit_diff(lc).mean()
    with torch.no_grad():
        ref = torch.stack([logit_diff(llama.module("lm_head")(llama.module("model.norm")(xc + d))).mean() - base
                           for d in deltas])
    s = path_patch(llama, batch, senders, "logits", batch_size=5)
    assert (s.values - ref).abs().max().item() < 1e-5
    assert ref.abs().min().item() > 1e-3
    assert s.sites == ["L0.head1", "L1.head3", "L0.mlp_out", "L1.attn_out", "L0.head0", "L2.mlp_out", "L1.head"]
    assert s.settings["senders"][4] == ["L0.head0", "L1.head2"]
    assert s.method == "path_patch/all" and s.metric == "logit_diff" and s.values.dim() == 1
    # normalised by clean - corrupted
    n = path_patch(llama, batch, senders[:2], "logits", normalise=True)
    gap = s.settings["metric_clean"] - s.settings["metric_corrupted"]
    assert torch.allclose(n.values, s.values[:2] / gap, atol=1e-5)


def naive_path(model, batch, sender, receiver, freeze):
    """Steps (a)-(c) for one sender with plain torch hooks on the HF modules, one forward each."""
    L, dh = model.dims.n_layers, model.dims.d_head
    group = model.dims.n_heads // model.dims.n_kv_heads
    zc, ac, mc, _, lc = writes(model, batch.clean)
    zk, _, mk, _, _ = writes(model, batch.corrupted)
    kind, ls, hs = sender
    # (b): heads frozen through z (the sender's slice corrupted), MLPs frozen (or recomputed), from the sender on
    hooks, got = [], {}
    for j in range(ls, L):
        def z_hook(m, args, j=j):
            z = zc[j].clone()
            if kind == "head" and j == ls:
                z[..., hs * dh:(hs + 1) * dh] = zk[j][..., hs * dh:(hs + 1) * dh]
            return (z,)
        hooks.append(model.layer_module(j, "self_attn.o_proj").register_forward_pre_hook(z_hook))
        if freeze == "all" or (kind == "mlp" and j == ls):
            out = mk[j] if kind == "mlp" and j == ls else mc[j]
            hooks.append(model.layer_module(j, "mlp").register_forward_hook(lambda m, a, o, out=out: out.clone()))
    rkind, lr, hr = receiver
    if rkind in ("q", "k", "v"):
        proj = model.layer_module(lr, f"self_attn.{rkind}_proj")
        hooks.append(proj.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0].clone())))
    else:
        def keep_pre(m, a, k):
            got["pre"] = (a[0] if a else k["hidden_states"]).clone()
        hooks.append(model.layers[lr].register_forward_pre_hook(keep_pre, with_kwargs=True))
        hooks.append(model.layer_module(lr, "self_attn").register_forward_hook(
            lambda m, a, o: got.__setitem__("attn", o[0].clone())))
    try:
        with torch.no_grad():
            model.hf(**batch.clean, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    # (c): only the receiver's input patched
    if rkind in ("q", "k", "v"):
        idx = hr if rkind == "q" else hr // group
        with torch.no_grad():
            new = proj(got["x"])[..., idx * dh:(idx + 1) * dh]

        def put(m, a, o):
            o = o.clone()
            o[..., idx * dh:(idx + 1) * dh] = new
            return o
        h = proj.register_forward_hook(put)
    elif rkind == "resid_pre":
        def set_pre(m, a, k):
            return ((got["pre"],) + a[1:], k) if a else (a, {**k, "hidden_states": got["pre"]})
        h = model.layers[lr].register_forward_pre_hook(set_pre, with_kwargs=True)
    else:  # resid_mid: the attention write that makes resid_pre (clean) + attn = resid_mid from (b)
        mid = got["pre"] + got["attn"]
        box = {}
        h1 = model.layers[lr].register_forward_pre_hook(
            lambda m, a, k: box.__setitem__("pre", a[0] if a else k["hidden_states"]), with_kwargs=True)
        h2 = model.layer_module(lr, "self_attn").register_forward_hook(lambda m, a, o: (mid - box["pre"],) + o[1:])

        class Both:
            def remove(self):
                h1.remove()
                h2.remove()
        h = Both()
    try:
        with torch.no_grad():
            logits = model.hf(**batch.clean, use_cache=False).logits
    finally:
        h.remove()
    return float(logit_diff(logits).mean() - logit_diff(lc).mean())


SENDERS = {"L0.head1": ("head", 0, 1), "L1.head2": ("head", 1, 2), "L0.mlp_out": ("mlp", 0, None),
           "L1.mlp_out": ("mlp", 1, None)}
RECEIVERS = {"L2.head1.q": ("q", 2, 1), "L2.head3.k": ("k", 2, 3), "L2.head0.v": ("v", 2, 0),
             "L2.resid_pre": ("resid_pre", 2, None), "L1.resid_mid": ("resid_mid", 1, None)}


@pytest.mark.parametrize("freeze", ["all", "heads"])
@pytest.mark.parametrize("receiver", list(RECEIVERS))
def test_receivers_equal_naive_hook_loop(llama, receiver, freeze):
    batch = task_batch(llama)
    senders = list(SENDERS)
    s = path_patch(llama, batch, senders, [receiver], freeze=freeze, batch_size=4)
    ref = torch.tensor([naive_path(llama, batch, SENDERS[x], RECEIVERS[receiver], freeze) for x in senders])
    assert (s.values - ref).abs().max().item() < 1e-5, (s.values, ref)
    if receiver != "L1.resid_mid":
        assert ref.abs().max().item() > 1e-3


def test_head_receiver_means_q_k_v_and_batching_does_not_matter(llama):
    batch = task_batch(llama)
    a = path_patch(llama, batch, ["L0.head1", "L1.mlp_out"], "L2.head1", batch_size=1)
    b = path_patch(llama, batch, ["L0.head1", "L1.mlp_out"], ["L2.head1.q", "L2.head1.k", "L2.head1.v"])
    assert a.settings["receivers"] == ["L2.head1.q", "L2.head1.k", "L2.head1.v"]
    assert torch.allclose(a.values, b.values, atol=1e-6)
    # a receiver before the sender: no path, no effect
    none = path_patch(llama, batch, ["L2.head0"], "L1.head1.q")
    assert none.values.abs().max().item() < 1e-6
    # last position only
    last = path_patch(llama, batch, ["L0.head1"], "L2.head1.q", pos=-1)
    assert last.settings["pos"] == -1 and last.values.shape == (1,)


@pytest.mark.parametrize("arch", ["gemma2", "gpt2"])
def test_all_heads_of_a_layer_equal_its_attention_output(arch):
    """Heads are frozen per head where a sender head sits and as attn_out elsewhere: both routes must agree,
    also behind Gemma 2's post-attention norm and GPT-2's o_proj bias."""
    m = mechanic.load(tiny_model(arch, initializer_range=0.2))
    batch = task_batch(m)
    heads = [f"L1.head{h}" for h in range(m.dims.n_heads)]
    for receivers in ("logits", "L2.resid_pre"):
        s = path_patch(m, batch, [heads, "L1.attn_out", "L1.head"], receivers)
        assert s.sites == ["L1.head", "L1.attn_out", "L1.head"]
        assert (s.values - s.values[1]).abs().max().item() < 1e-5
        assert s.values.abs().max().item() > 1e-3


def test_task_input_and_clear_errors(llama):
    batch = task_batch(llama)
    no_corr = TaskBatch(batch.clean, None, batch.answer, batch.wrong, batch.tokens)
    with pytest.raises(PathError, match="corrupted prompt"):
        path_patch(llama, no_corr, ["L0.head1"])
    with pytest.raises(PathError, match="corrupted prompt for every example"):
        path_patch(llama, Task("t", [Example("a b", " c", " d")]), ["L0.head1"])
    with pytest.raises(PathError, match="cannot be a sender"):
        path_patch(llama, batch, ["L0.head1.q"])
    with pytest.raises(PathError, match="cannot be a sender"):
        path_patch(llama, batch, ["L0.resid_post"])
    with pytest.raises(PathError, match="cannot be a receiver"):
        path_patch(llama, batch, ["L0.head1"], ["L1.mlp_out"])
    with pytest.raises(PathError, match="cannot be combined"):
        path_patch(llama, batch, ["L0.head1"], ["logits", "L1.head0.q"])
    with pytest.raises(PathError, match="No senders"):
        path_patch(llama, batch, [])
    with pytest.raises(PathError, match="freeze"):
        path_patch(llama, batch, ["L0.head1"], freeze="mlps")
    with pytest.raises(ValueError, match="out of range"):
        path_patch(llama, batch, ["L7.head1"])
    with pytest.raises(ValueError, match="out of range"):
        path_patch(llama, batch, ["L0.head9"])
