"""Run the benchmarks side by side (mechanic and each peer, each in its own process on the same weights), save each
section's raw result under benchmarks/results/, and write docs/BENCHMARKS.md from those files alone.

    python benchmarks/run.py                      # every section, then the page
    python benchmarks/run.py --only patching      # re-run some sections; the others are read from results/
    python benchmarks/run.py --render             # the page from benchmarks/results/*.json only (no model run)

Every number on the page comes from benchmarks/results/*.json; tests/test_benchmarks_doc.py checks that the
committed page is exactly what --render makes of the committed results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from plot_editing import NAMES  # noqa: E402  (the editing methods' display names, one table for page and figure)
DOC = ROOT / "docs" / "BENCHMARKS.md"
PEERS_PY = HERE / ".venv-peers" / "bin" / "python"
PEERS = ["nnsight", "transformer_lens", "pyvene"]
# the general case first: no position where the two prompts hold the same token, so no patch can be skipped
PAIRS = {"no_shared_prefix": "no_shared_prefix_pair.json", "ioi_shared_prefix": "ioi_pair.json"}


def med(xs) -> float:
    return statistics.median(xs)


# ----------------------------------------------------------------------------------------------- measuring


def machine() -> dict:
    """CPU model, cores, memory, Python, date and the 1-minute load average of this machine now."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), "load_avg_1m_start": round(os.getloadavg()[0], 2)}


THREADS = 2  # torch threads of every benchmark process; main() sets it from --threads
OMP_WAIT = "default"  # OpenMP wait policy of every benchmark process ("default": OpenMP's own); from --omp-wait


def revision() -> dict:
    """The commit mechanic was measured at, and whether its source had uncommitted changes then."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD"), "src_uncommitted": bool(git("status", "--porcelain", "src"))}


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _env(wait: str | None = None, **extra: str) -> dict:
    """A benchmark process's environment: THREADS torch threads, the OpenMP wait policy (`wait`, else OMP_WAIT;
    ACTIVE keeps idle OpenMP threads spinning between parallel regions instead of sleeping)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), BENCH_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false",
               **extra)
    env.pop("OMP_WAIT_POLICY", None)
    if (wait or OMP_WAIT) != "default":
        env["OMP_WAIT_POLICY"] = wait or OMP_WAIT
    return env


def run_script(python: Path, script: Path, model_dir: Path, *args: str, wait: str | None = None) -> dict:
    """One benchmark process (OpenMP wait policy `wait`, else OMP_WAIT); its last stdout line is the JSON result.
    Its stderr goes to a log file (the path is printed), so a long run can be followed."""
    cmd = [str(python), str(script), "--model", str(model_dir), *args]
    log = Path(tempfile.gettempdir()) / f"mechanic-bench-{script.stem}.log"
    print("$", " ".join(cmd), f"2> {log}", file=sys.stderr, flush=True)
    with open(log, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=_env(wait))
    if proc.returncode != 0:
        return {"peer": script.stem, "error": log.read_text().strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def resid_cache(model_dir: Path, args) -> list[dict]:
    prompts = HERE / "data" / "prompts_resid.json"
    timing = ["--prompts", str(prompts), "--repeats", str(args.cache_repeats), "--warmup", str(args.cache_warmup)]
    results = [run_script(Path(sys.executable), HERE / "resid_cache_mechanic.py", model_dir, *timing)]
    for peer in [x for x in args.peers.split(",") if x]:
        if not PEERS_PY.exists():
            results.append({"peer": peer, "error": ["peers environment missing: run benchmarks/setup_peers.sh"]})
            continue
        results.append(run_script(PEERS_PY, HERE / "peers" / f"resid_cache_{peer}.py", model_dir, *timing))
    return results


LOAD_OURS = ("import time; t0=time.perf_counter(); import mechanic; t1=time.perf_counter(); mechanic.load('smollm2'); "
             "t2=time.perf_counter(); mechanic.load('smollm2'); t3=time.perf_counter(); print(t1-t0, t2-t1, t3-t2)")
LOAD_PLAIN = ("import time, sys; t0=time.perf_counter(); import torch, transformers as T; t1=time.perf_counter(); "
              "T.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32); "
              "T.AutoTokenizer.from_pretrained(sys.argv[1]); t2=time.perf_counter(); print(t1-t0, t2-t1)")


def loading(model_dir: Path, args) -> dict:
    """Fresh processes, round after round (the first `warmup` rounds untimed): mechanic's import + load of the
    cached default model (+ a repeat load in the same process), plain transformers on the same directory, and a
    first load ever (an empty $MECHANIC_CACHE: the packaged GGUF is dequantized and saved)."""
    import transformers

    def fresh(code: str, *argv: str, **env: str) -> list[float]:
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True,
                             env=_env(**env))
        return [float(x) for x in out.stdout.strip().splitlines()[-1].split()]

    res = {"repeats": args.repeats, "warmup": args.warmup, "transformers": transformers.__version__,
           "mechanic": {"import": [], "load": [], "repeat_load": []}, "transformers_plain": {"import": [], "load": []},
           "first_load_ever": {"import": [], "load": []}}
    for r in range(args.warmup + args.repeats):
        ours = fresh(LOAD_OURS)
        plain = fresh(LOAD_PLAIN, str(model_dir))
        empty = tempfile.mkdtemp(prefix="mechanic-cache-")
        try:
            first = fresh(LOAD_OURS, MECHANIC_CACHE=empty)
        finally:
            shutil.rmtree(empty, ignore_errors=True)
        print(f"loading round {r}{' (warm-up)' if r < args.warmup else ''}: mechanic {ours}, transformers {plain}, "
              f"first load ever {first}", file=sys.stderr, flush=True)
        if r < args.warmup:
            continue
        for k, v in zip(("import", "load", "repeat_load"), ours):
            res["mechanic"][k].append(v)
        for k, v in zip(("import", "load"), plain):
            res["transformers_plain"][k].append(v)
        for k, v in zip(("import", "load"), first):
            res["first_load_ever"][k].append(v)
    return res


