"""Magnitude methods on SmolLM2: cost (forward passes, seconds) and what they find on the shipped text.

Massive activations, the iterative super-weight search with its perplexity verification, attention
sinks, and perplexity itself; one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import mechanic
from mechanic.data.text import calibration, heldout
from mechanic.model.perplexity import perplexity
from mechanic.locate.magnitude import attention_sinks, massive_activations, super_weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))  # benchmarks/run.py --threads
    m = mechanic.load(args.model)
    res: dict = {"model": m.name}
    t = time.perf_counter()
    ppl = perplexity(m, heldout(), max_tokens=4096)
    res["perplexity"] = {"s": time.perf_counter() - t, "tokens": ppl.tokens, "ppl": ppl.ppl}
    t = time.perf_counter()
    ma = massive_activations(m, calibration(), max_tokens=4096)
    res["massive"] = {"s": time.perf_counter() - t, "tokens": 4096, "forward_passes": "one per 8 windows of 128",
                      "flagged": [{k: r[k] for k in ("layer", "dim", "value", "median", "token")} for r in ma.massive][:8]}
    t = time.perf_counter()
    sw = super_weights(m, calibration(), heldout())
    res["super_weights"] = {"s": time.perf_counter() - t, "baseline_ppl": sw.baseline_ppl, "settings": sw.settings,
                            "candidates": [{"layer": c.layer, "row": c.row, "col": c.col, "weight": c.weight,
                                            "ppl": c.ppl, "ppl_random": c.ppl_random, "verified": c.verified}
                                           for c in sw.candidates]}
    t = time.perf_counter()
    sinks = attention_sinks(m, heldout())
    top = sinks.top(5, by="max")
    res["sinks"] = {"s": time.perf_counter() - t, "tokens": 1024,
                    "heads_over_half": int((sinks.values[:, 0] > 0.5).sum()), "heads": len(sinks.sites),
                    "top": top}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
