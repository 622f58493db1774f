"""Causal tracing and greedy ACDC on SmolLM2: the reuse-based implementations against the former ones (kept as
test references in tests/test_trace.py and tests/test_acdc.py), side by side in one process, same load.

Trace: MLP traces (window 10, 10 noise samples) of one fact, at the subject's last token (what ROME's layer
choice runs) and at every token (the full grid). ACDC: the top-n EAP-IG circuit of an IOI slice pruned at
threshold 0.01. Wall and CPU seconds of each side, their ratio, floating-point operations of each trace (counted
in a separate untimed run, so they do not depend on the machine's load), and the agreement (max abs diff of the
trace, equal edge sets and decisions for ACDC). Writes benchmarks/results/trace_acdc.json."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import mechanic  # noqa: E402
from mechanic.locate.acdc import acdc  # noqa: E402
from mechanic.locate.circuit import top_edges  # noqa: E402
from mechanic.locate.gradient import eap  # noqa: E402
from mechanic.locate.trace import causal_trace, embedding_std, subject_positions  # noqa: E402
from mechanic.tasks.builtin import load_task  # noqa: E402
from test_acdc import loop_acdc  # noqa: E402
from test_trace import full_forward_trace  # noqa: E402


def timed(fn):
    """(result, wall seconds, CPU seconds of this process)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def gflop(fn) -> float:
    """Floating-point operations of one call, in GFLOP (torch's FLOP counter: matmuls and attention)."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / 1e9


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def trace_side(m, args) -> dict:
    prompt, subject, answer = "The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris"
    ids = torch.tensor(m.tokenizer(prompt)["input_ids"])
    ans = m.tokenizer(answer, add_special_tokens=False)["input_ids"][0]
    subj = subject_positions(m, prompt, subject)
    std = 3 * embedding_std(m)
    out = {}
    for case, positions in (("one_token", [subj[-1]]), ("every_token", list(range(ids.numel())))):
        new = lambda: causal_trace(m, prompt, answer, subject, "mlp", samples=args.samples,  # noqa: E731
                                   positions=positions)
        old = lambda: full_forward_trace(m, ids, ans, subj, "mlp", args.samples, std, 0, 10,  # noqa: E731
                                         positions=positions)
        start = uptime()
        new()  # warm-up
        s, w_new, c_new = timed(new)
        log(f"trace {case} new {w_new:.1f} s wall, {c_new:.1f} s CPU")
        (ref, _), w_old, c_old = timed(old)
        log(f"trace {case} old {w_old:.1f} s wall, {c_old:.1f} s CPU")
        end = uptime()
        f_new, f_old = gflop(new), gflop(old)
        out[case] = {"what": f"mlp trace, window 10, {args.samples} samples, "
                             + (f"one token ({positions[0]})" if case == "one_token" else "every token")
                             + f" of {ids.numel()}; subject tokens {subj}",
                     "old_wall_s": w_old, "new_wall_s": w_new, "old_cpu_s": c_old, "new_cpu_s": c_new,
                     "ratio_wall": w_old / w_new, "ratio_cpu": c_old / c_new,
                     "old_gflop": f_old, "new_gflop": f_new, "ratio_gflop": f_old / f_new,
                     "max_abs_diff": float((s.values - ref).abs().max()), "largest_effect": float(ref.abs().max()),
                     "uptime_start": start, "uptime_end": end}
    return out


def acdc_side(m, args) -> dict:
    suite = load_task("ioi")
    step = max(1, len(suite) // args.n)
    b = mechanic.tasks.Task("ioi", suite.examples[::step][:args.n], suite.metric).tokenize(m)
    start = top_edges(eap(m, b, ig_steps=5), args.start)
    log(f"acdc start circuit {len(start)} edges, {b.n} examples")
    up = uptime()
    (circuit, lg), w_new, c_new = timed(lambda: acdc(m, b, start, threshold=args.threshold,
                                                     candidates=args.candidates, progress=False))
    log(f"acdc new {w_new:.1f} s wall, {c_new:.1f} s CPU: {len(circuit)} edges")
    (ref_keep, ref_steps), w_old, c_old = timed(lambda: loop_acdc(m, b, start, args.threshold))
    log(f"acdc old {w_old:.1f} s wall, {c_old:.1f} s CPU")
    same = [(tuple(s["edge"]), s["removed"]) for s in lg["steps"]] == [(e, r) for e, _, r in ref_steps]
    return {"what": f"IOI, {b.n} examples, top-{args.start} EAP-IG circuit ({len(start)} edges), threshold "
                    f"{args.threshold}, {args.candidates} candidates a forward",
            "edges_start": len(start), "edges_end": len(circuit), "runs": lg["runs"],
            "rows_computed": lg["rows_computed"], "forwards": lg["forwards"],
            "same_edge_set": bool(torch.equal(circuit.keep, ref_keep)), "same_decisions": same,
            "max_abs_diff_metric": max(abs(s["metric_without"] - r) for s, (_, r, _) in zip(lg["steps"], ref_steps)),
            "old_wall_s": w_old, "new_wall_s": w_new, "old_cpu_s": c_old, "new_cpu_s": c_new,
            "ratio_wall": w_old / w_new, "ratio_cpu": c_old / c_new, "uptime_start": up, "uptime_end": uptime()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--n", type=int, default=8, help="IOI examples")
    p.add_argument("--start", type=int, default=120, help="ACDC prunes the top-n EAP-IG circuit")
    p.add_argument("--threshold", type=float, default=0.01)
    p.add_argument("--candidates", type=int, default=2)
    p.add_argument("--skip", choices=["trace", "acdc"], default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trace_acdc.json"))
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.set_grad_enabled(False)
    m = mechanic.load(args.model)
    out = {"model": m.name, "threads": torch.get_num_threads(), "load_start": os.getloadavg()[0]}
    if args.skip != "trace":
        out["trace"] = trace_side(m, args)
    if args.skip != "acdc":
        out["acdc"] = acdc_side(m, args)
    out["load_end"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
