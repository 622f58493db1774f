"""Attribution patching (AtP) against naive first-order terms and exact patching; EAP / EAP-IG edges; circuits."""

import pytest
import torch
from naive import blocks, expert_first_order, first_order, llama_pieces, patch_reference, patch_tolerance, point

import mechanic
from mechanic.locate.gradient import atp
from mechanic.tasks.task import TaskBatch, TaskError
from mechanic.testing.tiny import tiny_model


def tiny_batch(n=4, P=7, seed=0, vocab=101, changed=(2, 4)):
    """A TaskBatch from random token ids: corrupted = clean with a few positions changed."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, P), generator=g)
    corr = ids.clone()
    for p in changed:
        corr[:, p] = torch.randint(3, vocab, (n,), generator=g)
    mask = torch.ones_like(ids)
    pos = torch.arange(P).expand(n, P).contiguous()
    mk = lambda x: {"input_ids": x, "attention_mask": mask, "position_ids": pos}  # noqa: E731
    return TaskBatch(mk(ids), mk(corr), torch.randint(3, vocab, (n,), generator=g),
                     torch.randint(3, vocab, (n,), generator=g), [[str(t) for t in r.tolist()] for r in ids])


def ld(logits, b):
    rows = torch.arange(logits.shape[0])
    return (logits[:, -1][rows, b.answer] - logits[:, -1][rows, b.wrong]).mean()


@pytest.mark.parametrize("at", ["corrupted", "clean"])
def test_atp_equals_naive_first_order_term_dense(at):
    m = mechanic.load(tiny_model("llama"))
    b = tiny_batch()
    out = atp(m, b, ["head", "neuron", "resid_pre"], metric=lambda lg, bb: lg[torch.arange(lg.shape[0]), bb.answer]
              - lg[torch.arange(lg.shape[0]), bb.wrong], gradient_at=at, batch_size=3)
    H = m.hf.config.num_attention_heads
    tol = grad_tolerance(m, b)
    heads = first_order(m, b, *point(m.hf, "head", 1), lambda r: (H,), at)
    got = out["head"].values[out["head"].sites.index("L1.head0"):][:H]
    assert (got - heads).abs().max().item() < tol
    neurons = first_order(m, b, *point(m.hf, "neuron", 2), lambda r: (r.shape[-1],), at)
    i = out["neuron"].sites.index("L2.neuron0")
    assert (out["neuron"].values[i:i + len(neurons)] - neurons).abs().max().item() < tol
    resid = first_order(m, b, blocks(m.hf)[1], "in", lambda r: (r.shape[1],), at)
    row = out["resid_pre"].values[out["resid_pre"].sites.index("L1.resid_pre")]
    assert (row - resid).abs().max().item() < tol
    assert min(heads.abs().max(), neurons.abs().max(), resid.abs().max()).item() > 100 * tol  # not all ~0
    assert out["head"].method == "atp" and out["head"].fingerprint == m.fingerprint
    assert out["resid_pre"].positions is not None and out["head"].positions is None


def test_atp_equals_naive_first_order_term_moe():
    """Heads and experts of a Mixtral-style model against plain hooks with autograd."""
    m = mechanic.load(tiny_model("mixtral"))
    b = tiny_batch(seed=1)
    out = atp(m, b, ["head", "expert"], metric="logit_diff")
    H, E = m.hf.config.num_attention_heads, blocks(m.hf)[1].mlp.experts.num_experts
    tol = grad_tolerance(m, b)
    heads = first_order(m, b, *point(m.hf, "head", 0), lambda r: (H,))
    assert (out["head"].values[:H] - heads).abs().max().item() < tol
    i = out["expert"].sites.index("L1.expert0")
    assert (out["expert"].values[i:i + E] - expert_first_order(m, b, 1)).abs().max().item() < tol
    assert out["expert"].values.abs().max() > 1e-4  # not trivially zero


def exact_head_patching(model, b):
    """m(corrupted run with head h := its clean value) - m(corrupted), one head per row (plain hooks, tests/naive.py)."""
    with torch.no_grad():
        lg = model.hf(**b.corrupted, use_cache=False).logits[:, -1]
    rows = torch.arange(b.n)
    base = (lg[rows, b.answer] - lg[rows, b.wrong]).mean()
    values, _ = patch_reference(model, b, "head", None, normalise=False)
    return values - base


def grad_tolerance(model, b, factor=64):
    """float32 eps x the logit scale x a margin for rounding accumulated through the layers (as patch_tolerance)."""
    with torch.no_grad():
        scale = max(model.hf(**b.clean, use_cache=False).logits.abs().max().item(), 1.0)
    return factor * torch.finfo(torch.float32).eps * scale


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_atp_agrees_with_exact_head_patching(arch):
    """On tiny random models effects are small, so AtP is close to exact; check correlation and the biggest signs."""
    m = mechanic.load(tiny_model(arch))
    b = tiny_batch(n=6, seed=2)
    scores = atp(m, b, "head").values
    exact = exact_head_patching(m, b)
    top = exact.abs().argsort(descending=True)[:4]
    assert (scores[top].sign() == exact[top].sign()).all()
    assert torch.corrcoef(torch.stack([scores, exact]))[0, 1].item() > 0.9


def test_atp_chunks_and_errors():
    m = mechanic.load(tiny_model("llama"))
    b = tiny_batch(n=5)
    whole = atp(m, b, "head", batch_size=None)
    parts = atp(m, b, "head", batch_size=2)
    assert (whole.values - parts.values).abs().max().item() < 1e-6
    assert whole.settings["metric_clean"] == pytest.approx(parts.settings["metric_clean"], abs=1e-6)
    per_pos = atp(m, b, "head", per_position=True)
    assert (per_pos.values.sum(1) - whole.values).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="cannot score kind"):
        atp(m, b, "heads")
    with pytest.raises(ValueError, match="no expert sites"):
        atp(m, b, "expert")
    with pytest.raises(ValueError, match="gradient_at"):
        atp(m, b, "head", gradient_at="middle")
    with pytest.raises(TaskError, match="no corrupted prompts"):
        atp(m, TaskBatch(b.clean, None, b.answer, b.wrong, b.tokens), "head")


# ---------------------------------------------------------------- capture_calls (engine)
def test_capture_calls_replays_a_layer_exactly():
    m = mechanic.load(tiny_model("llama"))
    b = tiny_batch()
    run = m.run(b.clean, cache=["L1.resid_pre", "L1.resid_post"], capture_calls=["model.layers.1"])
    assert len(run.calls["model.layers.1"]) == 1
    args, kwargs = run.calls["model.layers.1"][0]
    with torch.no_grad():
        out = m.layers[1](run["L1.resid_pre"], *args[1:], **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    assert (out - run["L1.resid_post"]).abs().max().item() < 1e-6
    assert m.hook_count() == 0
    with pytest.raises(ValueError, match="no module at"):
        m.run(b.clean, capture_calls=["model.layers.9"])


# ---------------------------------------------------------------- EAP / EAP-IG against an explicit Llama
def explicit_llama(hf, ids, x0=None, eps=None, delta=None):
    """A plain re-implementation of the tiny Llama forward (no padding) in which every head, MLP and the
    unembedding reads its own copy of the residual; receiver v's input gets + sum_u eps[u, v] * delta[u].
    Returns (sender outputs [U, b, p, d] in graph order, last-position logits)."""
    lm = hf.model
    H, KV, dh, P, rope, rms, causal = llama_pieces(hf, ids.shape[1])
    R = lm.embed_tokens(ids) if x0 is None else x0
    senders, v = [R], 0

    def read(R, v):
        if eps is None:
            return R
        n = len(senders)
        return R + torch.einsum("u,ubpd->bpd", eps[:n, v], delta[:n])
    for layer in lm.layers:
        a, heads = layer.self_attn, []
        for h in range(H):
            x = rms(read(R, v + h), layer.input_layernorm.weight)
            kv = h // (H // KV)
            q = rope(x @ a.q_proj.weight[h * dh:(h + 1) * dh].T)
            k = rope(x @ a.k_proj.weight[kv * dh:(kv + 1) * dh].T)
            val = x @ a.v_proj.weight[kv * dh:(kv + 1) * dh].T
            pat = (q @ k.transpose(-1, -2) / dh ** 0.5).masked_fill(~causal, float("-inf")).softmax(-1)
            heads.append((pat @ val) @ a.o_proj.weight[:, h * dh:(h + 1) * dh].T)
        senders += heads
        v += H
        mid = R + sum(heads)
        x = rms(read(mid, v), layer.post_attention_layernorm.weight)
        y = layer.mlp.down_proj(torch.nn.functional.silu(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x))
        senders.append(y)
        v += 1
        R = mid + y
    x = rms(read(R, v), lm.norm.weight)
    return torch.stack(senders), hf.lm_head(x[:, -1])


def naive_edge_scores(hf, b, ig_steps=None):
    """d metric / d eps[u, v] at eps = 0, delta = corrupted - clean sender outputs: every edge's first-order term."""
    with torch.no_grad():
        s_clean, _ = explicit_llama(hf, b.clean["input_ids"])
        s_corr, _ = explicit_llama(hf, b.corrupted["input_ids"])
    x_clean, x_corr = s_clean[0], s_corr[0]
    points = [1.0] if ig_steps is None else [k / ig_steps for k in range(ig_steps)]
    total = 0
    for alpha in points:
        eps = torch.zeros(s_clean.shape[0], s_clean.shape[0], requires_grad=True)
        _, logits = explicit_llama(hf, b.clean["input_ids"], x_corr + alpha * (x_clean - x_corr), eps, s_corr - s_clean)
        rows = torch.arange(logits.shape[0])
        (g,) = torch.autograd.grad((logits[rows, b.answer] - logits[rows, b.wrong]).mean(), eps)
        total = total + g
    return total / len(points)


