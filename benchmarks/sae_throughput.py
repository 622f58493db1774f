"""SAE training throughput, mechanic against SAELens, and mechanic's peak memory as tokens grow.

    nice -n 19 .venv/bin/python benchmarks/run.py --only sae_throughput     # -> results/sae_throughput.json + page
    .venv/bin/python benchmarks/sae_throughput.py --tokens 4096 --curve 2048,4096 --out /tmp/t.json   # a small try

A TopK SAE (d_sae 9216, k 32) on SmolLM2-135M-Instruct L6.resid_post (SAELens: its AutoModelForCausalLM wrapper,
hook `model.layers.6`, the same Hugging Face forward), trained by each tool in its own fresh process on the same
token ids (written once to a file both read) with the same batch size, learning rate and schedule, context length,
shuffle-buffer size, forward batch, token count, fp32 and torch threads. Recorded per tool: the end time of every
step (tokens/s after a warm-up of one half-buffer of steps), peak RSS, and FVU / L0 of the saved dictionary on
the same held-out activations (both evaluated by the same code). Also the SAE step alone (both trainers fed the
same pre-computed activations) and mechanic's peak RSS for several token counts, each in a fresh process.
Each child process prints one JSON line; this script prints the combined result as its last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

HERE = Path(__file__).resolve().parent
SAELENS_PY = HERE / ".venv-saelens" / "bin" / "python"
SETTINGS = ("layer", "d_sae", "k", "batch_size", "lr", "seq_len", "buffer_tokens", "forward_batch", "seed", "threads")


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM of its address space (ru_maxrss would also count the parent's RSS
    at fork, which Linux carries across exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: mechanic's converted smollm2 cache)")
    p.add_argument("--tokens", type=int, default=100_000, help="training tokens per tool, end to end")
    p.add_argument("--step-tokens", type=int, default=40_960, help="training tokens of the SAE-step-only comparison")
    p.add_argument("--step-acts", type=int, default=32_768, help="pre-computed activations it cycles through")
    p.add_argument("--heldout-tokens", type=int, default=16_384)
    p.add_argument("--curve", default="25000,50000,200000",
                   help="extra token counts for mechanic's memory curve (the --tokens run is one more point)")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--d-sae", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--buffer-tokens", type=int, default=32768)
    p.add_argument("--forward-batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 2)))
    p.add_argument("--skip-saelens", action="store_true")
    p.add_argument("--work", default=None, help="keep the token files and dictionaries here (default: a temp dir)")
    p.add_argument("--out", default=None, help="also write the result JSON here")
    p.add_argument("--side", choices=("mechanic",), default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("e2e", "steps"), default="e2e", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ mechanic's side


def mechanic_side(a) -> dict:
    """Train in this (fresh) process; per-step end times, peak RSS, the saved dictionary's directory."""
    torch.set_num_threads(a.threads)
    import mechanic
    from mechanic.features.saelens import save
    from mechanic.features.train import DictConfig, train
    from mechanic.features.trainer import Trainer

    work = Path(a.work)
    cfg = DictConfig(f"L{a.layer}.resid_post", "topk", d_sae=a.d_sae, k=a.k, lr=a.lr)
    out_dir = work / f"mechanic_{a.mode}_{a.tokens}"
    ends: list[float] = []
    t_setup = time.perf_counter()
    if a.mode == "e2e":
        model = mechanic.load(a.model)
        ids = load_file(str(work / "train_ids.safetensors"))["ids"]
        t_fit, c_fit = time.perf_counter(), time.process_time()
        (d,) = train(model, cfg, out_dir, tokens=a.tokens, text=ids, batch_size=a.batch_size,
                     buffer_tokens=a.buffer_tokens, seq_len=a.seq_len, forward_batch=a.forward_batch, seed=a.seed,
                     progress=False, on_step=lambda row: ends.append(time.perf_counter()))
        t_end, c_end = time.perf_counter(), time.process_time()
        seen = json.loads((out_dir / "train.json").read_text())["tokens_seen"]
        d_dir = out_dir / cfg.label
    else:
        acts = load_file(str(work / "step_acts.safetensors"))["x"]
        acts = acts[torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(a.seed))]
        n_batches = acts.shape[0] // a.batch_size
        t = Trainer(cfg, acts.shape[1], acts.shape[1], a.tokens, a.batch_size, a.seed)
        t_fit, c_fit, seen, i = time.perf_counter(), time.process_time(), 0, 0
        while seen < a.tokens:
            x = acts[(i % n_batches) * a.batch_size:(i % n_batches + 1) * a.batch_size]
            if t.opt is None:
                t.init_from(x, x)
            t.step(x, x)
            ends.append(time.perf_counter())
            seen, i = seen + a.batch_size, i + 1
        t_end, c_end = time.perf_counter(), time.process_time()
        d, d_dir = t.finished(), out_dir
        save(d, d_dir, model_name="SmolLM2-135M-Instruct", overwrite=True)
    return {"peer": "mechanic", "version": mechanic.__version__, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "mode": a.mode, "tokens": seen, "batch_size": a.batch_size,
            "step_ends": [x - t_fit for x in ends], "setup_s": t_fit - t_setup, "fit_s": t_end - t_fit,
            "fit_cpu_s": c_end - c_fit, "process_s": t_end - T0,
            "peak_rss_mb": peak_rss_mb(), "dictionary_dir": str(d_dir)}


