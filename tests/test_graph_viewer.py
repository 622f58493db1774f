"""The attribution-graph viewer in headless Chromium, on a tiny model's graph (with hostile labels, prompt and
feature pages) and on a synthetic graph of 10,000 nodes and 50,000 edges: no console errors or network, every
node drawn (its centre pixel has its kind's colour), hover shows the right node, clicks highlight its edges,
the pruning sliders change what is drawn exactly as the thresholds say, supernodes group and ungroup, and
hostile text stays text."""

import json
import os

import pytest
import torch

from mechanic.locate.graph import Graph, GraphError, graph_scores
from mechanic.report import graph_viewer
from mechanic.report.screenshot import CHROMIUM, opened
from test_graph_attribute import graph_for
from test_untrusted import HOSTILE

PIXELS = """() => {
  const c = document.getElementById('graph'), b = c.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
  const img = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const rgb = (h) => [1, 3, 5].map((k) => parseInt(h.slice(k, k + 2), 16));
  let ok = 0; const bad = [];
  for (const i of window.__viewer.shown()) {
    const [x, y] = window.__viewer.screenPos(i);
    const k = 4 * (Math.floor((y - b.top) * dpr) * c.width + Math.floor((x - b.left) * dpr));
    const want = rgb(window.__viewer.colorOf(i)), got = [img[k], img[k + 1], img[k + 2]];
    if (want.every((v, j) => v === got[j])) ok++; else bad.push([i, got, want]);
  }
  return {ok, bad: bad.slice(0, 5)};
}"""


def empty_spot(page):
    """A point on the canvas where no node is drawn (its top-left corner, left of the first column)."""
    return page.evaluate("() => { const b = document.getElementById('graph').getBoundingClientRect();"
                         " return [b.left + 4, b.top + 4]; }")


def set_thresholds(page, nodes, edges):
    page.evaluate("""([n, e]) => {
        for (const [id, v] of [['node-threshold', n], ['edge-threshold', e]]) {
            const s = document.getElementById(id); s.value = String(v); s.dispatchEvent(new Event('input'));
        }}""", [nodes, edges])
    return page.evaluate("() => ({...window.__drawn})")


def expected(data, node_thr, edge_thr, groups=()):
    """(nodes, edges) the page should draw: thresholds as view_data defines them, supernodes merged."""
    n = data["nodes"]
    kinds = data["kinds"]
    vis = [kinds[k] in ("token", "logit") or node_thr >= 1 or c < node_thr for k, c in zip(n["kind"], n["c"])]
    rep = list(range(len(vis)))
    for g, members in enumerate(groups):
        for i in members:
            rep[i] = -1 - g
    pairs, edges = set(), 0
    e = data["edges"]
    for s, t, c in zip(e["src"], e["dst"], e["c"]):
        if (edge_thr < 1 and c >= edge_thr) or not (vis[s] and vis[t]) or rep[s] == rep[t]:
            continue
        if rep[s] < 0 or rep[t] < 0:
            pairs.add((rep[s], rep[t]))
        else:
            edges += 1
    nodes = sum(v and r >= 0 for v, r in zip(vis, rep))
    return nodes, edges + len(pairs)


def layer0_features(graph) -> list[int]:
    """The distinct layer-0 feature ids of a graph, in node order (a feature active at several positions once)."""
    return list(dict.fromkeys(int(f) for k, L, f in zip(graph.kind, graph.layer, graph.feature) if k == 0 and L == 0))


def pages_for(graph):
    """Feature-page data (mechanic.locate.feature_pages layout) for the layer-0 features, with hostile text."""
    feats = layer0_features(graph)
    out = []
    for j, f in enumerate(feats):
        h = HOSTILE[j % len(HOSTILE)]
        out.append({"id": f, "contexts": [{"tokens": ["The", " cat", h, " sat"], "at": 2, "value": 1.5 + j}],
                    "logits": {"promoted": [{"token": h, "logit": 0.7}],
                               "suppressed": [{"token": " dog", "logit": -0.3}]}})
    return {0: {"features": out}}


@pytest.fixture(scope="class")
def tiny(tmp_path_factory):
    _, _, g = graph_for("llama")
    g.scores = graph_scores(g)
    g.prompt = HOSTILE[0] + " " + HOSTILE[6]
    for j, h in enumerate(HOSTILE):                   # hostile labels on the first features
        g.labels[j] = h
    pages = pages_for(g)
    kw = dict(node_threshold=1.0, edge_threshold=0.98, pages=pages)
    path = graph_viewer.write(g, tmp_path_factory.mktemp("viewer") / "graph.html", **kw)
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: apt-get install chromium"
    with opened(path, width=1400) as (page, errors):
        yield {"page": page, "errors": errors, "graph": g, "data": graph_viewer.view_data(g, **kw), "path": path}


