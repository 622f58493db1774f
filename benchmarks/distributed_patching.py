"""Parallel efficiency of a data-parallel patching sweep: 2 processes x 1 thread vs 1 process x 1 thread on SmolLM2.

    python benchmarks/distributed_patching.py                 # 64 IOI examples, resid_pre at every position
    python benchmarks/distributed_patching.py --examples 16 --kind head --save

Each setting runs in fresh processes (1: a plain process; 2: torchrun --standalone, gloo), OMP_NUM_THREADS=1, and
times only the patch call (model loaded, ranks lined up by a barrier first). Efficiency = T1 / (2 x T2); the
script also reports the max abs difference between the two Scores (they should agree to ~1e-6). --save writes
benchmarks/results/distributed_patching.json. Run it on a quiet machine: other load makes the ranks wait.
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


def worker(args) -> None:
    """One process of a setting: load, line up, patch, and (rank 0) write seconds and values."""
    import torch

    import mechanic
    from mechanic import distributed as D
    from mechanic.locate.causal import patch
    from mechanic.locate.parallel import parallel
    from mechanic.tasks.builtin import load_task

    torch.set_num_threads(1)
    D.init("gloo")
    m = mechanic.load("smollm2")
    task = load_task("ioi").subset(args.n)
    positions = "all" if args.kind in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out") else None
    D.barrier()
    t = time.perf_counter()
    s = parallel(patch, m, task, kind=args.kind, positions=positions, progress=False)
    D.barrier()
    seconds = time.perf_counter() - t
    if D.is_main():
        Path(args.out).write_text(json.dumps({"seconds": seconds, "values": s.values.tolist(),
                                              "runs": s.settings["runs_computed"], "ranks": D.world()}))


def setting(procs: int, args, out: Path) -> dict:
    """Run one setting in fresh processes; its rank 0 record."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    me = [str(Path(__file__).resolve()), "--worker", "--examples", str(args.n), "--kind", args.kind, "--out", str(out)]
    cmd = ([sys.executable, *me] if procs == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *me])
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", dest="n", type=int, default=64, help="IOI examples")
    ap.add_argument("--kind", default="resid_pre", help="patching granularity")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/distributed_patching.json")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    import torch

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        one = setting(1, args, Path(tmp) / "one.json")
        two = setting(2, args, Path(tmp) / "two.json")
    diff = (torch.tensor(one["values"]) - torch.tensor(two["values"])).abs().max().item()
    eff = one["seconds"] / (2 * two["seconds"])
    res = {"what": f"patch {args.kind} over {args.n} IOI examples, SmolLM2-135M, fp32, CPU", "examples": args.n,
           "kind": args.kind, "patched_runs": one["runs"], "seconds_1proc_1thread": round(one["seconds"], 2),
           "seconds_2proc_1thread": round(two["seconds"], 2), "speedup": round(one["seconds"] / two["seconds"], 3),
           "parallel_efficiency": round(eff, 3), "max_abs_diff": diff,
           "load_average_start": load_start, "load_average": os.getloadavg()[0], "cpus": os.cpu_count(),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=HERE).stdout.strip()}
    print(json.dumps(res, indent=1))
    if args.save:
        (HERE / "results" / "distributed_patching.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
