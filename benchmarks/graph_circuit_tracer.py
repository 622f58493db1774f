"""Attribution graphs, mechanic against circuit-tracer on SmolLM2 with the same transcoders: edge agreement and
time per graph, both tools timed in one run, interleaved, so the machine's load falls on both.

    nice -n 19 .venv/bin/python benchmarks/run.py --only graph_circuit_tracer --threads 1   # -> results/ + page
    .venv/bin/python benchmarks/graph_circuit_tracer.py --model DIR --repeats 1 --prompt "The capital of France is"

circuit-tracer 0.5.0 runs in benchmarks/.venv-circuit-tracer (benchmarks/setup_circuit_tracer.sh) through its
nnsight backend on the Hugging Face forward (its default backend, TransformerLens, has no SmolLM2); it serves
graphs from a long-lived process (benchmarks/circuit_tracer/ct_side.py), so neither tool's load is timed. The
model: mechanic's converted GGUF directory, given to transformers 4.57 with its config's rope settings and
tokenizer class in 4.x spelling (weights and tokenizer files are links to the same files). The transcoders:
`runs/tc_smollm2` (30 TopK skip transcoders, not in the repository; see graph_smollm2.py), written in
circuit-tracer's format by mechanic.locate.graph.save_circuit_tracer and read by circuit-tracer's own loader.

Same token ids for both (circuit-tracer prepends a special token, so mechanic gets it too), same logit
selection (max_logits 10, probability mass 0.95), same batch size, no feature cap, position 0 without feature
nodes in both (circuit-tracer zeroes it; mechanic's zero_first). Edges are compared on the nodes both graphs
have, matched by (layer, position, feature) for features, (layer, position) for errors, position for tokens
and vocabulary id for logits; position 0's error nodes differ by design (circuit-tracer zeroes their vectors,
mechanic keeps position 0's whole MLP output there) and are reported apart. The last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CT_PY = HERE / ".venv-circuit-tracer" / "bin" / "python"
PROMPT = "The capital of France is Paris, and the capital of Germany is the city of"


def hf4_model_dir(model_dir: Path, out: Path) -> Path:
    """`model_dir` as transformers 4.57 reads it: links to its files, config and tokenizer config in 4.x spelling."""
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name not in ("config.json", "tokenizer_config.json") and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((model_dir / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    if "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rope
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    tok = json.loads((model_dir / "tokenizer_config.json").read_text())
    if tok.get("tokenizer_class") == "TokenizersBackend":
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    for k in ("backend", "is_local", "local_files_only"):
        tok.pop(k, None)
    (out / "tokenizer_config.json").write_text(json.dumps(tok, indent=1))
    return out


class CircuitTracer:
    """The circuit-tracer process: one graph per request."""

    def __init__(self, model_dir: Path, transcoders: Path, threads: int, log: Path):
        self.log = open(log, "w")
        self.proc = subprocess.Popen([str(CT_PY), str(HERE / "circuit_tracer" / "ct_side.py"), "--model", str(model_dir),
                                      "--transcoders", str(transcoders), "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false"))
        self.ready = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.flush()
            tail = [x for x in Path(self.log.name).read_text().splitlines() if x.strip()][-12:]
            raise RuntimeError("\n".join(tail) or f"circuit-tracer exited with {self.proc.returncode}")
        return json.loads(line)

    def graph(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def mechanic_graph(model, tcs, ids, a):
    from mechanic.locate.graph import attribute

    w0, c0 = time.perf_counter(), time.process_time()
    g = attribute(model, tcs, ids, logit_mass=a.logit_mass, max_logits=a.max_logits, batch_size=a.batch_size,
                  max_feature_nodes=None, zero_first=True)
    return g, {"wall_seconds": round(time.perf_counter() - w0, 3), "cpu_seconds": round(time.process_time() - c0, 3),
               "nodes": len(g), "features": g.count("feature"), "phases_cpu_s": g.meta["cpu_seconds"]}


def compare(g, ct_file: Path, real_logits) -> dict:
    """Edges of mechanic's graph `g` and circuit-tracer's saved graph on the nodes both have."""
    import torch
    from safetensors.torch import load_file

    ct = load_file(str(ct_file))
    A = ct["adjacency"]
    L, P = int(g.meta["n_layers"]), len(g.tokens)
    feats = ct["features"]
    Fc = feats.shape[0]
    assert torch.equal(ct["tokens"], g.tokens.long()), "the two tools saw different token ids"
    kind, layer, pos, feat = g.kind.long(), g.layer.long(), g.pos.long(), g.feature.long()
    mech_feat = {(int(l), int(p), int(f)): i for i, (k, l, p, f) in enumerate(zip(kind, layer, pos, feat)) if k == 0}
    ct_feat = {tuple(int(x) for x in r): i for i, r in enumerate(feats)}
    shared = sorted(set(mech_feat) & set(ct_feat))
    m_idx, c_idx = [mech_feat[k] for k in shared], [ct_feat[k] for k in shared]
    m_err = {(int(l), int(p)): i for i, (k, l, p) in enumerate(zip(kind, layer, pos)) if k == 1}
    m_tok = {int(p): i for i, (k, p) in enumerate(zip(kind, pos)) if k == 2}
    err_pairs = [(m_err[(l, p)], Fc + l * P + p) for l in range(L) for p in range(1, P)]
    err0_pairs = [(m_err[(l, 0)], Fc + l * P) for l in range(L)]
    tok_pairs = [(m_tok[p], Fc + L * P + p) for p in range(P)]
    m_logit = {int(t): i for i, t in zip(range(len(g) - g.count("logit"), len(g)), g.logit_tokens)}
    c_logit = {int(t): Fc + (L + 1) * P + j for j, t in enumerate(ct["logit_tokens"])}
    logits = sorted(set(m_logit) & set(c_logit), key=lambda t: list(m_logit).index(t))
    src_m = torch.tensor(m_idx + [a for a, _ in err_pairs + tok_pairs])
    src_c = torch.tensor(c_idx + [b for _, b in err_pairs + tok_pairs])
    tgt_m = m_idx + [m_logit[t] for t in logits]
    tgt_c = c_idx + [c_logit[t] for t in logits]
    diff = scale = diff0 = ct0 = rel = 0.0
    e0m, e0c = torch.tensor([x for x, _ in err0_pairs]), torch.tensor([y for _, y in err0_pairs])
    for s in range(0, len(tgt_m), 1024):
        a = g.adjacency[torch.tensor(tgt_m[s:s + 1024])]
        b = A[torch.tensor(tgt_c[s:s + 1024])]
        d = (a[:, src_m] - b[:, src_c]).abs()
        diff = max(diff, float(d.max()))
        scale = max(scale, float(b[:, src_c].abs().max()))
        rel = max(rel, float((d / b[:, src_c].abs().amax(1, keepdim=True).clamp_min(1e-12)).max()))
        diff0 = max(diff0, float(a[:, e0m].abs().max()))
        ct0 = max(ct0, float(b[:, e0c].abs().max()))
    acts_m = g.value[torch.tensor(m_idx)]
    acts_c = ct["activations"][torch.tensor(c_idx)]
    probs_m = {int(t): float(p) for t, p in zip(g.logit_tokens, g.logit_probs)}
    probs_c = {int(t): float(p) for t, p in zip(ct["logit_tokens"], ct["logit_probs"])}
    return {"features": {"mechanic": len(mech_feat), "circuit_tracer": Fc, "shared": len(shared)},
            "logit_tokens": {"mechanic": [int(t) for t in g.logit_tokens], "circuit_tracer": ct["logit_tokens"].tolist()},
            "logit_prob_max_abs_diff": max(abs(probs_m[t] - probs_c[t]) for t in logits),
            "real_logits_max_abs_diff": float((real_logits.float() - ct["logits"]).abs().max()),
            "activation_max_abs_diff": float((acts_m - acts_c).abs().max()),
            "compared": {"targets": len(tgt_m), "sources": len(src_m), "edges": len(tgt_m) * len(src_m)},
            "edge_max_abs_diff": diff, "edge_max_abs": scale, "edge_max_rel_diff_per_row": rel,
            "position0_error_edges": {"mechanic_max_abs": diff0, "circuit_tracer_max_abs": ct0}}


def load_now() -> dict:
    """The machine's load averages now, and `uptime` as it prints them."""
    return {"loadavg": [round(x, 2) for x in os.getloadavg()],
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: mechanic's converted smollm2 cache)")
    p.add_argument("--transcoders", default=os.environ.get("MECHANIC_TRANSCODERS", "runs/tc_smollm2"))
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--repeats", type=int, default=1, help="timed graphs per tool, after one warm-up graph each")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-logits", type=int, default=10)
    p.add_argument("--logit-mass", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 1)))
    p.add_argument("--work", default=None, help="keep the exported transcoders and graphs here (default: a temp dir)")
    p.add_argument("--finish", default=None, metavar="LOG",
                   help="finish a run that was cut off: the rounds its stderr LOG holds and the circuit-tracer graph it "
                        "saved in --work; mechanic's graph (deterministic) is rebuilt for the edge comparison")
    a = p.parse_args()

    import torch

    import mechanic
    from mechanic.locate.graph import load_transcoders
    from mechanic.locate.graph.transcoders import save_circuit_tracer
    from mechanic.model.load import resolve

    torch.set_num_threads(a.threads)
    model_dir = Path(a.model) if a.model else resolve("smollm2")
    work = Path(a.work or tempfile.mkdtemp(prefix="graph-ct-"))
    model = mechanic.load(str(model_dir))
    tcs, where = load_transcoders(model, a.transcoders)
    save_circuit_tracer(tcs, work / "transcoders", scan="mechanic-tc_smollm2")
    ct_model = hf4_model_dir(model_dir, work / "model_hf4")
    tok = model.tokenizer
    ids = tok(a.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if int(ids[0]) not in tok.all_special_ids:       # what circuit-tracer's ensure_tokenized does
        ids = torch.cat([torch.tensor([tok.bos_token_id]), ids])
    out = {"what": "one attribution graph, mechanic vs circuit-tracer 0.5.0 (nnsight backend), same transcoders",
           "prompt": a.prompt, "tokens": len(ids), "token_ids": ids.tolist(), "transcoders": str(a.transcoders),
           "transcoder": repr(tcs[0]), "transcoder_layers": len(where),
           "settings": {"batch_size": a.batch_size, "max_logits": a.max_logits, "logit_mass": a.logit_mass,
                        "max_feature_nodes": None, "position0_features": "none (both zero it)"},
           "threads": a.threads, "repeats": a.repeats, "warmup": 1, "load_start": load_now()}
    req = {"ids": ids.tolist(), "batch_size": a.batch_size, "max_logits": a.max_logits, "logit_mass": a.logit_mass}
    if a.finish:
        rounds = [json.loads(x) for x in Path(a.finish).read_text().splitlines() if x.startswith('{"round"')]
        versions = subprocess.run([str(CT_PY), "-c", "import importlib.metadata as m, json; print(json.dumps({k: "
                                   "m.version(k) for k in ('circuit-tracer', 'nnsight', 'transformers', 'torch')}))"],
                                  capture_output=True, text=True, check=True).stdout
        out |= {"circuit_tracer": {"versions": json.loads(versions)}, "repeats": len(rounds) - 1,
                "warmup": int(rounds[0]["warmup"]), "cut_off": f"the run stopped after {len(rounds)} of "
                f"{1 + a.repeats} rounds (a foreground job took both cores); its rounds are reported as they ran, and "
                "mechanic's graph was rebuilt (it is deterministic) for the comparison with circuit-tracer's saved graph"}
        first = rounds[0][rounds[0]["order"][0]]["loadavg_1m_before"]
        out["load_start"] = {"loadavg": [first], "uptime": f"1-minute load average {first} (the run's first graph)"}
        keep, _ = mechanic_graph(model, tcs, ids[None], a)
        return finish(out, rounds, model, ids, keep, work)
    try:
        ct = CircuitTracer(ct_model, work / "transcoders", a.threads, work / "circuit_tracer.log")
    except RuntimeError as e:
        out["circuit_tracer_error"] = str(e)
        print(json.dumps(out))
        return
    out["circuit_tracer"] = ct.ready
    rounds = []
    for r in range(1 + a.repeats):
        row = {"round": r, "warmup": r == 0, "order": ["mechanic", "circuit_tracer"][::1 if r % 2 == 0 else -1]}
        for tool in row["order"]:
            before = load_now()["loadavg"][0]
            if tool == "mechanic":
                g, row["mechanic"] = mechanic_graph(model, tcs, ids[None], a)
                if r == 0:
                    keep = g
                else:
                    del g
            else:
                row["circuit_tracer"] = ct.graph({**req, "save": str(work / "ct_graph.safetensors") if r == 0 else None})
            row[tool]["loadavg_1m_before"], row[tool]["loadavg_1m_after"] = before, load_now()["loadavg"][0]
        rounds.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    ct.close()
    finish(out, rounds, model, ids, keep, work)


def finish(out: dict, rounds: list, model, ids, keep, work: Path) -> None:
    """Compare the graphs, summarise the rounds (the timed ones, or every round when none is), print the JSON."""
    import torch

    out["rounds"] = rounds
    with torch.no_grad():
        real = model.hf(input_ids=ids[None]).logits[0, -1]
    out["agreement"] = compare(keep, work / "ct_graph.safetensors", real)
    timed = rounds[1:] or rounds
    for key in ("wall_seconds", "cpu_seconds"):
        out[f"median_{key}"] = {t: round(statistics.median(x[t][key] for x in timed), 3)
                                for t in ("mechanic", "circuit_tracer")}
        out[f"ratio_{key}"] = round(out[f"median_{key}"]["circuit_tracer"] / out[f"median_{key}"]["mechanic"], 2)
    out["nodes"] = {"mechanic": rounds[0]["mechanic"]["nodes"], "circuit_tracer": rounds[0]["circuit_tracer"]["nodes"]}
    out["load_end"] = load_now()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
