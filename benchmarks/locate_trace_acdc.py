"""Causal tracing and greedy ACDC on SmolLM2: the reuse-based implementations against the former ones (kept as
test references in tests/test_trace.py and tests/test_acdc.py), side by side in one process, same load.

Trace: an MLP trace (window 10) at the subject's last token of one fact, 10 noise samples. ACDC: the top-n
EAP-IG circuit of an IOI slice pruned at threshold 0.01. Wall and CPU seconds of each side, their ratio, and
the agreement (max abs diff of the trace, equal edge sets and decisions for ACDC). Writes
benchmarks/results/trace_acdc.json."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

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


def trace_side(m, args) -> dict:
    prompt, subject, answer = "The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris"
    pos = subject_positions(m, prompt, subject)[-1]
    ids = torch.tensor(m.tokenizer(prompt)["input_ids"])
    ans = m.tokenizer(answer, add_special_tokens=False)["input_ids"][0]
    subj = subject_positions(m, prompt, subject)
    std = 3 * embedding_std(m)
    new = lambda: causal_trace(m, prompt, answer, subject, "mlp", samples=args.samples, positions=[pos])  # noqa: E731
    old = lambda: full_forward_trace(m, ids, ans, subj, "mlp", args.samples, std, 0, 10, positions=[pos])  # noqa: E731
    new()  # warm-up
    s, w_new, c_new = timed(new)
    log(f"trace new {w_new:.1f} s wall, {c_new:.1f} s CPU")
    (ref, _), w_old, c_old = timed(old)
    log(f"trace old {w_old:.1f} s wall, {c_old:.1f} s CPU")
    return {"what": f"mlp trace, window 10, {args.samples} samples, one token ({pos}) of {ids.numel()}",
            "old_wall_s": w_old, "new_wall_s": w_new, "old_cpu_s": c_old, "new_cpu_s": c_new,
            "ratio_wall": w_old / w_new, "ratio_cpu": c_old / c_new,
            "max_abs_diff": float((s.values - ref).abs().max())}


def acdc_side(m, args) -> dict:
    suite = load_task("ioi")
    step = max(1, len(suite) // args.n)
    b = mechanic.tasks.Task("ioi", suite.examples[::step][:args.n], suite.metric).tokenize(m)
    start = top_edges(eap(m, b, ig_steps=5), args.start)
    log(f"acdc start circuit {len(start)} edges, {b.n} examples")
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
            "ratio_wall": w_old / w_new, "ratio_cpu": c_old / c_new}


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
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
