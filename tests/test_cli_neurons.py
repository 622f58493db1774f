"""`mechanic locate neurons` on the default model: ranked neurons, files written, user errors without traceback."""

import json

import pytest
from typer.testing import CliRunner

from mechanic.cli import app
from mechanic.locate import Scores

pytestmark = pytest.mark.real
runner = CliRunner()


def test_neurons_ranks_writes_and_refuses_bad_layers(tmp_path, smollm2):
    out = tmp_path / "neurons"
    res = runner.invoke(app, ["locate", "neurons", "--task", "facts", "--n", "1", "--layers", "28,29",
                              "--top", "5", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    scores = Scores.load(out / "scores.safetensors")
    assert scores.values.shape == (2 * 1536,) and (out / "heatmap.html").stat().st_size > 100_000
    assert [r["site"] for r in info["top"]] == [s for s, _, _ in scores.top(5, by="max")]
    assert info["top"][0]["logprob_increase"] == pytest.approx(scores.top(1, by="max")[0][2])
    assert all(len(r["promotes"]) == 3 for r in info["top"])
    res = runner.invoke(app, ["locate", "neurons", "--task", "facts", "--n", "1", "--layers", "29", "--top", "3"])
    assert res.exit_code == 0, res.output
    assert "neurons by log-probability increase" in res.output and "L29.neuron" in res.output
    res = runner.invoke(app, ["locate", "neurons", "--task", "facts", "--layers", "99"])
    assert res.exit_code == 2 and "Traceback" not in res.output and "0..29" in res.output
