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
