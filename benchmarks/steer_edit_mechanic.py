"""ROME and MEMIT on SmolLM2: seconds per edit (key statistics cached) and CounterFact ES / PS / NS on shipped facts."""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import mechanic
from mechanic.improve.edit_metrics import counterfact
from mechanic.locate.trace import subject_positions
from mechanic.steer.edit import facts_from_task, memit, rome
from mechanic.steer.stats import second_moments
from mechanic.tasks.builtin import load_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--facts", type=int, default=8)
    p.add_argument("--layer", type=int, default=5)
    p.add_argument("--stats-tokens", type=int, default=32768)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))  # benchmarks/run.py --threads
    m = mechanic.load(args.model)
    # subjects past the first token (SmolLM2's first token is an attention sink: see docs/STEERING.md)
    pool = [f for f in facts_from_task(load_task("facts")) if subject_positions(m, f.prompt, f.subject)[-1] > 0]
    facts = pool[:: max(1, len(pool) // args.facts)][: args.facts]
    t = time.perf_counter()
    second_moments(m, range(1, args.layer + 1), max_tokens=args.stats_tokens, cache=False)
    stats_s = time.perf_counter() - t
    second_moments(m, range(1, args.layer + 1), max_tokens=args.stats_tokens)  # into the cache
    before = counterfact(m, facts)
    per, secs = [], []
    for f in facts:
        t = time.perf_counter()
        plan = rome(m, f, args.layer, stats_tokens=args.stats_tokens)
        secs.append(time.perf_counter() - t)
        with m.applied(plan):
            per.append(counterfact(m, [f]))
    rome_after = {k: sum(r[k] for r in per) / len(per) for k in ("es", "ps", "ns")}
    t = time.perf_counter()
    plan = memit(m, facts, list(range(1, args.layer + 1)), stats_tokens=args.stats_tokens)
    memit_s = time.perf_counter() - t
    with m.applied(plan):
        memit_after = counterfact(m, facts)
    print(json.dumps({"facts": [f.subject + " ->" + f.target_new for f in facts], "layer": args.layer,
                      "stats_tokens": args.stats_tokens, "stats_s_one_layer_range": stats_s,
                      "before": before, "rome_s": secs, "rome_after": rome_after,
                      "memit_layers": list(range(1, args.layer + 1)), "memit_s": memit_s, "memit_after": memit_after}))


if __name__ == "__main__":
    main()