@pytest.mark.parametrize("ig_steps", [None, 3])
def test_eap_equals_explicit_per_edge_first_order_terms(ig_steps):
    from mechanic.locate.gradient import eap

    hf = tiny_model("llama")
    m = mechanic.load(hf)
    b = tiny_batch(n=3, P=6)
    with torch.no_grad():
        ref_logits = hf(**b.clean, use_cache=False).logits[:, -1]
        assert (explicit_llama(hf, b.clean["input_ids"])[1] - ref_logits).abs().max().item() < 1e-5
    scores = eap(m, b, ig_steps=ig_steps, batch_size=2)
    naive = naive_edge_scores(hf, b, ig_steps)
    assert scores.values.shape == naive.shape == (1 + 3 * 5, 3 * 5 + 1)
    real = scores.values != 0
    assert (naive[~real] == 0).all()       # no edge where the graph has none (eps there never reaches the metric)
    assert (scores.values - naive).abs().max().item() < 1e-5
    assert naive.abs().max().item() > 1e-3
    assert scores.method == ("eap" if ig_steps is None else "eap-ig") and scores.positions[-1] == "logits"


def loop_eap_ig(m, b, steps, size=8):
    """EAP-IG as computed before its points were batched: per chunk of `size` examples the clean and corrupted
    graph runs, then one graph forward + backward per point (the reference the batched points must equal; the
    IOI benchmark times it as the "before")."""
    from mechanic.locate.gradient import ComponentGraph, prepare_graph_inputs, receiver_grads
    from mechanic.tasks.metrics import logit_diff

    g = ComponentGraph(m)
    total = 0
    for start in range(0, b.n, size):
        sub = b.select(slice(start, start + size))
        x0c, x0x, calls, _, _ = prepare_graph_inputs(m, g, sub)
        with torch.no_grad():
            s_corr, _ = g.execute(x0x, calls)
            s_clean, _ = g.execute(x0c, calls)
        G = 0
        for k in range(steps):
            G = G + receiver_grads(g, x0x + (k / steps) * (x0c - x0x), calls,
                                   lambda lg, sub=sub: logit_diff(lg, sub).sum())[1]
        total = total + torch.einsum("ubpd,vbpd->uv", s_corr - s_clean, G / steps).double()
    return ((total / b.n).float() * g.upstream).float()


