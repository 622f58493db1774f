"""`mechanic locate outliers` on the default model: tables, JSON and Scores files."""

import json

import pytest
from typer.testing import CliRunner

from mechanic.cli import app
from mechanic.locate import Scores

pytestmark = pytest.mark.real
runner = CliRunner()
SMALL = ["--tokens", "128", "--detect-tokens", "128", "--verify-tokens", "128", "--max-iter", "1", "--n-random", "1"]


def test_outliers_json_and_scores(tmp_path, smollm2):
    res = runner.invoke(app, ["locate", "outliers", *SMALL, "-o", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["tokens"] == 128 and info["massive"] and {e["dim"] for e in info["massive"]} == {507}
    assert info["super_weights"] and info["super_weights"][0]["ppl"] is not None
    assert len(info["sink_heads"]) == 10
    for name in ("massive_activations", "super_weights", "attention_sinks"):
        s = Scores.load(tmp_path / f"{name}.json")
        assert s.method == name
    assert not (tmp_path / "super_experts.json").exists()


def test_outliers_tables_and_bad_option(smollm2):
    res = runner.invoke(app, ["locate", "outliers", *SMALL, "--top", "3"])
    assert res.exit_code == 0, res.output
    assert "super-weight candidates" in res.output and "sink heads" in res.output and "507" in res.output
    res = runner.invoke(app, ["locate", "outliers", "--tokens", "1"])
    assert res.exit_code == 2 and "max_tokens must be at least 2" in res.output


def test_outliers_on_a_moe_model_directory(tmp_path, smollm2):
    """A tiny Qwen2-MoE with SmolLM2's tokenizer: super experts and super weights (its dense layer) both run."""
    from mechanic.testing.tiny import tiny_model

    hf = tiny_model("qwen2_moe", vocab_size=smollm2.dims.vocab)
    hf.save_pretrained(tmp_path / "moe")
    smollm2.tokenizer.save_pretrained(tmp_path / "moe")
    res = runner.invoke(app, ["locate", "outliers", "--model", str(tmp_path / "moe"), *SMALL, "--json",
                              "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["super_experts"] is not None and len(info["super_experts"]["super"]) >= 1
    assert info["super_weights"] is not None
    s = Scores.load(tmp_path / "out" / "super_experts.json")
    assert "L0.shared_expert" in s.sites and "L2.expert3" in s.sites
