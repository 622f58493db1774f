"""Parallel efficiency of data-parallel dictionary training: 2 processes x 1 thread vs 1 process x 1 thread on SmolLM2.

    python benchmarks/distributed_training.py                  # TopK SAE on L6.resid_post, 65,536 tokens
    python benchmarks/distributed_training.py --tokens 8192 --save

Each setting runs in fresh processes (1: a plain process; 2: torchrun --standalone, gloo), OMP_NUM_THREADS=1, and
times only the train call (model loaded, ranks lined up by a barrier first): reading the default corpus, the
forwards that fill the activation buffer (split over ranks) and the SAE steps (rows split, gradients summed by
DistributedDataParallel). Efficiency = T1 / (2 x T2) in wall time. CPU efficiency = the one process's CPU seconds /
the two ranks' CPU seconds summed (every thread, gloo's too): the work the split adds (duplicated Adam steps and
corpus reading, communication), which other load on the machine does not change, unlike waiting. The script also
compares the two saved dictionaries (max abs difference per tensor, and relative to the tensor's largest entry) and
their final training FVU. --save writes benchmarks/results/distributed_training.json. Run it on a quiet machine:
other load makes the ranks wait for each other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = ("site", "d_sae", "k", "tokens", "batch_size", "buffer_tokens", "seq_len", "forward_batch")


def worker(args) -> None:
    """One process of a setting: load, line up, train, and (rank 0) write seconds and the training summary."""
    import torch

    import mechanic
    from mechanic import distributed as D
    from mechanic.features.train import DictConfig, train

    torch.set_num_threads(1)
    D.init("gloo")
    m = mechanic.load("smollm2")
    cfg = DictConfig(args.site, "topk", d_sae=args.d_sae, k=args.k)
    D.barrier()
    t, cpu = time.perf_counter(), time.process_time()
    train(m, cfg, args.dir, tokens=args.tokens, batch_size=args.batch_size, buffer_tokens=args.buffer_tokens,
          seq_len=args.seq_len, forward_batch=args.forward_batch, progress=False)
    D.barrier()
    seconds, cpu = time.perf_counter() - t, D.gather(time.process_time() - cpu)   # CPU: every thread of each rank
    if D.is_main():
        summary = json.loads((Path(args.dir) / "train.json").read_text())
        Path(args.out).write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "ranks": D.world(),
                                              "label": cfg.label,
                                              "tokens_seen": summary["tokens_seen"],
                                              "final": summary["final"][cfg.label]}))


def setting(procs: int, args, work: Path) -> dict:
    """Run one setting in fresh processes; its rank 0 record."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out, d = work / f"{procs}.json", work / f"dict{procs}"
    me = [str(Path(__file__).resolve()), "--worker", "--out", str(out), "--dir", str(d),
          *[x for s in SETTINGS for x in (f"--{s.replace('_', '-')}", str(getattr(args, s)))]]
    cmd = ([sys.executable, *me] if procs == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *me])
    subprocess.run(cmd, env=env, check=True)
    return {**json.loads(out.read_text()), "dir": d}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", default="L6.resid_post")
    ap.add_argument("--d-sae", type=int, default=9216)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=65_536, help="training tokens (the fixed budget)")
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--buffer-tokens", type=int, default=16_384)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--forward-batch", type=int, default=16)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/distributed_training.json")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    from mechanic.features import load

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        one = setting(1, args, Path(tmp))
        two = setting(2, args, Path(tmp))
        a, b = (load(r["dir"] / r["label"]).state_dict() for r in (one, two))
    diff = {k: (a[k] - b[k]).abs().max().item() for k in a}
    rel = {k: diff[k] / max(1e-12, a[k].abs().max().item()) for k in a}
    eff = one["seconds"] / (2 * two["seconds"])
    cpu1, cpu2 = sum(one["cpu_seconds"]), sum(two["cpu_seconds"])
    res = {"what": f"TopK SAE (d_sae {args.d_sae}, k {args.k}) on SmolLM2-135M {args.site}, {args.tokens} tokens of "
                   "the default corpus, fp32, CPU",
           **{s: getattr(args, s) for s in SETTINGS},
           "seconds_1proc_1thread": round(one["seconds"], 2), "seconds_2proc_1thread": round(two["seconds"], 2),
           "speedup": round(one["seconds"] / two["seconds"], 3), "parallel_efficiency": round(eff, 3),
           "cpu_seconds_1proc": round(cpu1, 2), "cpu_seconds_2proc_by_rank": [round(c, 2) for c in two["cpu_seconds"]],
           "cpu_efficiency": round(cpu1 / cpu2, 3),
           "max_abs_diff": max(diff.values()), "max_abs_diff_by_tensor": diff,
           "max_rel_diff_by_tensor": rel, "final_1proc": one["final"], "final_2proc": two["final"],
           "load_average_before": load_before[0], "load_average_after": os.getloadavg()[0], "cpus": os.cpu_count()}
    print(json.dumps(res, indent=1))
    if args.save:
        (HERE / "results" / "distributed_training.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