def test_eap_ig_points_as_batch_rows_equal_the_loop_float64():
    """ig_batch (points per graph run) changes nothing but speed and memory: every grouping equals the loop."""
    from mechanic.locate.gradient import eap

    m = mechanic.load(tiny_model("llama").double())
    b = tiny_batch(n=3, P=6)
    ref = loop_eap_ig(m, b, 4, 2)
    assert ref.abs().max().item() > 1e-3
    for k in (1, 3, 4, 9):        # one at a time, groups of 3 + 1, all at once, more than there are
        s = eap(m, b, ig_steps=4, ig_batch=k, batch_size=2)
        assert (s.values - ref).abs().max().item() < 1e-6, k
        assert s.settings["metric_corrupted"] == pytest.approx(eap(m, b, batch_size=2).settings["metric_corrupted"])
    with pytest.raises(ValueError, match="ig_batch"):
        eap(m, b, ig_steps=4, ig_batch=0)


# ---------------------------------------------------------------- circuits and faithfulness
def padded_batch(lengths=(7, 5, 6), seed=0, vocab=101):
    """Like tiny_batch, left padded (pad id 0) with position_ids over real tokens."""
    b = tiny_batch(n=len(lengths), P=max(lengths), seed=seed, changed=(-3, -5))
    mask = torch.zeros_like(b.clean["input_ids"])
    for i, n in enumerate(lengths):
        mask[i, mask.shape[1] - n:] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    for d in (b.clean, b.corrupted):
        d["input_ids"] = d["input_ids"] * mask
        d["attention_mask"], d["position_ids"] = mask, pos
    return b


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe", "gpt_neox"])
def test_full_circuit_is_clean_and_empty_circuit_is_corrupted(arch):
    from mechanic.locate.circuit import Circuit, faithfulness
    from mechanic.locate.gradient import ComponentGraph

    m = mechanic.load(tiny_model(arch))
    b = padded_batch()
    g = ComponentGraph(m)
    # Both sides are float32 forwards of the same values in another summation order (batched, patched graph vs
    # plain): the metric may differ by eps x logit scale x a margin for the layers' reductions, and faithfulness
    # by that divided by the clean - corrupted gap it is normalised by (a small gap on a random model).
    tol_metric = patch_tolerance(m, b, normalise=False)
    tol_faith = patch_tolerance(m, b, normalise=True)
    assert tol_faith < 0.05                                   # still far below any real change of the metric
    for patch in ("corrupted", "mean", "zero") if arch == "llama" else ("corrupted",):
        full = faithfulness(m, b, Circuit.full(g), patch=patch, batch_size=2)
        assert abs(full["faithfulness"] - 1) < tol_faith and abs(full["metric"] - full["metric_clean"]) < tol_metric
    empty = faithfulness(m, b, Circuit.empty(g), batch_size=2)
    assert abs(empty["faithfulness"]) < tol_faith and abs(empty["metric"] - empty["metric_corrupted"]) < tol_metric
    if arch == "llama":
        zero = faithfulness(m, b, Circuit.empty(g), patch="zero")
        assert abs(zero["metric"] - empty["metric"]) > 1e-4  # zero ablation is a different reference


