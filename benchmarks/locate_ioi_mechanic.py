"""Locate on the IOI suite with SmolLM2: AtP vs exact head patching (rank agreement, cost), EAP-IG faithfulness."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import mechanic
from mechanic.locate.causal import patch
from mechanic.locate.acdc import acdc
from mechanic.locate.circuit import faithfulness, faithfulness_curve, top_edges
from mechanic.locate.gradient import ComponentGraph, atp, eap
from mechanic.tasks.builtin import load_task
from mechanic.tasks.metrics import logit_diff

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_gradient import loop_eap_ig  # noqa: E402  (the test's reference: the loop before points were batched)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def timed(fn):
    """(result, wall seconds, CPU seconds of this process)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=16, help="IOI examples, spread over templates and name orders")
    p.add_argument("--acdc-start", type=int, default=300, help="ACDC prunes the top-n EAP-IG circuit")
    p.add_argument("--acdc-threshold", type=float, default=0.01)
    p.add_argument("--eap-rounds", type=int, default=2, help="interleaved rounds of the EAP-IG variants")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))  # benchmarks/run.py --threads
    m = mechanic.load(args.model)
    suite = load_task("ioi")
    step = max(1, len(suite) // args.n)
    task = mechanic.tasks.Task("ioi", suite.examples[::step][:args.n], suite.metric)
    b = task.tokenize(m)

    def fwd_bwd():
        m.run(b.corrupted, cache=["L0.resid_pre"], grad=lambda lg: logit_diff(lg[:, -1], b).sum())
    fwd_bwd()
    t = time.perf_counter()
    fwd_bwd()
    t_fb = time.perf_counter() - t
    atp(m, b, "head")
    t = time.perf_counter()
    approx = atp(m, b, "head")
    t_atp = time.perf_counter() - t
    t = time.perf_counter()
    exact = patch(m, b, "head", positions=None, progress=False)
    t_exact = time.perf_counter() - t
    g = ComponentGraph(m)
    # EAP-IG, 5 points, in interleaved rounds: the former loop (one graph run per point, the corrupted run repeated),
    # eap as it is called by default, and eap with the 5 points as batch rows of one graph run
    runs = {"loop": lambda: loop_eap_ig(m, b, 5), "default": lambda: eap(m, b, ig_steps=5),
            "rows": lambda: eap(m, b, ig_steps=5, ig_batch=5)}
    ig = {"steps": 5, "rounds": args.eap_rounds, "threads": torch.get_num_threads(), "uptime_start": uptime(),
          "wall_s": {k: [] for k in runs}, "cpu_s": {k: [] for k in runs}}
    out = {}
    for _ in range(args.eap_rounds):
        for k, fn in runs.items():
            out[k], w, c = timed(fn)
            ig["wall_s"][k].append(w)
            ig["cpu_s"][k].append(c)
    ig["uptime_end"] = uptime()
    ref = out["loop"]
    edges = out["default"]
    ig["max_abs_diff"] = {k: float((out[k].values - ref).abs().max()) for k in ("default", "rows")}
    ig["largest_edge"] = float(ref.abs().max())
    t_eap = statistics.median(ig["wall_s"]["default"])
    curve = faithfulness_curve(m, b, edges, [0, 100, 300, 1000, 3000, 10000, g.n_edges])
    start = top_edges(edges, args.acdc_start)
    t = time.perf_counter()
    pruned, log = acdc(m, b, start, threshold=args.acdc_threshold, progress=False)
    t_acdc = time.perf_counter() - t
    acdc_row = {k: log[k] for k in ("threshold", "edges_start", "edges_end", "runs", "nodes", "faithfulness")}
    acdc_row.update(seconds=t_acdc, faithfulness_start=faithfulness(m, b, start)["faithfulness"],
                    faithfulness_topn_same_size=faithfulness(m, b, top_edges(edges, len(pruned)))["faithfulness"])
    print(json.dumps({
        "examples": b.n, "heads": len(approx.sites),
        "spearman_atp_vs_exact": spearman(approx.values, exact.values),
        "atp_s": t_atp, "fwd_bwd_s": t_fb, "exact_head_patching_s": t_exact, "eap_ig_s": t_eap, "eap_ig": ig,
        "metric_clean": exact.settings["metric_clean"], "metric_corrupted": exact.settings["metric_corrupted"],
        "edges_total": g.n_edges, "faithfulness": curve, "acdc": acdc_row,
        "top_heads_exact": exact.top(5), "top_heads_atp": approx.top(5)}))


if __name__ == "__main__":
    main()
