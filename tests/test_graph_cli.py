"""`mechanic graph` on a tiny model directory: the viewer page, circuit-tracer JSON, the saved graph equal to
attribute() called directly, validation rows, and user mistakes as one paragraph."""

import json

import pytest
import torch
from test_graph_attribute import random_transcoders
from typer.testing import CliRunner

import mechanic
from mechanic.cli import app
from mechanic.features import Dictionary, save
from mechanic.locate.graph import Graph, attribute
from mechanic.testing.tiny import tiny_model

runner = CliRunner()
PROMPT = "The king of the old country went to the city"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, word_tokenizer):
    root = tmp_path_factory.mktemp("graphcli")
    tiny_model("llama", vocab_size=len(word_tokenizer)).save_pretrained(root / "model")
    word_tokenizer.save_pretrained(root / "model")
    m = mechanic.load(str(root / "model"))
    tcs = random_transcoders(m, d_sae=32, architecture="relu", scale=0.05, layers=[0, 2])
    for i in (0, 2):
        save(tcs[i], root / "tc" / f"L{i}.mlp_in-L{i}.mlp_out.relu")
    return root, m, tcs


def test_graph_command(setup, tmp_path):
    root, m, tcs = setup
    res = runner.invoke(app, ["graph", PROMPT, "--model", str(root / "model"), "--transcoders", str(root / "tc"),
                              "-o", str(tmp_path / "g.html"), "--export", str(tmp_path / "ct" / "cap.json"),
                              "--save", str(tmp_path / "saved"), "--validate", "3", "--max-logits", "3",
                              "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["transcoder_layers"] == [0, 2] and len(info["logits"]) <= 3
    page = (tmp_path / "g.html").read_text()
    assert page.startswith("<!doctype html>") and 'id="graph-data"' in page
    doc = json.loads((tmp_path / "ct" / "cap.json").read_text())
    assert doc["metadata"]["slug"] == "cap" and (tmp_path / "ct" / "graph-metadata.json").is_file()
    saved = Graph.load(tmp_path / "saved")
    want = attribute(m, tcs, PROMPT, max_logits=3)
    assert torch.equal(saved.logit_tokens, want.logit_tokens) and saved.count("feature") == want.count("feature")
    assert (saved.adjacency - want.adjacency).abs().max() < 1e-6
    assert set(saved.layer[saved.span("feature")].tolist()) <= {0, 2}       # layer 1: error nodes only
    assert info["scores"] == pytest.approx(want.scores)
    v = info["validation"]
    assert len(v["rows"]) == 3 * len(info["logits"]) and set(v["agreement"]) >= {"pearson", "spearman", "sign"}
    res = runner.invoke(app, ["graph", PROMPT, "--model", str(root / "model"), "--transcoders", str(root / "tc"),
                              "-o", str(tmp_path / "h.html"), "--validate", "2"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "predicted" in res.output and (tmp_path / "h.html").is_file()


def test_graph_errors(setup, tmp_path):
    root, m, tcs = setup
    wide = Dictionary(32, 64, "relu", site="L1.mlp_in", out_site="L1.mlp_out")
    save(wide, tmp_path / "bad" / "L1.mlp_in-L1.mlp_out.relu")
    cases = [(tmp_path / "bad", "width"), (tmp_path / "none", "not a directory"), (tmp_path, "no transcoder")]
    sae = Dictionary(m.dims.d_model, 32, "relu", site="L1.resid_post")
    save(sae, tmp_path / "sae" / "L1.resid_post.relu")
    cases.append((tmp_path / "sae", "not a per-layer MLP transcoder"))
    for path, words in cases:
        res = runner.invoke(app, ["graph", PROMPT, "--model", str(root / "model"), "--transcoders", str(path),
                                  "-o", str(tmp_path / "x.html")])
        assert res.exit_code == 2, res.output
        assert words in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["graph", PROMPT, "--model", str(root / "model"), "--transcoders", str(root / "tc"),
                              "--node-threshold", "3"])
    assert res.exit_code == 2 and "between 0 and 1" in res.output


def test_graph_feature_cap_and_first_position(setup, tmp_path):
    root, m, tcs = setup
    base = ["graph", PROMPT, "--model", str(root / "model"), "--transcoders", str(root / "tc"), "--json"]
    res = runner.invoke(app, base + ["-o", str(tmp_path / "a.html"), "--max-feature-nodes", "5",
                                     "--save", str(tmp_path / "capped")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["nodes"]["feature"] == 5
    want = attribute(m, tcs, PROMPT, max_feature_nodes=5)
    assert (Graph.load(tmp_path / "capped").adjacency - want.adjacency).abs().max() < 1e-6
    res = runner.invoke(app, base + ["-o", str(tmp_path / "b.html"), "--max-feature-nodes", "-1", "--keep-first",
                                     "--save", str(tmp_path / "all")])
    assert res.exit_code == 0, res.output
    g = Graph.load(tmp_path / "all")
    assert g.count("feature") == attribute(m, tcs, PROMPT, max_feature_nodes=None, zero_first=False).count("feature")
    assert int(g.pos[g.span("feature")].min()) == 0          # position 0 kept its features
    res = runner.invoke(app, base + ["-o", str(tmp_path / "c.html"), "--max-feature-nodes", "-3"])
    assert res.exit_code != 0 and "--max-feature-nodes" in res.output and "Traceback" not in res.output
