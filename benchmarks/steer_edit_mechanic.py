"""ROME and MEMIT on SmolLM2: seconds per edit (key statistics cached) and CounterFact ES / PS / NS on the shipped
suite's test facts, each as published (the key averaged over context prefixes) and with prompt_key (the edit also
held at the bare prompt's own key, which a model without BOS needs)."""

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
    p.add_argument("--facts", type=int, default=0, help="test facts to edit (0: all whose subject is past the first "
                   "token)")
    p.add_argument("--layer", type=int, default=5)
    p.add_argument("--stats-tokens", type=int, default=32768)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))  # benchmarks/run.py --threads
    m = mechanic.load(args.model)
    # subjects past the first token (SmolLM2's first token is an attention sink: see docs/STEERING.md)
    pool = [f for f in facts_from_task(load_task("facts", split="test"))
            if subject_positions(m, f.prompt, f.subject)[-1] > 0]
    facts = pool[:: max(1, len(pool) // args.facts)][: args.facts] if args.facts else pool
    t = time.perf_counter()
    second_moments(m, range(1, args.layer + 1), max_tokens=args.stats_tokens, cache=False)
    stats_s = time.perf_counter() - t
    second_moments(m, range(1, args.layer + 1), max_tokens=args.stats_tokens)  # into the cache
    before = counterfact(m, facts)
    out = {}
    for key, pk in (("", False), ("_pk", True)):
        per, secs = [], []
        for f in facts:
            t = time.perf_counter()
            plan = rome(m, f, args.layer, stats_tokens=args.stats_tokens, prompt_key=pk)
            secs.append(time.perf_counter() - t)
            with m.applied(plan):
                per.append(counterfact(m, [f]))
        out[f"rome{key}_s"] = secs
        out[f"rome{key}_after"] = {k: sum(r[k] or 0 for r in per) / max(1, sum(r[k] is not None for r in per))
                                   for k in ("es", "ps", "ns")}
        t = time.perf_counter()
        plan = memit(m, facts, list(range(1, args.layer + 1)), stats_tokens=args.stats_tokens, prompt_key=pk)
        out[f"memit{key}_s"] = time.perf_counter() - t
        with m.applied(plan):
            out[f"memit{key}_after"] = counterfact(m, facts)
    print(json.dumps({"facts": [f.subject + " ->" + f.target_new for f in facts], "layer": args.layer,
                      "stats_tokens": args.stats_tokens, "stats_s_one_layer_range": stats_s,
                      "split": "test", "before": before, "memit_layers": list(range(1, args.layer + 1)), **out}))


if __name__ == "__main__":
    main()
