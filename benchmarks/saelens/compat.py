"""Compatibility with SAELens itself, both ways: mechanic's files in SAELens and SAELens's files in mechanic.

For every architecture, a random dictionary is written by one tool and read by the other; both compute
encode, decode(encode) and forward on the same inputs and the largest absolute difference is recorded.
Run with mechanic's python after `bash benchmarks/setup_saelens.sh`:

    .venv/bin/python benchmarks/saelens/compat.py     # -> benchmarks/results/saelens_compat.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mechanic.features import Dictionary, load, save

HERE = Path(__file__).resolve().parent
SAELENS_PY = HERE.parent / ".venv-saelens" / "bin" / "python"
OUT = HERE.parent / "results" / "saelens_compat.json"
D_IN, D_SAE, TOL = 16, 64, 1e-5


def made_by_mechanic():
    """(name, Dictionary) for each architecture mechanic writes in a SAELens-readable form."""
    sae = dict(site="L1.resid_post")
    tc = dict(site="L1.mlp_in", out_site="L1.mlp_out")
    yield "relu", Dictionary(D_IN, D_SAE, "relu", **sae)
    yield "relu_layer_norm", Dictionary(D_IN, D_SAE, "relu", normalize="layer_norm", **sae)
    yield "relu_constant_norm_rescale", Dictionary(D_IN, D_SAE, "relu", normalize="constant_norm_rescale", **sae)
    yield "topk", Dictionary(D_IN, D_SAE, "topk", k=8, **sae)
    yield "topk_rescaled", Dictionary(D_IN, D_SAE, "topk", k=8, rescale_acts_by_decoder_norm=True, **sae)
    yield "batchtopk", Dictionary(D_IN, D_SAE, "batchtopk", k=8, **sae)
    yield "jumprelu", Dictionary(D_IN, D_SAE, "jumprelu", **sae)
    yield "gated", Dictionary(D_IN, D_SAE, "gated", **sae)
    yield "transcoder", Dictionary(D_IN, D_SAE, "relu", **tc)
    yield "skip_transcoder", Dictionary(D_IN, D_SAE, "relu", skip=True, **tc)
    yield "jumprelu_transcoder", Dictionary(D_IN, D_SAE, "jumprelu", **tc)
    yield "jumprelu_skip_transcoder", Dictionary(D_IN, D_SAE, "jumprelu", skip=True, **tc)


@torch.no_grad()
def randomise(d: Dictionary, seed: int) -> Dictionary:
    g = torch.Generator().manual_seed(seed)
    for name, p in d.named_parameters():
        p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("W") else 0.1))
    if hasattr(d, "threshold"):
        d.threshold.copy_(torch.rand(d.threshold.shape, generator=g) * 0.3)
    return d


@torch.no_grad()
def outputs(d: Dictionary, x: torch.Tensor) -> dict[str, torch.Tensor]:
    acts = d.encode(x)
    return {"acts": acts, "recon": d.decode(acts), "forward": d(x)}


def diffs(a: dict, b: dict) -> dict[str, float]:
    return {k: float((a[k] - b[k]).abs().max()) for k in ("acts", "recon", "forward")}


def main() -> dict:
    if not SAELENS_PY.exists():
        sys.exit("benchmarks/.venv-saelens is missing: run `bash benchmarks/setup_saelens.sh` first.")
    x = torch.randn(4, 7, D_IN, generator=torch.Generator().manual_seed(0))
    result = {"tolerance": TOL, "d_in": D_IN, "d_sae": D_SAE, "inputs": list(x.shape),
              "mechanic_to_saelens": {}, "saelens_to_mechanic": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_file({"x": x}, str(work / "x.safetensors"))
        ours = {}
        for i, (name, d) in enumerate(made_by_mechanic()):
            randomise(d, i)
            save(d, work / "mechanic" / name, model_name="tiny-llama")
            ours[name] = (d.architecture, outputs(d, x))
        proc = subprocess.run([str(SAELENS_PY), str(HERE / "saelens_side.py"), str(work)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"saelens_side.py failed:\n{proc.stderr[-3000:]}")
        side = json.loads((work / "saelens_side.json").read_text())
        result["sae_lens_version"], result["saelens_torch"] = side["sae_lens"], side["torch"]
        for name, (arch, out) in ours.items():
            info = side["load_mechanic"][name]
            row = {"mechanic_architecture": arch,
                   "written_as": json.loads((work / "mechanic" / name / "cfg.json").read_text())["architecture"]}
            if "error" in info:
                row["error"] = info["error"]
            else:
                row["saelens_class"] = info["class"]
                row["max_abs_diff"] = diffs(out, load_file(str(work / "mechanic" / name / "saelens_outputs.safetensors")))
                row["mean_l0"] = float((out["acts"] != 0).sum(-1).float().mean())
            result["mechanic_to_saelens"][name] = row
        for name in side["saved"]:
            d_dir = work / "saelens" / name
            theirs = load_file(str(d_dir / "saelens_outputs.safetensors"))
            d = load(d_dir)
            result["saelens_to_mechanic"][name] = {
                "written_as": json.loads((d_dir / "cfg.json").read_text())["architecture"],
                "mechanic": repr(d), "max_abs_diff": diffs(outputs(d, x), theirs),
                "mean_l0": float((theirs["acts"] != 0).sum(-1).float().mean())}
    worst = [max(r["max_abs_diff"].values()) for side_ in ("mechanic_to_saelens", "saelens_to_mechanic")
             for r in result[side_].values() if "max_abs_diff" in r]
    result["max_abs_diff_overall"] = max(worst)
    result["all_within_tolerance"] = all(w <= TOL for w in worst) and not any(
        "error" in r for r in result["mechanic_to_saelens"].values())
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    r = main()
    print(json.dumps({k: r[k] for k in ("sae_lens_version", "max_abs_diff_overall", "all_within_tolerance")}))
    for side_ in ("mechanic_to_saelens", "saelens_to_mechanic"):
        for name, row in r[side_].items():
            print(f"{side_:22s} {name:28s} {row.get('error') or max(row['max_abs_diff'].values()):}")
