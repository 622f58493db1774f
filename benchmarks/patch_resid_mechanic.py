"""mechanic side of the patching benchmark: resid_pre layers x positions for one clean/corrupted pair, against a
naive one-hook-per-run loop and simple batching (64 runs a forward) written with plain torch hooks.

Every method is timed with benchmarks/peers/_common.time_against_plain, as the TransformerLens side is: the same
repeats after the same warm-up, each run preceded by a plain HF forward of the corrupted prompt."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "peers"))

import torch  # noqa: E402
from _common import setup_torch, time_against_plain  # noqa: E402

import mechanic  # noqa: E402
from mechanic.locate.causal import patch  # noqa: E402
from mechanic.tasks import Example, Task  # noqa: E402


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


def flop_floor(model, pair, computed_cells) -> dict:
    """FLOPs each way of computing the grid, counted from the model's shapes (multiply-adds x 2).

    floor: what causal reuse must compute, the patched run (l, p) recomputing layers l.. at columns p.. (its
    linear layers, and attention over columns 0..q for each query column q) and the unembedding at the last
    column only; floor_two_columns: the same with only the two vocabulary columns a logit difference reads (what
    mechanic computes); naive: every run a full forward of every column with logits at the last column."""
    hf, L = model.hf, model.dims.n_layers
    S = len(pair["clean_ids"])
    linear = 2 * sum(m.weight.numel() for m in model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    attn = 2 * 2 * model.dims.n_heads * model.dims.d_head             # q.k and p.v, per query column per key
    unembed = 2 * hf.get_output_embeddings().weight.numel()

    def run(l, p):   # layers l.., columns p..
        return (L - l) * sum(linear + attn * (q + 1) for q in range(p, S)) + unembed
    floor = sum(run(l, p) for l, p in computed_cells)
    naive = L * S * run(0, 0)
    two_columns = floor - len(computed_cells) * (unembed - 2 * 2 * hf.get_output_embeddings().weight.shape[1])
    return {"linear_flop_per_token_layer": linear, "unembed_flop_per_token": unembed,
            "floor_gflop": floor / 1e9, "naive_gflop": naive / 1e9, "floor_two_columns_gflop": two_columns / 1e9}


def matmul_speed(repeats: int = 20) -> float:
    """GFLOP/s of an MLP-shaped fp32 matmul ([512, 576] x [576, 1536]) in this process now (median)."""
    import time

    x, w = torch.randn(512, 576), torch.randn(1536, 576)
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        times.append(time.perf_counter() - t)
    return 2 * 512 * 576 * 1536 / sorted(times)[len(times) // 2] / 1e9


def counted_gflop(fn) -> float:
    """GFLOP torch's FLOP counter sees in one call of fn (matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--pair", required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--naive", action="store_true", help="Also time the one-run-per-patch loop (slow).")
    args = p.parse_args()
    setup_torch()
    pair = json.load(open(args.pair))
    model = mechanic.load(args.model)
    task = Task("pair", [Example(pair["clean"], pair["answer"], pair["wrong"], pair["corrupted"])])
    ids = task.tokenize(model)
    assert ids.clean["input_ids"][0].tolist() == pair["clean_ids"]
    assert ids.corrupted["input_ids"][0].tolist() == pair["corrupted_ids"]
    corr = torch.tensor([pair["corrupted_ids"]])
    fns = {"tool": lambda: patch(model, task, "resid_pre", positions="all", progress=False),
           "every": lambda: patch(model, task, "resid_pre", positions="all", progress=False, skip_unchanged=False),
           "batched64": lambda: plain_runs(model, pair, 64)}
    if args.naive:
        fns["naive"] = lambda: plain_runs(model, pair, 1)
    times, outs = time_against_plain(lambda: model.hf(corr), fns, args.repeats, args.warmup)
    result = {"peer": "mechanic", "version": mechanic.__version__, "transformers": __import__("transformers").__version__,
              "torch": torch.__version__, "repeats": args.repeats, "warmup": args.warmup,
              "plain_s": times.pop("plain"), "tool_s": times.pop("tool"), "values": outs["tool"].values.tolist(),
              "runs_computed": outs["tool"].settings["runs_computed"],
              "runs_unchanged": outs["tool"].settings["runs_unchanged"],
              "every_s": times["every"], "every_values": outs["every"].values.tolist(),
              "every_runs_computed": outs["every"].settings["runs_computed"],
              "batched64_s": times["batched64"], "batched64_values": outs["batched64"].tolist()}
    tool = outs["tool"]
    # the cells whose patch changes something: the residual differs at every layer from the first differing
    # column on, and at layer 0 (the embedding) wherever the tokens differ
    c, k = pair["clean_ids"], pair["corrupted_ids"]
    shared = next((i for i, (a, b) in enumerate(zip(c, k)) if a != b), len(c))
    cells = [(l, p) for l in range(model.dims.n_layers) for p in range(shared, len(c)) if l > 0 or c[p] != k[p]]
    assert len(cells) == tool.settings["runs_computed"], (len(cells), tool.settings["runs_computed"])
    result["flops"] = {**flop_floor(model, pair, cells), "tool_counted_gflop": counted_gflop(fns["tool"]),
                       "matmul_gflops": matmul_speed(), "threads": torch.get_num_threads()}
    if args.naive:
        result["naive_s"] = times["naive"]
        result["naive_values"] = outs["naive"].tolist()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
