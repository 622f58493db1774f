"""Memory planner: mechanic.memory's predicted peak against the measured peak of each planned operation (issue 15).

    nice -n 19 .venv/bin/python benchmarks/run.py --only memory_planner     # -> results/memory_planner.json + page
    .venv/bin/python benchmarks/memory_planner.py --model smollm2 --out /tmp/m.json   # by hand

On SmolLM2-135M-Instruct (fp32, CPU), in one process (train_run_2ranks: two gloo ranks, one row per rank), after
one warm-up forward (the weights are memory-mapped
from safetensors, so the first forward pages them in): each operation's peak resident growth is measured with
mechanic.testing.peak.peak (VmHWM reset through /proc/self/clear_refs, after gc and malloc_trim) and set against
the estimate of mechanic.memory for the same request and batch. The goal: within 25% on every operation.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

OPS = ("cache_resid", "cache_heads_last", "patch_resid", "atp_heads", "eap", "eap_ig", "train_topk", "train_run",
       "train_run_2ranks")


def prompts(n: int, words: int, seed: int = 0) -> list[str]:
    """n prose prompts of about `words` words (same length in tokens for the same n of words is not needed: padded)."""
    import random

    vocab = ("the cat sat on a mat while people in the old town walked to market and talked about rain wind "
             "boats fish bread music school river light stone garden").split()
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(vocab) for _ in range(words)) for _ in range(n)]


def task(model, n: int, words: int):
    """n prompt pairs that differ in their first word and all have one token length (no padding), so patching at
    the first differing column runs every example over the whole prompt (the widest patched forward)."""
    from collections import Counter

    from mechanic.tasks.task import Example, Task

    tok, cands = model.tokenizer, prompts(8 * n, words, seed=1)
    size = {c: len(tok("John " + c)["input_ids"]) for c in cands}
    same = [c for c in cands if size[c] == len(tok("dog " + c)["input_ids"])]
    common = Counter(size[c] for c in same).most_common(1)[0][0]
    chosen = [c for c in same if size[c] == common][:n]
    return Task("memory", [Example("John " + c, " Mary", " John", "dog " + c) for c in chosen]).tokenize(model)


def first_diff(batch) -> int:
    """The first column where the clean and corrupted prompts differ."""
    return int((batch.clean["input_ids"] != batch.corrupted["input_ids"]).any(0).nonzero()[0])


def _rank_train(rank: int, model_name: str, size: dict, store: str, out: str) -> None:
    """One of the 2 gloo ranks of train_run_2ranks: its plan (memory.training_run for this rank) and its measured peak
    of the same dictionary training as train_run; rank 0 writes both ranks' rows to `out`."""
    import tempfile

    import torch.distributed as dist

    import mechanic
    from mechanic import distributed as D
    from mechanic import memory
    from mechanic.features.train import DictConfig, train
    from mechanic.testing.peak import peak

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        peak(lambda: None)     # every large tensor its own mapping from the start (tests/test_memory.py says why)
        model = mechanic.load(model_name)
        model.run(prompts(2, 20))
        d, b, n, seq, fb = model.dims.d_model, size["batch"], size["buffer"], size["seq_len"], size["forward_batch"]
        cfg = DictConfig("L6.resid_post", "topk", expansion=16, k=32)
        est = memory.training_run(model, [(d, 16 * d, d, "topk", False)], [d], b, n, seq)   # this rank's plan
        tmp = D.decide(tempfile.mkdtemp())
        train(model, cfg, f"{tmp}/warm", tokens=1024, batch_size=512, buffer_tokens=1024, seq_len=seq,
              forward_batch=2, progress=False)
        _, got = peak(lambda: train(model, cfg, f"{tmp}/run", tokens=size["tokens"], batch_size=b, buffer_tokens=n,
                                    seq_len=seq, forward_batch=fb, progress=False))
        rows = D.gather({"op": "train_run_2ranks", "what": f"{est.what}, rank {rank}",
                         "request": {"tokens": size["tokens"], "d_sae": 16 * d, "buffer_tokens": n, "seq_len": seq,
                                     "forward_batch": fb, "batch": b, "rank": rank},
                         "predicted_mib": round(est.at(fb) / 2 ** 20, 1), "measured_mib": round(got / 2 ** 20, 1),
                         "ratio": round(est.at(fb) / got, 3)})
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure_ranks(model_name: str, size: dict) -> list[dict]:
    """train_run_2ranks: the rows of both ranks (each a fresh process)."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_train, args=(model_name, size, f"{tmp}/store", f"{tmp}/rows.json"), nprocs=2, join=True)
        return json.loads(Path(f"{tmp}/rows.json").read_text())


def measure(model, op: str, size: dict) -> dict:
    """(predicted, measured) peak bytes of one operation."""
    from mechanic import memory
    from mechanic.testing.peak import peak

    if op in ("cache_resid", "cache_heads_last"):
        from mechanic.model.parallel import collect

        texts = prompts(size["rows"], size["words"])
        seq = model.inputs(texts)["input_ids"].shape[1]
        if op == "cache_resid":
            sites, pos = [f"L{i}.resid_post" for i in range(model.dims.n_layers)], None
        else:
            sites, pos = [f"L{i}.head" for i in range(model.dims.n_layers)], -1
        est = memory.cache(model, sites, len(texts), seq, pos)
        b = size["batch"]
        out, got = peak(lambda: collect(model, texts, sites, batch_size=b, pos=pos, budget="100GiB"))
        del out
        request = {"sites": len(sites), "rows": len(texts), "positions": seq if pos is None else 1, "batch": b}
    elif op == "patch_resid":
        from mechanic.locate.causal import patch

        batch = task(model, size["examples"], size["words"])
        sites = [f"L{i}.resid_pre" for i in range(model.dims.n_layers)]
        est = memory.patching(model, batch.n, batch.seq, sites)
        b = size["batch"]
        _, got = peak(lambda: patch(model, batch, "resid_pre", positions=[first_diff(batch)], batch_size=b,
                                     progress=False))
        request = {"examples": batch.n, "positions": batch.seq, "patched_rows": model.dims.n_layers * batch.n,
                   "batch": b}
    elif op == "atp_heads":
        from mechanic.locate.gradient import atp

        batch = task(model, size["examples"], size["words"])
        sites = [f"L{i}.head.z" for i in range(model.dims.n_layers)]     # what atp caches for heads
        est = memory.gradient(model, sites, batch.n, batch.seq)
        b = size["batch"]
        _, got = peak(lambda: atp(model, batch, "head", batch_size=b))
        request = {"examples": batch.n, "positions": batch.seq, "batch": b}
    elif op in ("eap", "eap_ig"):
        from mechanic.locate.gradient import eap
        from mechanic.tasks.builtin import load_task
        from mechanic.tasks.task import Task

        suite = load_task("ioi")
        batch = Task("ioi", suite.examples[:size["examples"]], suite.metric).tokenize(model)
        steps, b = size.get("ig_steps"), size["batch"]
        padded = bool((batch.clean["attention_mask"] == 0).any())
        est = memory.edges(model, batch.n, batch.seq, steps, padded=padded)
        _, got = peak(lambda: eap(model, batch, batch_size=b, ig_steps=steps))
        request = {"examples": batch.n, "positions": batch.seq, "ig_steps": steps or 0, "batch": b}
    elif op == "train_topk":
        from mechanic.features.trainer import DictConfig, Trainer

        d_in, d_sae, b = model.dims.d_model, size["d_sae"], size["batch"]
        x = torch.randn(b, d_in)
        est = memory.training(d_in, d_sae, b, architecture="topk")

        def step():
            tr = Trainer(DictConfig(site="L6.resid_post", d_sae=d_sae, k=32), d_in, d_in, 10 * b, b, 0)
            tr.init_from(x, x)
            tr.step(x, x)
            return tr
        _, got = peak(step)
        request = {"d_in": d_in, "d_sae": d_sae, "batch": b, "k": 32}
    elif op == "train_run":
        import tempfile

        from mechanic.features.train import DictConfig, train

        d, b, n, seq, fb = model.dims.d_model, size["batch"], size["buffer"], size["seq_len"], size["forward_batch"]
        cfg = DictConfig("L6.resid_post", "topk", expansion=16, k=32)
        est = memory.training_run(model, [(d, 16 * d, d, "topk", False)], [d], b, n, seq)
        with tempfile.TemporaryDirectory() as tmp:     # the default corpus (GCIDE), as `mechanic sae train` reads it
            train(model, cfg, f"{tmp}/warm", tokens=1024, batch_size=512, buffer_tokens=1024, seq_len=seq,
                  forward_batch=2, progress=False)     # untimed warm-up: kernels, thread state, the corpus reader
            _, got = peak(lambda: train(model, cfg, f"{tmp}/run", tokens=size["tokens"], batch_size=b,
                                        buffer_tokens=n, seq_len=seq, forward_batch=fb, progress=False))
        request = {"tokens": size["tokens"], "d_sae": 16 * d, "buffer_tokens": n, "seq_len": seq,
                   "forward_batch": fb, "batch": b}
    else:
        raise ValueError(f"unknown operation {op!r}; choose from {', '.join(OPS)}")
    pred = est.at(request["forward_batch"] if op == "train_run" else request["batch"])
    return {"op": op, "what": est.what, "request": request, "predicted_mib": round(pred / 2 ** 20, 1),
            "measured_mib": round(got / 2 ** 20, 1), "ratio": round(pred / got, 3)}


SIZES = {"cache_resid": {"rows": 64, "words": 60, "batch": 16},
         "cache_heads_last": {"rows": 256, "words": 60, "batch": 32},
         "patch_resid": {"examples": 8, "words": 40, "batch": 60},
         "atp_heads": {"examples": 16, "words": 40, "batch": 8},
         "eap": {"examples": 8, "batch": 4},                      # IOI suite prompts (14 tokens, not padded)
         "eap_ig": {"examples": 4, "batch": 4, "ig_steps": 3},
         "train_topk": {"d_sae": 9216, "batch": 4096},
         "train_run": {"tokens": 8192, "batch": 4096, "buffer": 16384, "seq_len": 128, "forward_batch": 16},
         "train_run_2ranks": {"tokens": 8192, "batch": 4096, "buffer": 16384, "seq_len": 128, "forward_batch": 16}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get("BENCH_MODEL", "smollm2"))
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--out", default=None)
    args, _ = p.parse_known_args()
    import mechanic

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    model = mechanic.load(args.model)
    model.run(prompts(2, 20))            # page the memory-mapped weights in before measuring anything
    rows = []
    for op in args.ops.split(","):
        t0 = time.perf_counter()
        new = measure_ranks(args.model, SIZES[op]) if op == "train_run_2ranks" else [measure(model, op, SIZES[op])]
        for row in new:
            row["seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(row), file=sys.stderr, flush=True)
        rows += new
    result = {"what": "peak resident growth of each planned operation on SmolLM2-135M-Instruct (fp32, CPU) against "
                      "mechanic.memory's estimate for the same request and batch", "model": args.model,
              "torch": torch.__version__, "goal": "predicted / measured within 0.75 .. 1.25", "operations": rows,
              "within_25pct": all(0.75 <= r["ratio"] <= 1.25 for r in rows)}
    if args.out:
        from mechanic.files import write_text

        write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
