"""Graphs in the loop: a graph's features as Scores equal a matrix-inverse reference, and a recipe's locate
(graph_features) -> steer (feature_steer) changes the logits as the graph said (exactly where nothing the graph
freezes is downstream of the located features)."""

import pytest
import torch
from test_graph_attribute import random_transcoders

import mechanic
from mechanic.features import attach, detach, save
from mechanic.locate.graph import Graph, GraphError, attribute, load_transcoders, scores
from mechanic.locate.scores import Scores
from mechanic.recipes.methods import run_method
from mechanic.recipes.schema import MethodSpec, RecipeError
from mechanic.steer.plan import Plan
from mechanic.testing.tiny import tiny_model

PROMPT = "The king of the old country went to the city"


def worded_model(word_tokenizer, linear_final_norm=False):
    hf = tiny_model("llama", vocab_size=len(word_tokenizer))
    if linear_final_norm:   # the final norm's scale no longer depends on its input (see test_graph_validate)
        with torch.no_grad():
            hf.model.norm.variance_epsilon = 1e8
            hf.model.norm.weight.mul_(1e4)
    return mechanic.load(hf, tokenizer=word_tokenizer)


def saved(m, tmp_path, layers=None):
    tcs = random_transcoders(m, d_sae=32, architecture="relu", skip=True, scale=0.3, layers=layers)
    for i, d in enumerate(tcs):
        if d is not None:
            save(d, tmp_path / "tc" / f"L{i}.mlp_in-L{i}.mlp_out.relu")
    return tmp_path / "tc", tcs


@pytest.fixture(scope="module")
def graph(word_tokenizer):
    m = worded_model(word_tokenizer)
    tcs = random_transcoders(m, d_sae=32, architecture="relu", scale=0.05)
    return m, tcs, attribute(m, tcs, PROMPT, max_logits=4, logit_mass=0.99)


def naive_effects(g, token_row=None):
    """Per feature node: activation x (w^T (I - M)^-1)[feature], by matrix inverse."""
    A = g.adjacency.double()
    F = g.span("feature")
    M = torch.zeros_like(A)
    M[:, F] = A[:, F] / g.value.double()[F]
    T = torch.linalg.inv(torch.eye(len(g), dtype=torch.float64) - M)[g.span("logit")]
    w = g.logit_probs.double() if token_row is None else torch.eye(len(g.logit_tokens), dtype=torch.float64)[token_row]
    return (w @ T[:, F]) * g.value.double()[F]


def test_scores_equal_reference(graph):
    m, tcs, g = graph
    F = g.span("feature")
    for row in (None, 1):
        token = None if row is None else int(g.logit_tokens[row])
        eff = naive_effects(g, row)
        want: dict[str, float] = {}
        per: dict[tuple, float] = {}
        for e, L, f, p in zip(eff.tolist(), g.layer[F].tolist(), g.feature[F].tolist(), g.pos[F].tolist()):
            want[f"L{L}.mlp_out.sae{f}"] = want.get(f"L{L}.mlp_out.sae{f}", 0.0) + e
            per[(f"L{L}.mlp_out.sae{f}", p)] = e
        sc = scores(g, token=token)
        assert sorted(sc.sites) == sorted(want)
        got = dict(zip(sc.sites, sc.values.tolist()))
        assert max(abs(got[k] - v) for k, v in want.items()) < 1e-5
        pp = scores(g, token=token, per_position=True)
        assert pp.values.shape == (len(want), len(g.tokens)) and len(pp.positions) == len(g.tokens)
        for (site, p), e in per.items():
            assert abs(float(pp.values[pp.sites.index(site), p]) - e) < 1e-5
    top = sc.top(1)[0][0]
    attach(m, tcs[int(top.split(".")[0][1:])])        # the ids are the feature sites of the attached transcoder
    assert m.check(top).kind == "sae" and m.check(top).index == int(top.split("sae")[1])
    detach(m, top.rsplit(".", 1)[0])
    with pytest.raises(GraphError, match="not one of the graph's logit nodes"):
        scores(g, token=-5)


