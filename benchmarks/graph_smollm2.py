"""One attribution graph of a 16-token prompt on SmolLM2 with mechanic's trained transcoders: time, peak memory,
scores and agreement with interventions, for the feature cap on and off and position 0 zeroed or kept.

    python benchmarks/graph_smollm2.py --model DIR [--transcoders runs/tc_smollm2]

Each setting runs in a fresh process (peak RSS is per process); the last stdout line is the JSON result. The
transcoders are not in the repository (30 x 23 MB); make them with
`mechanic sae train --site L{l}.mlp_in --out-site L{l}.mlp_out --skip --expansion 8 --k 32 --tokens 200000
--out runs/tc_smollm2` for l = 0..29 (about 11 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PROMPT = "The capital of France is Paris, and the capital of Germany is the city of"
SETTINGS = {"capped": {"max_feature_nodes": 7500, "zero_first": True},
            "all_features": {"max_feature_nodes": None, "zero_first": True},
            "capped_first_kept": {"max_feature_nodes": 7500, "zero_first": False}}
TOP = 20


def one(model_dir: str, transcoders: str, name: str) -> dict:
    """Build, prune and validate one graph in this process."""
    import torch

    import mechanic
    from mechanic.locate.graph import attribute, load_transcoders, prune, validate

    model = mechanic.load(model_dir)
    tcs, where = load_transcoders(model, transcoders)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    wall, cpu = time.perf_counter(), time.process_time()
    g = attribute(model, tcs, PROMPT, **SETTINGS[name])
    graph_wall, graph_cpu = time.perf_counter() - wall, time.process_time() - cpu
    graph_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    t = time.perf_counter()
    kept = prune(g)
    prune_s = time.perf_counter() - t
    t = time.perf_counter()
    v = validate(model, tcs, g, top=TOP)
    return {"setting": name, **SETTINGS[name], "prompt": PROMPT, "tokens": len(g.tokens),
            "transcoder_layers": len(where), "active_features": g.meta["active_features"],
            "nodes": {k: g.count(k) for k in ("feature", "error", "token", "logit")},
            "logits": [[model.tokenizer.decode([int(i)]), float(p)] for i, p in zip(g.logit_tokens, g.logit_probs)],
            "scores": g.scores, "graph_wall_s": round(graph_wall, 2), "graph_cpu_s": round(graph_cpu, 2),
            "phases_wall_s": g.meta["seconds"], "phases_cpu_s": g.meta["cpu_seconds"],
            "rss_after_load_gb": round(base_rss, 3), "peak_rss_graph_gb": round(graph_rss, 3),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
            "pruned": {"nodes": int(kept.node_mask.sum()), "edges": int(kept.edge_mask.sum()),
                       "seconds": round(prune_s, 2)},
            "validation": {"top": TOP, "agreement": v.agreement, "seconds": round(time.perf_counter() - t, 2)},
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--transcoders", default=os.environ.get("MECHANIC_TRANSCODERS", "runs/tc_smollm2"))
    p.add_argument("--one", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.model, a.transcoders, a.one)))
        return
    rows = []
    for name in SETTINGS:
        out = subprocess.run([sys.executable, __file__, "--model", a.model, "--transcoders", a.transcoders,
                              "--one", name], stdout=subprocess.PIPE, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"model": a.model, "transcoders": a.transcoders, "rows": rows}))


if __name__ == "__main__":
    main()
