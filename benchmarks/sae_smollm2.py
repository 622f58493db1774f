"""A TopK SAE (16x, k=32) on one SmolLM2 residual layer, trained on this machine's CPU, then evaluated held-out.

    nice -n 19 .venv/bin/python benchmarks/sae_smollm2.py [--tokens N] [--layer L]
    -> benchmarks/results/sae_smollm2.json (settings, training log with tokens/s, held-out evaluation)

Training text: the default corpus (GCIDE train split); evaluation: its held-out split.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import mechanic
from mechanic.features.evaluate import evaluate
from mechanic.features.train import DictConfig, train

OUT = Path(__file__).resolve().parent / "results" / "sae_smollm2.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=500_000)
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--work", default="runs/sae_smollm2")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--ce-tokens", type=int, default=4096)
    ap.add_argument("--eval-only", action="store_true", help="re-evaluate the trained dictionary of the committed result")
    a = ap.parse_args()
    if a.eval_only:
        return reevaluate(a)
    model = mechanic.load("smollm2")
    cfg = DictConfig(f"L{a.layer}.resid_post", "topk", expansion=16, k=32, lr=a.lr, dead_after=100_000)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    (d,) = train(model, cfg, a.work, tokens=a.tokens, batch_size=a.batch_size, buffer_tokens=32768,
                 checkpoint_every=100_000)
    train_s = time.perf_counter() - t0
    summary = json.loads((Path(a.work) / "train.json").read_text())
    t1 = time.perf_counter()
    ev = evaluate(model, d, tokens=a.eval_tokens, ce_tokens=a.ce_tokens)
    result = {"what": "TopK SAE 16x k=32 on SmolLM2-135M-Instruct " + cfg.site, "model": model.name,
              "site": cfg.site, "d_sae": d.d_sae, "k": 32, "train_tokens": summary["tokens_seen"],
              "train_seconds": train_s, "train_tokens_per_s": summary["tokens_per_s"],
              "train_final_batch": summary["final"][cfg.label], "train_settings": summary["settings"],
              "train_log": summary["log"], "eval_seconds": time.perf_counter() - t1, "heldout": ev.to_json(),
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform(), "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg(),
                          "note": "run under nice -n 19 beside other full-size experiments; tokens/s is a lower bound"},
              "torch": torch.__version__, "dictionary_dir": str(Path(a.work) / cfg.label)}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("train_tokens", "train_tokens_per_s")} |
                     {k: ev.to_json()[k] for k in ("fvu", "l0", "dead_fraction", "ce_loss_recovered", "kl_spliced")}))


def reevaluate(a) -> None:
    """Evaluate the dictionary the committed result trained again (e.g. after a fix in evaluation); training stays."""
    from mechanic.features import load

    result = json.loads(OUT.read_text())
    model = mechanic.load("smollm2")
    d = load(result["dictionary_dir"])
    t1 = time.perf_counter()
    ev = evaluate(model, d, tokens=a.eval_tokens, ce_tokens=a.ce_tokens)
    result.setdefault("earlier_heldout", []).append(result["heldout"])
    result["heldout"], result["eval_seconds"] = ev.to_json(), time.perf_counter() - t1
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: ev.to_json()[k] for k in ("fvu", "l0", "ce_loss_recovered", "max_logit_diff_with_error")}))


if __name__ == "__main__":
    main()