def test_load_transcoders(word_tokenizer, tmp_path):
    m = worded_model(word_tokenizer)
    path, tcs = saved(m, tmp_path, layers=[0, 2])
    got, where = load_transcoders(m, path)
    assert got[1] is None and sorted(where) == [0, 2]
    assert torch.equal(got[2].W_dec, tcs[2].W_dec)
    with pytest.raises(GraphError, match="not a directory"):
        load_transcoders(m, tmp_path / "nothing")
    save(random_transcoders(m, layers=[0])[0], tmp_path / "tc" / "again")
    with pytest.raises(GraphError, match="Two transcoders for layer 0"):
        load_transcoders(m, path)


def locate_then_steer(m, tmp_path, path, **settings):
    found = run_method("locate", {"model": m, "task": None, "dir": tmp_path / "locate"},
                       MethodSpec(method="graph_features", transcoders=str(path), prompt=PROMPT, max_logits=4,
                                  logit_mass=0.99, **settings))
    d = tmp_path / "steer"
    d.mkdir()
    run_method("steer", {"model": m, "task": None, "dir": d, "found": found, "seed": 0},
               MethodSpec(method="feature_steer", how="ablate"))
    return found, Plan.load(d / "plan.safetensors")


def weighted_logit(m, found):
    ids = m.inputs(PROMPT)["input_ids"]
    z = m.run(ids, last_only=True).logits[0, -1].double()
    g_tok = torch.tensor(found.data["logit_tokens"])
    return z[g_tok] - z.mean()


def test_locate_then_steer_exact(word_tokenizer, tmp_path):
    """Last-layer features, a linear final norm: ablating them everywhere moves the probability-weighted demeaned
    logits by minus the sum of their graph effects, exactly."""
    m = worded_model(word_tokenizer, linear_final_norm=True)
    path, _ = saved(m, tmp_path)
    L = m.dims.n_layers
    found, plan = locate_then_steer(m, tmp_path, path, layer=L - 1, top_k=4)
    assert found.data["site"] == f"L{L - 1}.mlp_out" and len(found.data["latents"]) == 4
    assert found.data["dictionary"].endswith(f"L{L - 1}.mlp_in-L{L - 1}.mlp_out.relu")
    assert (tmp_path / "locate" / "graph" / "graph.json").is_file()
    sc = Scores.load(tmp_path / "locate" / "features.json")
    effect = dict(zip(sc.sites, sc.values.tolist()))
    g = Graph.load(tmp_path / "locate" / "graph")
    before = weighted_logit(m, found)
    with m.applied(plan):
        after = weighted_logit(m, found)
    measured = after - before
    # the weighted target (what graph_features ranked by), and each logit node on its own
    predicted = -sum(effect[x] for x in found.data["latents"])
    assert abs(float(g.logit_probs.double() @ measured) - predicted) < 1e-8
    for k, tok in enumerate(g.logit_tokens.tolist()):
        one = dict(zip(*[(s := scores(g, token=tok)).sites, s.values.tolist()]))
        want = -sum(one[x] for x in found.data["latents"])
        assert abs(want) > 0.005 and abs(float(measured[k]) - want) < 1e-5


def test_locate_then_steer_general(word_tokenizer, tmp_path):
    """Default layer (the top feature's): the plan changes the weighted logits; the graph's sum is only a guide."""
    m = worded_model(word_tokenizer)
    path, _ = saved(m, tmp_path)
    found, plan = locate_then_steer(m, tmp_path, path, top_k=3)
    before = weighted_logit(m, found)
    with m.applied(plan):
        after = weighted_logit(m, found)
    assert (after - before).abs().max() > 1e-3
    assert found.data["latents"][0].startswith(found.data["site"] + ".sae")
    with pytest.raises(RecipeError, match="no transcoder for it"):
        locate_then_steer(m, tmp_path / "x", path, layer=7)


def test_recipe_runs_graph_features_to_an_evaluated_plan(word_tokenizer, tmp_path, monkeypatch):
    """The runner attaches the located layer's transcoder (found.data["dictionary"]) for steer and evaluation."""
    import json
    from dataclasses import asdict

    from mechanic.recipes.runner import run
    from mechanic.tasks.builtin import load_task

    m = worded_model(word_tokenizer)
    monkeypatch.setattr(mechanic, "load", lambda name, **kw: m)
    path, _ = saved(m, tmp_path)
    n = lambda t: len(word_tokenizer(t)["input_ids"])  # noqa: E731
    rows = [asdict(e) for e in load_task("gender").split(["train", "validation", "test"]).examples
            if n(e.prompt) == n(e.corrupted)]
    task = tmp_path / "gender.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
