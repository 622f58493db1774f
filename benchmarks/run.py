"""Run every benchmark side by side (mechanic and each peer, each in its own process on the same weights) and
write docs/BENCHMARKS.md with median ratios to the plain HF forward measured in the same process."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS_PY = HERE / ".venv-peers" / "bin" / "python"
PEERS = ["nnsight", "transformer_lens", "pyvene"]


def machine() -> dict:
    """CPU model, cores and memory of this machine."""
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
            "date": datetime.date.today().isoformat()}


def run_script(python: Path, script: Path, model_dir: Path, *args: str) -> dict:
    """One benchmark process; its last stdout line is the JSON result."""
    cmd = [str(python), str(script), "--model", str(model_dir), *args]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"peer": script.stem, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(result: dict, key: str = "tool_s") -> float:
    return statistics.median(result[key]) / statistics.median(result["plain_s"])


def load_time(repeats: int = 3) -> dict:
    """Medians over fresh processes: import, first and repeat load of the cached default model; plain HF too."""
    ours = ("import time; t0=time.perf_counter(); import mechanic; t1=time.perf_counter(); mechanic.load('smollm2'); "
            "t2=time.perf_counter(); mechanic.load('smollm2'); t3=time.perf_counter(); print(t1-t0, t2-t1, t3-t2)")
    plain = ("import time, sys; t0=time.perf_counter(); import torch, transformers as T; t1=time.perf_counter(); "
             "T.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32); "
             "T.AutoTokenizer.from_pretrained(sys.argv[1]); t2=time.perf_counter(); print(t1-t0, t2-t1)")
    from mechanic.model.load import resolve

    where = str(resolve("smollm2"))
    rows, hf = [], []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", ours], capture_output=True, text=True, check=True)
        rows.append([float(x) for x in out.stdout.strip().splitlines()[-1].split()])
        out = subprocess.run([sys.executable, "-c", plain, where], capture_output=True, text=True, check=True)
        hf.append([float(x) for x in out.stdout.strip().splitlines()[-1].split()])
    result = {k: statistics.median(r[i] for r in rows) for i, k in enumerate(("import", "first", "repeat"))}
    result["hf_import"] = statistics.median(r[0] for r in hf)
    result["hf_load"] = statistics.median(r[1] for r in hf)
    return result


def patching_lines(patching: list[dict]) -> list[str]:
    """The patching table: seconds, speed-up over each alternative, max abs diff to the naive loop."""
    import torch

    ours = patching[0]
    if "error" in ours:
        return ["", f"Patching benchmark failed: {' '.join(ours['error'])}"]
    t = statistics.median(ours["tool_s"])
    ref = torch.tensor(ours.get("naive_values", ours["batched64_values"]))
    rows = [("mechanic `locate.causal.patch`", ours["version"], t, torch.tensor(ours["values"]))]
    if "every_s" in ours:
        rows.append(("mechanic, every run computed (`skip_unchanged=False`)", ours["version"], ours["every_s"],
                     torch.tensor(ours["every_values"])))
    if "naive_s" in ours:
        rows.append(("naive loop, one plain hook per run", "", ours["naive_s"], ref))
    rows.append(("simple batching, 64 runs a forward (plain hooks)", "", ours["batched64_s"],
                 torch.tensor(ours["batched64_values"])))
    for r in patching[1:]:
        if "error" in r:
            rows.append((f"{r['peer']} (failed: {' '.join(r['error'])[:80]})", "", float("nan"), None))
        else:
            rows.append(("TransformerLens `patching.get_act_patch_resid_pre` (TransformerBridge)",
                         f"{r['version']} / transformers {r['transformers']}", statistics.median(r["tool_s"]),
                         torch.tensor(r["values"])))
    lines = ["", "## Activation patching: resid_pre, every layer x position, one IOI pair (30 x 14 = 420 runs)", "",
             "Goal: >= 20x faster than TransformerLens, equal to the naive loop to 1e-4.", "",
             "The two prompts share their first 9 tokens, so a patch at any of those columns puts back the value "
             "that is already there: mechanic returns the unpatched run's metric for those cells (checked bit for "
             f"bit on the cached values) and computes {ours.get('runs_computed', '?')} of the 420 runs. The row "
             "with `skip_unchanged=False` computes all 420 (layer and position reuse only), for a pair with no "
             "shared prefix.", "",
             "| method | version | seconds | mechanic is faster by | max abs diff vs naive loop |",
             "|---|---|---|---|---|"]
    for name, ver, secs, vals in rows:
        diff = f"{(vals - ref).abs().max().item():.1e}" if vals is not None else ""
        speed = f"{secs / t:.1f}x" if secs == secs and name != rows[0][0] else ""
        lines.append(f"| {name} | {ver} | {secs:.2f} | {speed} | {diff} |")
    return lines


def ioi_lines(r: dict) -> list[str]:
    """AtP vs exact patching and the EAP-IG faithfulness curve on the IOI suite."""
    if "error" in r:
        return ["", f"IOI locate benchmark failed: {' '.join(r['error'])}"]
    lines = ["", f"## Locate on the IOI suite ({r['examples']} examples, SmolLM2)", "",
             f"Logit difference clean {r['metric_clean']:.2f}, corrupted {r['metric_corrupted']:.2f}.", "",
             "| measure | value | goal |", "|---|---|---|",
             f"| Spearman, head AtP vs exact head patching ({r['heads']} heads) | {r['spearman_atp_vs_exact']:.3f} | >= 0.8 |",
             f"| AtP for all heads / one forward+backward | {r['atp_s'] / r['fwd_bwd_s']:.2f}x "
             f"({r['atp_s']:.2f} s / {r['fwd_bwd_s']:.2f} s) | <= 3x |",
             f"| exact head patching, all heads (fast patching) | {r['exact_head_patching_s']:.1f} s | |",
             f"| EAP-IG edge scores (5 steps, {r['edges_total']} edges) | {r['eap_ig_s']:.1f} s | |",
             "", "EAP-IG circuit faithfulness (every edge outside the circuit carries its corrupted value;",
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


def locate2_lines(neurons: dict, outliers: dict) -> list[str]:
    """Cost and findings of the vocabulary-projection, comparative and magnitude methods (issue Locate II)."""
    lines = ["", "## Locate II on SmolLM2: cost of each method", ""]
    if "error" in neurons:
        lines.append(f"Neuron benchmark failed: {' '.join(neurons['error'])}")
    else:
        n = neurons
        na = n["naive_loop"]
        lines += [f"Neuron-level log-probability attribution of all {n['neurons']} FFN neurons for one prompt "
                  f"(\"{n['neuron_attribution']['prompt']}\"): one forward plus batched projections, "
                  f"{n['neuron_attribution']['s']:.1f} s, against {na['extrapolated_s']:.0f} s for a loop that projects "
                  f"one neuron at a time (timed on {na['neurons_run']} neurons and extrapolated): "
                  f"**{n['speedup_vs_naive']:.0f}x**, max abs diff {na['max_abs_diff_vs_batched']:.1e}. A forward "
                  f"per neuron would take about {n['per_neuron_forward_extrapolated_s']:.0f} s.", "",
                  "| method | forward passes | seconds | notes |", "|---|---|---|---|",
                  f"| one forward (reference) | 1 | {n['forward_s']:.2f} | |",
                  f"| neuron attribution, {n['neurons']} FFN neurons | 1 | {n['neuron_attribution']['s']:.1f} | |",
                  f"| attention-neuron attribution | 1 | {n['attn_neuron_s']:.1f} | every head dimension |",
                  f"| layer + head attribution | 1 | {n['layers_and_heads_s']:.1f} | |",
                  f"| direct logit attribution, {n['dla']['examples']} facts | 1 | {n['dla']['s']:.1f} | parts sum to "
                  f"the total within {n['dla']['sum_error']:.1e} |",
                  f"| logit lens | 1 | {n['logit_lens']['s']:.1f} | answer first top-1 at "
                  f"{n['logit_lens']['first_state_with_answer_top1']} |",
                  f"| logit flow, 8 facts | 2 | {n['logit_flow']['s']:.1f} | |",
                  f"| query neurons | 2 | {n['query_neurons']['s']:.1f} | |",
                  f"| head scan, {n['head_scan']['heads']} heads x {n['head_scan']['examples']} facts | "
                  f"{n['head_scan']['forward_passes']} | {n['head_scan']['s']:.1f} | one batch row per head |",
                  f"| comparative neuron analysis | 2 | {n['cna']['s']:.1f} | ablating {', '.join(n['cna']['heads'])} |",
                  f"| in-context heads, layers {n['in_context_heads']['layers']} | | {n['in_context_heads']['s']:.1f} | "
                  f"accuracy {n['in_context_heads']['accuracy_clean']:.2f} -> "
                  f"{n['in_context_heads']['accuracy_union_ablated']:.2f} with the top heads zeroed |"]
        lines += ["", "Top neurons by log-probability increase:", ""]
        for f in n["top_neurons"]:
            tops = "; ".join(f"{t['site']} {t['imp']:+.3f} ({', '.join(map(repr, t['promotes']))})" for t in f["top"][:3])
            lines.append(f"- \"{f['prompt']}\" -> {f['answer']!r}: {tops}")
    if "error" in outliers:
        lines += ["", f"Magnitude benchmark failed: {' '.join(outliers['error'])}"]
        return lines
    o = outliers
    lines += ["", "| magnitude method | tokens | seconds | found |", "|---|---|---|---|",
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


def steer_lines(rows: list[dict]) -> list[str]:
    """Steered greedy generation vs plain generate, each tool in its own process, same vector and tokens."""
    lines = ["", "## Steering: generation with a vector added at one layer's output", ""]
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return lines + ["Steering benchmark failed: " + "; ".join(" ".join(r["error"]) for r in rows)]
    m = ok[0]["meta"]
    ref = ok[0]["meta"]["tokens"]
    lines += [f"{len(m['prompts'])} prompts, exactly {m['new_tokens']} new tokens (min = max, so a steered run that "
              "would stop early at EOS does not look faster), greedy; a fixed random direction of norm 8 "
              f"x {m['coefficient']} added to the output of decoder layer {m['layer']} at every token "
              f"(prompt and generated). Ratio = steered / plain `generate` (medians of {len(ok[0]['tool_s'])} "
              "interleaved rounds); goal <= 1.01x. Single rounds on this machine spread by about +-10%, so "
              "differences of a few percent between tools are within noise (raw times in "
              "benchmarks/results/steer_generate.json).", "",
              "| tool | version | plain s | steered s | ratio | generations changed by steering | same tokens as mechanic |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['peer']} | failed: {' '.join(r['error'])[:80]} | | | | | |")
            continue
        p, t = statistics.median(r["plain_s"]), statistics.median(r["tool_s"])
        lines.append(f"| {r['peer']} | {r['version']} | {p:.2f} | {t:.2f} | {t / p:.3f}x | {r['meta']['changed']} | "
                     f"{'yes' if r['meta']['tokens'] == ref else 'NO'} |")
    return lines


def edit_lines(r: dict) -> list[str]:
    """ROME / MEMIT cost and CounterFact scores on shipped facts."""
    lines = ["", "## Weight editing on SmolLM2: ROME and MEMIT", ""]
    if "error" in r:
        return lines + [f"Editing benchmark failed: {' '.join(r['error'])}"]
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    lines += [f"{len(r['facts'])} facts of the shipped suite ({', '.join(r['facts'])}); key statistics over "
              f"{r['stats_tokens']} tokens of shipped text for layers {r['memit_layers'][0]}-{r['memit_layers'][-1]} "
              f"took {r['stats_s_one_layer_range']:.0f} s once, then come from the cache. ES = P(new) > P(true) on the "
              "edit prompt, PS on paraphrases, NS = P(true) > P(new) on neighbourhood prompts (full target "
              "sequence log-probabilities).", "",
              "| | seconds | ES | PS | NS |", "|---|---|---|---|---|",
              f"| unedited | | {pct(r['before']['es'])} | {pct(r['before']['ps'])} | {pct(r['before']['ns'])} |",
              f"| ROME, layer {r['layer']}, one fact at a time | {statistics.median(r['rome_s']):.1f} per edit (median) | "
              f"{pct(r['rome_after']['es'])} | {pct(r['rome_after']['ps'])} | {pct(r['rome_after']['ns'])} |",
              f"| MEMIT, all facts at once, layers {r['memit_layers']} | {r['memit_s']:.1f} | "
              f"{pct(r['memit_after']['es'])} | {pct(r['memit_after']['ps'])} | {pct(r['memit_after']['ns'])} |"]
    return lines


def write_markdown(results: list[dict], info: dict, load_s: dict, out: Path, patching: list[dict],
                   ioi: dict, neurons: dict, outliers: dict, steering: list[dict], editing: dict) -> None:
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (benchmarks/run.py); do not edit by hand. Each tool runs in its own process on",
        "the same SmolLM2-135M-Instruct weights (fp32, CPU, 2 threads); each ratio is the median time of the",
        "tool over the median time of the plain Hugging Face forward measured in the same process, runs",
        "interleaved (plain, tool, plain, tool, ...). Lower is better; 1.00x is no overhead.",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']}; Python {info['python']}; {info['date']}.",
        "",
        "## Cache every layer's residual output (8 prompts, ~15 tokens, left padded)",
        "",
        "Goal: mechanic <= 1.02x the plain forward.",
        "",
        "| tool | version | transformers | torch | plain forward (ms) | cache all 30 resid_post | other | max abs diff vs HF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['peer']} | failed: {' '.join(r['error'])[:120]} | | | | | | |")
            continue
        extra = ", ".join(f"{k} {ratio(r, k) if k in r else statistics.median(v) / statistics.median(r['plain_s']):.2f}x"
                          for k, v in r.get("extra", {}).items() if isinstance(v, list))
        lines.append(f"| {r['peer']} | {r['version']} | {r['transformers']} | {r['torch'].split('+')[0]} | "
                     f"{statistics.median(r['plain_s']) * 1e3:.0f} | **{ratio(r):.2f}x** | {extra} | "
                     f"{r['max_abs_diff']:.1e} |")
    lines += ["", "Notes: `tool_truncated` (mechanic) caches layers 0-14 and stops the forward there",
              "(`stop_at=\"auto\"`). TransformerLens `plain_bridge` is the bridge's own forward without a cache.",
              "", "## Loading", "",
              "Fresh process to a loaded default model, once its safetensors cache exists (medians of 3):",
              "",
              "| | import | load (model + tokenizer) | total |",
              "|---|---|---|---|",
              f"| mechanic (`import mechanic`, `mechanic.load('smollm2')`) | {load_s['import']:.2f} s | "
              f"{load_s['first']:.2f} s | {load_s['import'] + load_s['first']:.2f} s |",
              f"| plain transformers on the same directory | {load_s['hf_import']:.2f} s | {load_s['hf_load']:.2f} s | "
              f"{load_s['hf_import'] + load_s['hf_load']:.2f} s |",
              "",
              "Most of a first load is transformers importing its model code; mechanic adds nothing measurable.",
              f"A repeat load in the same process takes {load_s['repeat']:.2f} s. The first load ever converts the",
              "packaged GGUF (about 30 s) and caches it.",
              ""]
    lines += patching_lines(patching) + ioi_lines(ioi) + locate2_lines(neurons, outliers) + steer_lines(steering) + \
        edit_lines(editing)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    p.add_argument("--only", default=None, help="Comma-separated sections to re-run (" + ", ".join(SECTIONS) +
                   "); the others are read from benchmarks/results/ and the page is rebuilt.")
    args = p.parse_args()
    from mechanic.model.load import resolve

    model_dir = resolve("smollm2")  # converts the packaged GGUF once
    only = set(filter(None, args.only.split(","))) if args.only is not None else set(SECTIONS)  # "" = re-render
    unknown = only - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    (HERE / "results").mkdir(exist_ok=True)
    data = {}
    for name, fn in SECTIONS.items():
        path = HERE / "results" / f"{name}.json"
        if name in only:
            data[name] = fn(model_dir, args)
            path.write_text(json.dumps(data[name], indent=1))
        else:
            data[name] = json.loads(path.read_text())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(data["resid_cache"], machine(), load_time(), out, data["patching"], data["locate_ioi"],
                   data["locate_neurons"], data["locate_outliers"], data["steer_generate"], data["steer_edit"])
    print(out.read_text())


def resid_cache(model_dir: Path, args) -> list[dict]:
    prompts = HERE / "data" / "prompts_resid.json"
    timing = ["--prompts", str(prompts), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    results = [run_script(Path(sys.executable), HERE / "resid_cache_mechanic.py", model_dir, *timing)]
    for peer in [x for x in args.peers.split(",") if x]:
        if not PEERS_PY.exists():
            results.append({"peer": peer, "error": ["peers environment missing: run benchmarks/setup_peers.sh"]})
            continue
        results.append(run_script(PEERS_PY, HERE / "peers" / f"resid_cache_{peer}.py", model_dir, *timing))
    return results


def patching(model_dir: Path, args) -> list[dict]:
    pair = HERE / "data" / "ioi_pair.json"
    rows = [run_script(Path(sys.executable), HERE / "patch_resid_mechanic.py", model_dir, "--pair", str(pair), "--naive")]
    if "transformer_lens" in args.peers and PEERS_PY.exists():
        rows.append(run_script(PEERS_PY, HERE / "peers" / "patch_resid_transformer_lens.py", model_dir,
                               "--pair", str(pair)))
    return rows


def steer_generate(model_dir: Path, args) -> list[dict]:
    rows = [run_script(Path(sys.executable), HERE / "steer_generate_mechanic.py", model_dir)]
    for peer in ("steering_vectors", "repeng"):
        if PEERS_PY.exists():
            rows.append(run_script(PEERS_PY, HERE / "peers" / f"steer_generate_{peer}.py", model_dir))
    return rows


def _ours(script: str):
    return lambda model_dir, args: run_script(Path(sys.executable), HERE / script, model_dir)


SECTIONS = {"resid_cache": resid_cache, "patching": patching, "locate_ioi": _ours("locate_ioi_mechanic.py"),
            "locate_neurons": _ours("locate_neurons_mechanic.py"),
            "locate_outliers": _ours("locate_outliers_mechanic.py"), "steer_generate": steer_generate,
            "steer_edit": _ours("steer_edit_mechanic.py")}


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"bench took {time.perf_counter() - t:.0f} s", file=sys.stderr)