def patching(model_dir: Path, args) -> dict:
    """mechanic and TransformerLens on each pair, same repeats and warm-up, each in its own process."""
    out = {"repeats": args.repeats, "warmup": args.warmup, "pairs": {}}
    for name, fname in PAIRS.items():
        path = HERE / "data" / fname
        pair = json.loads(path.read_text())
        timing = ["--pair", str(path), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
        rows = [run_script(Path(sys.executable), HERE / "patch_resid_mechanic.py", model_dir, *timing, "--naive")]
        if "transformer_lens" in args.peers and PEERS_PY.exists():
            rows.append(run_script(PEERS_PY, HERE / "peers" / "patch_resid_transformer_lens.py", model_dir, *timing))
        elif "transformer_lens" in args.peers:
            rows.append({"peer": "transformer_lens", "error": ["peers environment missing: run benchmarks/setup_peers.sh"]})
        if OMP_WAIT != "default":   # what a user who leaves OpenMP's wait policy alone gets
            rows.append({**run_script(Path(sys.executable), HERE / "patch_resid_mechanic.py", model_dir, *timing,
                                      wait="default"), "omp_wait_policy": "default"})
        c, k = pair["clean_ids"], pair["corrupted_ids"]
        shared = next((i for i, (a, b) in enumerate(zip(c, k)) if a != b), len(c))
        out["pairs"][name] = {"data": f"benchmarks/data/{fname}", "clean": pair["clean"], "corrupted": pair["corrupted"],
                              "tokens": len(c), "shared_prefix_tokens": shared,
                              "same_token_positions": sum(a == b for a, b in zip(c, k)), "rows": rows}
    return out


def locate_neurons(model_dir: Path, args) -> dict:
    return run_script(Path(sys.executable), HERE / "locate_neurons_mechanic.py", model_dir,
                      "--repeats", str(args.repeats), "--warmup", str(args.warmup))


def steer_generate(model_dir: Path, args) -> list[dict]:
    rows = [run_script(Path(sys.executable), HERE / "steer_generate_mechanic.py", model_dir)]
    for peer in ("steering_vectors", "repeng"):
        if PEERS_PY.exists():
            rows.append(run_script(PEERS_PY, HERE / "peers" / f"steer_generate_{peer}.py", model_dir))
    return rows


def _ours(script: str):
    return lambda model_dir, args: run_script(Path(sys.executable), HERE / script, model_dir)


def sae_smollm2(model_dir: Path, args) -> dict:
    """benchmarks/sae_smollm2.py (about 20 minutes of training, then a held-out evaluation) writes its own result."""
    subprocess.run([sys.executable, str(HERE / "sae_smollm2.py")], check=True, env=_env())
    return json.loads((RESULTS / "sae_smollm2.json").read_text())


def editing_sequential(model_dir: Path, args) -> dict:
    """benchmarks/editing_sequential.py (hours: 5 methods x ~145 sequential edits, scored after every batch)
    writes its own result; benchmarks/plot_editing.py then redraws docs/figures/editing_sequential.svg from it."""
    subprocess.run([sys.executable, str(HERE / "editing_sequential.py")], check=True, env=_env())
    subprocess.run([sys.executable, str(HERE / "plot_editing.py")], check=True, env=_env())
    return json.loads((RESULTS / "editing_sequential.json").read_text())


SECTIONS = {"resid_cache": resid_cache, "loading": loading, "patching": patching,
            "locate_ioi": _ours("locate_ioi_mechanic.py"), "locate_neurons": locate_neurons,
            "locate_outliers": _ours("locate_outliers_mechanic.py"), "trace_acdc": _ours("locate_trace_acdc.py"),
            "steer_generate": steer_generate,
            "steer_edit": _ours("steer_edit_mechanic.py"), "editing_sequential": editing_sequential,
            "sae_smollm2": sae_smollm2,
            "dispatch_overhead": _ours("dispatch_overhead.py"),
            "sae_throughput": _ours("sae_throughput.py"), "graph_smollm2": _ours("graph_smollm2.py"),
            "graph_circuit_tracer": _ours("graph_circuit_tracer.py"),
            "memory_planner": _ours("memory_planner.py")}


# ----------------------------------------------------------------------------------------------- rendering


def provenance(meta: dict, name: str, *files: str) -> str:
    """When a section was measured, the machine load then, and its raw result file(s)."""
    m = meta["sections"][name]
    load = ""
    if "load_avg_1m_start" in m:
        load = f"; 1-minute load average {m['load_avg_1m_start']:.1f} at the start, {m['load_avg_1m_end']:.1f} at the end"
    raw = ", ".join(f"`benchmarks/results/{f}.json`" for f in (files or (name,)))
    wait = f" (OMP_WAIT_POLICY={m['omp_wait_policy']})" if m.get("omp_wait_policy", "default") != "default" else ""
    rev = ""
    if "commit" in m:
        rev = f"; mechanic at commit {m['commit']}" + (" with uncommitted changes in src/" if m["src_uncommitted"] else "")
    return (f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores, {m['memory']}, Python {m['python']}, "
            f"{plural(m['threads'], 'torch thread')} per process{wait}{load}{rev}. "
            f"Raw results: {raw}.")


def resid_cache_lines(results: list[dict], meta: dict) -> list[str]:
    lines = ["", "## Cache every layer's residual output (8 prompts, ~15 tokens, left padded)", "",
             provenance(meta, "resid_cache"), "",
             "Goal: mechanic <= 1.02x the plain forward. Each process times plain forward and tool in interleaved "
             "rounds (plain, tool, plain, tool, ...) after untimed warm-up rounds; ratio = median tool time / median "
             "plain forward time of the same process.", "",
             "| tool | version | transformers | torch | timed rounds | plain forward (ms) | cache all 30 resid_post | "
             "other | max abs diff vs HF |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['peer']} | failed: {' '.join(r['error'])[:120]} | | | | | | | |")
            continue
        p = med(r["plain_s"])
        extra = ", ".join(f"{k} {med(v) / p:.2f}x" for k, v in r.get("extra", {}).items() if isinstance(v, list))
        lines.append(f"| {r['peer']} | {r['version']} | {r['transformers']} | {r['torch'].split('+')[0]} | "
                     f"{len(r['tool_s'])} | {p * 1e3:.0f} | **{med(r['tool_s']) / p:.2f}x** | {extra} | "
                     f"{r['max_abs_diff']:.1e} |")
    return lines + ["", "Notes: `tool_truncated` (mechanic) caches layers 0-14 and stops the forward there",
                    "(`stop_at=\"auto\"`). TransformerLens `plain_bridge` is the bridge's own forward without a cache."]


def loading_lines(r: dict, meta: dict) -> list[str]:
    m, t, f = r["mechanic"], r["transformers_plain"], r["first_load_ever"]
    ours = med(m["import"]) + med(m["load"])
    plain = med(t["import"]) + med(t["load"])
    return ["", "## Loading", "", provenance(meta, "loading"), "",
            f"Fresh process to a loaded default model, once its safetensors cache exists: medians of "
            f"{plural(r['repeats'], 'round')} after {plural(r['warmup'], 'untimed warm-up round')} (each round starts one process per row, in table "
            "order). Import and load are timed inside each process.", "",
            "| | import | load (model + tokenizer) | total | total vs plain transformers |",
            "|---|---|---|---|---|",
            f"| mechanic (`import mechanic`, `mechanic.load('smollm2')`) | {med(m['import']):.2f} s | "
            f"{med(m['load']):.2f} s | {ours:.2f} s | {ours / plain:.2f}x |",
            f"| plain transformers {r['transformers']} on the same directory | {med(t['import']):.2f} s | "
            f"{med(t['load']):.2f} s | {plain:.2f} s | 1.00x |",
            f"| mechanic, first load ever (empty cache: dequantize the packaged GGUF, save safetensors) | "
            f"{med(f['import']):.2f} s | {med(f['load']):.2f} s | {med(f['import']) + med(f['load']):.2f} s | "
            f"{(med(f['import']) + med(f['load'])) / plain:.2f}x |",
            "",
            f"A repeat `mechanic.load('smollm2')` in the same process takes {med(m['repeat_load']):.2f} s (median)."]


def _maxdiff(a, b) -> float:
    """Max |a - b| over two equal-shaped nested lists."""
    if isinstance(a, list):
        return max((_maxdiff(x, y) for x, y in zip(a, b)), default=0.0)
    return abs(a - b)


def _patch_rows(rows: list[dict]) -> list[dict]:
    """One dict per table row: name, version, seconds and plain-forward lists, values; the mechanic row first."""
    ours = rows[0]
    out = []
    if "error" in ours:
        return out
    base = {"version": ours["version"], "plain_s": ours["plain_s"]}
    out.append({**base, "name": "mechanic `locate.causal.patch`", "s": ours["tool_s"], "values": ours["values"],
                "runs": ours["runs_computed"]})
    out.append({**base, "name": "mechanic, `skip_unchanged=False`", "s": ours["every_s"],
                "values": ours["every_values"], "runs": ours["every_runs_computed"]})
    if "naive_s" in ours:
        out.append({**base, "version": "", "name": "naive loop, one plain hook per run", "s": ours["naive_s"],
                    "values": ours["naive_values"], "runs": None})
    out.append({**base, "version": "", "name": "simple batching, 64 runs a forward (plain hooks)",
                "s": ours["batched64_s"], "values": ours["batched64_values"], "runs": None})
    for r in rows[1:]:
        if r.get("omp_wait_policy") == "default":
            out.append({"name": "mechanic `locate.causal.patch`, OpenMP's default wait policy" +
                        (f" (failed: {' '.join(r['error'])[:80]})" if "error" in r else ""), "error": "error" in r,
                        **({} if "error" in r else {"version": r["version"], "plain_s": r["plain_s"], "s": r["tool_s"],
                                                    "values": r["values"], "runs": r["runs_computed"]})})
            continue
        if "error" in r:
            out.append({"name": f"{r['peer']} (failed: {' '.join(r['error'])[:80]})", "error": True})
        else:
            out.append({"name": "TransformerLens `patching.get_act_patch_resid_pre` (TransformerBridge)",
                        "version": f"{r['version']} / transformers {r['transformers']}", "s": r["tool_s"],
                        "plain_s": r["plain_s"], "values": r["values"], "runs": None, "peer": True})
    return out


def patching_speedup(pair: dict) -> tuple[float, float] | None:
    """mechanic over TransformerLens on one pair: (in seconds, in plain forwards of each process)."""
    rows = _patch_rows(pair["rows"])
    tl = [r for r in rows if r.get("peer")]
    if not rows or not tl:
        return None
    ours, tl = rows[0], tl[0]
    return (med(tl["s"]) / med(ours["s"]),
            (med(tl["s"]) / med(tl["plain_s"])) / (med(ours["s"]) / med(ours["plain_s"])))


def floor_lines(pair: dict) -> list[str]:
    """The FLOP floor of causal reuse on one pair and mechanic's time against it (from the mechanic row)."""
    ours = pair["rows"][0]
    f = ours.get("flops")
    if "error" in ours or not f:
        return []
    floor_s = f["floor_gflop"] / f["matmul_gflops"]
    return ["", f"FLOP floor: the {ours['runs_computed']} patched runs need {f['floor_gflop']:.0f} GFLOP when each "
            "recomputes only its layers and columns from the patched one on, with logits at the last column "
            f"({f['floor_gflop'] / f['naive_gflop']:.0%} of the {f['naive_gflop']:.0f} GFLOP of one full run per "
            f"patch); torch's FLOP counter sees {f['tool_counted_gflop']:.0f} GFLOP in mechanic's call (its two "
            f"unpatched runs included). At the fp32 matmul speed measured in the same process ({f['matmul_gflops']:.0f} "
            f"GFLOP/s on {plural(f['threads'], 'thread')}, a [512, 576] x [576, 1536] matmul) the floor is "
            f"{floor_s:.2f} s: mechanic's {med(ours['tool_s']):.2f} s is {med(ours['tool_s']) / floor_s:.2f}x the "
            "floor (goal <= 1.3x)."] + ([
            "", f"mechanic computes less than that floor: a logit difference reads two vocabulary columns, so its "
            f"patched runs unembed only those (`tasks.metrics.columns`). The floor of that smaller work is "
            f"{f['floor_two_columns_gflop']:.0f} GFLOP, {f['floor_two_columns_gflop'] / f['matmul_gflops']:.2f} s; "
            f"mechanic is {med(ours['tool_s']) / (f['floor_two_columns_gflop'] / f['matmul_gflops']):.2f}x it."]
            if "floor_two_columns_gflop" in f else [])


def patching_lines(p: dict, meta: dict) -> list[str]:
    """Both pairs: a summary against TransformerLens, then every method on each pair."""
    general, special = p["pairs"]["no_shared_prefix"], p["pairs"]["ioi_shared_prefix"]
    n_runs = 30 * general["tokens"]
    lines = ["", f"## Activation patching: resid_pre, every layer x position, one clean/corrupted pair "
             f"(30 x {general['tokens']} = {n_runs} runs)", "", provenance(meta, "patching"), "",
             "Goal (issue 15): >= 24x faster than TransformerLens in the general case and within 1.3x of the FLOP "
             "floor, equal to the naive loop to 1e-4.", "",
             "Two pairs, the same clean prompt and metric (logit difference ' Mary' - ' John', normalised to "
             "(m - corrupted) / (clean - corrupted)):", "",
             f"- **General case** ({general['data']}): corrupted \"{general['corrupted']}\" " +
             (f"has a different token at every one of the {general['tokens']} positions, so no patched value equals "
              "the value already in the corrupted run and every run is computed. " if general["same_token_positions"] == 0
              else f"shares {general['shared_prefix_tokens']} prefix tokens and holds the same token as the clean prompt "
              f"at {general['same_token_positions']} positions. ") + "mechanic "
             "still starts each patched run at its layer and column, on the corrupted run's cached prefix, which is "
             "exact for any pair.",
             f"- **Special case: shared prefix** ({special['data']}): the IOI pair \"{special['clean']}\" / "
             f"\"{special['corrupted']}\" shares its first {special['shared_prefix_tokens']} tokens. A patch at any of "
             "those columns puts back the value that is already there, so mechanic returns the unpatched run's "
             "metric for those cells (checked bit for bit on the cached values) and computes fewer runs. "
             "TransformerLens and the plain-hook baselines compute every run on both pairs.", "",
             f"Timing: every method is timed {plural(p['repeats'], 'time')} after {plural(p['warmup'], 'untimed warm-up run')}, each run "
             "preceded by a plain Hugging Face forward of the corrupted prompt in the same process; seconds are "
             "medians. \"In plain forwards\" = median method time / median plain forward time of its own process, "
             "which cancels most of the machine's load and the transformers version (TransformerLens runs on "
             "transformers 4.57, mechanic on 5.x).", "",
             "| case | runs mechanic computes | mechanic s | TransformerLens s | mechanic faster by (seconds) | "
             "mechanic faster by (in plain forwards) |", "|---|---|---|---|---|---|"]
    for label, pair in (("general: no shared prefix", general), ("special: IOI pair, shared prefix", special)):
        rows = _patch_rows(pair["rows"])
        sp = patching_speedup(pair)
        tl = [r for r in rows if r.get("peer")]
        if not rows or sp is None:
            lines.append(f"| {label} | | | | failed | |")
            continue
        lines.append(f"| {label} | {rows[0]['runs']} of {n_runs} | {med(rows[0]['s']):.2f} | {med(tl[0]['s']):.1f} | "
                     f"**{sp[0]:.1f}x** | **{sp[1]:.1f}x** |")
    sp = patching_speedup(general)
    if sp is not None:
        met = "meets" if min(sp) >= 24 else "does not meet"
        lines += ["", f"In the general case mechanic is {sp[0]:.1f}x faster in seconds and {sp[1]:.1f}x in plain "
                  f"forwards: it {met} the 24x goal."]
    lines += floor_lines(general)
    for label, pair in (("General case: no shared prefix", general), ("Special case: IOI pair, shared prefix", special)):
        lines += ["", f"### {label}", "",
                  "| method | version | runs computed | seconds | plain forward (ms) | in plain forwards | "
                  "mechanic faster by (seconds) | mechanic faster by (in plain forwards) | max abs diff vs naive loop |",
                  "|---|---|---|---|---|---|---|---|---|"]
        rows = _patch_rows(pair["rows"])
        if not rows:
            lines.append(f"| mechanic failed: {' '.join(pair['rows'][0]['error'])[:120]} | | | | | | | | |")
            continue
        ref = next((r["values"] for r in rows if r["name"].startswith("naive")), rows[3]["values"])
        ours = rows[0]
        for r in rows:
            if r.get("error"):
                lines.append(f"| {r['name']} | | | | | | | | |")
                continue
            s, pl = med(r["s"]), med(r["plain_s"])
            fast = "" if r is ours else f"{s / med(ours['s']):.1f}x"
            fast_pf = "" if r is ours else f"{(s / pl) / (med(ours['s']) / med(ours['plain_s'])):.1f}x"
            runs = n_runs if r["runs"] is None else r["runs"]
            lines.append(f"| {r['name']} | {r['version']} | {runs} | {s:.2f} | {pl * 1e3:.0f} | {s / pl:.0f} | "
                         f"{fast} | {fast_pf} | {_maxdiff(r['values'], ref):.1e} |")
    return lines


def ioi_lines(r: dict, meta: dict) -> list[str]:
    """AtP vs exact patching and the EAP-IG faithfulness curve on the IOI suite."""
    if "error" in r:
        return ["", f"IOI locate benchmark failed: {' '.join(r['error'])}"]
    ig = r.get("eap_ig")
    lines = ["", f"## Locate on the IOI suite ({r['examples']} examples, SmolLM2)", "", provenance(meta, "locate_ioi"), "",
             "Timing: AtP and the forward+backward are one timed run each after one untimed warm-up run; exact head "
             f"patching{'' if ig else ', EAP-IG'} and ACDC are one timed run each.", "",
             f"Logit difference clean {r['metric_clean']:.2f}, corrupted {r['metric_corrupted']:.2f}.", "",
             "| measure | value | goal |", "|---|---|---|",
             f"| Spearman, head AtP vs exact head patching ({r['heads']} heads) | {r['spearman_atp_vs_exact']:.3f} | >= 0.8 |",
             f"| AtP for all heads / one forward+backward | {r['atp_s'] / r['fwd_bwd_s']:.2f}x "
             f"({r['atp_s']:.2f} s / {r['fwd_bwd_s']:.2f} s) | <= 3x |",
             f"| exact head patching, all heads (fast patching) | {r['exact_head_patching_s']:.1f} s | |",
             f"| EAP-IG edge scores (5 steps, {r['edges_total']} edges) | {r['eap_ig_s']:.1f} s | |"]
    if ig:
        w, c = ({k: med(v) for k, v in ig[x].items()} for x in ("wall_s", "cpu_s"))
        row = lambda name, k, goal="": f"| {name} | {w[k]:.1f} s ({c[k]:.1f} CPU s) | {goal} |"  # noqa: E731
        lines[-1] = row(f"EAP-IG edge scores (5 steps, {r['edges_total']} edges), `eap(ig_steps=5)`", "default",
                        "<= 15 s")
        lines += [row("EAP-IG, one graph run per point and the corrupted run repeated (before)", "loop"),
                  row("EAP-IG, the 5 points as batch rows of one graph run (`ig_batch=5`)", "rows"), "",
                  f"EAP-IG timing: {plural(ig['rounds'], 'round')} in one process at {plural(ig['threads'], 'torch thread')}, "
                  "each round the three in table order (medians). CPU seconds / before: "
                  f"`eap(ig_steps=5)` {c['default'] / c['loop']:.2f}x, batch rows {c['rows'] / c['loop']:.2f}x "
                  f"(wall {w['default'] / w['loop']:.2f}x, {w['rows'] / w['loop']:.2f}x). Max abs diff vs before: "
                  f"{ig['max_abs_diff']['default']:.1e} and {ig['max_abs_diff']['rows']:.1e} (largest edge "
                  f"{ig['largest_edge']:.2f}). Load at the start: `{ig['uptime_start']}`; at the end: "
                  f"`{ig['uptime_end']}`."]
    lines += ["", "EAP-IG circuit faithfulness (every edge outside the circuit carries its corrupted value;",
             "1.0 = the clean behaviour, 0.0 = the corrupted one):", "",
             "| top edges requested | edges kept (connected) | nodes | faithfulness |", "|---|---|---|---|"]
    for c in r["faithfulness"]:
        lines.append(f"| {c['requested']} | {c['edges']} | {c['nodes']} | {c['faithfulness']:.3f} |")
    a = r.get("acdc")
    if a:
        lines += ["", f"Greedy ACDC pruning (`locate.acdc`, threshold {a['threshold']} of the clean - corrupted gap) "
                  f"of the top-{a['edges_start']} EAP-IG circuit: {a['runs']} patched-graph runs, {a['seconds']:.0f} s.", "",
                  "| circuit | edges | faithfulness |", "|---|---|---|",
                  f"| EAP-IG top edges (start) | {a['edges_start']} | {a['faithfulness_start']:.3f} |",
                  f"| after ACDC | {a['edges_end']} ({a['nodes']} nodes) | {a['faithfulness']:.3f} |",
                  f"| EAP-IG top edges, same size as ACDC's | {a['edges_end']} | {a['faithfulness_topn_same_size']:.3f} |"]
    return lines


def locate2_lines(n: dict, o: dict, meta: dict) -> list[str]:
    """Cost and findings of the vocabulary-projection, comparative and magnitude methods (issue Locate II)."""
    lines = ["", "## Locate II on SmolLM2: cost of each method", ""]
    if "error" in n:
        lines.append(f"Neuron benchmark failed: {' '.join(n['error'])}")
    else:
        t = {k: med(v) for k, v in n["times"].items()}
        pf = med(n["plain_s"])
        na = n["naive_loop"]

        def row(name, passes, key, notes=""):
            return f"| {name} | {passes} | {t[key]:.2f} | {t[key] / pf:.0f} | {notes} |"
        lines += [provenance(meta, "locate_neurons"), "",
                  f"Timing: every method is timed {plural(n['repeats'], 'time')} after {plural(n['warmup'], 'untimed warm-up run')}, each "
                  "run preceded by a plain Hugging Face forward of the one-fact prompt in the same process; seconds "
                  f"are medians, \"in plain forwards\" = median method time / median plain forward ({pf * 1e3:.0f} ms).",
                  "",
                  f"Neuron-level log-probability attribution of all {n['neurons']} FFN neurons for one prompt "
                  f"(\"{n['neuron_attribution']['prompt']}\"): one forward plus batched projections, "
                  f"{t['neuron_attribution']:.1f} s, against {na['extrapolated_s']:.0f} s for a loop that projects one "
                  f"neuron at a time: **{n['speedup_vs_naive']:.1f}x**, max abs diff {na['max_abs_diff_vs_batched']:.1e}. "
                  f"The loop does no loop-invariant work: the {na['loop_invariant_outside']} are computed once outside "
                  f"it ({t['naive_setup']:.2f} s, counted once), and each neuron costs one unembedding and log-softmax "
                  f"({na['s_per_neuron'] * 1e3:.1f} ms, timed on {na['neurons_run']} random neurons and extrapolated "
                  f"to {n['neurons']}). A forward per neuron would take about "
                  f"{n['per_neuron_forward_extrapolated_s']:.0f} s ({n['neurons']} plain forwards).", "",
                  "| method | forward passes | seconds | in plain forwards | notes |", "|---|---|---|---|---|",
                  f"| plain HF forward (reference) | 1 | {pf:.2f} | 1 | |",
                  row("mechanic forward (`model.run`)", 1, "forward"),
                  row(f"neuron attribution, {n['neurons']} FFN neurons", 1, "neuron_attribution"),
                  f"| one-neuron-at-a-time loop, {n['neurons']} FFN neurons (extrapolated) | 1 | "
                  f"{na['extrapolated_s']:.1f} | {na['extrapolated_s'] / pf:.0f} | setup {t['naive_setup']:.2f} s + "
                  f"{na['neurons_run']} neurons in {t['naive_loop']:.2f} s, scaled |",
                  row("attention-neuron attribution", 1, "attn_neuron", "every head dimension"),
                  row("layer + head attribution", 1, "layers_and_heads"),
                  row(f"direct logit attribution, {n['dla']['examples']} facts", 1, "dla",
                      f"parts sum to the total within {n['dla']['sum_error']:.1e}"),
                  row("logit lens", 1, "logit_lens",
                      f"answer first top-1 at {n['logit_lens']['first_state_with_answer_top1']}"),
                  row(f"logit flow, {n['logit_flow']['examples']} facts", 2, "logit_flow"),
                  row("query neurons", 2, "query_neurons"),
                  row(f"head scan, {n['head_scan']['heads']} heads x {n['head_scan']['examples']} facts",
                      n["head_scan"]["forward_passes"], "head_scan", "one batch row per head"),
                  row("comparative neuron analysis", 2, "cna", f"ablating {', '.join(n['cna']['heads'])}"),
                  row(f"in-context heads, layers {n['in_context_heads']['layers']}", "", "in_context_heads",
                      f"accuracy {n['in_context_heads']['accuracy_clean']:.2f} -> "
                      f"{n['in_context_heads']['accuracy_union_ablated']:.2f} with the top heads zeroed")]
        lines += ["", "Top neurons by log-probability increase:", ""]
        for f in n["top_neurons"]:
            tops = "; ".join(f"{t['site']} {t['imp']:+.3f} ({', '.join(map(repr, t['promotes']))})" for t in f["top"][:3])
            lines.append(f"- \"{f['prompt']}\" -> {f['answer']!r}: {tops}")
    if "error" in o:
        return lines + ["", f"Magnitude benchmark failed: {' '.join(o['error'])}"]
    lines += ["", provenance(meta, "locate_outliers") + " Timing: one timed run per method.", "",
              "| magnitude method | tokens | seconds | found |", "|---|---|---|---|",
              f"| perplexity (held-out text) | {o['perplexity']['tokens']} | {o['perplexity']['s']:.1f} | "
              f"ppl {o['perplexity']['ppl']:.1f} |",
              f"| massive activations | {o['massive']['tokens']} | {o['massive']['s']:.1f} | " +
              ", ".join(f"L{r['layer']} d{r['dim']} {r['value']:.0f} ({r['token']!r})" for r in o['massive']['flagged'][:3]) + " |",
              f"| super weights (search + verification) | {o['super_weights']['settings'].get('detect_tokens', '')} + "
              f"{o['super_weights']['settings'].get('verify_tokens', '')} | {o['super_weights']['s']:.1f} | " +
              ", ".join(f"L{c['layer']}[{c['row']},{c['col']}] ppl {o['super_weights']['baseline_ppl']:.1f} -> "
                        f"{c['ppl']:.1f}{' (verified)' if c['verified'] else ''}" for c in o['super_weights']['candidates']) + " |",
              f"| attention sinks | {o['sinks']['tokens']} | {o['sinks']['s']:.1f} | {o['sinks']['heads_over_half']} of "
              f"{o['sinks']['heads']} heads put > 0.5 of their attention on the first token |"]
    return lines


def steer_lines(rows: list[dict], meta: dict) -> list[str]:
    """Steered greedy generation vs plain generate, each tool in its own process, same vector and tokens."""
    lines = ["", "## Steering: generation with a vector added at one layer's output", "",
             provenance(meta, "steer_generate"), ""]
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return lines + ["Steering benchmark failed: " + "; ".join(" ".join(r["error"]) for r in rows)]
    m = ok[0]["meta"]
    ref = ok[0]["meta"]["tokens"]
    lines += [f"{len(m['prompts'])} prompts, exactly {m['new_tokens']} new tokens (min = max, so a steered run that "
              "would stop early at EOS does not look faster), greedy; a fixed random direction of norm 8 "
              f"x {m['coefficient']} added to the output of decoder layer {m['layer']} at every token "
              f"(prompt and generated). Ratio = steered / plain `generate` (medians of {len(ok[0]['tool_s'])} "
              "interleaved rounds after untimed warm-up rounds, the same for every tool); goal <= 1.01x. Single "
              "rounds on this machine spread by about +-10%, so differences of a few percent between tools are "
              "within noise.", "",
              "| tool | version | plain s | steered s | ratio | generations changed by steering | same tokens as mechanic |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['peer']} | failed: {' '.join(r['error'])[:80]} | | | | | |")
            continue
        p, t = med(r["plain_s"]), med(r["tool_s"])
        lines.append(f"| {r['peer']} | {r['version']} | {p:.2f} | {t:.2f} | {t / p:.3f}x | {r['meta']['changed']} | "
                     f"{'yes' if r['meta']['tokens'] == ref else 'NO'} |")
    return lines


def trace_acdc_lines(r: dict | None, meta: dict) -> list[str]:
    """Causal tracing and greedy ACDC against the former implementations (kept as test references), one process."""
    lines = ["", "## Causal tracing and greedy ACDC on SmolLM2 (reuse against the former full runs)", ""]
    if r is None:
        return lines + not_yet_run("trace_acdc")
    lines += [provenance(meta, "trace_acdc"), "",
              "`benchmarks/locate_trace_acdc.py`: each method's new implementation (which runs only what a "
              "restoration or a removed edge changes, from the noised / corrupted run's key/value cache and stored "
              "layers) and its former one (kept as the test reference: `full_forward_trace` in tests/test_trace.py, "
              "every restoration a full forward of the prompt; `loop_acdc` in tests/test_acdc.py, one run per "
              "candidate edge), one after the other in the same process, one timed run each (the trace after one "
              "untimed warm-up). GFLOP: torch's FLOP counter on a separate untimed run (independent of the load). "
              "CPU seconds are this process's own; with the cores oversubscribed, wall seconds mostly measure the "
              "other work.", "",
              "| method | case | old CPU s | new CPU s | CPU ratio | old wall s | new wall s | GFLOP old / new | "
              "agreement |", "|---|---|---|---|---|---|---|---|---|"]
    for case, x in r.get("trace", {}).items():
        lines.append(f"| causal trace | {x['what']} | {x['old_cpu_s']:.1f} | {x['new_cpu_s']:.1f} | "
                     f"{x['ratio_cpu']:.2f}x | {x['old_wall_s']:.1f} | {x['new_wall_s']:.1f} | {x['old_gflop']:,.0f} / "
                     f"{x['new_gflop']:,.0f} ({x['ratio_gflop']:.2f}x) | max abs diff {x['max_abs_diff']:.1e} "
                     f"(largest effect {x['largest_effect']:.3g}) |")
    a = r.get("acdc")
    if a:
        lines.append(f"| greedy ACDC | {a['what']}; {a['runs']} runs | {a['old_cpu_s']:.1f} | {a['new_cpu_s']:.1f} | "
                     f"{a['ratio_cpu']:.2f}x | {a['old_wall_s']:.1f} | {a['new_wall_s']:.1f} | | "
                     f"{'same' if a['same_edge_set'] else 'different'} edge set ({a['edges_start']} -> "
                     f"{a['edges_end']} edges), {'same' if a['same_decisions'] else 'different'} decisions, metric "
                     f"max abs diff {a['max_abs_diff_metric']:.1e} |")
    one = r.get("trace", {}).get("one_token")
    if one:
        lines += ["", f"Issue 15's goal for the one-token MLP trace is <= 3 s: {one['new_cpu_s']:.1f} CPU s here on "
                  f"{plural(meta['sections']['trace_acdc']['threads'], 'thread')} ({one['new_gflop']:,.0f} GFLOP; at "
                  f"240 GFLOP/s, this machine's fp32 matmul peak on 2 cores, that is {one['new_gflop'] / 240:.1f} s), "
                  f"{one['new_wall_s']:.1f} s wall under the load below."]
    timed = [(f"the {case.replace('_', '-')} trace", x) for case, x in r.get("trace", {}).items()]
    lines += ["", "Load (`uptime`) at the start and end of each timing: " + "; ".join(
        f"{name}: `{x['uptime_start']}`, `{x['uptime_end']}`" for name, x in timed + ([("ACDC", a)] if a else [])) + "."]
    return lines


def edit_lines(r: dict, meta: dict, seq: dict | None = None) -> list[str]:
    """ROME / MEMIT cost and CounterFact scores on shipped facts (seq: the sequential benchmark, whose validation
    calibration chose prompt_key)."""
    lines = ["", "## Weight editing on SmolLM2: ROME and MEMIT", "", provenance(meta, "steer_edit"), ""]
    if "error" in r:
        return lines + [f"Editing benchmark failed: {' '.join(r['error'])}"]
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    n = len(r["facts"])
    which = (f"the {n} test facts of the shipped suite whose subject is past the first token" if r.get("split") == "test"
             else f"{n} facts of the shipped suite ({', '.join(r['facts'])})")
    lines += [f"Edited: {which}; key statistics over {r['stats_tokens']} tokens of shipped text for layers "
              f"{r['memit_layers'][0]}-{r['memit_layers'][-1]} took {r['stats_s_one_layer_range']:.0f} s once, then "
              "come from the cache. ES = P(new) > P(true) on the edit prompt, PS on paraphrases, NS = P(true) > P(new) "
              "on neighbourhood prompts (full target sequence log-probabilities). ROME edits each fact alone on the "
              "unedited model; MEMIT all facts at once. 'prompt_key': the edit also held at the bare prompt's own key "
              "(mechanic.steer.edit.rome). Timing: ROME is the median over the facts, MEMIT one timed run.", "",
              "| | seconds | ES | PS | NS |", "|---|---|---|---|---|",
              f"| unedited | | {pct(r['before']['es'])} | {pct(r['before']['ps'])} | {pct(r['before']['ns'])} |"]
    for key, how in (("", "as published"), ("_pk", "prompt_key")):
        if f"rome{key}_after" not in r:
            continue
        ra, ma = r[f"rome{key}_after"], r[f"memit{key}_after"]
        lines += [f"| ROME, layer {r['layer']}, one fact at a time, {how} | {med(r[f'rome{key}_s']):.1f} per edit "
                  f"(median) | {pct(ra['es'])} | {pct(ra['ps'])} | {pct(ra['ns'])} |",
                  f"| MEMIT, all facts at once, layers {r['memit_layers']}, {how} | {r[f'memit{key}_s']:.1f} | "
                  f"{pct(ma['es'])} | {pct(ma['ps'])} | {pct(ma['ns'])} |"]
    if r.get("timing_note"):
        lines += ["", r["timing_note"]]
    if "rome_pk_after" in r:
        pk = bool(((seq or {}).get("chosen") or {}).get("rome", {}).get("prompt_key"))
        a = r["rome_pk_after" if pk else "rome_after"]
        ok = a["es"] >= 0.95 and a["ps"] >= 0.80 and a["ns"] >= 0.70
        lines += ["", f"Goal (issue 12): ROME one fact at a time on the built-in test facts ES >= 95%, PS >= 80%, NS >= "
                  f"70% (ROME paper, GPT-2 XL: 100 / 96.4 / 75.4), judged on the variant chosen on validation facts "
                  f"(the sequential-editing benchmark's calibration chose prompt_key {pk} for ROME): "
                  f"{'met' if ok else 'not met'} (ES {pct(a['es'])}, PS {pct(a['ps'])}, NS {pct(a['ns'])})."]
    return lines


def _with_ci(p: dict, key: str, fmt: str) -> str:
    """A curve point's score with its 95% CI, e.g. '97% [94, 99]' (fractions) or '46.1 [44.9, 47.3]'."""
    if p.get(key) is None:
        return ""
    ci = (p.get("ci") or {}).get(key)
    if fmt == "pct":
        return f"{100 * p[key]:.0f}%" + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci else "")
    return f"{p[key]:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def editing_seq_lines(r: dict | None, meta: dict) -> list[str]:
    """Sequential editing: the five methods after every test fact, the curve's milestones, seconds per edit."""
    lines = ["", "## Sequential editing on SmolLM2: AlphaEdit, MEMIT, ROME, FT-L and LoRA", ""]
    if r is None:
        return lines + not_yet_run("editing_sequential")
    lines += [provenance(meta, "editing_sequential"), ""]
    n, b = len(r["facts"]), r["batch"]
    layer = r.get("trace_layer", r.get("given_layer"))
    how = (f"causal tracing averaged over {len(r['trace_facts'])} train facts ({r['trace_seconds']:.0f} s)"
           if "trace_layer" in r else "given")
    ch = r.get("chosen", {})
    chosen = "; ".join(f"{NAMES[k]} " + ", ".join(f"{a} {v}" for a, v in c.items()) for k, c in ch.items())
    sc = r["scores"]
    lines += [f"{n} test facts of the `{r['suite']}` suite (subjects past the first token) edited in sequential "
              f"batches of {b}, each batch on the model with the earlier ones applied (ROME one fact after the "
              f"other). Layer {layer} from {how}; MEMIT and AlphaEdit edit the five layers ending there, FT-L and "
              f"LoRA train that layer. Chosen on validation facts "
              f"(never the test facts): {chosen or 'given'}. Key statistics: {r['stats_tokens']:,} tokens of "
              f"shipped text, {r.get('stats_seconds', 0):.0f} s once (the one-off cost beside the seconds per edit). "
              f"Scores after the last batch over all {n} edited facts, with 95% bootstrap CIs ({sc['n_boot']} "
              "resamples): ES / PS / NS are CounterFact's probability comparisons (NS: neighbourhood prompts whose "
              "true answer is the edited fact's true answer keep it), locality is EasyEdit's (teacher-forced tokens "
              "on the neighbourhood prompts equal the unedited model's), perplexity on "
              f"{sc['windows']} held-out windows of {sc['seq_len']} tokens, fluency the n-gram entropy of "
              f"{sc['openings']} generations of {sc['new_tokens']} tokens.", "",
              "| method | settings | s per edit | ES | PS | NS | locality | perplexity | fluency |",
              "|---|---|---|---|---|---|---|---|---|"]
    bf = r["before"]
    lines.append(f"| unedited | | | {_with_ci(bf, 'es', 'pct')} | {_with_ci(bf, 'ps', 'pct')} | "
                 f"{_with_ci(bf, 'ns', 'pct')} | {_with_ci(bf, 'locality', 'pct')} | {_with_ci(bf, 'ppl', 'num')} | "
                 f"{_with_ci(bf, 'fluency', 'num')} |")
    for name, m in r["methods"].items():
        a = m["after"]
        opts = ", ".join(f"{k} {v}" for k, v in m["options"].items() if k in ("prompt_key", "threshold", "alpha",
                                                                                 "lam", "eps", "rank", "steps"))
        lines.append(f"| {NAMES[name]}, layers {m['layers']} | {opts} | {m['seconds_per_edit']:.1f} | "
                     f"**{_with_ci(a, 'es', 'pct')}** | {_with_ci(a, 'ps', 'pct')} | {_with_ci(a, 'ns', 'pct')} | "
                     f"{_with_ci(a, 'locality', 'pct')} | {_with_ci(a, 'ppl', 'num')} | {_with_ci(a, 'fluency', 'num')} |")
    for name, note in r.get("separate_runs", {}).items():
        lines += ["", f"{NAMES[name]} ran in {note}; its seconds per edit are slower than a run alone."]
    marks = sorted({p["edits"] for m in r["methods"].values() for p in m["curve"]})
    marks = [x for x in marks if x in (marks[0], marks[len(marks) // 4], marks[len(marks) // 2], marks[-1])]
    lines += ["", "ES / NS over the number of edits (the whole curve, every score, with CI bands: "
              "docs/figures/editing_sequential.svg, drawn by `benchmarks/plot_editing.py` from the same JSON):", "",
              "| method | " + " | ".join(f"{x} edits" for x in marks) + " |", "|---|" + "---|" * len(marks)]
    for name, m in r["methods"].items():
        at = {p["edits"]: p for p in m["curve"]}
        lines.append(f"| {NAMES[name]} | " + " | ".join(
            f"{100 * at[x]['es']:.0f}% / {100 * at[x]['ns']:.0f}%" if x in at else "" for x in marks) + " |")
    ae = r["methods"].get("alphaedit")
    if ae:
        a = ae["after"]
        others = [k for k in ("memit", "rome") if k in r["methods"]]
        ahead = all(a["score"] >= r["methods"][k]["after"]["score"] for k in others)
        ns_gap = 100 * (bf["ns"] - a["ns"])
        lines += ["", f"Goal (issue 12): after {n} sequential facts AlphaEdit ES >= 90% (here {100 * a['es']:.0f}%: "
                  f"{'met' if a['es'] >= 0.9 else 'not met'}), NS within 5 points of the unedited model (here "
                  f"{abs(ns_gap):.1f} points {'lower' if ns_gap > 0 else 'higher'}: {'met' if ns_gap <= 5 else 'not met'}), ahead of MEMIT and ROME in the "
                  f"same run by CounterFact score ({'yes' if ahead else 'no'}: " + ", ".join(
                      f"{NAMES[k]} {r['methods'][k]['after']['score']:.3f}" for k in ["alphaedit", *others]) +
                  f"); perplexity {bf['ppl']:.2f} -> {a['ppl']:.2f}. Published, for scale (Fang et al. 2025, "
                  "CounterFact, 2000 sequential edits in batches of 100, efficacy / generalization / specificity): "
                  "LLaMA3-8B AlphaEdit 98.9 / 94.2 / 67.9, MEMIT 65.7 / 64.7 / 51.6, ROME 64.4 / 61.4 / 49.4. "
                  "EasyEdit itself could not run side by side here: its PyPI names hold no code."]
    return lines


def not_yet_run(name: str) -> list[str]:
    return [f"Not yet run: `nice -n 19 .venv/bin/python benchmarks/run.py --only {name}` measures it and writes "
            f"`benchmarks/results/{name}.json`, its provenance in `benchmarks/results/meta.json` and this section."]


def sae_lines(r: dict | None, meta: dict) -> list[str]:
    """One TopK SAE trained on one SmolLM2 residual layer: what it reached against issue 13's goal."""
    lines = ["", "## Training a TopK SAE on one SmolLM2 residual layer", ""]
    if r is None:
        return lines + not_yet_run("sae_smollm2")
    h, st = r["heldout"], r["train_settings"]
    mins = r["train_seconds"] / 60
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    met = [r["train_seconds"] < 1800, h["fvu"] <= 0.2, h["ce_loss_recovered"] >= 0.9]
    verdict = "meets every part of the goal" if all(met) else "does not meet the goal (" + ", ".join(
        n for n, ok in zip(("time", "FVU", "CE loss recovered"), met) if not ok) + ")"
    lines += [provenance(meta, "sae_smollm2"), "",
              "Goal (issue 13): a TopK SAE on one SmolLM2 residual layer (16x expansion, k = 32) reaching FVU <= 0.2 "
              "with CE loss recovered >= 90% in under 30 minutes on 2 cores.", "",
              f"`benchmarks/sae_smollm2.py`: {r['what']} (d_sae {r['d_sae']}), trained by `mechanic.features.train` on "
              f"{r['train_tokens']:,} tokens of the {st['text']} train split (batch {st['batch_size']}, "
              f"lr {st['dictionaries'][0]['lr']:g}, shuffle buffer {st['buffer_tokens']:,} tokens, windows of "
              f"{st['seq_len']} tokens, the first position of each dropped), then evaluated on the held-out split: "
              f"{h['tokens']:,} tokens for FVU and L0, {h['ce_tokens']:,} for the spliced-model losses. "
              f"{r['machine']['note'].capitalize()}; the run predates the sparse TopK gradient measured in the next "
              "section, so the trainer is faster now.", "",
              "| measure | goal | reached |", "|---|---|---|",
              f"| training time | < 30 min | {mins:.1f} min ({r['train_seconds']:.0f} s, "
              f"{r['train_tokens_per_s']:.0f} tokens/s) |",
              f"| FVU, held-out | <= 0.2 | **{h['fvu']:.3f}** |",
              f"| CE loss recovered, held-out | >= 90% | **{pct(h['ce_loss_recovered'])}** |",
              f"| L0 | k = {r['k']} | {h['l0']:.1f} |",
              f"| CE loss: original / SAE spliced in / layer zero-ablated | | {h['ce_original']:.3f} / "
              f"{h['ce_spliced']:.3f} / {h['ce_zero_ablated']:.3f} |",
              f"| KL to the original next-token distribution, SAE spliced in | | {h['kl_spliced']:.3f} |",
              f"| spliced with the error term: max logit difference to the original | | "
              f"{h['max_logit_diff_with_error']:.1e} |",
              f"| dead latents / dense latents (fire on > {100 * h['settings']['dense_threshold']:g}% of tokens) | | "
              f"{100 * h['dead_fraction']:.2f}% / {100 * h['dense_fraction']:.2f}% |", "",
              f"It {verdict}. FVU on the last training batch was {r['train_final_batch']['fvu']:.3f}."]
    return lines


def _rate(r: dict) -> str:
    return "" if r.get("tokens_per_s_after_warmup") is None else f"{r['tokens_per_s_after_warmup']:,.0f}"


def sae_throughput_lines(r: dict | None, meta: dict) -> list[str]:
    """TopK SAE training, mechanic against SAELens on the same layer, tokens and settings; mechanic's memory curve."""
    lines = ["", "## SAE training throughput against SAELens, and memory as tokens grow", ""]
    if r is None:
        return lines + not_yet_run("sae_throughput")
    if "error" in r:
        return lines + [provenance(meta, "sae_throughput"), "", f"Failed: {' '.join(r['error'])}"]
    s = r["settings"]
    sl = r["e2e"].get("sae_lens", {})
    lines += [provenance(meta, "sae_throughput"), "",
              "Goal (issue 13): >= 1.5x SAELens's tokens/s at equal or lower FVU at the same L0, on the same layer, "
              "tokens and hyper-parameters; peak memory bounded as tokens grow.", "",
              f"`benchmarks/sae_throughput.py`: {r['what']}. Each tool trains in its own fresh process on the same "
              f"token ids of the {s['text']} train split, written once to a file both read: batch "
              f"{s['batch_size']} tokens, lr "
              f"{s['lr']:g} with linear warm-up over the first 1% of steps and linear decay to 0 over the last 20%, "
              f"Adam (0.9, 0.999), windows of {s['seq_len']} tokens with the first position dropped, forwards of "
              f"{s['forward_batch']} windows into a {s['buffer_tokens']:,}-token shuffle buffer that hands out half "
              f"and keeps half, inputs scaled to mean norm sqrt(d_in) (SAELens: `expected_average_only_in`), fp32, "
              f"{plural(s['threads'], 'torch thread')}. SAELens trains through its `AutoModelForCausalLM` wrapper "
              "(`HookedProxyLM`, hook `model.layers.6`, stopping the forward there like mechanic), so both tools run "
              "the same Hugging Face forward; TransformerLens's `HookedTransformer` cannot load the model (" +
              (f"`{sl['hooked_transformer']}`: SmolLM2 is not among its official model names" if sl.get(
                  "hooked_transformer") else "not checked") + "). Architecture details stay each tool's own (mechanic: "
              "unit-norm decoder rows, encoder initialised as the decoder's transpose, b_dec initialised to the mean "
              "of the first batch; SAELens 6's TopK defaults: decoder initial norm 0.1, activations rescaled by "
              "decoder norm, b_dec initialised to zero, gradient norm clipped to 1); neither reaches its "
              "dead-latent window in this many tokens.", "",
              f"Tokens/s counts the steps after a warm-up of {plural(s['warmup_steps'], 'step')} (one half-buffer, "
              "so the first buffer fill and setup are excluded and later refills are included). FVU and L0 are "
              f"measured by the same code on the same {s['heldout_tokens']:,} held-out activations (the "
              f"{s['text']} held-out split), reading each "
              "tool's saved SAE with mechanic's loader (SAELens's own loader, on its file, is the last column). "
              "'SAE step only' feeds both trainers the same "
              f"{s['step_acts']:,} pre-computed activations (cycled; no model forward) for "
              f"{s['step_tokens']:,} tokens, after a warm-up of 2 steps.", "",
              "| run | tool | version | tokens | tokens/s | mechanic faster by | CPU s (training) | held-out FVU | "
              "held-out L0 | peak RSS (MB) | FVU by SAELens's loader |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios = {}
    for mode, label in (("e2e", "end to end (forward + SAE)"), ("steps", "SAE step only")):
        rows = r[mode]
        ours = rows.get("mechanic", {})
        for tool, row in rows.items():
            if "error" in row:
                lines.append(f"| {label} | {tool} | failed: {row['error'][:100]} | | | | | | | | |")
                continue
            fast = ""
            if tool != "mechanic" and "error" not in ours and row.get("tokens_per_s_after_warmup"):
                ratios[mode] = ours["tokens_per_s_after_warmup"] / row["tokens_per_s_after_warmup"]
                fast = f"**{ratios[mode]:.2f}x**"
            own = row.get("heldout_by_saelens", {}).get("fvu")
            lines.append(f"| {label} | {tool} | {row['version']} | {row['tokens']:,} | {_rate(row)} | {fast} | "
                         f"{row['fit_cpu_s']:.0f} | {row['heldout']['fvu']:.3f} | {row['heldout']['l0']:.1f} | "
                         f"{row['peak_rss_mb']:,.0f} | {'' if own is None else f'{own:.3f}'} |")
    e2e = r["e2e"]
    if "e2e" in ratios:
        f_ours, f_them = e2e["mechanic"]["heldout"]["fvu"], e2e["sae_lens"]["heldout"]["fvu"]
        met = ratios["e2e"] >= 1.5 and f_ours <= f_them
        lines += ["", f"End to end, mechanic trains {ratios['e2e']:.2f}x as many tokens per second as SAELens at "
                  f"held-out FVU {f_ours:.3f} against {f_them:.3f} (L0 {e2e['mechanic']['heldout']['l0']:.1f} and "
                  f"{e2e['sae_lens']['heldout']['l0']:.1f}): it {'meets' if met else 'does not meet'} the goal."]
    lines += ["", "mechanic's peak RSS for growing token counts, each in a fresh process with the same settings "
              "(model, optimiser state and the bounded shuffle buffer; nothing grows with the tokens):", "",
              "| tokens | peak RSS (MB) | tokens/s |", "|---|---|---|"]
    for p in r["memory_curve"]:
        if "error" in p:
            lines.append(f"| {p['tokens']:,} | failed: {p['error'][:100]} | |")
        else:
            lines.append(f"| {p['tokens_trained']:,} | {p['peak_rss_mb']:,.0f} | {_rate(p)} |")
    return lines


def graph_lines(r: dict | None, meta: dict) -> list[str]:
    """One attribution graph of a 16-token prompt on SmolLM2 with trained transcoders: cost, scores, validation."""
    lines = ["", "## Attribution graph on SmolLM2 (16 tokens, trained transcoders)", ""]
    if r is None:
        return lines + not_yet_run("graph_smollm2")
    first = r["rows"][0]
    lines += [provenance(meta, "graph_smollm2"), "",
              f"Prompt {first['prompt']!r} ({first['tokens']} tokens; {first['active_features']:,} active features of "
              f"{first['transcoder_layers']} per-layer transcoders, `runs/tc_smollm2`: 8x, TopK k = 32, skip). Each "
              "setting in a fresh process; peak RSS is the whole process (model and transcoders: "
              f"{first['rss_after_load_gb']:.2f} GB after loading). Validation ablates the "
              f"{first['validation']['top']} most influential features one at a time in the real model and compares "
              "each logit's change with the graph's prediction. Goal: under 2 minutes on 2 cores, peak memory stated.",
              "",
              "| setting | nodes | wall s | CPU s | peak RSS GB | replacement | completeness | pruned nodes | "
              "validation Pearson | Spearman | sign |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    names = {"capped": "7,500 features (default), position 0 zeroed (default)",
             "all_features": "every feature, position 0 zeroed", "capped_first_kept": "7,500 features, position 0 kept"}
    for x in r["rows"]:
        a = x["validation"]["agreement"]
        lines.append(f"| {names.get(x['setting'], x['setting'])} | {sum(x['nodes'].values()):,} | {x['graph_wall_s']:.1f} | "
                     f"{x['graph_cpu_s']:.1f} | {x['peak_rss_graph_gb']:.2f} | {x['scores']['replacement']:.3f} | "
                     f"{x['scores']['completeness']:.3f} | {x['pruned']['nodes']:,} | {a['pearson']:.2f} | "
                     f"{a['spearman']:.2f} | {a['sign']:.2f} |")
    return lines


def dispatch_lines(r: dict | None, meta: dict) -> list[str]:
    """mechanic's hooks on a model dispatched over the CPU and disk, against the same dispatched model run plainly."""
    lines = ["", "## Hooks on a dispatched model (SmolLM2 over CPU and disk)", ""]
    if r is None:
        return lines + not_yet_run("dispatch_overhead")
    if "error" in r:
        return lines + [provenance(meta, "dispatch_overhead"), "", f"Failed: {' '.join(r['error'])}"]
    cases = r["cases"]

    def ratio(case: str, k: str, clock: str) -> float:
        s = cases[case]["seconds"]
        return med(s[k][clock]) / med(s["plain"][clock])
    lines += [provenance(meta, "dispatch_overhead"), "",
              "Goal (issue 15): mechanic's hooks on a dispatched (offloaded) model cost <= 1.05x the same dispatched "
              "model run plainly.", "",
              f"`benchmarks/dispatch_overhead.py` loads SmolLM2 with a device_map: the embedding, final norm, "
              f"unembedding and {r['layers_on_cpu']} decoder layers on the CPU, the other {r['layers_on_disk']} "
              "layers on disk (accelerate, `offload_folder`; mechanic maps disk-offloaded weights from the "
              "checkpoint file). Plain = the Hugging Face forward of that dispatched model (`model.hf(**batch, "
              "use_cache=False)`, no mechanic hook); mechanic = `model.run` on the same batch, with no site, caching "
              f"{len(r['sites'])} sites ({', '.join(r['sites'])}), and caching them while applying "
              f"{len(r['interventions'])} interventions ({', '.join(r['interventions'])}): hooks on CPU-resident and "
              f"disk-offloaded layers alike. {plural(r['repeats'], 'timed round')} after "
              f"{plural(r['warmup'], 'untimed warm-up round')}, each round running every row once in table order; "
              "ratio = median / median of the plain forward of the same rounds. The machine was shared, so each "
              "row is given in CPU seconds of the (1-thread) process, which the other jobs barely move, and in wall "
              "seconds, which they do.", "",
              "- **General case**: 8 prompts of different lengths, left padded (padding, masks and position ids in "
              "play), every site and intervention at every position.",
              "- **Special case**: one prompt, no padding (the smallest forward, where fixed per-hook costs weigh "
              "most).", "",
              "| case | batch | plain forward (CPU ms) | `run`, no site | cache | cache + interventions |",
              "|---|---|---|---|---|---|"]
    for case, label in (("batch", "general"), ("one_prompt", "special")):
        c = cases[case]
        cells = [f"{ratio(case, k, 'cpu'):.3f}x (wall {ratio(case, k, 'wall'):.2f}x)"
                 for k in ("run", "cache", "cache_and_interventions")]
        lines.append(f"| {label} | {c['shape'][0]} x {c['shape'][1]} | {med(c['seconds']['plain']['cpu']) * 1e3:.0f} | "
                     + " | ".join(cells) + " |")
    worst = max(ratio("batch", "cache_and_interventions", "cpu"), ratio("one_prompt", "cache_and_interventions", "cpu"))
    general = ratio("batch", "cache_and_interventions", "cpu")
    checks = sorted({k for c in cases.values() for k, v in c["checks"].items() if v})
    lines += ["", f"In the general case caching and intervening costs {general:.3f}x the plain dispatched forward in "
              f"CPU time (worst case {worst:.3f}x): it {'meets' if worst <= 1.05 else 'does not meet'} the 1.05x "
              f"goal. `run` with no site does the plain forward plus the engine's bookkeeping, so its distance from 1.00x "
              "shows how noisy the measurement is. Checked after timing, in both cases: "
              f"{', '.join(c.replace('_', ' ') for c in checks)}."]
    return lines


def graph_ct_lines(r: dict | None, meta: dict) -> list[str]:
    """One attribution graph built by mechanic and by circuit-tracer with the same transcoders: edges and time."""
    lines = ["", "## Attribution graph against circuit-tracer (SmolLM2, same transcoders)", ""]
    if r is None:
        return lines + not_yet_run("graph_circuit_tracer")
    lines += [provenance(meta, "graph_circuit_tracer"), ""]
    if "circuit_tracer_error" in r:
        return lines + [f"circuit-tracer could not build a graph on this machine: `{r['circuit_tracer_error']}`"]
    ag, s, v = r["agreement"], r["settings"], r["circuit_tracer"]["versions"]
    lines += [f"`benchmarks/graph_circuit_tracer.py`: {r['what']}. Prompt {r['prompt']!r} ({r['tokens']} tokens with "
              "the special token circuit-tracer prepends; mechanic gets the same ids), "
              f"{r['transcoder_layers']} transcoders `{r['transcoder']}` from `{r['transcoders']}`, written in "
              "circuit-tracer's transcoder_set format by `save_circuit_tracer` and read by its own loader (TopK "
              f"activation set to its TopK + ReLU). Same settings: batch size {s['batch_size']}, at most "
              f"{s['max_logits']} logits covering {s['logit_mass']} of the probability, no feature cap, position 0 "
              f"without features. circuit-tracer {v['circuit-tracer']} with nnsight {v['nnsight']} and transformers "
              f"{v['transformers']} in its own venv, in one long-lived process; both tools in the same run, "
              + (f"{plural(r['warmup'], 'warm-up graph')} then {plural(r['repeats'], 'timed graph')} each, interleaved "
                 "(the order alternates)" if r["repeats"] else "one graph each (the first round), one after the other")
              + f", {plural(r['threads'], 'torch thread')} each, at nice 19. Load at the start: "
              f"`{r['load_start']['uptime']}`; at the end: `{r['load_end']['uptime']}`."
              + (f" Cut off: {r['cut_off']}." if r.get("cut_off") else ""), "",
              "| tool | nodes | median wall s | median CPU s | every graph, wall / CPU s (warm-up first) |",
              "|---|---|---|---|---|"]
    for t, name in (("mechanic", "mechanic"), ("circuit_tracer", "circuit-tracer")):
        each = ", ".join(f"{x[t]['wall_seconds']:.0f} / {x[t]['cpu_seconds']:.0f}" for x in r["rounds"])
        lines.append(f"| {name} | {r['nodes'][t]:,} | {r['median_wall_seconds'][t]:.1f} | "
                     f"{r['median_cpu_seconds'][t]:.1f} | {each} |")
    c, f = ag["compared"], ag["features"]
    ok_edges = ag["edge_max_abs_diff"] <= 1e-4
    ok_time = r["ratio_cpu_seconds"] >= 2
    lines += ["", f"Time per graph: circuit-tracer / mechanic = {r['ratio_cpu_seconds']:.2f}x in CPU seconds, "
              f"{r['ratio_wall_seconds']:.2f}x in wall seconds (goal >= 2x: {'met' if ok_time else 'not met'}).", "",
              f"Edges: {c['edges']:,} edges compared ({c['targets']:,} targets x {c['sources']:,} sources; "
              f"{f['shared']:,} features shared of {f['mechanic']:,} in mechanic's graph and {f['circuit_tracer']:,} "
              f"in circuit-tracer's): max abs difference {ag['edge_max_abs_diff']:.2g} with edges up to "
              f"{ag['edge_max_abs']:.3g} (goal 1e-4: {'met' if ok_edges else 'not met'}). Feature activations differ "
              f"by at most {ag['activation_max_abs_diff']:.2g}, the two real forwards' last logits by "
              f"{ag['real_logits_max_abs_diff']:.2g}, the logit probabilities by {ag['logit_prob_max_abs_diff']:.2g}. "
              "Not compared: position 0's error nodes, which circuit-tracer zeroes (its largest edge there "
              f"{ag['position0_error_edges']['circuit_tracer_max_abs']:.2g}) while mechanic keeps position 0's MLP "
              f"output in them (largest edge {ag['position0_error_edges']['mechanic_max_abs']:.3g})."]
    x = r.get("longer_prompt_cut_off")
    if x:
        m, c = x["rounds"][0]["mechanic"], x["rounds"][0]["circuit_tracer"]
        lines += ["", f"Longer prompt {x['prompt']!r} ({x['tokens']} tokens, {m['nodes']:,} nodes in both graphs): "
                  f"{x['note']}. Its one graph each: mechanic {m['wall_seconds']:.0f} s wall / {m['cpu_seconds']:.0f} s "
                  f"CPU, circuit-tracer {c['wall_seconds']:.0f} s / {c['cpu_seconds']:.0f} s "
                  f"({c['cpu_seconds'] / m['cpu_seconds']:.2f}x in CPU seconds, {c['wall_seconds'] / m['wall_seconds']:.2f}x "
                  "in wall seconds); circuit-tracer's peak RSS "
                  f"{c['peak_rss_mb'] / 1024:.1f} GB."]
    return lines


def memory_lines(r: dict | None, meta: dict) -> list[str]:
    """mechanic.memory's predicted peak of each planned operation against its measured peak (issue 15)."""
    lines = ["", "## Memory planner: predicted against measured peak (SmolLM2)", ""]
    if r is None:
        return lines + not_yet_run("memory_planner")
    ratios = [o["ratio"] for o in r["operations"]]
    lines += [provenance(meta, "memory_planner"), "",
              "Goal (issue 15): the planner's estimate within 25% of the measured peak on every planned operation.", "",
              f"`benchmarks/memory_planner.py`: {r['what']}. Measured peak: the growth of the process's resident "
              "memory above its level before the call (VmHWM reset through /proc/self/clear_refs), with glibc's "
              "mmap threshold fixed at 64 KiB so that freed tensors leave the resident set at once (mechanic.testing."
              "peak says why); one warm-up forward first pages in the memory-mapped weights.", "",
              "| operation | request | predicted MiB | measured MiB | predicted / measured |", "|---|---|---|---|---|"]
    for o in r["operations"]:
        req = ", ".join(f"{k} {v:,}" for k, v in o["request"].items())
        lines.append(f"| {o['what']} | {req} | {o['predicted_mib']:,.1f} | {o['measured_mib']:,.1f} | "
                     f"**{o['ratio']:.2f}** |")
    ok = all(0.75 <= x <= 1.25 for x in ratios)
    lines += ["", f"Predicted / measured from {min(ratios):.2f} to {max(ratios):.2f}: "
              f"{'every operation within 25% (goal met)' if ok else 'not every operation within 25% (goal not met)'}."]
    return lines


def load_results(results: Path = RESULTS) -> tuple[dict, dict]:
    """Every section's raw result (None when it has not been run yet) and meta.json (when and where each was)."""
    data = {name: json.loads((results / f"{name}.json").read_text()) if (results / f"{name}.json").exists() else None
            for name in SECTIONS}
    return data, json.loads((results / "meta.json").read_text())


def render(data: dict, meta: dict) -> str:
    """docs/BENCHMARKS.md from the raw results alone."""
    machines = {(m["cpu"], m["cores"], m["memory"]) for m in meta["sections"].values()}
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python benchmarks/run.py`) from the raw results in `benchmarks/results/*.json`;",
        "do not edit by hand. `python benchmarks/run.py --render` rebuilds this page from those files alone (no",
        "model run), and tests/test_benchmarks_doc.py checks that this page is exactly that rebuild.",
        "",
        "Each tool runs in its own process on the same SmolLM2-135M-Instruct weights (fp32, CPU).",
        "The machine is shared with other work, so absolute seconds are noisy: every timed method is also given as",
        "a ratio to the plain Hugging Face forward of the same model timed in the same process (interleaved with",
        "it), which cancels most of that noise. Within a comparison every tool gets the same repeats and warm-up;",
        "each section states them. Seconds are medians. Lower is better; 1.00x is no overhead.",
    ]
    if any(m["threads"] != 2 for m in meta["sections"].values()):
        lines += ["", "Sections measured with 1 torch thread per process were run while other work oversubscribed the "
                  "machine's cores, where multi-threaded timings become erratic; every tool in such a section ran "
                  "with the same single thread."]
    if len(machines) > 1:
        lines += ["", f"The sections were measured on {len(machines)} different machines (each section says which), "
                  "so compare seconds only within a section; the ratios carry across."]
    lines += resid_cache_lines(data["resid_cache"], meta) + loading_lines(data["loading"], meta) + \
        patching_lines(data["patching"], meta) + ioi_lines(data["locate_ioi"], meta) + \
        locate2_lines(data["locate_neurons"], data["locate_outliers"], meta) + trace_acdc_lines(data["trace_acdc"], meta) + \
        steer_lines(data["steer_generate"], meta) + edit_lines(data["steer_edit"], meta, data["editing_sequential"]) + \
        editing_seq_lines(data["editing_sequential"], meta) + \
        sae_lines(data["sae_smollm2"], meta) + sae_throughput_lines(data["sae_throughput"], meta) + \
        graph_lines(data["graph_smollm2"], meta) + graph_ct_lines(data["graph_circuit_tracer"], meta)
    lines += dispatch_lines(data["dispatch_overhead"], meta)
    lines += memory_lines(data["memory_planner"], meta)
    return "\n".join(lines) + "\n"


def write_page(out: Path = DOC) -> str:
    text = render(*load_results())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs of every method in the loading, patching and neuron sections (all tools)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    p.add_argument("--cache-repeats", type=int, default=10, help="timed rounds of the resid-cache section")
    p.add_argument("--cache-warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads per benchmark process (1 when other work oversubscribes the cores)")
    p.add_argument("--omp-wait", default="default", choices=["ACTIVE", "PASSIVE", "default"],
                   help="OpenMP wait policy of every benchmark process (default: OpenMP's own). Under ACTIVE the "
                        "patching section also times mechanic under OpenMP's own policy; on 2026-11-30 the two "
                        "were within the machine's drift (2.32 s and 2.24 s), so ACTIVE is not the default")
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument("--out", default=str(DOC))
    p.add_argument("--only", default=None, help="Comma-separated sections to re-run (" + ", ".join(SECTIONS) +
                   "); the others are read from benchmarks/results/ and the page is rebuilt.")
    p.add_argument("--render", action="store_true",
                   help="Only rebuild the page from benchmarks/results/*.json (no model run); same as --only ''.")
    args = p.parse_args()
    global THREADS, OMP_WAIT
    THREADS, OMP_WAIT = args.threads, args.omp_wait
    only = set() if args.render else (set(filter(None, args.only.split(","))) if args.only is not None
                                      else set(SECTIONS))
    unknown = only - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if only:
        from mechanic.model.load import resolve

        model_dir = resolve("smollm2")  # converts the packaged GGUF once
        RESULTS.mkdir(exist_ok=True)
        meta_path = RESULTS / "meta.json"
        for name in SECTIONS:  # in page order
            if name not in only:
                continue
            where = {**machine(), **revision(), "threads": args.threads, "omp_wait_policy": args.omp_wait}
            result = SECTIONS[name](model_dir, args)
            where["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
            (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"sections": {}}
            meta["sections"][name] = where
            meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(write_page(Path(args.out)))


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"bench took {time.perf_counter() - t:.0f} s", file=sys.stderr)