def test_single_edge_patch_matches_eap_sign_and_top_edges_prune():
    """Patching one edge's sender value changes the metric by about its EAP score; top_edges keeps connected edges."""
    from mechanic.locate.circuit import Circuit, faithfulness, faithfulness_curve, top_edges
    from mechanic.locate.gradient import ComponentGraph, eap

    m = mechanic.load(tiny_model("llama"))
    b = tiny_batch(n=4)
    g = ComponentGraph(m)
    scores = eap(m, b)
    full = Circuit.full(g)
    for u, j, value in scores.top(3):
        keep = full.keep.clone()
        keep[g.senders.index(u), j] = False
        r = faithfulness(m, b, Circuit(g.senders, g.receivers, keep))
        exact = r["metric"] - r["metric_clean"]
        assert abs(exact - value) < 0.2 * abs(value) + 1e-5, (u, scores.positions[j], exact, value)
    c = top_edges(scores, 10)
    assert 0 < len(c) <= 10 and c.nodes[0] == "embed" and c.nodes[-1] == "logits"
    for u, v in c.edges:  # every kept edge lies on a path embed -> logits
        assert u == "embed" or any(v2 == u for _, v2 in c.edges)
        assert v == "logits" or any(u2 == v for u2, _ in c.edges)
    assert len(top_edges(scores, 0)) == 0 and len(top_edges(scores, 10 ** 6)) == g.n_edges
    curve = faithfulness_curve(m, b, scores, [0, g.n_edges])
    assert abs(curve[0]["faithfulness"]) < 1e-4 and abs(curve[1]["faithfulness"] - 1) < 1e-4
    assert Circuit.from_edges(g, c.edges).keep.equal(c.keep)
    with pytest.raises(ValueError, match="not an edge"):
        Circuit.from_edges(g, [("L2.head0", "L1.head0")])
    with pytest.raises(ValueError, match="needs edge scores"):
        top_edges(atp(m, b, "head"), 5)


def test_eap_refuses_post_normed_attention():
    from mechanic.locate.gradient import eap

    m = mechanic.load(tiny_model("gemma2"))
    with pytest.raises(ValueError, match="normalised again"):
        eap(m, tiny_batch())


