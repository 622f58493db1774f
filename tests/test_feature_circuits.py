"""Feature circuits: activation patching over dictionary latents (patch(kind="sae")) against a naive loop of plain
torch hooks that recompute the dictionary by hand, and EAP / EAP-IG over features (eap(features=True)) against an
explicit per-edge computation and the component graph's own edges (the latents and error node of a dictionary add
up to the node they decompose)."""

import pytest
import torch
from conftest import randomized
from naive import blocks, hf_logits, llama_pieces, logit_diff, rows
from test_causal import tiny_batch as padded_batch

import mechanic
from mechanic.features import Dictionary, attach
from mechanic.locate.causal import patch
from mechanic.tasks import Example, Task
from mechanic.tasks.task import TaskError
from mechanic.testing.tiny import tiny_model


# ---------------------------------------------------------------- activation patching, by hand
def relu_sae(d):
    """(encode, W_dec) of a ReLU SAE from its weights: a = relu((x - b_dec) W_enc + b_enc), x_hat = a W_dec + b_dec."""
    W_enc, b_enc, W_dec, b_dec = (t.detach() for t in (d.W_enc, d.b_enc, d.W_dec, d.b_dec))
    return (lambda x: torch.relu((x - b_dec) @ W_enc + b_enc)), W_dec, b_dec


def block_values(hf, inputs, layer):
    """Decoder block `layer`'s hidden-state output in a plain forward."""
    got = {}

    def keep(x):
        got["x"] = x.detach().clone()
        return x
    hf_logits(hf, inputs, [(blocks(hf)[layer], "out", keep)], last=True)
    return got["x"]


def naive_latent_patching(model, batch, d, layer, positions="all", direction="denoise", ablation=None, donors=None,
                          chunk=256):
    """m(target run with one latent (or the error) of the ReLU SAE on block `layer`'s output set to the source
    value at one column (or every column), everything else as computed in that run), mean over examples.

    Plain HF forward, one hook on the block output that re-encodes the value by hand and adds
    (a_src - a) W_dec[f] for a latent or (e_src - e) for the error. Returns (values [units, cols] or [units], names)
    with units every latent then the error."""
    hf = model.hf
    encode, W_dec, b_dec = relu_sae(d)
    n, P = batch.clean["input_ids"].shape
    target = batch.clean if (ablation is not None or direction == "noise") else batch.corrupted
    source = batch.clean if (ablation is not None or direction == "denoise") else batch.corrupted
    x = block_values(hf, source, layer)
    a_src = encode(x)
    e_src = x - (a_src @ W_dec + b_dec)
    if ablation == "mean":
        real = batch.clean["attention_mask"].bool()
        for t in (a_src, e_src):
            for p in range(P):
                t[:, p] = t[real[:, p], p].mean(0)
    elif ablation == "resample":
        a_src, e_src = a_src[torch.as_tensor(donors)], e_src[torch.as_tensor(donors)]
    F = d.d_sae
    base = d.site
    names = [f"{base}.sae{f}" for f in range(F)] + [f"{base}.sae_error"]
    cols = list(range(P)) if positions == "all" else [None] if positions is None else [p % P for p in positions]
    jobs = [(u, ci, e) for u in range(F + 1) for ci in range(len(cols)) for e in range(n)]
    totals = torch.zeros(F + 1, len(cols))
    for start in range(0, len(jobs), chunk):
        part = jobs[start:start + chunk]

        def write(t, part=part):
            a = encode(t)
            err = t - (a @ W_dec + b_dec)
            t = t.clone()
            for i, (u, ci, e) in enumerate(part):
                c = slice(None) if cols[ci] is None else slice(cols[ci], cols[ci] + 1)
                if u < F:
                    t[i, c] += (a_src[e, c, u] - a[i, c, u])[:, None] * W_dec[u]
                else:
                    t[i, c] += e_src[e, c] - err[i, c]
            return t
        ex = torch.tensor([j[2] for j in part])
        logits = hf_logits(hf, rows(target, ex), [(blocks(hf)[layer], "out", write)], last=True)
        for (u, ci, _), v in zip(part, logit_diff(logits, batch.answer[ex], batch.wrong[ex]).tolist()):
            totals[u, ci] += v
    out = totals / n
    return (out if cols != [None] else out[:, 0]), names


def sae_on(model, layer=1, width=2, seed=4, scale=0.3):
    """A random ReLU SAE (width x d_model latents) attached at L{layer}.resid_post."""
    D = model.dims.d_model
    d = randomized(Dictionary(D, width * D, "relu", site=f"L{layer}.resid_post"), seed, scale)
    attach(model, d)
    return d


