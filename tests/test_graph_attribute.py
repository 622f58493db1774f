"""Attribution-graph edges: batched backward rows equal a naive per-source deletion reference, and every
target's incoming edges plus its bias add up to its value (completeness of the linear decomposition)."""

import copy

import pytest
import torch

import mechanic
from mechanic.features import Dictionary
from mechanic.locate.graph import Graph, GraphError, Replacement, attribute, salient_logits
from mechanic.locate.graph.replacement import Sources
from mechanic.testing.tiny import tiny_model

ARCHS = ["llama", "gemma2", "gpt2", "gpt_neox", "qwen3"]


def random_transcoders(model, d_sae=32, architecture="relu", skip=False, seed=0, scale=0.05, layers=None):
    """Random per-layer transcoders (exactness must not depend on their quality: error nodes absorb the rest)."""
    out = []
    for i in range(model.dims.n_layers):
        if layers is not None and i not in layers:
            out.append(None)
            continue
        d = Dictionary(model.dims.d_model, d_sae, architecture, k=3 if "topk" in architecture else None,
                       site=f"L{i}.mlp_in", out_site=f"L{i}.mlp_out", skip=skip)
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for p in d.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            if skip:       # a small skip keeps edges O(1): random skips compound over layers into huge cancelling edges
                d.W_skip.mul_(0.1)
            if architecture in ("jumprelu", "batchtopk"):
                d.threshold.fill_(0.05)
        out.append(d)
    return out


def prompt(n=6, seed=1):
    return torch.randint(3, 100, (1, n), generator=torch.Generator().manual_seed(seed))


def target_values(rep, trace, graph):
    """[B, targets] feature pre-activations and demeaned logits of a replacement run (rows of the graph order)."""
    cols = []
    for i, d in enumerate(rep.transcoders):
        a = rep.active[i]
        if d is not None and len(a.pos):
            cols.append(d.pre(trace.mlp_in[i])[:, a.pos, a.feat])
    z = trace.logits
    cols.append(z[:, graph.logit_tokens] - z.mean(-1, keepdim=True))
    return torch.cat(cols, 1)


def naive_edges(rep, graph):
    """adjacency[targets, sources] by deleting one source node at a time from the frozen model (no autograd),
    in float64 (a copy of the model and transcoders), so the reference's own rounding is far below the tolerance."""
    model64 = mechanic.load(copy.deepcopy(rep.model.hf).double())
    tcs64 = [None if d is None else copy.deepcopy(d).double() for d in rep.transcoders]
    rep64 = Replacement(model64, tcs64, rep.batch["input_ids"])
    for a, b in zip(rep.active, rep64.active):
        assert torch.equal(a.pos, b.pos) and torch.equal(a.feat, b.feat)
    rep = rep64
    src = rep.sources
    L, P = len(rep.transcoders), rep.n_pos
    F = sum(len(a) for a in src.acts)
    S = F + L * P + P
    batch = src.expand(S + 1)
    embed, acts, errors = batch.embed.clone(), [a.clone() for a in batch.acts], [e.clone() for e in batch.errors]
    r = 0
    for i, a in enumerate(acts):
        for j in range(a.shape[1]):
            a[r, j] = 0
            r += 1
    for i, e in enumerate(errors):
        for p in range(P):
            e[r, p] = 0
            r += 1
    for p in range(P):
        embed[r, p] = 0
        r += 1
    with torch.no_grad():
        vals = target_values(rep, rep.run(Sources(embed, acts, errors)), graph)
    return (vals[-1][None, :] - vals[:-1]).T.float()      # [targets, sources]


def graph_for(name, **kw):
    torch.manual_seed(0)
    model = mechanic.load(tiny_model(name))
    tcs = random_transcoders(model, **kw)
    rep = Replacement(model, tcs, prompt())
    return model, rep, attribute(model, rep, None, batch_size=7)