# ---------------------------------------------------------------- SmolLM2 (real)
IOI_NAMES = [" Mary", " John", " Tom", " James", " Anna", " David", " Sarah", " Michael", " Paul", " Lisa", " Mark",
             " Emma", " Peter", " Kate", " George", " Alice"]
IOI_TEMPLATES = ["When{A} and{B} went to the store,{S} gave a drink to",
                 "After{A} and{B} arrived at the park,{S} handed a ball to"]


def ioi_task(n=8):
    """IOI: the built-in suite when it exists, else a small inline one (corruption ABC: S2 replaced by a third name)."""
    import random

    from mechanic.tasks import Example, Task
    try:
        from mechanic.tasks.builtin import load_task
    except ImportError:
        load_task = None
    if load_task is not None:  # 16 examples per template (8 ABBA, then 8 BABA): spread over templates and orders
        task = load_task("ioi")
        picks = [i * 16 + (i % 2) * 8 for i in range(n)] if len(task) >= 16 * n else range(n)
        return Task("ioi", [task.examples[i] for i in picks], task.metric)
    rng, ex = random.Random(0), []
    for i in range(n):
        a, b, c = rng.sample(IOI_NAMES, 3)
        t = IOI_TEMPLATES[i % len(IOI_TEMPLATES)]
        ex.append(Example(t.format(A=a, B=b, S=b), a, b, t.format(A=a, B=b, S=c)))
    return Task("ioi", ex)


def spearman(a, b):
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


@pytest.mark.real
def test_atp_heads_rank_like_exact_patching_on_ioi(smollm2):
    """AtP (gradient at the corrupted run) vs exact denoising of every head (plain hooks, many heads per forward)."""
    import time

    from mechanic.tasks.metrics import logit_diff

    m = smollm2
    b = ioi_task().tokenize(m)
    n = b.n
    def fwd_bwd():
        m.run(b.corrupted, cache=["L0.resid_pre"], grad=lambda lg: logit_diff(lg[:, -1], b).sum())
    fwd_bwd()  # warm-up
    t0 = time.time()
    fwd_bwd()
    t_fb = time.time() - t0
    t0 = time.time()
    scores = atp(m, b, "head")
    t_atp = time.time() - t0
    exact = exact_head_patching(m, b)   # plain hooks on o_proj inputs, 270 heads x 8 rows
    rho = spearman(scores.values, exact)
    print(f"\nIOI n={n}: AtP vs exact head patching Spearman {rho:.3f}, Pearson "
          f"{torch.corrcoef(torch.stack([scores.values, exact]))[0, 1].item():.3f}; AtP {t_atp:.1f}s = "
          f"{t_atp / t_fb:.2f} x one forward+backward ({t_fb:.1f}s); clean/corrupted logit diff "
          f"{scores.settings['metric_clean']:.2f}/{scores.settings['metric_corrupted']:.2f}")
    assert rho >= 0.7


@pytest.mark.real
def test_eap_ig_faithfulness_curve_on_ioi(smollm2):
    from mechanic.locate.circuit import faithfulness_curve
    from mechanic.locate.gradient import ComponentGraph, eap

    m = smollm2
    b = ioi_task().tokenize(m)
    g = ComponentGraph(m)
    scores = eap(m, b, ig_steps=5)
    ns = [0, 100, 1000, 5000, g.n_edges]
    curve = faithfulness_curve(m, b, scores, ns)
    print("\nIOI EAP-IG (5 steps) faithfulness: " + ", ".join(
        f"top {r['requested']} ({r['edges']} kept, {r['nodes']} nodes): {r['faithfulness']:.3f}" for r in curve))
    assert abs(curve[0]["faithfulness"]) < 1e-3 and abs(curve[-1]["faithfulness"] - 1) < 1e-3
    assert curve[-2]["faithfulness"] > 0.4  # measured 0.66 on the inline task (8 prompts)


@pytest.mark.real
def test_eap_ig_batched_points_equal_the_loop_on_smollm2(smollm2):
    from mechanic.locate.gradient import eap

    m = smollm2
    b = ioi_task(4).tokenize(m)
    ref = loop_eap_ig(m, b, 3, 8)
    new = eap(m, b, ig_steps=3, ig_batch=3)
    diff = (new.values - ref).abs().max().item()
    print(f"\nSmolLM2 IOI EAP-IG (3 points as batch rows) vs one graph run per point: max abs diff {diff:.2e}, "
          f"largest edge {ref.abs().max().item():.2e}")
    assert diff < 1e-5 * ref.abs().max().item()
