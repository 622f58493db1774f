"""How much of a ROME edit made at the prefix-averaged key k* reaches the bare prompt's own key on SmolLM2:
r = u . k_prompt / u . k* (u = C^-1 k* / ||C^-1 k*||) per validation fact of facts_large, beside the same ratio for
the prefixed rows. r < 1 means the bare prompt, which ES reads, gets only that share of the edit (docs/STEERING.md,
prompt_key). Writes benchmarks/results/edit_prompt_keys.json."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import mechanic
from mechanic.steer.edit import _batch, _fact_rows, context_prefixes
from mechanic.steer.stats import second_moments

sys.path.insert(0, str(Path(__file__).parent))
from editing_sequential import facts_of  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--facts", type=int, default=30)
    p.add_argument("--layer", type=int, default=5)
    p.add_argument("--stats-tokens", type=int, default=16384)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "edit_prompt_keys.json"))
    args = p.parse_args()
    m = mechanic.load(args.model)
    prefixes = context_prefixes(m, 10)
    C = second_moments(m, [args.layer], max_tokens=args.stats_tokens)[args.layer][0].double()
    rows = []
    for f in facts_of(m, "validation", args.facts):
        texts, ends = _fact_rows(m, f, prefixes)
        inputs, last, _ = _batch(m, texts[:len(prefixes)], ends[:len(prefixes)])
        K = m.run(inputs, cache=[f"L{args.layer}.neuron"])[f"L{args.layer}.neuron"][torch.arange(len(last)), last].double()
        k = K.mean(0)
        u = torch.linalg.solve(C, k)
        r = (K @ u) / (k @ u)
        rows.append({"fact": f"{f.subject} ->{f.target_new}", "r_prompt": round(float(r[0]), 4),
                     "r_prefixed_mean": round(float(r[1:].mean()), 4)})
    rp = [x["r_prompt"] for x in rows]
    out = {"model": args.model, "layer": args.layer, "stats_tokens": args.stats_tokens, "prefixes": len(prefixes),
           "r_prompt_min": min(rp), "r_prompt_max": max(rp), "r_prompt_median": sorted(rp)[len(rp) // 2],
           "r_prefixed_range": [min(x["r_prefixed_mean"] for x in rows), max(x["r_prefixed_mean"] for x in rows)],
           "facts": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print({k: v for k, v in out.items() if k != "facts"})


if __name__ == "__main__":
    main()