name: tiny-graph
title: "Graph features, tiny"
task: {{file: {task}, label: gender}}
locate: {{method: graph_features, transcoders: {path}, top_k: 3, max_logits: 3}}
steer: {{method: feature_steer, how: scale, factor: 0.0}}
evaluate: {{target: [task], better: lower, task: {{file: {task}, label: gender}}, side_effects: [kl], n_boot: 100}}
""")
    res = run(recipe, tmp_path / "run", log=lambda s: None)
    found = res["stages"][0]["data"]
    assert res["stages"][0]["name"] == "locate" and found["prompt"] == next(r["prompt"] for r in rows if r["split"] == "train")
    assert res["stages"][1]["data"]["latents"] == found["latents"] and len(found["latents"]) == 3
    assert found["site"] in m.dictionaries and any(r["id"] == "gender.logit_diff" for r in res["evaluation"]["rows"])
    # the locate stage keys on the transcoders' files, not their path: same files reuse it, new weights redo it
    again = run(recipe, tmp_path / "run", log=lambda s: None)
    assert again["stages"][0]["reused"]
    cfg = next(path.rglob("sae_weights.safetensors"))
    from safetensors.torch import load_file, save_file
    w = load_file(str(cfg))
    save_file({k: v * 1.5 for k, v in w.items()}, str(cfg))
    changed = run(recipe, tmp_path / "run", log=lambda s: None)
    assert not changed["stages"][0]["reused"] and changed["stages"][0]["key"] != again["stages"][0]["key"]
    # features of every layer: the runner attaches one transcoder per layer they come from, for steer and evaluation
    recipe.write_text(recipe.read_text().replace("top_k: 3,", "top_k: 12, layer: all,"))
    every = run(recipe, tmp_path / "run", log=lambda s: None)
    sites = every["stages"][0]["data"]["site"]
    assert isinstance(sites, list) and len(sites) >= 2 and all(s in m.dictionaries for s in sites)
    assert every["stages"][1]["data"]["latents"] == every["stages"][0]["data"]["latents"]


def test_features_of_every_layer_make_one_plan(word_tokenizer, tmp_path):
    """layer: all hands the top features of any layer to the steer stage with one dictionary per layer; the plan
    equals ablating each latent by hand with those transcoders attached, bit for bit, and random draws stay per layer."""
    from mechanic.steer.feature_plans import feature_ablate

    m = worded_model(word_tokenizer)
    path = tmp_path / "tc"
    tcs = random_transcoders(m, d_sae=32, architecture="relu", scale=0.1, layers={1, 2})
    with torch.no_grad():
        tcs[2].W_dec.mul_(5)          # so that both layers have features among the top (layer 1's reach further)
    for i in (1, 2):
        save(tcs[i], path / f"L{i}.mlp_in-L{i}.mlp_out.relu")
    found, plan = locate_then_steer(m, tmp_path, path, layer="all", top_k=12)
    layers = found.data["layer"]
    assert isinstance(layers, list) and len(layers) >= 2 and len(found.data["dictionary"]) == len(layers)
    assert found.data["site"] == [f"L{L}.mlp_out" for L in layers]
    sc = Scores.load(tmp_path / "locate" / "features.json")
    top = sorted(range(len(sc.sites)), key=lambda i: -float(sc.values[i]))[:12]
    assert found.data["latents"] == [sc.sites[i] for i in top]          # the top 12 of any layer, in order
    ids = m.inputs(PROMPT)["input_ids"]
    with m.applied(plan):
        got = m.run(ids).logits
    by_hand = None
    for x in found.data["latents"]:
        one = feature_ablate(m, x)
        by_hand = one if by_hand is None else by_hand + one
    with m.applied(by_hand):
        want = m.run(ids).logits
    assert torch.equal(got, want) and not torch.equal(got, m.run(ids).logits)
    d = tmp_path / "rand"
    d.mkdir()
    run_method("steer", {"model": m, "task": None, "dir": d, "found": found, "seed": 0},
               MethodSpec(method="feature_steer", how="ablate", random=True))
    drawn = Plan.load(d / "plan.safetensors").settings["latents"]
    count = lambda xs, s: sum(x.startswith(s + ".") for x in xs)   # noqa: E731
    assert all(count(drawn, s) == count(found.data["latents"], s) for s in found.data["site"])
    assert not set(drawn) & set(found.data["latents"])
    for s in found.data["site"]:
        detach(m, s)