@pytest.mark.parametrize("name", ARCHS)
def test_edges_equal_naive_deletion(name):
    model, rep, g = graph_for(name)
    targets = torch.cat([torch.arange(g.count("feature")), torch.arange(len(g) - g.count("logit"), len(g))])
    sources = torch.arange(len(g) - g.count("logit"))
    naive = naive_edges(rep, g)
    fast = g.adjacency[targets][:, sources]
    assert g.count("feature") > 20
    assert fast.abs().max() > 1e-2            # something to compare
    assert (fast - naive).abs().max() <= 1e-5
    # edges only go forward: no feature feeds a feature of its own layer or below, nor a later position
    f = g.span("feature")
    A = g.adjacency[f, f]
    lay, pos = g.layer[f], g.pos[f]
    backward = (lay[:, None] <= lay[None, :]) | (pos[:, None] < pos[None, :])
    assert A[backward].abs().max() == 0


@pytest.mark.parametrize("name", ARCHS)
def test_incoming_edges_plus_bias_sum_to_value(name):
    model, rep, g = graph_for(name, skip=True)
    t = torch.cat([torch.arange(g.count("feature")), torch.arange(len(g) - g.count("logit"), len(g))])
    total = g.adjacency[t].sum(1) + g.bias[t]
    assert (total - g.value[t]).abs().max() <= 1e-4
    assert g.bias[t].abs().max() > 1e-3       # the check is not trivially about biases being zero


@pytest.mark.parametrize("architecture", ["topk", "jumprelu", "gated"])
def test_other_dictionary_architectures(architecture):
    model, rep, g = graph_for("llama", architecture=architecture)
    naive = naive_edges(rep, g)
    targets = torch.cat([torch.arange(g.count("feature")), torch.arange(len(g) - g.count("logit"), len(g))])
    assert (g.adjacency[targets][:, :naive.shape[1]] - naive).abs().max() <= 1e-5
    t = targets
    assert (g.adjacency[t].sum(1) + g.bias[t] - g.value[t]).abs().max() <= 1e-4


def test_layers_without_transcoders_are_all_error():
    model, rep, g = graph_for("llama", layers={1})
    assert set(g.layer[g.span("feature")].tolist()) == {1}
    naive = naive_edges(rep, g)
    targets = torch.cat([torch.arange(g.count("feature")), torch.arange(len(g) - g.count("logit"), len(g))])
    assert (g.adjacency[targets][:, :naive.shape[1]] - naive).abs().max() <= 1e-5


def test_batch_size_does_not_change_edges():
    model, rep, g = graph_for("llama")
    one = attribute(model, rep, None, batch_size=1)
    big = attribute(model, rep, None, batch_size=1000, prefixes=1)
    each = attribute(model, rep, None, batch_size=5, prefixes=rep.n_pos)
    for h in (one, big, each):
        assert (h.adjacency - g.adjacency).abs().max() <= 1e-6


def test_salient_logits_cover_the_mass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    ids, p = salient_logits(logits, 0.9, 10)
    assert ids.tolist() == [0, 1, 2]
    assert torch.allclose(p, torch.tensor([0.5, 0.3, 0.15]))
    assert salient_logits(logits, 0.9, 2)[0].tolist() == [0, 1]
    with pytest.raises(GraphError, match="logit_mass"):
        salient_logits(logits, 1.5)


def test_save_load_round_trip(tmp_path):
    model, rep, g = graph_for("gpt2")
    assert set(g.scores) == {"replacement", "completeness"}
    g.save(tmp_path / "g")
    h = Graph.load(tmp_path / "g")
    assert torch.equal(h.adjacency, g.adjacency) and h.labels == g.labels and h.scores == g.scores
    assert torch.equal(h.kind, g.kind) and torch.equal(h.logit_probs, g.logit_probs)
    assert not list((tmp_path / "g").glob(".*partial*"))
    with pytest.raises(GraphError, match="graph.json"):
        Graph.load(tmp_path)


def test_top_features_rank_by_weighted_direct_effect_on_logits():
    model, rep, g = graph_for("qwen2")
    lg, f = g.span("logit"), g.span("feature")
    effect = [abs(sum(float(g.logit_probs[k]) * float(g.adjacency[lg.start + k, j]) for k in range(g.count("logit"))))
              for j in range(f.start, f.stop)]
    expected = sorted(range(len(effect)), key=lambda j: -effect[j])[:5]
    assert g.top(5) == expected
    assert all(g.labels[i].startswith(f"L{int(g.layer[i])}.mlp_out.sae{int(g.feature[i])}@") for i in g.top(5))