class TestTinyGraph:
    """A tiny model's graph with hostile labels, prompt and feature pages (one browser per class)."""

    def test_tiny_page_draws_every_node(self, tiny):
        page, g = tiny["page"], tiny["graph"]
        drawn = page.evaluate("() => window.__drawn")
        assert tiny["errors"] == []
        assert drawn["nodes"] == len(g) and drawn["frames"] >= 1
        assert drawn["edges"] == expected(tiny["data"], 1.0, 0.98)[1] > 0
        px = page.evaluate(PIXELS)
        assert px["ok"] == len(g), px["bad"]

    def test_hover_shows_that_nodes_details(self, tiny):
        page, g, data = tiny["page"], tiny["graph"], tiny["data"]
        for i in [0, 3, g.span("error").start + 2, g.span("token").start + 1, g.span("logit").start]:
            page.mouse.move(*page.evaluate(f"() => window.__viewer.screenPos({i})"))
            box = page.evaluate("() => ({node: document.getElementById('details').dataset.node,"
                                " title: document.querySelector('#details h2').textContent,"
                                " text: document.getElementById('details').innerText})")
            assert box["node"] == str(i) and box["title"] == g.labels[i]
            assert data["nodes"]["id"][i] in box["text"]
        page.mouse.move(*page.evaluate("() => window.__viewer.screenPos(1)"))     # a feature with its page
        text = page.evaluate("() => document.getElementById('details').innerText")
        marked = page.evaluate("() => [...document.querySelectorAll('#details .ctx mark')].map(m => m.textContent)")
        j = layer0_features(g).index(int(g.feature[1]))
        assert marked == [HOSTILE[j % len(HOSTILE)]] and "promotes" in text.lower() and '" dog"' in text

    def test_click_selects_and_highlights_its_edges(self, tiny):
        page, data = tiny["page"], tiny["data"]
        set_thresholds(page, 1.0, 0.98)
        i = 2
        page.mouse.click(*page.evaluate(f"() => window.__viewer.screenPos({i})"))
        e = data["edges"]
        want = sum((s == i or t == i) and c < 0.98 for s, t, c in zip(e["src"], e["dst"], e["c"]))
        assert page.evaluate("() => window.__viewer.selected()") == [i]
        assert page.evaluate("() => window.__drawn.highlighted") == want > 0
        page.mouse.click(*empty_spot(page))               # empty canvas: clears the selection
        assert page.evaluate("() => window.__viewer.selected()") == []
        assert page.evaluate("() => window.__drawn.highlighted") == 0

    def test_sliders_prune_what_is_drawn(self, tiny):
        page, data = tiny["page"], tiny["data"]
        full = set_thresholds(page, 1.0, 0.98)
        fewer_edges = set_thresholds(page, 1.0, 0.5)
        assert fewer_edges["edges"] == expected(data, 1.0, 0.5)[1] < full["edges"]
        fewer_nodes = set_thresholds(page, 0.5, 0.98)
        assert (fewer_nodes["nodes"], fewer_nodes["edges"]) == expected(data, 0.5, 0.98)
        assert fewer_nodes["nodes"] < full["nodes"]
        stats = page.evaluate("() => document.getElementById('stats').textContent")
        assert f"shown {fewer_nodes['nodes']} nodes, {fewer_nodes['edges']} edges" in stats
        back = set_thresholds(page, 1.0, 0.98)
        assert (back["nodes"], back["edges"]) == (full["nodes"], full["edges"])

    def test_supernodes_group_and_ungroup(self, tiny):
        page, data = tiny["page"], tiny["data"]
        before = set_thresholds(page, 1.0, 0.98)
        members = [4, 5, 6]
        page.mouse.click(*empty_spot(page))
        page.keyboard.down("Shift")
        for i in members:
            page.mouse.click(*page.evaluate(f"() => window.__viewer.screenPos({i})"))
        page.keyboard.up("Shift")
        assert sorted(page.evaluate("() => window.__viewer.selected()")) == members
        page.fill("#supernode-name", HOSTILE[1])
        page.click("#group-button")
        drawn = page.evaluate("() => ({...window.__drawn})")
        assert drawn["supernodes"] == 1 and drawn["nodes"] == before["nodes"] - len(members)
        assert (drawn["nodes"], drawn["edges"]) == expected(data, 1.0, 0.98, [members])
        assert page.evaluate("() => document.querySelector('#supernodes .name').textContent") == HOSTILE[1]
        ids = [data["nodes"]["id"][i] for i in members]
        shown = page.evaluate("() => document.getElementById('supernodes-json').textContent")
        assert json.loads(shown) == [[HOSTILE[1], *ids]]
        n = len(tiny["graph"])
        page.mouse.move(*page.evaluate(f"() => window.__viewer.screenPos({n})"))
        assert page.evaluate("() => document.querySelector('#details h2').textContent") == HOSTILE[1]
        assert page.evaluate(f"() => window.__viewer.screenPos({members[0]})") is None
        page.click("#supernodes button")
        after = page.evaluate("() => ({...window.__drawn})")
        assert after["supernodes"] == 0 and (after["nodes"], after["edges"]) == (before["nodes"], before["edges"])

    def test_hostile_text_is_text(self, tiny):
        page = tiny["page"]
        html = tiny["path"].read_text(encoding="utf-8")
        assert "<script>window" not in html and "<img" not in html
        out = page.evaluate("""() => ({pwned: window.__pwned === undefined ? null : window.__pwned,
            imgs: document.querySelectorAll('img, svg').length, scripts: document.scripts.length,
            handlers: document.querySelectorAll('[onerror], [onload], [onmouseover]').length,
            title: document.getElementById('title').textContent, doc: document.title})""")
        assert out == {"pwned": None, "imgs": 0, "scripts": 2, "handlers": 0, "title": tiny["graph"].prompt,
                       "doc": "Attribution graph: " + tiny["graph"].prompt}
        assert tiny["errors"] == []

    def test_wheel_zooms_about_the_cursor_and_drag_pans(self, tiny):
        page = tiny["page"]
        at = lambda i: page.evaluate(f"() => window.__viewer.screenPos({i})")   # noqa: E731
        a, b = at(0), at(40)
        page.mouse.move(*a)
        page.mouse.wheel(0, -400)                          # zoom in, about the cursor
        page.wait_for_function("() => window.__drawn.frames > 0")
        page.wait_for_timeout(100)
        a2, b2 = at(0), at(40)
        assert a2 == pytest.approx(a, abs=1.5)             # the node under the cursor stays (events: whole px)
        assert abs(b2[0] - a2[0]) + abs(b2[1] - a2[1]) > 1.5 * (abs(b[0] - a[0]) + abs(b[1] - a[1]))
        page.mouse.down()
        page.mouse.move(a2[0] + 60, a2[1] + 30, steps=4)
        page.mouse.up()
        page.wait_for_timeout(100)
        assert at(0) == pytest.approx([a2[0] + 60, a2[1] + 30], abs=1.5)
        assert page.evaluate("() => window.__viewer.selected()") == []     # a drag is not a click
        page.click("#fit")
        assert at(0) == pytest.approx(a, abs=0.5)

    def test_page_keeps_the_strongest_nodes_and_edges(self, tiny):
        g, full = tiny["graph"], tiny["data"]
        capped = graph_viewer.view_data(g, max_nodes=50, max_edges=100)
        fixed = g.count("token") + g.count("logit")
        assert len(capped["nodes"]["id"]) == 50 + fixed and len(capped["edges"]["c"]) == 100
        assert capped["meta"] == {**full["meta"], "kept_nodes": 50 + fixed, "kept_edges": 100}
        kinds = [full["kinds"][k] for k in full["nodes"]["kind"]]
        ids = full["nodes"]["id"]
        strongest = sorted((c, i) for i, (c, k) in enumerate(zip(full["nodes"]["c"], kinds))
                           if k in ("feature", "error"))
        kept = {ids[i] for _, i in strongest[:50]} | {i for i, k in zip(ids, kinds) if k in ("token", "logit")}
        assert set(capped["nodes"]["id"]) == kept
        name = lambda d, i: d["nodes"]["id"][i]   # noqa: E731
        columns = lambda d: zip(*(d["edges"][k] for k in ("src", "dst", "c")))   # noqa: E731
        edges = {(name(full, s), name(full, t)): c for s, t, c in columns(full)}
        got = {(name(capped, s), name(capped, t)): c for s, t, c in columns(capped)}
        assert all(edges[e] == c for e, c in got.items())            # the same share-above as the whole graph's
        between = sorted(c for (s, t), c in edges.items() if s in kept and t in kept)
        assert sorted(got.values()) == between[:100]

    def test_bad_input_is_one_clear_error(self, tiny, tmp_path):
        with pytest.raises(GraphError, match="mechanic attribution Graph"):
            graph_viewer.write({"nodes": []}, tmp_path / "x.html")
        with pytest.raises(GraphError, match="between 0 and 1"):
            graph_viewer.write(tiny["graph"], tmp_path / "x.html", edge_threshold=2)
        assert not (tmp_path / "x.html").exists()


