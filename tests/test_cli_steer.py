"""The steer commands: plans and summaries written, effects shown, models saved anew, user errors in one paragraph."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mechanic.cli import app
from mechanic.steer.plan import Plan
from mechanic.testing.tiny import tiny_model

runner = CliRunner()


@pytest.mark.real
def test_vector_and_ablate_on_smollm2(tmp_path, smollm2):
    out = tmp_path / "vec"
    res = runner.invoke(app, ["steer", "vector", "--task", "sentiment", "--n", "16", "--layers", "12",
                              "--coefficient", "4", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert (out / "vector.gguf").is_file() and len(Plan.load(out / "plan.safetensors").interventions) == 1
    # adding the positive-minus-negative direction moves the negative prompts toward the positive answer
    assert info["after"]["corrupted"] > info["before"]["corrupted"] + 0.5
    res = runner.invoke(app, ["steer", "vector", "--task", "sentiment", "--n", "8", "--layers", "6,12",
                              "--sweep", "0,4", "--max-kl", "10", "-o", str(tmp_path / "sw"), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["coefficient"] == 4.0 and (tmp_path / "sw" / "sweep_kl.html").is_file()
    res = runner.invoke(app, ["steer", "vector", "--task", "sentiment", "--n", "8", "--layers", "12",
                              "--sweep", "4", "--max-kl", "0", "-o", str(tmp_path / "sw0")])
    assert res.exit_code == 2 and "KL" in res.output
    res = runner.invoke(app, ["steer", "ablate", "--task", "ioi", "--n", "4", "--sites", "L0,L1.head0",
                              "--how", "zero", "-o", str(tmp_path / "abl")])
    assert res.exit_code == 0, res.output
    assert "before / after" in res.output
    summary = json.loads((tmp_path / "abl" / "summary.json").read_text())
    assert summary["sites"] == ["L0.attn_out", "L0.mlp_out", "L1.head0"]
    res = runner.invoke(app, ["steer", "ablate", "--task", "ioi", "--sites", "L0.head99", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "Traceback" not in res.output and "head" in res.output
    res = runner.invoke(app, ["steer", "ablate", "--task", "ioi", "-o", str(tmp_path / "y")])
    assert res.exit_code == 2 and "exactly one of --scores" in res.output


@pytest.mark.real
def test_edit_writes_a_new_model_that_knows_the_new_fact(tmp_path, smollm2):
    out = tmp_path / "edit"
    res = runner.invoke(app, ["steer", "edit", "--prompt", "Toulouse is a city in the country of", "--subject",
                              "Toulouse", "--target", " Germany", "--layers", "5", "--stats-tokens", "8192",
                              "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["efficacy"] == 1.0
    edited = AutoModelForCausalLM.from_pretrained(out / "model")
    ids = smollm2.tokenizer("Toulouse is a city in the country of", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        top = edited(ids).logits[0, -1].argmax().item()
    assert smollm2.tokenizer.decode([top]) == " Germany"
    res = runner.invoke(app, ["steer", "edit", "--prompt", "Paris is nice", "-o", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "--subject" in res.output


def test_merge_writes_plan_shifts_and_model(tmp_path):
    base, tuned = tiny_model("llama"), tiny_model("llama")
    with torch.no_grad():
        tuned.model.layers[1].mlp.down_proj.weight[:, 5] += 3.0
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    out = tmp_path / "merged"
    res = runner.invoke(app, ["steer", "merge", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"),
                              "--keep", "1", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["kept_per_group"]["L1.neuron"] == "1 of 96"
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert torch.equal(merged.model.layers[1].mlp.down_proj.weight, tuned.model.layers[1].mlp.down_proj.weight)
    assert (out / "shifts.json").is_file()
    res = runner.invoke(app, ["steer", "merge", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"),
                              "-o", str(out)])
    assert res.exit_code == 2 and "not empty" in res.output  # never writes over an existing model