def test_patching_latents_equals_naive_loop(tiny):
    """Every family (the `tiny` fixture): denoise at every column and noise at two columns, raw metric (1e-5)."""
    m = tiny
    d = sae_on(m)
    b = padded_batch(m)
    fast = patch(m, b, "sae", positions="all", normalise=False, batch_size=48, progress=False)
    ref, names = naive_latent_patching(m, b, d, 1)
    assert fast.sites == names and fast.values.shape == ref.shape
    assert (fast.values - ref).abs().max().item() < 1e-5
    base = fast.settings["metric_corrupted"]
    assert (ref - base).abs().max().item() > 1e-3            # patches really change the metric
    noise = patch(m, b, "sae", positions=[-1, 2], direction="noise", normalise=False, progress=False)
    ref, _ = naive_latent_patching(m, b, d, 1, [-1, 2], direction="noise")
    assert (noise.values - ref).abs().max().item() < 1e-5


def test_patching_latents_at_once_mean_resample_and_a_subset():
    m = mechanic.load(tiny_model("llama"))
    d = sae_on(m, layer=0, seed=7)
    b = padded_batch(m, 3)
    whole = patch(m, b, "sae", positions=None, normalise=False, progress=False)
    ref, names = naive_latent_patching(m, b, d, 0, None)
    assert whole.values.dim() == 1 and (whole.values - ref).abs().max().item() < 1e-5
    mean = patch(m, b, "sae", positions=[-1, 3], ablation="mean", normalise=False, progress=False)
    ref, _ = naive_latent_patching(m, b, d, 0, [-1, 3], ablation="mean")
    assert (mean.values - ref).abs().max().item() < 1e-5
    r = patch(m, b, "sae", positions=[-1], ablation="resample", normalise=False, seed=2, progress=False)
    diffs = [(r.values - naive_latent_patching(m, b, d, 0, [-1], ablation="resample", donors=p)[0]).abs().max().item()
             for p in ([1, 2, 0], [2, 0, 1])]
    assert min(diffs) < 1e-5 < max(diffs)
    # a subset: the 5 latents whose clean and corrupted values differ most, plus the error node; same values
    top = patch(m, b, "sae", positions=None, normalise=False, latents=5, progress=False)
    full = dict(zip(whole.sites, whole.values.tolist()))
    assert len(top.sites) == 6 and top.sites[-1] == "L0.resid_post.sae_error"
    assert all(abs(full[s] - v) < 1e-6 for s, v in zip(top.sites, top.values.tolist()))
    run_c = m.run(b.clean, cache=["L0.resid_post.sae"])["L0.resid_post.sae"]
    run_x = m.run(b.corrupted, cache=["L0.resid_post.sae"])["L0.resid_post.sae"]
    size = (run_c - run_x).abs().sum((0, 1))
    assert {f"L0.resid_post.sae{f}" for f in size.argsort(descending=True)[:5].tolist()} == set(top.sites[:-1])
    listed = patch(m, b, "sae", positions=None, normalise=False, latents=[3, 1], progress=False)
    assert listed.sites == ["L0.resid_post.sae1", "L0.resid_post.sae3", "L0.resid_post.sae_error"]
    with pytest.raises(TaskError, match="kind='sae'"):
        patch(m, b, "head", latents=3, progress=False)
    with pytest.raises(TaskError, match="no dictionary is attached"):
        patch(m, b, "sae", latents={"L2.resid_post": [1]}, progress=False)


def test_patching_latents_needs_a_dictionary():
    m = mechanic.load(tiny_model("llama"))
    with pytest.raises(TaskError, match="features.attach"):
        patch(m, padded_batch(m), "sae", progress=False)


@pytest.mark.real
def test_patching_latents_on_smollm2(smollm2):
    """A few latents of a random SAE on L3.resid_post of SmolLM2, at the last two columns, against the naive loop."""
    import time

    from mechanic.features import detach

    m = smollm2
    task = Task("ioi-one", [Example("When Mary and John went to the store, John gave a drink to", " Mary", " John",
                                    "When Mary and John went to the store, Paul gave a drink to")] * 2)
    b = task.tokenize(m)
    D = m.dims.d_model
    d = randomized(Dictionary(D, 64, "relu", site="L3.resid_post"), 1, 0.05)
    attach(m, d)
    try:
        t0 = time.time()
        fast = patch(m, b, "sae", positions=[-1, 9], normalise=False, latents=6, progress=False)
        took = time.time() - t0
        ref, names = naive_latent_patching(m, b, d, 3, [-1, 9])
        want = [names.index(s) for s in fast.sites]
        diff = (fast.values - ref[want]).abs().max().item()
        print(f"\nSmolLM2 latent patching ({len(fast.sites)} units x 2 columns, {took:.1f}s): max abs diff vs "
              f"naive {diff:.2e}")
        assert diff < 1e-5
        assert (ref[want] - fast.settings["metric_corrupted"]).abs().max().item() > 1e-3
    finally:
        detach(m, "L3.resid_post")