def synthetic(n=10_000, n_edges=50_000, layers=20, positions=20, logits=10, seed=0) -> Graph:
    """A graph of n nodes in circuit-tracer's order with n_edges random forward edges (earlier layer, same or
    earlier position), features spread evenly over the (layer, position) cells."""
    g = torch.Generator().manual_seed(seed)
    L, P, K = layers, positions, logits
    F = n - L * P - P - K
    cell = torch.arange(F) % (L * P)
    f_layer, f_pos, f_feat = cell // P, cell % P, torch.randperm(50_000, generator=g)[:F]
    order = torch.argsort(f_layer * 10**9 + f_pos * 10**6 + f_feat)
    f_layer, f_pos, f_feat = f_layer[order], f_pos[order], f_feat[order]
    kind = torch.tensor([0] * F + [1] * (L * P) + [2] * P + [3] * K, dtype=torch.int8)
    layer = torch.cat([f_layer, torch.arange(L).repeat_interleave(P), torch.full((P,), -1), torch.full((K,), L)])
    pos = torch.cat([f_pos, torch.arange(P).repeat(L), torch.arange(P), torch.full((K,), P - 1)])
    tokens = torch.randint(0, 1000, (P,), generator=g)
    logit_tokens = torch.arange(K) + 2000
    feature = torch.cat([f_feat, torch.full((L * P,), -1), tokens, logit_tokens])
    targets = torch.cat([torch.arange(F), torch.arange(n - K, n)])
    sources = torch.arange(n - K)
    t = targets[torch.randint(0, len(targets), (8 * n_edges,), generator=g)]
    s = sources[torch.randint(0, len(sources), (8 * n_edges,), generator=g)]
    ok = (layer[s] < layer[t]) & (pos[s] <= pos[t])
    pairs = torch.unique(t[ok] * n + s[ok])
    pairs = pairs[torch.randperm(len(pairs), generator=g)[:n_edges]]
    adjacency = torch.zeros(n, n)
    adjacency[pairs // n, pairs % n] = torch.randn(len(pairs), generator=g)
    probs = torch.softmax(torch.randn(K, generator=g), 0)
    graph = Graph(kind, layer.int(), pos.int(), feature, torch.rand(n, generator=g), torch.zeros(n), adjacency,
                  tokens, logit_tokens, probs, meta={"model": "synthetic", "n_layers": L})
    graph.labels[0] = HOSTILE[4]
    return graph


@pytest.fixture(scope="class")
def big(tmp_path_factory):
    g = synthetic()
    assert len(g) == 10_000 and int((g.adjacency != 0).sum()) == 50_000
    path = graph_viewer.write(g, tmp_path_factory.mktemp("big") / "graph.html", node_threshold=1.0, edge_threshold=1.0)
    data = graph_viewer.view_data(g, node_threshold=1.0, edge_threshold=1.0)
    del g.adjacency                                    # 400 MB dense; the tests below need only the page
    with opened(path, width=1600) as (page, errors):
        yield {"page": page, "errors": errors, "data": data, "path": path, "labels": g.labels}


class TestTenThousandNodes:
    """A synthetic graph of 10,000 nodes and 50,000 edges."""

    def test_ten_thousand_nodes_all_drawn(self, big):
        page = big["page"]
        drawn = page.evaluate("() => ({...window.__drawn})")
        size_mb = big["path"].stat().st_size / 1e6
        print(f"\n10k-node graph: page {size_mb:.2f} MB, first draw {drawn['firstDrawMs']:.0f} ms after navigation "
              f"start, one redraw {drawn['lastDrawMs']:.0f} ms, {drawn['edges']} edges drawn")
        assert big["errors"] == []
        assert drawn["nodes"] == 10_000 and drawn["edges"] == 50_000 == expected(big["data"], 1.0, 1.0)[1]
        px = page.evaluate(PIXELS)
        assert px["ok"] == 10_000, px["bad"]

    def test_ten_thousand_nodes_interact(self, big):
        page, data = big["page"], big["data"]
        for i in [0, 5000, 9999]:
            page.mouse.move(*page.evaluate(f"() => window.__viewer.screenPos({i})"))
            assert page.evaluate("() => document.getElementById('details').dataset.node") == str(i)
            assert page.evaluate("() => document.querySelector('#details h2').textContent") == big["labels"][i]
        full = page.evaluate("() => ({...window.__drawn})")
        pruned = set_thresholds(page, 0.8, 0.5)
        assert (pruned["nodes"], pruned["edges"]) == expected(data, 0.8, 0.5)
        assert pruned["edges"] < full["edges"] and pruned["nodes"] < full["nodes"]
        e = data["edges"]
        i = e["dst"][min(range(len(e["c"])), key=e["c"].__getitem__)]            # the target of the strongest edge
        page.mouse.click(*page.evaluate(f"() => window.__viewer.screenPos({i})"))
        vis = [k >= 2 or c < 0.8 for k, c in zip(data["nodes"]["kind"], data["nodes"]["c"])]
        want = sum((s == i or t == i) and c < 0.5 and vis[s] and vis[t] for s, t, c in zip(e["src"], e["dst"], e["c"]))
        assert page.evaluate("() => window.__drawn.highlighted") == want > 0
        assert big["errors"] == []


