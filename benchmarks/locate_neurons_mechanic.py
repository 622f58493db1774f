"""Vocabulary projection and comparative methods on SmolLM2: cost (forward passes, seconds) and what they find.

Headline: neuron attribution of every FFN neuron (30 x 1536) for one prompt from one forward plus batched
projections, against the naive loop that projects one neuron at a time (run on a subset, extrapolated).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import mechanic
from mechanic.locate.compare import comparative_neurons, head_scan, in_context_heads
from mechanic.locate.neurons import neuron_attribution, promoted_tokens
from mechanic.locate.project import direct_logit_attribution, logit_flow, logit_lens
from mechanic.locate.query import query_neurons
from mechanic.locate.readout import Readout, collect
from mechanic.tasks.builtin import load_task


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def naive_loop(m, task, sites):
    """log p(w | h + v) - log p(w | h), one neuron at a time: a full unembedding + log-softmax per neuron."""
    b = task.tokenize(m)
    col = collect(m, b.clean)
    R = Readout(m, col.final)
    w = b.answer
    out = []
    with torch.no_grad():
        for s in sites:
            L, j = int(s.split(".")[0][1:]), int(s.split("neuron")[1])
            W = m.layer_module(L, m.arch.down_proj).weight[:, j].float()
            h = col.mlp_in(L)
            out.append(float(R.logprob(h + col.neurons[L][:, j, None] * W, w) - R.logprob(h, w)))
    return out


def signs_of(m, task, sites):
    b = task.tokenize(m)
    run = m.run(b.clean, cache=sorted({s.split(".")[0] + ".neuron" for s in sites}), pos=-1)
    return [float(run[s.split(".")[0] + ".neuron"][0, int(s.split("neuron")[1])]) for s in sites]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--naive", type=int, default=300, help="neurons in the naive one-at-a-time loop (extrapolated)")
    p.add_argument("--facts", type=int, default=3, help="facts whose top neurons are reported")
    p.add_argument("--icl", type=int, default=8, help="in-context examples for the head scan")
    p.add_argument("--icl-layers", default="24-29", help="layers whose heads the in-context scan covers")
    args = p.parse_args()
    torch.set_num_threads(2)
    m = mechanic.load(args.model)
    facts = load_task("facts")
    one = facts.subset(1)
    res: dict = {"model": m.name, "neurons": m.dims.n_layers * m.dims.d_mlp, "vocab": m.dims.vocab}

    b = one.tokenize(m)
    m.run(b.clean)
    _, res["forward_s"] = timed(m.run, b.clean)

    na, t = timed(neuron_attribution, m, one, "neuron")
    scores = na["neuron"]
    res["neuron_attribution"] = {"s": t, "forward_passes": 1, "prompt": one.examples[0].prompt}
    rng = torch.Generator().manual_seed(0)
    subset = [scores.sites[i] for i in torch.randperm(len(scores.sites), generator=rng)[:args.naive].tolist()]
    naive, t_naive = timed(naive_loop, m, one, subset)
    batched = [float(scores.values[scores.sites.index(s)]) for s in subset]
    per = t_naive / len(subset)
    res["naive_loop"] = {"neurons_run": len(subset), "s": t_naive, "s_per_neuron": per,
                         "extrapolated_s": per * len(scores.sites),
                         "max_abs_diff_vs_batched": max(abs(a - c) for a, c in zip(naive, batched))}
    res["speedup_vs_naive"] = per * len(scores.sites) / res["neuron_attribution"]["s"]
    res["per_neuron_forward_extrapolated_s"] = res["forward_s"] * len(scores.sites)

    _, t = timed(neuron_attribution, m, one, "attn_neuron")
    res["attn_neuron_s"] = t
    _, t = timed(neuron_attribution, m, one, ["attn", "mlp", "head"])
    res["layers_and_heads_s"] = t

    top_facts = []
    for i in range(args.facts):
        task = facts.subset(1, start=i * 7)
        sc = neuron_attribution(m, task, "neuron")["neuron"]
        best = sc.top(5, by="max")
        sites = [s for s, _, _ in best]
        toks = promoted_tokens(m, sites, signs_of(m, task, sites), k=3)
        top_facts.append({"prompt": task.examples[0].prompt, "answer": task.examples[0].answer,
                          "top": [{"site": s, "imp": round(v, 4), "promotes": tk} for (s, _, v), tk in zip(best, toks)]})
    res["top_neurons"] = top_facts

    dla, t = timed(direct_logit_attribution, m, facts.subset(8))
    s = dla["component"].settings
    res["dla"] = {"s": t, "examples": 8, "forward_passes": 1, "total": s["total"],
                  "sum_error": abs(float(dla["component"].values.sum()) + sum(s["attn_bias"]) + s["constant"] - s["total"]),
                  "top": dla["component"].top(5)}
    lens, t = timed(logit_lens, m, one, k=5)
    first = next((r for r in range(len(lens.rank.sites)) if lens.rank.values[r, -1] == 0), None)
    res["logit_lens"] = {"s": t, "forward_passes": 1,
                         "first_state_with_answer_top1": lens.prob.sites[first] if first is not None else None,
                         "final_prob": float(lens.prob.values[-1, -1])}
    flow, t = timed(logit_flow, m, facts.subset(8))
    res["logit_flow"] = {"s": t, "forward_passes": 2, "top": flow.top(5)}
    q, t = timed(query_neurons, m, one, top=10)
    res["query_neurons"] = {"s": t, "forward_passes": 2, "top": q.top(5),
                            "value_neurons": [(v["site"], v["dim"], round(v["importance"], 4))
                                              for v in q.settings["value_neurons"][:5]]}

    scan, t = timed(head_scan, m, facts.subset(4))
    res["head_scan"] = {"s": t, "heads": len(scan.sites), "examples": 4,
                        "forward_passes": scan.settings["forward_passes"], "top": scan.top(5, by="min")}
    heads = [x for x, _, _ in scan.top(1, by="min")]
    cna, t = timed(comparative_neurons, m, one, heads)
    res["cna"] = {"s": t, "heads": heads, "forward_passes": 2, "p_target": cna["neuron"].settings["p_target"],
                  "p_target_ablated": cna["neuron"].settings["p_target_ablated"], "top": cna["neuron"].top(5)}
    lo, hi = (int(x) for x in args.icl_layers.split("-"))
    icl, t = timed(in_context_heads, m, n=args.icl, layers=range(lo, hi + 1))
    s = icl["ablation"].settings
    res["in_context_heads"] = {"s": t, "examples": args.icl, "layers": [lo, hi], "accuracy_clean": s["accuracy_clean"],
                               "union": s["union"], "accuracy_union_ablated": s["accuracy_union_ablated"]}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
