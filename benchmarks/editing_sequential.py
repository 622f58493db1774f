"""Sequential editing on SmolLM2 as a curve: ROME, MEMIT and AlphaEdit, and the fine-tuning baselines FT-L and LoRA,
on the same test facts of the `facts_large` suite in batches; after every batch, over the facts edited so far,
CounterFact ES / PS / NS, EasyEdit locality against the unedited model's own tokens, fluency and held-out perplexity,
each with a 95% bootstrap CI (mechanic.improve.edit_metrics.curve_scores). Layers from causal tracing averaged over
train facts (FT-L and LoRA train ROME's layer); on validation facts, prompt_key (the bare prompt's key held besides
the averaged one) chosen for ROME, MEMIT and AlphaEdit, and AlphaEdit's threshold and alpha on one batch, then MEMIT's
and AlphaEdit's v* kl_factor (OPT's, or SEQUENCE_SETTINGS') over a sequence of validation facts in batches
(sequence_scores; one batch cannot show how the edits disturb neighbours). Writes the raw results as JSON
(benchmarks/plot_editing.py draws them)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import mechanic
from mechanic.improve.edit_metrics import counterfact, curve_scores
from mechanic.improve.evaluate import NEUTRAL_OPENINGS
from mechanic.locate.trace import subject_positions
from mechanic.steer.alphaedit import NullSpaces, alphaedit_update
from mechanic.steer.edit import (context_prefixes, facts_from_task, layer_range, memit_targets, memit_update, rome,
                                 spread, trace_layers)
from mechanic.steer.plan import Plan, PlanError
from mechanic.steer.sequential import sequential
from mechanic.steer.stats import second_moments
from mechanic.tasks.builtin import load_task

OPT = dict(steps=25, lr=0.5, kl_factor=0.0625, weight_decay=0.5, clamp=4.0)
TRAINED = ("ft", "lora")    # fine-tuning baselines: their own settings, no statistics


SUITE = "facts_large"
# MEMIT / AlphaEdit settings tried besides OPT's over a validation sequence: a KL weight 16x OPT's kept NS higher
# after every batch of 30 validation facts (both 1.00/0.97/0.92, against 0.93/0.93/0.88 and 0.93/0.95/0.90) where
# AlphaEdit's null spaces did not move it (benchmarks/results/editing_ns_validation.json)
SEQUENCE_SETTINGS = [{"kl_factor": 1.0}]


def facts_of(m, split: str, n: int):
    """The first n facts of a split whose subject is past the first token (SmolLM2's first token is a sink)."""
    pool = [f for f in facts_from_task(load_task(SUITE, split=split))
            if subject_positions(m, f.prompt, f.subject)[-1] > 0]
    return pool[:n]


def top1(m, prompts: list[str]) -> list[int]:
    return [int(m.run(p, last_only=True).logits[0, -1].argmax()) for p in prompts]


def _scored(m, edits, facts) -> dict:
    with m.applied(Plan(edits=edits)):
        return counterfact(m, facts)


def calibrate(m, facts, layers, moments, prefixes, thresholds, alphas, lam) -> list[dict]:
    """MEMIT's and AlphaEdit's settings scored on validation facts (one batch): prompt_key (the bare prompt's key
    held too) x, for AlphaEdit, (threshold, alpha). The targets are optimised once, with the bare prompt's
    columns, which are dropped when prompt_key is off; only the closed-form solve changes."""
    rows, Z, _ = memit_targets(m, facts, layers[-1], prefixes, prompt_key=True, **OPT)
    out = []
    for pk in (False, True):
        z = Z if pk else Z[:, ::2]
        s = _scored(m, spread(m, rows, z, layers, lambda L, K, R: memit_update(moments[L][0], K, R, lam),
                              "calibration")[0], facts)
        out.append({"method": "memit", "prompt_key": pk, "lam": lam, **s})
        print(f"calibrate memit prompt_key {pk}: ES {s['es']:.2f} PS {s['ps']:.2f} NS {s['ns']:.2f}", flush=True)
        for thr in thresholds:
            state = NullSpaces(thr)
            try:
                for L in layers:
                    state.projection(L, moments[L][0])
            except PlanError as e:  # no eigenvalue below this threshold at some layer
                out.append({"method": "alphaedit", "prompt_key": pk, "threshold": thr, "error": str(e)})
                continue
            for a in alphas:
                def solve(L, K, R):
                    return alphaedit_update(state.projection(L, moments[L][0]), K, R, None, a)
                s = _scored(m, spread(m, rows, z, layers, solve, "calibration")[0], facts)
                out.append({"method": "alphaedit", "prompt_key": pk, "threshold": thr, "alpha": a,
                            "null_dims": dict(state.dims), **s})
                print(f"calibrate alphaedit prompt_key {pk} threshold {thr:g} alpha {a:g}: ES {s['es']:.2f} "
                      f"PS {s['ps']:.2f} NS {s['ns']:.2f}", flush=True)
    return out


def sequence_scores(m, facts, method: str, batch: int, layers, stats_tokens: int, targets: dict | None = None,
                    state=None, **options) -> dict:
    """The sequential validation protocol: mechanic.steer.sequential edits `facts` in batches (each batch's targets
    optimised on the model with the earlier batches applied) with `options` (OPT's and the method's own), and
    CounterFact ES/PS/NS are taken over the facts edited so far after each batch (NS without the neighbourhood
    prompts naming a subject edited so far; ns_every: with them, the old count); the model is left unedited.
    `targets` keeps the first batch's targets for the next setting; `state` is AlphaEdit's NullSpaces."""
    def scores(model, step, done):
        s, every = counterfact(model, done), counterfact(model, done, edited=())
        print(f"  after {len(done)}: ES {s['es']:.2f} PS {s['ps']:.2f} NS {s['ns']:.2f} (every neighbour "
              f"{every['ns']:.2f})", flush=True)
        return {k: round(s[k], 4) for k in ("es", "ps", "ns", "score")} | {
            "ns_prompts": s["n"]["ns"], "ns_every": round(every["ns"], 4), "ns_every_prompts": every["n"]["ns"]}

    t0 = time.perf_counter()
    plan = sequential(m, facts, method, batch, layers, on_batch=scores, progress=False, stats_tokens=stats_tokens,
                      targets=targets, state=state, **options)
    curve = [{k: v for k, v in point.items() if k != "step"} for point in plan.settings["curve"]]
    return {**curve[-1], "curve": curve, "seconds": round(time.perf_counter() - t0, 1)}


def calibrate_sequence(m, facts, layers, stats_tokens: int, method: str, one: dict, batch: int,
                       lam: float) -> list[dict]:
    """MEMIT's or AlphaEdit's one-batch best (`one`: prompt_key, and threshold, alpha) and SEQUENCE_SETTINGS on top
    of it, scored by the sequential validation protocol (sequence_scores): one batch has no earlier edits whose
    neighbours the next batches can disturb, so it cannot tell these apart."""
    out = []
    for extra in ({}, *SEQUENCE_SETTINGS):
        st = {k: one[k] for k in ("prompt_key", "threshold", "alpha") if k in one} | extra
        print(f"calibrate {method} over a sequence of {len(facts)} validation facts: {st}", flush=True)
        if method == "alphaedit":
            state = NullSpaces(st["threshold"])
            r = sequence_scores(m, facts, method, batch, layers, stats_tokens, state=state, **(OPT | st))
            st["null_dims"] = dict(state.dims)
        else:
            r = sequence_scores(m, facts, method, batch, layers, stats_tokens, **(OPT | st), lam=lam)
            st["lam"] = lam
        out.append({"method": method, "sequence": len(facts), **st, **r})
    return out


def calibrate_rome(m, facts, layer, moments, prefixes) -> list[dict]:
    """ROME one fact at a time on validation facts, without and with the bare prompt's key."""
    out = []
    for pk in (False, True):
        edits = []
        for f in facts:    # each edit alone on the unedited model; scored together (they touch one layer each)
            p = rome(m, f, layer, prefixes=prefixes, moments=moments, prompt_key=pk, **OPT)
            with m.applied(p):
                edits.append(counterfact(m, [f]))
        s = {k: sum(e[k] or 0 for e in edits) / max(1, sum(e[k] is not None for e in edits)) for k in ("es", "ps", "ns")}
        s["score"] = 3 / sum(1 / max(v, 1e-9) for v in s.values())
        out.append({"method": "rome", "prompt_key": pk, **s})
        print(f"calibrate rome prompt_key {pk}: ES {s['es']:.2f} PS {s['ps']:.2f} NS {s['ns']:.2f}", flush=True)
    return out


def best(grid: list[dict], method: str) -> dict:
    """The validation-best setting of a method: highest CounterFact score (harmonic mean), then ES."""
    return max((r for r in grid if r["method"] == method and "error" not in r), key=lambda r: (r["score"], r["es"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--facts", type=int, default=150, help="test facts to edit (the split has 147)")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--methods", default="rome,memit,alphaedit,ft,lora")
    p.add_argument("--ft", default="5e-3,5e-3,25", help="FT-L's 'eps,lr,steps'")
    p.add_argument("--lora", default="8,5e-3,50", help="LoRA's 'rank,lr,steps' (alpha = 2 x rank)")
    p.add_argument("--trace-facts", type=int, default=8)
    p.add_argument("--calibration-facts", type=int, default=10)
    p.add_argument("--sequence-facts", type=int, default=30, help="validation facts edited in batches to choose "
                   "MEMIT's and AlphaEdit's kl_factor: OPT's or SEQUENCE_SETTINGS' (0: one batch only)")
    p.add_argument("--stats-tokens", type=int, default=16384)
    p.add_argument("--lam", type=float, default=1000.0)
    p.add_argument("--layer", type=int, help="skip the averaged trace: ROME's layer (MEMIT/AlphaEdit end there)")
    p.add_argument("--alphaedit", help="skip the calibration: 'threshold,alpha' for AlphaEdit")
    p.add_argument("--prompt-key", choices=["yes", "no"], help="skip the calibration: prompt_key for ROME, MEMIT and "
                   "AlphaEdit")
    p.add_argument("--kl-factor", type=float, help="with --alphaedit and --prompt-key: MEMIT's and AlphaEdit's v* "
                   "kl_factor as another run chose it on the validation sequence (default: OPT's)")
    p.add_argument("--windows", type=int, default=8, help="held-out windows of 128 tokens for perplexity")
    p.add_argument("--openings", type=int, default=8, help="neutral openings generated for fluency")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--cached-stats", action="store_true",
                   help="read the statistics from the disk cache (default: compute afresh to time the one-off cost)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "editing_sequential.json"))
    args = p.parse_args()
    methods = args.methods.split(",")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    t0 = time.perf_counter()
    m = mechanic.load(args.model)
    train, val, test = (facts_of(m, "train", args.trace_facts), facts_of(m, "validation", args.calibration_facts),
                        facts_of(m, "test", args.facts))
    t = time.perf_counter()
    result = {"model": args.model, "suite": SUITE, "facts": [f"{f.subject} ->{f.target_new}" for f in test],
              "batch": args.batch, "stats_tokens": args.stats_tokens,
              "scores": {"windows": args.windows, "seq_len": 128, "openings": args.openings, "new_tokens": 32,
                         "n_boot": args.n_boot, "level": 0.95, "seed": 0,
                         "neighbourhood": "edited subjects left out"}}   # mechanic.improve.edit_metrics.edited_apart
    if args.layer is None:
        top, mean = trace_layers(m, train, samples=5)
        result |= {"trace_facts": [f.subject for f in train], "trace_layer": top,
                   "trace_mean": [round(float(x), 5) for x in mean], "trace_seconds": round(time.perf_counter() - t, 1)}
    else:
        top = result["given_layer"] = args.layer
    range_ = layer_range(top)
    how = "given" if args.layer is not None else f"averaged trace over {len(train)} train facts"
    print(f"{how}: layer {top}; MEMIT/AlphaEdit layers {range_}", flush=True)
    t = time.perf_counter()
    if any(x not in TRAINED for x in methods):
        moments = second_moments(m, sorted(set(range_)), max_tokens=args.stats_tokens, progress=True,
                                 fresh=not args.cached_stats)   # written to the cache: sequential() reads them
        result["stats_seconds"] = round(time.perf_counter() - t, 1)
        result["stats_fresh"] = not args.cached_stats
        prefixes = context_prefixes(m, 10)
    chosen = {}
    if args.alphaedit is None or args.prompt_key is None:    # settings chosen on validation facts
        grid = calibrate(m, val, range_, moments, prefixes, [2e-2, 5e-3, 1e-3], [10.0, 1.0, 0.1], args.lam)
        if "rome" in methods:
            grid += calibrate_rome(m, val, top, {top: moments[top]}, prefixes)
        result["calibration"] = grid
        chosen = {meth: best(grid, meth) for meth in ("rome", "memit", "alphaedit") if meth in methods}
        seq_facts = facts_of(m, "validation", args.sequence_facts) if args.sequence_facts else []
        result["calibration_sequence"] = []
        for meth in ("memit", "alphaedit"):
            if meth in methods and seq_facts:
                seq = calibrate_sequence(m, seq_facts, range_, args.stats_tokens, meth, chosen[meth], args.batch,
                                         args.lam)
                result["calibration_sequence"] += seq
                chosen[meth] = best(seq, meth)
    if args.alphaedit is not None:
        thr, a = (float(x) for x in args.alphaedit.split(","))
        chosen["alphaedit"] = chosen.get("alphaedit", {}) | {"threshold": thr, "alpha": a}
    if args.prompt_key is not None:
        for meth in ("rome", "memit", "alphaedit"):
            chosen[meth] = chosen.get(meth, {}) | {"prompt_key": args.prompt_key == "yes"}
    if args.kl_factor is not None:
        for meth in ("memit", "alphaedit"):
            chosen[meth] = chosen.get(meth, {}) | {"kl_factor": args.kl_factor}
    keep = ("prompt_key", "threshold", "alpha", "kl_factor")
    result["chosen"] = {meth: {k: v for k, v in c.items() if k in keep} for meth, c in chosen.items()}
    print(f"chosen on validation facts: {result['chosen']}", flush=True)
    nb = [q for f in test for q in f.neighborhood]
    t = time.perf_counter()
    scores = curve_scores(m, test, fluency_prompts=list(NEUTRAL_OPENINGS[:args.openings]), windows=args.windows,
                          n_boot=args.n_boot)
    result["before"] = scores.before
    result["before_seconds"] = round(time.perf_counter() - t, 1)
    nb_before = top1(m, nb)
    result["methods"] = {}
    ft_eps, ft_lr, ft_steps = (float(x) for x in args.ft.split(","))
    rank, lora_lr, lora_steps = (float(x) for x in args.lora.split(","))
    own = {"ft": {"eps": ft_eps, "lr": ft_lr, "steps": int(ft_steps)},
           "lora": {"rank": int(rank), "lr": lora_lr, "steps": int(lora_steps)}}
    for method in methods:
        layers = [top] if method in ("rome", *TRAINED) else range_
        extra = ({"lam": args.lam} if method == "memit" else {}) | result["chosen"].get(method, {})
        t = time.perf_counter()
        if method in TRAINED:
            plan = sequential(m, test, method, args.batch, layers, on_batch=scores, **own[method])
        else:
            plan = sequential(m, test, method, args.batch, layers, on_batch=scores,
                              stats_tokens=args.stats_tokens, **(OPT | extra))
        secs = time.perf_counter() - t
        with m.applied(plan):
            nb_after = top1(m, nb)
        s = plan.settings
        done = 0.0
        for point, b in zip(s["curve"], s["batches"]):     # edit seconds of the batch and so far, beside the scores
            done += b["seconds"]
            point["edit_seconds"], point["edit_seconds_so_far"] = b["seconds"], round(done, 3)
        result["methods"][method] = {
            "layers": layers, "options": s["options"], "seconds": round(secs, 1),
            "seconds_per_edit": round(done / len(test), 2),
            "scoring_seconds": round(sum(p["scoring_seconds"] for p in s["curve"]), 1),
            "stats_seconds": s["stats_seconds"], "curve": s["curve"], "after": s["curve"][-1],
            "neighbourhood_top1_kept": sum(a == b for a, b in zip(nb_before, nb_after)) / len(nb),
            "null_dims": s.get("null_dims")}
        last = s["curve"][-1]
        print(f"{method}: ES {last['es']:.2f} PS {last['ps']:.2f} NS {last['ns']:.2f} locality {last['locality']:.2f} "
              f"ppl {last['ppl']:.1f} (before {scores.before['ppl']:.1f}) after {len(test)} edits ({secs:.0f} s, "
              f"{done / len(test):.1f} s per edit)", flush=True)
        result["seconds_total"] = round(time.perf_counter() - t0, 1)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
