"""The locate commands on the default model: outputs written, JSON printed, user errors in one paragraph."""

import json

import pytest
from typer.testing import CliRunner

from mechanic.cli import app
from mechanic.locate import Scores

pytestmark = pytest.mark.real
runner = CliRunner()


def test_patch_and_atp_write_scores_and_heatmap(tmp_path, smollm2):
    out = tmp_path / "patch"
    res = runner.invoke(app, ["locate", "patch", "--task", "ioi", "--n", "2", "--positions", "-1",
                              "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    scores = Scores.load(out / "scores.safetensors")
    assert scores.values.shape == (30, 1) and (out / "heatmap.html").stat().st_size > 100_000
    assert info["top"][0]["value"] == pytest.approx(scores.top(1)[0][2])
    res = runner.invoke(app, ["locate", "atp", "--task", "ioi", "--n", "2", "-o", str(tmp_path / "atp")])
    assert res.exit_code == 0, res.output
    assert "atp: top 10" in res.output and len(Scores.load(tmp_path / "atp" / "scores.json").sites) == 270


def test_user_task_file_and_errors(tmp_path, smollm2):
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"prompt": "When Mary and John went to the store, John gave a drink to",
                             "answer": " Mary", "wrong": " John",
                             "corrupted": "When Mary and John went to the store, Paul gave a drink to"}) + "\n")
    res = runner.invoke(app, ["locate", "patch", "--task", str(f), "--kind", "mlp_out", "--positions", "none",
                              "-o", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["locate", "patch", "--task", "no_such_task", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "Traceback" not in res.output and "ioi" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    res = runner.invoke(app, ["locate", "patch", "--task", str(bad), "-o", str(tmp_path / "y")])
    assert res.exit_code == 2 and "bad.jsonl" in res.output


def test_dictionary_latents_are_sites_for_patch_atp_and_eap(tmp_path, smollm2):
    """--dictionary attaches a trained SAE: patch and atp score its latents (kind sae), eap makes them graph nodes;
    the CLI's numbers equal the library called on the same dictionary."""
    import torch

    import mechanic
    from mechanic.features import attach, load
    from mechanic.features.train import DictConfig, train
    from mechanic.locate.causal import patch
    from mechanic.tasks import load_task

    train(smollm2, DictConfig("L3.resid_post", "topk", expansion=1, k=8), tmp_path / "sae", tokens=2048,
          batch_size=256, buffer_tokens=1024, seq_len=32, progress=False)
    d = tmp_path / "sae" / "L3.resid_post.topk"
    res = runner.invoke(app, ["locate", "patch", "--task", "ioi", "--n", "2", "--positions", "-1", "--kind", "sae",
                              "--dictionary", str(d), "--latents", "4", "-o", str(tmp_path / "p"), "--json"])
    assert res.exit_code == 0, res.output
    got = Scores.load(tmp_path / "p" / "scores.safetensors")
    m = mechanic.load("smollm2")
    attach(m, load(d))
    ref = patch(m, load_task("ioi", n=2), "sae", positions=[-1], latents=4, progress=False)
    assert got.sites == ref.sites and torch.allclose(got.values, ref.values, atol=1e-6)
    assert any(s.endswith(".sae_error") for s in got.sites)
    res = runner.invoke(app, ["locate", "atp", "--task", "ioi", "--n", "2", "--kind", "sae", "--dictionary", str(d),
                              "-o", str(tmp_path / "a"), "--json"])
    assert res.exit_code == 0, res.output
    assert len(Scores.load(tmp_path / "a" / "scores.json").sites) == 576 + 1      # every latent + the error node
    res = runner.invoke(app, ["locate", "eap", "--task", "ioi", "--n", "2", "--ig-steps", "0", "--dictionary", str(d),
                              "--latents", "8", "-o", str(tmp_path / "e"), "--json"])
    assert res.exit_code == 0, res.output
    assert any(".sae" in s for s in Scores.load(tmp_path / "e" / "scores.json").sites)