# ------------------------------------------------------------------------------------------ orchestration


def child(cmd: list[str], a) -> dict:
    """One side in a fresh process (threads pinned); its last stdout line is its JSON result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:400]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def side_args(a, mode: str, tokens: int) -> list[str]:
    return ["--model", a.model, "--work", a.work, "--mode", mode, "--tokens", str(tokens),
            "--layer", str(a.layer), "--d-sae", str(a.d_sae), "--k", str(a.k), "--batch-size", str(a.batch_size),
            "--lr", str(a.lr), "--seq-len", str(a.seq_len), "--buffer-tokens", str(a.buffer_tokens),
            "--forward-batch", str(a.forward_batch), "--seed", str(a.seed), "--threads", str(a.threads)]


def rate_after_warmup(r: dict, warm_steps: int) -> float | None:
    """Tokens/s from the end of step `warm_steps` to the end of the last step."""
    ends = r.get("step_ends") or []
    if len(ends) <= warm_steps:
        return None
    return (len(ends) - warm_steps) * r["batch_size"] / (ends[-1] - ends[warm_steps - 1])


@torch.no_grad()
def heldout_metrics(d_dir: str, site: str, x: torch.Tensor) -> dict:
    """FVU and L0 of a saved dictionary on held-out activations (mechanic's loader for both tools' files)."""
    from mechanic.features import load

    d = load(d_dir, site=site)
    acts = d.encode(x)
    err = float((d.decode(acts) - x).pow(2).sum())
    var = float((x - x.mean(0)).pow(2).sum())
    return {"fvu": err / var, "l0": float((acts != 0).sum(-1).float().mean()), "dictionary": repr(d)}


def prepare(a, work: Path, train_tokens: int) -> dict:
    """Token ids for training and held-out evaluation, held-out activations, step-only activations."""
    import mechanic
    from mechanic.features.activations import SiteReader, text_windows
    from mechanic.model.load import resolve

    model = mechanic.load(a.model)
    per_window = a.seq_len - 1
    n_train = math.ceil(train_tokens / per_window)
    train_ids = torch.stack([w for _, w in zip(range(n_train), text_windows(model, None, "train", a.seq_len))])
    held_ids = torch.stack([w for _, w in zip(range(math.ceil(a.heldout_tokens / per_window)),
                                              text_windows(model, None, "heldout", a.seq_len))])
    if train_ids.shape[0] < n_train:
        raise SystemExit(f"the default corpus gave {train_ids.shape[0]} windows, {n_train} needed")
    save_file({"ids": train_ids.contiguous()}, str(work / "train_ids.safetensors"))
    reader = SiteReader(model, [f"L{a.layer}.resid_post"], skip_first=1)

    def acts(ids):
        return torch.cat([reader.read(ids[i:i + a.forward_batch])[f"L{a.layer}.resid_post"]
                          for i in range(0, ids.shape[0], a.forward_batch)])
    held = acts(held_ids)
    save_file({"x": held.contiguous()}, str(work / "heldout_acts.safetensors"))
    step_x = acts(train_ids[:math.ceil(a.step_acts / per_window)])
    save_file({"x": step_x.contiguous()}, str(work / "step_acts.safetensors"))
    name = "SmolLM2-135M-Instruct" if Path(a.model) == Path(resolve("smollm2")) else model.name
    return {"held": held, "train_windows": train_ids.shape[0], "heldout_tokens": held.shape[0],
            "step_acts": step_x.shape[0], "model": name}


def orchestrate(a) -> dict:
    from mechanic.model.load import resolve

    a.model = str(a.model or resolve("smollm2"))
    curve = [int(x) for x in a.curve.split(",") if x]
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="mechanic-sae-throughput-")
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    a.work = str(work)
    # enough windows for the longest run, its kept half-buffer and SAELens's norm-estimate batch
    need = max([a.tokens, *curve]) + 2 * a.buffer_tokens + 4 * a.batch_size
    t0 = time.perf_counter()
    prep = prepare(a, work, need)
    prep_s = time.perf_counter() - t0
    site = f"L{a.layer}.resid_post"
    me = [sys.executable, str(Path(__file__).resolve()), "--side", "mechanic"]
    them = [str(SAELENS_PY), str(HERE / "saelens" / "throughput_side.py")]
    warm = max(1, a.buffer_tokens // 2 // a.batch_size)
    settings = {k: getattr(a, k) for k in SETTINGS} | {
        "tokens": a.tokens, "step_tokens": a.step_tokens, "step_acts": prep["step_acts"], "warmup_steps": warm,
        "heldout_tokens": prep["heldout_tokens"], "train_windows": prep["train_windows"],
        "text": "default corpus (GCIDE)"}
    res = {"what": f"TopK SAE d_sae {a.d_sae} k {a.k} on {prep['model']} {site}", "settings": settings,
           "prepare_s": prep_s, "cpus": os.cpu_count(), "e2e": {}, "steps": {}, "memory_curve": []}
    runs = {"e2e": a.tokens, "steps": a.step_tokens}
    for mode, tokens in runs.items():
        rows = {"mechanic": child(me + side_args(a, mode, tokens), a)}
        if not a.skip_saelens:
            if not SAELENS_PY.exists():
                rows["sae_lens"] = {"error": "benchmarks/.venv-saelens is missing: run benchmarks/setup_saelens.sh"}
            else:
                extra = ["--check-hooked-transformer"] if mode == "e2e" else []
                rows["sae_lens"] = child(them + side_args(a, mode, tokens) + extra, a)
        for r in rows.values():
            if "error" not in r:
                r["tokens_per_s_after_warmup"] = rate_after_warmup(r, warm if mode == "e2e" else 2)
                r["heldout"] = heldout_metrics(r["dictionary_dir"], site, prep["held"])
        res[mode] = rows
    first = res["e2e"]["mechanic"]
    points = [] if "error" in first else [(a.tokens, first)]
    for n in curve:
        points.append((n, child(me + side_args(a, "e2e", n), a)))
    for n, r in sorted(points, key=lambda p: p[0]):
        row = {"tokens": n}
        row.update({"error": r["error"]} if "error" in r else
                   {"peak_rss_mb": r["peak_rss_mb"], "tokens_trained": r["tokens"], "fit_s": r["fit_s"],
                    "tokens_per_s_after_warmup": rate_after_warmup(r, warm)})
        res["memory_curve"].append(row)
    for mode in runs:
        for r in res[mode].values():
            r.pop("dictionary_dir", None)   # a temporary directory
    if tmp is not None:
        tmp.cleanup()
    res["total_s"] = time.perf_counter() - T0
    return res


def main() -> None:
    a = args()
    if a.side == "mechanic":
        print(json.dumps(mechanic_side(a)))
        return
    res = orchestrate(a)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
