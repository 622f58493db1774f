"""Loading: the packaged default, local directories, GGUF files, and clear errors for bad input."""

import json

import pytest
import torch
from typer.testing import CliRunner

import mechanic
from mechanic.cli import app
from mechanic.model.arch import UnknownArchitecture
from mechanic.model.load import LoadError
from mechanic.testing.tiny import tiny_model


@pytest.fixture
def tiny_dir(tmp_path):
    hf = tiny_model("qwen2")
    hf.save_pretrained(tmp_path / "qwen2")
    return tmp_path / "qwen2", hf


def test_local_directory_loads_the_same_weights(tiny_dir):
    path, hf = tiny_dir
    m = mechanic.load(str(path))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert m.run(ids).logits.equal(hf(input_ids=ids).logits)
    assert m.tokenizer is None and m.dims.n_layers == 3


def test_errors_say_what_was_expected(tmp_path, tiny_dir):
    with pytest.raises(LoadError, match="not a model directory"):
        mechanic.load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="no config.json"):
        mechanic.load(str(tmp_path / "empty"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_dir[0] / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(LoadError, match="never unpickles"):
        mechanic.load(str(pickled))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file")
    with pytest.raises(LoadError, match="GGUF"):
        mechanic.load(str(junk))
    with pytest.raises(LoadError, match="No GGUF file"):
        mechanic.load(str(tmp_path / "absent.gguf"))


def test_unknown_architecture_names_class_paths_and_fix():
    import transformers as T

    hf = T.AutoModelForCausalLM.from_config(T.OPTConfig(hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                                        num_attention_heads=2, vocab_size=50,
                                                        word_embed_proj_dim=32))
    with pytest.raises(UnknownArchitecture) as e:
        mechanic.load(hf)
    msg = str(e.value)
    assert "OPTForCausalLM" in msg and "model.decoder.layers" in msg and "archs/" in msg


def test_cli_inspect_json_and_errors(tiny_dir):
    runner = CliRunner()
    res = runner.invoke(app, ["inspect", str(tiny_dir[0]), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["model_type"] == "qwen2" and info["dims"]["n_heads"] == 4
    assert {"site": "L2.neuron", "shape": ["batch", "pos", 96]} in info["sites"]["L2"]
    res = runner.invoke(app, ["inspect", "/no/such/model"])
    assert res.exit_code == 2 and "Traceback" not in res.output and "not a model directory" in res.output
    res = runner.invoke(app, ["--help"])
    assert all(c in res.output for c in ("inspect", "check", "demo"))


@pytest.mark.real
def test_default_model_reloads_from_cache_and_answers(smollm2):
    """A second load reads the cached safetensors (load time is measured in benchmarks/, not here)."""
    from mechanic.model.load import cache_dir

    assert (cache_dir() / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    again = mechanic.load("smollm2")
    tok = again.tokenizer
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert again.dims.n_layers == 30 and again.dims.n_kv_heads == 3 and again.dims.d_mlp == 1536
    out = again.generate("The capital of France is", max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0])


@pytest.mark.real
def test_cli_check_on_default_model():
    res = CliRunner().invoke(app, ["check", "--json"])
    assert res.exit_code == 0, res.output
    assert all(r["ok"] for r in json.loads(res.stdout))
