"""`mechanic sae train|eval|show` on a tiny model directory: JSON output, files written, errors as one paragraph."""

import json

import pytest
from typer.testing import CliRunner

from mechanic.cli import app
from mechanic.data.text import calibration, heldout
from mechanic.testing.tiny import tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, word_tokenizer):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model("llama", vocab_size=word_tokenizer.vocab_size).save_pretrained(path)
    word_tokenizer.save_pretrained(path)
    text = path.parent / "train.txt"
    text.write_text("\n\n".join(calibration()[:40]))
    (path.parent / "held.jsonl").write_text("\n".join(json.dumps({"text": p}) for p in heldout()[:10]))
    return path


def test_train_eval_show(model_dir, tmp_path):
    out = tmp_path / "saes"
    res = runner.invoke(app, ["sae", "train", "--model", str(model_dir), "--site", "L1.resid_post,L2.resid_post",
                              "--k", "8", "--expansion", "4", "--tokens", "2048", "--batch-size", "256",
                              "--buffer-tokens", "1024", "--seq-len", "64", "--text", str(model_dir.parent / "train.txt"),
                              "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["tokens_seen"] == 2048 and set(info["dictionaries"]) == {"L1.resid_post.topk", "L2.resid_post.topk"}
    assert all(0 < v["fvu"] < 2 and v["l0"] == 8.0 for v in info["final"].values())
    sae = out / "L2.resid_post.topk"
    res = runner.invoke(app, ["sae", "eval", str(sae), "--model", str(model_dir), "--text",
                              str(model_dir.parent / "held.jsonl"), "--tokens", "512", "--ce-tokens", "128",
                              "--seq-len", "64", "--json", "-o", str(tmp_path / "ev.json")])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.stdout)
    assert ev["l0"] == 8.0 and ev["max_logit_diff_with_error"] < 1e-5 and ev["ce_loss_recovered"] is not None
    assert json.loads((tmp_path / "ev.json").read_text())["fvu"] == ev["fvu"]
    res = runner.invoke(app, ["sae", "show", str(sae), "--model", str(model_dir), "--json"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert (shown["architecture"], shown["site"], shown["d_sae"], shown["hook_name"]) == \
        ("topk", "L2.resid_post", 256, "blocks.2.hook_resid_post")
    res = runner.invoke(app, ["sae", "show", str(sae)])
    assert res.exit_code == 0 and "L2.resid_post" in res.output


def test_user_errors_are_one_paragraph(model_dir, tmp_path):
    cases = [
        (["sae", "show", str(tmp_path / "missing")], "No dictionary at"),
        (["sae", "train", "--model", str(model_dir), "--site", "L9.resid_post", "-o", str(tmp_path / "x")], "out of range"),
        (["sae", "train", "--model", str(model_dir), "--site", "L1.resid_post", "--arch", "gated", "-o",
          str(tmp_path / "x")], "gated"),
        (["sae", "train", "--model", str(model_dir), "--site", "L1.mlp_in,L2.mlp_in", "--out-site", "L1.mlp_out",
          "-o", str(tmp_path / "x")], "one output site per input site"),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output and "Traceback" not in res.output, res.output
    res = runner.invoke(app, ["sae", "train", "--model", str(model_dir), "--site", "L1.resid_post", "--forward-batch",
                              "0", "-o", str(tmp_path / "x")], env={"MECHANIC_MEMORY_BUDGET": "1MiB"})
    assert res.exit_code == 2, res.output            # a run that cannot fit the memory budget: refused, one paragraph
    assert "Not enough memory" in res.output and "What would fit" in res.output and "Traceback" not in res.output
