"""benchmarks/gpu_check.py runs its checks end to end on this machine (CPU, a tiny model): the same code a GPU
user runs, so a broken check is found here, not on their machine."""

import json
from pathlib import Path

import pytest
import torch

from conftest import load_script

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_passes_on_cpu_with_a_tiny_model(tmp_path):
    gpu_check = load_script(SCRIPT, "gpu_check")
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--dtype", "float32", "--model", "tiny", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["ok"] == {"parity": True, "patching": True, "steering": True}
    assert res["parity"]["max_logit_diff"] <= 1e-5 and res["parity"]["max_resid_diff"] <= 1e-5
    assert res["patching"]["max_score_diff"] <= 1e-4 and res["steering"]["same_tokens"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the no-GPU message cannot show")
def test_gpu_check_says_what_to_do_without_cuda(capsys):
    gpu_check = load_script(SCRIPT, "gpu_check")
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().out
