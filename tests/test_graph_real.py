"""An attribution graph on the real default model (SmolLM2-135M, 30 layers) with random transcoders on every
layer: exact logits, complete decomposition, and edges equal to deleting the source from the frozen model."""

import pytest
import torch

from mechanic.features import Dictionary
from mechanic.locate.graph import Replacement, attribute, graph_scores, prune
from mechanic.locate.graph.replacement import Sources

PROMPT = "The capital of France is Paris, and the capital of Germany is the city of"   # 16 tokens


def topk_transcoders(model, d_sae=2304, k=4, scale=0.02):
    out = []
    for i in range(model.dims.n_layers):
        d = Dictionary(model.dims.d_model, d_sae, "topk", k=k, site=f"L{i}.mlp_in", out_site=f"L{i}.mlp_out")
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in d.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        out.append(d)
    return out


@pytest.mark.real
def test_smollm2_graph_is_exact(smollm2):
    rep = Replacement(smollm2, topk_transcoders(smollm2), PROMPT)
    assert rep.n_pos == 16
    real = smollm2.run(PROMPT, cache=["logits"]).cache["logits"][0, -1]
    with torch.no_grad():
        assert (rep.run(rep.sources.expand(1)).logits[0] - real).abs().max() <= 1e-4
    g = attribute(smollm2, rep, PROMPT, batch_size=64)
    assert g.count("feature") == 30 * 15 * 4          # position 0 has no features (zero_first)
    t = torch.cat([torch.arange(g.count("feature")), torch.arange(len(g) - g.count("logit"), len(g))])
    assert (g.adjacency[t].sum(1) + g.bias[t] - g.value[t]).abs().max() <= 1e-4
    # a few sources deleted from the frozen model one at a time (a feature, an error, a token) vs their columns
    src, F, P = rep.sources, g.count("feature"), rep.n_pos
    cols = [100, F + 12 * P + 15, F + 30 * P + 3]
    embed, acts, errors = (src.embed.expand(4, -1, -1).clone(), [a.expand(4, -1).clone() for a in src.acts],
                           [e.expand(4, -1, -1).clone() for e in src.errors])
    layer, j = int(g.layer[100]), 100 - sum(len(a) for a in src.acts[:int(g.layer[100])])
    acts[layer][0, j] = 0
    errors[12][1, 15] = 0
    embed[2, 3] = 0
    with torch.no_grad():
        z = rep.run(Sources(embed, acts, errors)).logits
    demeaned = z[:, g.logit_tokens] - z.mean(-1, keepdim=True)
    naive = (demeaned[3] - demeaned[:3]).T                       # [logits, 3 sources]
    assert (g.adjacency[g.span("logit")][:, cols] - naive).abs().max() <= 1e-4
    s = graph_scores(g)
    assert 0 <= s["replacement"] <= 1 and 0 <= s["completeness"] <= 1
    assert prune(g).node_mask[g.span("logit")].all()


@pytest.mark.real
def test_smollm2_graph_features_to_a_feature_plan(smollm2, tmp_path):
    """The recipe path on the real model: graph_features on saved transcoders of the last layer, then feature_steer.
    Last-layer features reach the logits only at the last position and only through the (real, unfrozen) final
    norm, so ablating them everywhere moves the weighted demeaned logits as the graph predicts, up to that norm."""
    from mechanic.features import detach, save
    from mechanic.recipes.methods import run_method
    from mechanic.recipes.schema import MethodSpec
    from mechanic.steer.plan import Plan

    L = smollm2.dims.n_layers
    tcs = topk_transcoders(smollm2, k=16, scale=0.05)
    for i in (L - 2, L - 1):
        save(tcs[i], tmp_path / "tc" / f"L{i}.mlp_in-L{i}.mlp_out.topk")
    found = run_method("locate", {"model": smollm2, "task": None, "dir": tmp_path / "locate"},
                       MethodSpec(method="graph_features", transcoders=str(tmp_path / "tc"), prompt=PROMPT,
                                  layer=L - 1, top_k=3, max_logits=3, logit_mass=0.99))
    site = found.data["site"]
    try:
        (tmp_path / "steer").mkdir()
        run_method("steer", {"model": smollm2, "task": None, "dir": tmp_path / "steer", "found": found, "seed": 0},
                   MethodSpec(method="feature_steer", how="ablate"))
        plan = Plan.load(tmp_path / "steer" / "plan.safetensors")
        from mechanic.locate.scores import Scores
        effect = dict(zip(*[(s := Scores.load(tmp_path / "locate" / "features.json")).sites, s.values.tolist()]))
        predicted = -sum(effect[x] for x in found.data["latents"])
        tok = torch.tensor(found.data["logit_tokens"])
        probs = torch.tensor(Scores.load(tmp_path / "locate" / "features.json").settings["logit_probs"]).double()

        def target():
            z = smollm2.run(PROMPT, last_only=True).logits[0, -1].double()
            return float(probs @ (z[tok] - z.mean()))
        before = target()
        with smollm2.applied(plan):
            measured = target() - before
        assert abs(predicted) > 1e-3 and measured * predicted > 0
        assert abs(measured - predicted) <= 0.25 * abs(predicted)
    finally:
        detach(smollm2, site)