# ---------------------------------------------------------------- EAP over features: an explicit Llama
def hand_dictionary(d, model, base):
    """A dictionary's maths by hand, from its weights (not Dictionary.encode): (encode, write directions W in the
    residual, what it encodes: x | attn | z | y | neuron | mlp_in), with ReLU or TopK latents of
    (x - b_dec) W_enc + b_enc (x W_enc + b_enc for a transcoder)."""
    W_enc, b_enc, W_dec, b_dec = (t.detach() for t in (d.W_enc, d.b_enc, d.W_dec, d.b_dec))
    sub = 0 if d.transcoder else b_dec
    if d.architecture == "topk":
        def enc(x):
            pre = (x - sub) @ W_enc + b_enc
            vals, idx = pre.topk(int(d.k), dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    else:
        def enc(x):
            return torch.relu((x - sub) @ W_enc + b_enc)
    layer, part = int(base[1:base.index(".")]), base.split(".", 1)[1]
    blk = blocks(model.hf)[layer]
    W = W_dec
    if part == "head.z":
        W = W_dec @ blk.self_attn.o_proj.weight.detach().T
    elif part == "neuron":
        W = W_dec @ blk.mlp.down_proj.weight.detach().T
    reads = "mlp_in" if d.transcoder else {"attn_out": "attn", "head.z": "z", "mlp_out": "y", "neuron": "neuron"}.get(
        part, "x")
    return enc, W, reads


def explicit_feature_llama(hf, ids, dicts, x0=None, eps=None, delta=None):
    """The tiny Llama forward written out (as test_gradient.explicit_llama) with the feature graph's nodes: every
    receiver reads its own copy of the residual, receiver v's copy gets + sum_u eps[u, v] * delta[u] over the
    senders written since the last cut. dicts: base site -> hand_dictionary(...).

    A dictionary on attn_out / head.z replaces the layer's heads: latent f reads a copy x_f, runs all heads on it
    and writes a_f(enc input) W[f]; the error reads x_e and writes heads(x_e) - a(x_e) W. One on mlp_out / neuron
    or a transcoder (mlp_in -> mlp_out) does the same with the MLP. One on resid_pre / resid_mid / resid_post is a
    cut: latents and error read the residual (the error writes x_e - a(x_e) W) and the residual becomes the sum
    of what they write. Returns (sender names, receiver names, sender outputs [S, b, p, d], last logits,
    reads [S, R] bool: which senders each receiver reads)."""
    lm = hf.model
    H, KV, dh, P, rope, rms, causal = llama_pieces(hf, ids.shape[1])
    senders, receivers, outs, pairs, avail = [], [], [], [], []

    def read(name, R):
        v = len(receivers)
        receivers.append(name)
        pairs.extend((u, v) for u in avail)
        if eps is None or not avail:
            return R
        return R + torch.einsum("u,ubpd->bpd", eps[avail, v], delta[avail])

    def write(name, value):
        senders.append(name)
        outs.append(value)
        avail.append(len(senders) - 1)

    def heads(layer, x):
        """(z [b, p, H * dh], per-head contributions [H, b, p, d]) of layer's attention on residual x."""
        a = layer.self_attn
        x = rms(x, layer.input_layernorm.weight)
        zs, cs = [], []
        for h in range(H):
            kv = h // (H // KV)
            q = rope(x @ a.q_proj.weight[h * dh:(h + 1) * dh].T)
            k = rope(x @ a.k_proj.weight[kv * dh:(kv + 1) * dh].T)
            val = x @ a.v_proj.weight[kv * dh:(kv + 1) * dh].T
            pat = (q @ k.transpose(-1, -2) / dh ** 0.5).masked_fill(~causal, float("-inf")).softmax(-1)
            zs.append(pat @ val)
            cs.append(zs[-1] @ a.o_proj.weight[:, h * dh:(h + 1) * dh].T)
        return torch.cat(zs, -1), torch.stack(cs)

    def mlp(layer, x):
        """(MLP output, its normalised input, the FFN activations) on residual x."""
        x_in = rms(x, layer.post_attention_layernorm.weight)
        act = torch.nn.functional.silu(layer.mlp.gate_proj(x_in)) * layer.mlp.up_proj(x_in)
        return layer.mlp.down_proj(act), x_in, act

    def component(kind, reads, layer, x):
        """(encoder input, component output) of a dictionary's component on residual x."""
        if kind == "attn":
            z, cs = heads(layer, x)
            return (z if reads == "z" else cs.sum(0)), cs.sum(0)
        y, x_in, act = mlp(layer, x)
        return {"y": y, "neuron": act, "mlp_in": x_in}[reads], y

    def replaced(kind, base, layer, R):
        """Latent and error nodes of the dictionary at `base` in place of a component (kind attn | mlp) or as a cut."""
        enc, W, reads = dicts[base]
        F = W.shape[0]
        names = [f"{base}.sae{f}" for f in range(F)] + [f"{base}.sae_error"]
        xs = [read(n, R) for n in names]
        values = []
        for f, x in enumerate(xs):
            e, comp = (x, x) if kind == "cut" else component(kind, reads, layer, x)
            a = enc(e)
            values.append(a[..., f:f + 1] * W[f] if f < F else comp - a @ W)
        if kind == "cut":
            avail.clear()
        for n, v in zip(names, values):
            write(n, v)
        return sum(values) if kind == "cut" else R + sum(values)

    def cut(part, li, R):
        base = f"L{li}.{part}"
        return replaced("cut", base, None, R) if base in dicts else R

    R = lm.embed_tokens(ids) if x0 is None else x0
    write("embed", R)
    for li, layer in enumerate(lm.layers):
        R = cut("resid_pre", li, R)
        base = next((f"L{li}.{p}" for p in ("attn_out", "head.z") if f"L{li}.{p}" in dicts), None)
        if base:
            R = replaced("attn", base, layer, R)
        else:
            xs = [read(f"L{li}.head{h}", R) for h in range(H)]
            cs = [heads(layer, x)[1][h] for h, x in enumerate(xs)]
            for h, c in enumerate(cs):
                write(f"L{li}.head{h}", c)
            R = R + sum(cs)
        R = cut("resid_mid", li, R)
        base = next((f"L{li}.{p}" for p in ("mlp_out", "neuron") if f"L{li}.{p}" in dicts), None)
        if base:
            R = replaced("mlp", base, layer, R)
        else:
            y = mlp(layer, read(f"L{li}.mlp_out", R))[0]
            write(f"L{li}.mlp_out", y)
            R = R + y
        R = cut("resid_post", li, R)
    x = rms(read("logits", R), lm.norm.weight)
    reads = torch.zeros(len(senders), len(receivers), dtype=torch.bool)
    for u, v in pairs:
        reads[u, v] = True
    return senders, receivers, torch.stack(outs), hf.lm_head(x[:, -1]), reads


def naive_feature_edges(hf, b, dicts, ig_steps=None):
    """d metric / d eps[u, v] at eps = 0 with delta = corrupted - clean sender outputs (mean logit difference)."""
    with torch.no_grad():
        S, Rn, s_clean, _, reads = explicit_feature_llama(hf, b.clean["input_ids"], dicts)
        _, _, s_corr, _, _ = explicit_feature_llama(hf, b.corrupted["input_ids"], dicts)
    x_clean, x_corr = s_clean[0], s_corr[0]
    total = 0
    points = [1.0] if ig_steps is None else [k / ig_steps for k in range(ig_steps)]
    for alpha in points:
        eps = torch.zeros(len(S), len(Rn), dtype=s_clean.dtype, requires_grad=True)
        logits = explicit_feature_llama(hf, b.clean["input_ids"], dicts, x_corr + alpha * (x_clean - x_corr), eps,
                                        s_corr - s_clean)[3]
        (g,) = torch.autograd.grad(logit_diff(logits[:, None], b.answer, b.wrong).mean(), eps)
        total = total + g
    return S, Rn, total / len(points), reads


def graph_dictionaries(m):
    """One dictionary of every kind EAP places, on the tiny Llama (3 layers): a neuron SAE and a TopK SAE cutting the
    residual after layer 0; attn_out, mlp_out and resid_mid SAEs in layer 1; resid_pre, head.z and a skip transcoder
    (mlp_in -> mlp_out) in layer 2."""
    D, Z, M = m.dims.d_model, m.dims.n_heads * m.dims.d_head, m.dims.d_mlp
    specs = [Dictionary(M, 12, "relu", site="L0.neuron"), Dictionary(D, 24, "topk", k=5, site="L0.resid_post"),
             Dictionary(D, 16, "relu", site="L1.attn_out"), Dictionary(D, 16, "relu", site="L1.resid_mid"),
             Dictionary(D, 16, "relu", site="L1.mlp_out"), Dictionary(D, 12, "relu", site="L2.resid_pre"),
             Dictionary(Z, 16, "relu", site="L2.head.z"),
             Dictionary(D, 16, "relu", site="L2.mlp_in", out_site="L2.mlp_out", skip=True)]
    return [randomized(d, i, 0.25) for i, d in enumerate(specs)]


@pytest.mark.parametrize("ig_steps", [None, 3])
def test_feature_eap_equals_explicit_per_edge_terms(ig_steps):
    """In float64, so that what is compared is the computation, not float32 rounding (in float32 the two differ by
    up to ~1e-5 relative on these random dictionaries, whose error nodes are differences of large outputs); what
    remains is HF's RoPE tables, which it builds in float32 (~5e-7)."""
    from mechanic.locate.gradient import eap, upstream_mask
    from test_gradient import tiny_batch as graph_batch

    hf = tiny_model("llama").double()
    m = mechanic.load(hf)
    b = graph_batch(n=3, P=6)
    dicts = {}
    for d in graph_dictionaries(m):
        d = d.double()
        base = str(attach(m, d))
        dicts[base] = hand_dictionary(d, m, base)
    with torch.no_grad():
        ref = hf(**b.clean, use_cache=False).logits[:, -1]
        assert (explicit_feature_llama(hf, b.clean["input_ids"], dicts)[3] - ref).abs().max().item() < 1e-5
    scores = eap(m, b, features=True, ig_steps=ig_steps, batch_size=2)
    S, Rn, naive, reads = naive_feature_edges(hf, b, dicts, ig_steps)
    assert sorted(S) == sorted(scores.sites) and sorted(Rn) == sorted(scores.positions)
    si, ri = [S.index(s) for s in scores.sites], [Rn.index(r) for r in scores.positions]
    naive, reads = naive[si][:, ri], reads[si][:, ri]
    assert reads.equal(upstream_mask(scores.sites, scores.positions))      # the same graph, edge for edge
    diff = (scores.values - naive).abs().max().item()
    print(f"\nfeature EAP{'' if ig_steps is None else '-IG'}: {len(S)} senders x {len(Rn)} receivers, "
          f"{int(reads.sum())} edges; max abs diff vs explicit per-edge terms {diff:.2e} (largest edge "
          f"{naive.abs().max().item():.2e})")
    assert diff < 1e-5
    for base in dicts:     # every dictionary's latents carry edges both ways (the test is not vacuous)
        lat = [i for i, s in enumerate(scores.sites) if s.startswith(base + ".sae") and not s.endswith("_error")]
        rec = [j for j, r in enumerate(scores.positions) if r.startswith(base + ".sae") and not r.endswith("_error")]
        assert naive[lat].abs().max().item() > 1e-4 and naive[:, rec].abs().max().item() > 1e-4, base


def test_feature_eap_ig_points_as_batch_rows_equal_one_at_a_time():
    """EAP-IG over features with its points run as batch rows equals one point per graph run (the former loop),
    in float64; each point's gradients and residuals are read back from its own rows."""
    from mechanic.locate.gradient import eap
    from test_gradient import tiny_batch as graph_batch

    m = mechanic.load(tiny_model("llama").double())
    b = graph_batch(n=3, P=6)
    for d in graph_dictionaries(m):
        attach(m, d.double())
    one, *batched = [eap(m, b, features=True, ig_steps=3, ig_batch=k, batch_size=2) for k in (1, 2, 3)]
    assert one.values.abs().max().item() > 1e-3
    for s in batched:
        assert s.sites == one.sites and s.positions == one.positions
        assert (s.values - one.values).abs().max().item() < 1e-6


# ---------------------------------------------------------------- EAP over features: edges add up
def group_sums(values, senders, receivers, group):
    """values summed over the sender and receiver groups group(name) (a node's group; nodes of one dictionary
    share the group of what they replace)."""
    gs, gr = list(dict.fromkeys(map(group, senders))), list(dict.fromkeys(map(group, receivers)))
    A = torch.zeros(len(gs), len(senders), dtype=torch.float64)
    B = torch.zeros(len(receivers), len(gr), dtype=torch.float64)
    for i, s in enumerate(senders):
        A[gs.index(group(s)), i] = 1
    for j, r in enumerate(receivers):
        B[j, gr.index(group(r))] = 1
    return A @ values.double() @ B, gs, gr


def split_dictionaries(m):
    """Dictionaries on components' outputs: attn_out (L0), mlp_out (L1), head.z (L2), a transcoder (L2), and a
    neuron SAE on L0 where that layer is dense."""
    D, Z = m.dims.d_model, m.dims.n_heads * m.dims.d_head
    out = [Dictionary(D, 24, "relu", site="L0.attn_out"), Dictionary(D, 24, "topk", k=6, site="L1.mlp_out"),
           Dictionary(Z, 20, "relu", site="L2.head.z"),
           Dictionary(D, 20, "jumprelu", site="L2.mlp_in", out_site="L2.mlp_out", skip=True)]
    if not m.is_moe(0):
        out.append(Dictionary(m.dims.d_mlp, 16, "relu", site="L0.neuron"))
    out = [randomized(d, i, 0.25) for i, d in enumerate(out)]
    with torch.no_grad():
        out[3].threshold.uniform_(0, 0.1)
    return out


def replaced_group(name):
    """The component-graph node group a feature-graph node stands for: a layer's heads for attention dictionaries,
    its MLP for MLP dictionaries and transcoders; other nodes (and a cut's) stand for themselves."""
    if ".sae" not in name:
        return "attn" + name.split(".")[0] if ".head" in name else name
    base = name.rsplit(".sae", 1)[0]
    layer, part = base.split(".", 1)
    if part.startswith("resid"):
        return name                     # a cut replaces nothing
    return "attn" + layer if part in ("attn_out", "head.z") else f"{layer}.mlp_out"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2_moe", "phi3"])
def test_feature_edges_add_up_to_the_components_they_replace(arch):
    """Edges out of (into) a dictionary's latents + error node sum to the edges out of (into) the component(s) it
    decomposes in the component graph; edges between other nodes are the component graph's (1e-5)."""
    from mechanic.locate.gradient import eap
    from test_gradient import tiny_batch as graph_batch

    m = mechanic.load(tiny_model(arch))
    b = graph_batch(n=3, P=6, seed=1)
    plain = eap(m, b, batch_size=2)
    for d in split_dictionaries(m):
        attach(m, d)
    feats = eap(m, b, features=True, batch_size=2)
    got, gs, gr = group_sums(feats.values, feats.sites, feats.positions, replaced_group)
    want, ps, pr = group_sums(plain.values, plain.sites, plain.positions, replaced_group)
    assert gs == ps and gr == pr
    diff = (got - want).abs().max().item()
    assert diff < 1e-5, diff
    lat = [i for i, s in enumerate(feats.sites) if ".sae" in s and not s.endswith("_error")]
    assert feats.values[lat].abs().max().item() > 1e-3         # latents carry real edges
    assert feats.settings["features"] == list(m.dictionaries) and feats.method == "eap"


@pytest.mark.parametrize("arch,site", [("llama", "L1.resid_mid"), ("gpt_neox", "L1.resid_pre"),
                                       ("mixtral", "L0.resid_post"), ("gpt2", "L1.resid_post")])
def test_residual_dictionary_is_a_cut_whose_edges_add_up(arch, site):
    """A dictionary on the residual stream: edges from a sender into its latents + error sum to that sender's edges
    to every receiver after the cut, edges out of them to a receiver sum to the edges into it from every sender
    before the cut; no edge crosses the cut (1e-5). Its input is normalised (layer_norm) and TopK, so a~ and the
    error's constant part move between runs."""
    from mechanic.locate.gradient import eap
    from test_gradient import tiny_batch as graph_batch

    m = mechanic.load(tiny_model(arch))
    b = graph_batch(n=3, P=6, seed=2)
    plain = eap(m, b, batch_size=2)
    D = m.dims.d_model
    attach(m, randomized(Dictionary(D, 32, "topk", k=6, site=site, normalize="layer_norm"), 5, 0.25))
    feats = eap(m, b, features=True, batch_size=2)
    into, out, same = cut_sums(feats, plain, site, m.parallel)
    assert max(into, out, same) < 1e-5, (into, out, same)
    V = feats.values
    mine_s = [i for i, s in enumerate(feats.sites) if s.startswith(site + ".")]
    mine_r = [j for j, r in enumerate(feats.positions) if r.startswith(site + ".")]
    assert V[mine_s[:-1]].abs().max().item() > 1e-3 and V[:, mine_r[:-1]].abs().max().item() > 1e-3


def cut_sums(feats, plain, site, parallel):
    """For the cut at `site`, with nodes grouped by replaced_group (so other dictionaries may be attached): max
    |difference| between (into) each sender's edges into the cut's nodes and its component-graph edges to every
    receiver after the cut, (out) each receiver's edges from the cut's nodes and its edges from every sender before
    the cut, (same) the edges that do not cross the cut and their component-graph counterparts. No edge may cross."""
    from mechanic.locate.gradient import _step

    gf, fs, fr = group_sums(feats.values, feats.sites, feats.positions, replaced_group)
    gp, ps, pr = group_sums(plain.values, plain.sites, plain.positions, replaced_group)
    writes = {replaced_group(n): 2 * _step(n, parallel) + 1 for n in feats.sites + plain.sites}
    reads = {replaced_group(n): 2 * _step(n, parallel) for n in feats.positions + plain.positions}
    mine_s = [i for i, g in enumerate(fs) if g.startswith(site + ".")]
    mine_r = [j for j, g in enumerate(fr) if g.startswith(site + ".")]
    cut = reads[site + ".sae_error"]
    before, after = [u for u in ps if writes[u] < cut], [v for v in pr if reads[v] > cut + 1]
    into = max(abs(gf[fs.index(u), mine_r].sum() - gp[ps.index(u), [pr.index(v) for v in after]].sum()).item()
               for u in before)
    out = max(abs(gf[mine_s, fr.index(v)].sum() - gp[[ps.index(u) for u in before], pr.index(v)].sum()).item()
              for v in after)
    assert all(gf[fs.index(u), fr.index(v)] == 0 for u in before for v in after)
    same = [(u, v) for u in ps for v in pr if not (u in before and v in after)]
    return into, out, max(abs(gf[fs.index(u), fr.index(v)] - gp[ps.index(u), pr.index(v)]).item() for u, v in same)


def test_grouped_latents_are_the_sum_of_their_members():
    """latents=: the kept latents are the same nodes as in the full graph, the others' node `<base>.sae` carries the
    sum of their edges (both ways, through the attention and through a cut); latents=N keeps the N latents whose
    activations differ most between clean and corrupted prompts."""
    from mechanic.locate.gradient import eap
    from test_gradient import tiny_batch as graph_batch

    m = mechanic.load(tiny_model("llama"))
    b = graph_batch(n=3, P=6, seed=3)
    D = m.dims.d_model
    attach(m, randomized(Dictionary(D, 24, "relu", site="L1.attn_out"), 1, 0.25))
    attach(m, randomized(Dictionary(D, 24, "topk", k=5, site="L1.resid_post"), 2, 0.25))
    full = eap(m, b, features=True, ig_steps=2, batch_size=2)
    keep = {"L1.attn_out": [3, 7, 11], "L1.resid_post": [0, 5]}
    part = eap(m, b, features=True, latents=keep, ig_steps=2, batch_size=2)
    kept = {f"{base}.sae{f}" for base, fs in keep.items() for f in fs}

    def group(name):
        lone = ".sae" not in name or name.endswith("_error") or name in kept
        return name if lone else name.rsplit("sae", 1)[0] + "sae"
    got, gs, gr = group_sums(full.values, full.sites, full.positions, group)
    assert sorted(gs) == sorted(part.sites) and sorted(gr) == sorted(part.positions)
    got = got[[gs.index(s) for s in part.sites]][:, [gr.index(r) for r in part.positions]]
    assert (got - part.values.double()).abs().max().item() < 1e-5
    assert part.values[part.sites.index("L1.attn_out.sae")].abs().max().item() > 1e-3
    top = eap(m, b, features=["L1.resid_post"], latents=4, batch_size=2)
    c, x = (m.run(p, cache=["L1.resid_post.sae"])["L1.resid_post.sae"] for p in (b.clean, b.corrupted))
    want = sorted((c - x).abs().sum((0, 1)).argsort(descending=True)[:4].tolist())
    assert top.settings["latents"] == {"L1.resid_post": want}
    assert [s for s in top.sites if s.startswith("L1.resid_post")] == (
        [f"L1.resid_post.sae{f}" for f in want] + ["L1.resid_post.sae", "L1.resid_post.sae_error"])
    assert not any(s.startswith("L1.attn_out") for s in top.sites)     # features= picks the dictionaries


def test_feature_circuits_and_clear_errors():
    from mechanic.locate.circuit import top_edges
    from mechanic.locate.gradient import eap
    from test_gradient import tiny_batch as graph_batch

    m = mechanic.load(tiny_model("llama"))
    b = graph_batch(n=2, P=5)
    D = m.dims.d_model
    with pytest.raises(ValueError, match="features.attach"):
        eap(m, b, features=True)
    with pytest.raises(ValueError, match="needs features=True"):
        eap(m, b, latents=3)
    attach(m, randomized(Dictionary(D, 16, "relu", site="L1.mlp_out"), 1, 0.25))
    scores = eap(m, b, features=True)
    assert len(top_edges(scores, 10 ** 6)) == scores.settings["n_edges"]   # every feature node is on a path
    c = top_edges(scores, 60)                       # circuits: edges on a path embed -> ... -> logits
    assert 0 < len(c) <= 60 and any(".sae" in u for u, _ in c.edges)
    for u, v in c.edges:
        assert u == "embed" or any(v2 == u for _, v2 in c.edges)
        assert v == "logits" or any(u2 == v for u2, _ in c.edges)
    with pytest.raises(ValueError, match="no dictionary is attached"):
        eap(m, b, features=["L2.resid_post"])
    attach(m, randomized(Dictionary(m.dims.d_mlp, 16, "relu", site="L1.neuron"), 2, 0.25))
    with pytest.raises(ValueError, match="both decompose the MLP of layer 1"):
        eap(m, b, features=True)
    attach(m, randomized(Dictionary(D, 16, "relu", site="L2.mlp_in"), 3, 0.25))
    with pytest.raises(ValueError, match="normalised input"):
        eap(m, b, features=["L2.mlp_in"])
    with pytest.raises(ValueError, match="out of range"):
        eap(m, b, features=["L1.mlp_out"], latents=[99])


def test_effective_latents_are_what_the_decoder_applies():
    """reconstruction = a~ W_dec + the decoder's constant part, for normalising, rescaled and scaled dictionaries."""
    from mechanic.locate.gradient import effective_latents

    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    for i, kw in enumerate([dict(normalize="layer_norm"), dict(normalize="constant_norm_rescale"),
                            dict(rescale_acts_by_decoder_norm=True), dict(normalize="layer_norm", skip=True,
                                                                          out_site="L0.mlp_out", site="L0.mlp_in")]):
        d = randomized(Dictionary(16, 24, "relu", **{"site": "L0.resid_post", **kw}), i, 0.3)
        if i == 2:
            d.scaling_factor = torch.rand(24, generator=torch.Generator().manual_seed(1)) + 0.5
        with torch.no_grad():
            a = effective_latents(d, x)
            d.encode(x)
            const = d.decode(torch.zeros(2, 5, 24)) + d.skip(x)
            assert (a @ d.W_dec + const - d(x)).abs().max().item() < 1e-5, kw
            assert (a != 0).equal(d.encode(x) != 0)


@pytest.mark.real
def test_feature_eap_on_smollm2(smollm2):
    """SmolLM2 on two IOI prompts, a random 16x TopK SAE cutting the residual after layer 10 and a 4x one on layer
    12's attention output, 16 latents each as nodes, EAP-IG: the dictionaries' edges add up to the component
    graph's."""
    import time

    from mechanic.features import detach
    from mechanic.locate.gradient import eap
    from test_gradient import ioi_task

    m = smollm2
    b = ioi_task(2).tokenize(m)
    plain = eap(m, b, ig_steps=2)
    D = m.dims.d_model
    attach(m, randomized(Dictionary(D, 16 * D, "topk", k=32, site="L10.resid_post"), 0, 0.05))
    attach(m, randomized(Dictionary(D, 4 * D, "topk", k=16, site="L12.attn_out"), 1, 0.05))
    try:
        t0 = time.time()
        feats = eap(m, b, features=True, latents=16, ig_steps=2)
        took = time.time() - t0
    finally:
        detach(m, "L10.resid_post")
        detach(m, "L12.attn_out")
    into, out, same = cut_sums(feats, plain, "L10.resid_post", False)
    print(f"\nSmolLM2 feature EAP-IG ({feats.values.shape[0]} x {feats.values.shape[1]} nodes, {took:.1f}s): "
          f"max |sum - component graph| into the cut {into:.1e}, out of it {out:.1e}, elsewhere (attention "
          f"dictionary summed) {same:.1e}; largest edge {feats.values.abs().max().item():.1e}")
    assert max(into, out, same) < 1e-5