def test_zero_first_moves_position_zero_into_its_error_node():
    torch.manual_seed(0)
    model = mechanic.load(tiny_model("llama"))
    tcs = random_transcoders(model, skip=True)
    kept = Replacement(model, tcs, prompt(), zero_first=False)
    zeroed = Replacement(model, tcs, prompt())
    assert any(int(a.counts[0]) for a in kept.active)                 # the test has features at position 0 to move
    assert all(a.counts[0] == 0 for a in zeroed.active)
    with torch.no_grad():
        for rep in (kept, zeroed):           # both reproduce the real logits: the error node took the features' share
            assert (rep.run(rep.sources.expand(1)).logits[0] - rep.logits[-1]).abs().max() <= 1e-5
    for i, d in enumerate(tcs):              # position 0's error is the MLP output minus the transcoder's constant part
        x, y = zeroed.mlp_in[i][:1], zeroed.mlp_out[i][:1]
        assert (zeroed.sources.errors[i][:1] - (y - d.b_dec - d.skip(x))).abs().max() <= 1e-6
        assert torch.equal(zeroed.sources.errors[i][1:], kept.sources.errors[i][1:])
    g = attribute(model, tcs, prompt(), batch_size=7)
    assert g.meta["zero_first"] and int(g.pos[g.span("feature")].min()) >= 1


def naive_selection(full: Graph, cap: int, per_round: int) -> list[int]:
    """circuit-tracer's feature selection replayed on a full graph's rows: logit rows first, then in each round the
    `per_round` unvisited features with the largest influence through the rows known so far (power iteration on
    the row-normalised |rows|, one step at a time), until `cap` are visited."""
    F, lg = full.count("feature"), full.span("logit")
    known = list(range(lg.start, lg.stop))
    visited: list[int] = []
    while len(visited) < cap:
        A = full.adjacency[known].abs()
        A = A / A.sum(1, keepdim=True).clamp(min=1e-10)
        w = torch.zeros(len(known))
        w[[known.index(i) for i in range(lg.start, lg.stop)]] = full.logit_probs.float()
        inf, cur = torch.zeros(len(full)), w @ A
        while cur.any():
            inf += cur
            cur = cur[known] @ A
        pending = [j for j in range(F) if j not in visited]
        take = sorted(pending, key=lambda j: -float(inf[j]))[:min(per_round, cap - len(visited))]
        visited += take
        known += take
    return sorted(visited)


def test_feature_cap_keeps_the_most_influential_features_with_their_exact_rows():
    model, rep, full = graph_for("llama", skip=True)
    F = full.count("feature")
    assert attribute(model, rep, None, batch_size=7, max_feature_nodes=F).adjacency.equal(full.adjacency)
    cap, per_round = F // 3, 5
    g = attribute(model, rep, None, batch_size=3, max_feature_nodes=cap, rows_per_update=4 * per_round)
    assert g.count("feature") == cap and len(g) == len(full) - (F - cap)
    chosen = naive_selection(full, cap, per_round=4 * per_round)
    key = lambda h, n: list(zip(h.layer[:n].tolist(), h.pos[:n].tolist(), h.feature[:n].tolist()))  # noqa: E731
    mine_keys = set(key(g, cap))
    kept = [j for j, k in enumerate(key(full, F)) if k in mine_keys]
    assert kept == chosen
    cols = torch.tensor(kept + list(range(F, len(full))))
    rows = torch.tensor(kept + list(range(len(full) - full.count("logit"), len(full))))
    mine = torch.cat([torch.arange(cap), torch.arange(len(g) - g.count("logit"), len(g))])
    assert (g.adjacency[mine] - full.adjacency[rows][:, cols]).abs().max() <= 1e-6
    assert torch.equal(g.bias, full.bias[cols]) and torch.equal(g.value, full.value[cols])
    assert g.scores["completeness"] <= full.scores["completeness"] + 1e-6     # dropped features count as missing
    none = attribute(model, rep, None, batch_size=7, max_feature_nodes=0)
    assert none.count("feature") == 0 and none.count("logit") == full.count("logit")
    with pytest.raises(GraphError, match="max_feature_nodes"):
        attribute(model, rep, None, max_feature_nodes=-1)
