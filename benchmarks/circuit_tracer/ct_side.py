"""Runs inside benchmarks/.venv-circuit-tracer: circuit-tracer's own attribution graphs, for graph_circuit_tracer.py.

usage: ct_side.py --model DIR --transcoders DIR [--threads N]

Loads the model with circuit-tracer's nnsight backend (its ReplacementModel on the Hugging Face forward; the
default TransformerLens backend cannot load SmolLM2) and mechanic's transcoders from the transcoder_set directory
mechanic.locate.graph.save_circuit_tracer wrote, read by circuit-tracer's own loader. circuit-tracer's files
have no TopK, so the activation of a set whose config.yaml says `activation_function: topk` is set to
circuit-tracer's own TopK(k) followed by ReLU (mechanic's and SAELens's TopK keep only positive activations).
Prints one JSON line when ready, then serves one graph per JSON line on stdin ({"ids", "batch_size",
"max_logits", "logit_mass", "save"}), answering with one JSON line of timings (wall and this process's CPU
seconds around circuit-tracer's attribute() alone); with "save", also writes the graph's adjacency, node
table and real logits as safetensors.
"""

import argparse
import json
import sys
import time
from importlib import metadata as md

T0 = time.perf_counter()

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(a):
    from torch import nn
    from circuit_tracer.replacement_model import ReplacementModel
    from circuit_tracer.transcoder.activation_functions import TopK
    from circuit_tracer.utils.hf_utils import load_transcoders

    cfg = yaml.safe_load(open(f"{a.transcoders}/config.yaml"))
    # eager weights (lazy_decoder=True, circuit-tracer's default, re-reads decoder rows from disk per graph)
    tcs = load_transcoders(cfg, device=torch.device("cpu"), dtype=torch.float32, lazy_encoder=False,
                           lazy_decoder=False)
    if cfg.get("activation_function") == "topk":
        for tc in tcs:
            tc.activation_function = nn.Sequential(TopK(int(cfg["k"])), nn.ReLU())
    model = ReplacementModel.from_pretrained_and_transcoders(a.model, tcs, backend="nnsight",
                                                             device=torch.device("cpu"), dtype=torch.float32)
    return model


def graph(model, req: dict) -> dict:
    from circuit_tracer import attribute

    ids = torch.tensor(req["ids"])
    w0, c0 = time.perf_counter(), time.process_time()
    g = attribute(ids, model, max_n_logits=req["max_logits"], desired_logit_prob=req["logit_mass"],
                  batch_size=req["batch_size"], max_feature_nodes=None)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    out = {"wall_seconds": round(wall, 3), "cpu_seconds": round(cpu, 3), "nodes": int(g.adjacency_matrix.shape[0]),
           "features": int(len(g.selected_features)), "peak_rss_mb": round(peak_rss_mb(), 1)}
    if req.get("save"):
        with torch.no_grad(), model.trace(ids):
            from nnsight import save
            logits = save(model.output.logits)
        feats = g.active_features[g.selected_features]
        save_file({"adjacency": g.adjacency_matrix.float().contiguous(), "features": feats.long().contiguous(),
                   "activations": g.activation_values[g.selected_features].float().contiguous(),
                   "logit_tokens": g.logit_token_ids.long().cpu(), "logit_probs": g.logit_probabilities.float().cpu(),
                   "tokens": g.input_tokens.long().cpu(), "logits": logits[0, -1].float().contiguous()}, req["save"])
        out["saved"] = req["save"]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--transcoders", required=True)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = load(a)
    versions = {k: md.version(k) for k in ("circuit-tracer", "nnsight", "transformers", "torch")}
    print(json.dumps({"ready": True, "load_seconds": round(time.perf_counter() - T0, 1), "versions": versions,
                      "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(graph(model, json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
