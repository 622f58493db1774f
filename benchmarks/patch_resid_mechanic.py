"""mechanic side of the patching benchmark: resid_pre layers x positions for one IOI pair, against a naive
one-hook-per-run loop and simple batching (64 runs a forward) written with plain torch hooks."""

from __future__ import annotations

import argparse
import json
import time

import torch

import mechanic
from mechanic.locate.causal import patch
from mechanic.tasks import Example, Task


def plain_runs(model, pair, batch_rows: int) -> torch.Tensor:
    """Patch clean resid_pre(l, p) into the corrupted run with a plain forward pre-hook, batch_rows runs a forward."""
    hf, L = model.hf, model.dims.n_layers
    clean = torch.tensor([pair["clean_ids"]])
    corr = torch.tensor([pair["corrupted_ids"]])
    P = clean.shape[1]
    with torch.no_grad():
        hs = hf(clean, output_hidden_states=True).hidden_states  # hs[l] = resid_pre of layer l

        def ld(logits):
            return logits[:, -1, pair["answer_id"]] - logits[:, -1, pair["wrong_id"]]
        clean_ld, corr_ld = ld(hf(clean).logits), ld(hf(corr).logits)
        cells = [(l, p) for l in range(L) for p in range(P)]
        out = torch.zeros(L, P)
        for i in range(0, len(cells), batch_rows):
            chunk = cells[i:i + batch_rows]
            handles = []
            for layer in sorted({c[0] for c in chunk}):
                rows = [(r, p) for r, (l2, p) in enumerate(chunk) if l2 == layer]

                def hook(mod, args, rows=rows, layer=layer):
                    x = args[0].clone()
                    for r, p in rows:
                        x[r, p] = hs[layer][0, p]
                    return (x,) + args[1:]
                handles.append(model.layers[layer].register_forward_pre_hook(hook))
            try:
                logits = hf(corr.expand(len(chunk), P)).logits
            finally:
                for h in handles:
                    h.remove()
            for (layer, p), v in zip(chunk, ld(logits)):
                out[layer, p] = (v - corr_ld) / (clean_ld - corr_ld)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--pair", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--naive", action="store_true", help="Also time the one-run-per-patch loop (slow).")
    args = p.parse_args()
    torch.set_num_threads(2)
    pair = json.load(open(args.pair))
    model = mechanic.load(args.model)
    task = Task("ioi-pair", [Example(pair["clean"], pair["answer"], pair["wrong"], pair["corrupted"])])
    assert task.tokenize(model).clean["input_ids"][0].tolist() == pair["clean_ids"]
    patch(model, task, "resid_pre", progress=False)  # warm-up
    times, scores = [], None
    for _ in range(args.repeats):
        t = time.perf_counter()
        scores = patch(model, task, "resid_pre", positions="all", progress=False)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    every = patch(model, task, "resid_pre", positions="all", progress=False, skip_unchanged=False)
    every_s = time.perf_counter() - t
    t = time.perf_counter()
    batched = plain_runs(model, pair, 64)
    batched_s = time.perf_counter() - t
    result = {"peer": "mechanic", "version": mechanic.__version__, "tool_s": times, "values": scores.values.tolist(),
              "runs_computed": scores.settings["runs_computed"],
              "every_s": every_s, "every_values": every.values.tolist(), "batched64_s": batched_s, "batched64_values": batched.tolist()}
    if args.naive:
        t = time.perf_counter()
        naive = plain_runs(model, pair, 1)
        result["naive_s"] = time.perf_counter() - t
        result["naive_values"] = naive.tolist()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
