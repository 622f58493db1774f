"""Vocabulary projection and comparative methods on SmolLM2: cost (forward passes, seconds) and what they find.

Headline: neuron attribution of every FFN neuron (30 x 1536) for one prompt from one forward plus batched
projections, against the naive loop that projects one neuron at a time. The loop does no loop-invariant work:
the forward, the readout and, per layer, the residual before the write, the down-projection and log p(answer)
before the write are computed once outside it (timed separately, not extrapolated); only the per-neuron part
is timed on a random subset of neurons and extrapolated to all of them.

Every method is timed with benchmarks/peers/_common.time_against_plain: the same repeats after the same warm-up,
each run preceded by a plain HF forward of the prompt, so each cost is also reported in plain forwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "peers"))

import torch  # noqa: E402
from _common import setup_torch, time_against_plain  # noqa: E402

import mechanic  # noqa: E402
from mechanic.locate.compare import comparative_neurons, head_scan, in_context_heads  # noqa: E402
from mechanic.locate.neurons import neuron_attribution, promoted_tokens  # noqa: E402
from mechanic.locate.project import direct_logit_attribution, logit_flow, logit_lens  # noqa: E402
from mechanic.locate.query import query_neurons  # noqa: E402
from mechanic.locate.readout import Readout, collect  # noqa: E402
from mechanic.tasks.builtin import load_task  # noqa: E402


def naive_setup(m, task):
    """Everything the one-neuron-at-a-time loop needs that does not depend on the neuron: one forward, the readout,
    and per layer the residual the FFN writes into, the down-projection and log p(answer) before the write."""
    b = task.tokenize(m)
    col = collect(m, b.clean)
    R = Readout(m, col.final)
    w = b.answer
    layers = {}
    for L in range(m.dims.n_layers):
        h = col.mlp_in(L)
        layers[L] = (h, m.arch.down_weight(m.layer_module(L, m.arch.down_proj)).float(), R.logprob(h, w))
    return col, R, w, layers


def naive_loop(setup, sites):
    """log p(w | h + a_j W[:, j]) - log p(w | h), one neuron at a time: a full unembedding + log-softmax per neuron."""
    col, R, w, layers = setup
    out = []
    for s in sites:
        L, j = int(s.split(".")[0][1:]), int(s.split("neuron")[1])
        h, W, base = layers[L]
        out.append(float(R.logprob(h + col.neurons[L][:, j, None] * W[:, j], w) - base))
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
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    setup_torch()
    m = mechanic.load(args.model)
    facts = load_task("facts")
    one = facts.subset(1)
    b = one.tokenize(m)
    lo, hi = (int(x) for x in args.icl_layers.split("-"))
    res: dict = {"model": m.name, "neurons": m.dims.n_layers * m.dims.d_mlp, "vocab": m.dims.vocab,
                 "repeats": args.repeats, "warmup": args.warmup}

    # the subset of neurons the naive loop runs on, and its inputs (computed once; their cost is timed separately)
    all_sites = neuron_attribution(m, one, "neuron")["neuron"].sites
    rng = torch.Generator().manual_seed(0)
    subset = [all_sites[i] for i in torch.randperm(len(all_sites), generator=rng)[:args.naive].tolist()]
    setup = naive_setup(m, one)

    fns = {
        "forward": lambda: m.run(b.clean),
        "neuron_attribution": lambda: neuron_attribution(m, one, "neuron"),
        "naive_setup": lambda: naive_setup(m, one),
        "naive_loop": lambda: naive_loop(setup, subset),
        "attn_neuron": lambda: neuron_attribution(m, one, "attn_neuron"),
        "layers_and_heads": lambda: neuron_attribution(m, one, ["attn", "mlp", "head"]),
        "dla": lambda: direct_logit_attribution(m, facts.subset(8)),
        "logit_lens": lambda: logit_lens(m, one, k=5),
        "logit_flow": lambda: logit_flow(m, facts.subset(8)),
        "query_neurons": lambda: query_neurons(m, one, top=10),
        "head_scan": lambda: head_scan(m, facts.subset(4)),
        "in_context_heads": lambda: in_context_heads(m, n=args.icl, layers=range(lo, hi + 1)),
    }
    # comparative neuron analysis ablates the head the head scan finds, so it is timed after it
    heads = [x for x, _, _ in head_scan(m, facts.subset(4)).top(1, by="min")]
    fns["cna"] = lambda: comparative_neurons(m, one, heads)
    times, outs = time_against_plain(lambda: m.hf(input_ids=b.clean["input_ids"],
                                                  attention_mask=b.clean["attention_mask"]),
                                     fns, args.repeats, args.warmup)
    res["plain_s"] = times.pop("plain")
    res["times"] = times
    med = {k: statistics.median(v) for k, v in times.items()}

    scores = outs["neuron_attribution"]["neuron"]
    res["neuron_attribution"] = {"forward_passes": 1, "prompt": one.examples[0].prompt}
    naive = outs["naive_loop"]
    batched = [float(scores.values[scores.sites.index(s)]) for s in subset]
    per = med["naive_loop"] / len(subset)
    res["naive_loop"] = {"neurons_run": len(subset), "s_per_neuron": per,
                         "extrapolated_s": med["naive_setup"] + per * len(scores.sites),
                         "max_abs_diff_vs_batched": max(abs(a - c) for a, c in zip(naive, batched)),
                         "loop_invariant_outside": "forward, readout, per-layer residual, down-projection and "
                                                   "log p(answer) before the write"}
    res["speedup_vs_naive"] = res["naive_loop"]["extrapolated_s"] / med["neuron_attribution"]
    res["per_neuron_forward_extrapolated_s"] = statistics.median(res["plain_s"]) * len(scores.sites)

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

    dla = outs["dla"]
    s = dla["component"].settings
    res["dla"] = {"examples": 8, "forward_passes": 1, "total": s["total"],
                  "sum_error": abs(float(dla["component"].values.sum()) + sum(s["attn_bias"]) + s["constant"] - s["total"]),
                  "top": dla["component"].top(5)}
    lens = outs["logit_lens"]
    first = next((r for r in range(len(lens.rank.sites)) if lens.rank.values[r, -1] == 0), None)
    res["logit_lens"] = {"forward_passes": 1,
                         "first_state_with_answer_top1": lens.prob.sites[first] if first is not None else None,
                         "final_prob": float(lens.prob.values[-1, -1])}
    res["logit_flow"] = {"forward_passes": 2, "examples": 8, "top": outs["logit_flow"].top(5)}
    q = outs["query_neurons"]
    res["query_neurons"] = {"forward_passes": 2, "top": q.top(5),
                            "value_neurons": [(v["site"], v["dim"], round(v["importance"], 4))
                                              for v in q.settings["value_neurons"][:5]]}
    scan = outs["head_scan"]
    res["head_scan"] = {"heads": len(scan.sites), "examples": 4,
                        "forward_passes": scan.settings["forward_passes"], "top": scan.top(5, by="min")}
    cna = outs["cna"]
    res["cna"] = {"heads": heads, "forward_passes": 2, "p_target": cna["neuron"].settings["p_target"],
                  "p_target_ablated": cna["neuron"].settings["p_target_ablated"], "top": cna["neuron"].top(5)}
    s = outs["in_context_heads"]["ablation"].settings
    res["in_context_heads"] = {"examples": args.icl, "layers": [lo, hi], "accuracy_clean": s["accuracy_clean"],
                               "union": s["union"], "accuracy_union_ablated": s["accuracy_union_ablated"]}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
