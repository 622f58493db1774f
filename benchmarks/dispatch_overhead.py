"""Overhead of mechanic's hooks on a dispatched model: SmolLM2 spread over the CPU and disk (accelerate, offload_folder)
timed plainly (the Hugging Face forward, no mechanic hook) and through mechanic with caches and interventions active,
in interleaved rounds in one process. The last stdout line is the JSON result (benchmarks/run.py section
dispatch_overhead)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "peers"))

import torch  # noqa: E402
from _common import log, make_batch, setup_torch  # noqa: E402

import mechanic  # noqa: E402
from mechanic.model.interventions import Intervention  # noqa: E402

HERE = Path(__file__).resolve().parent


def device_map(model) -> dict:
    """Embedding, final norm, unembedding and the first half of the layers on the CPU; the second half on disk."""
    n, layers = model.dims.n_layers, model.arch.layers
    top = {name for name, _ in model.hf.named_modules() if name and "." not in name}
    out = {f"{layers}.{i}": "cpu" if i < n // 2 else "disk" for i in range(n)}
    parent = layers.rsplit(".", 1)[0]
    for name, _ in model.hf.get_submodule(parent).named_children():
        if f"{parent}.{name}" != layers:
            out[f"{parent}.{name}"] = "cpu"
    out.update({name: "cpu" for name in top if name != parent.split(".")[0]})
    return out


def hooks(model) -> tuple[list[str], list[Intervention]]:
    """Caches and interventions on CPU-resident and disk-offloaded layers alike, at every position."""
    n, d = model.dims.n_layers, model.dims.d_model
    low, high = n // 4, 3 * n // 4   # one CPU layer, one disk layer
    sites = [f"L{low}.resid_post", f"L{low}.attn_out", f"L{high}.resid_post", f"L{high}.head1.z"]
    vec = torch.randn(d, generator=torch.Generator().manual_seed(0))
    ivs = [Intervention(f"L{high}.resid_post", "add", vec, coef=2.0),        # steering vector, disk layer
           Intervention(f"L{high + 2}.head2", "replace", 0.0),              # zero-ablate a head, disk layer
           Intervention(f"L{low}.mlp_out", "scale", 0.5)]                   # scale an MLP, CPU layer
    return sites, ivs


def timed(fns: dict, repeats: int, warmup: int) -> dict:
    """Each fn once per round, in dict order, the first `warmup` rounds untimed: per-round wall seconds and CPU
    seconds of this process (on a shared machine the CPU time of a 1-thread process is the steadier measure)."""
    out = {k: {"wall": [], "cpu": []} for k in fns}
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            w, c = time.perf_counter() - w, time.process_time() - c
            if r >= warmup:
                out[k]["wall"].append(w)
                out[k]["cpu"].append(c)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="HF save_pretrained directory of SmolLM2 (benchmarks/run.py)")
    p.add_argument("--prompts", default=str(HERE / "data" / "prompts_resid.json"))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    setup_torch()
    ref = mechanic.load(args.model)
    with tempfile.TemporaryDirectory(prefix="mechanic-offload-") as folder:
        dmap = device_map(ref)
        model = mechanic.load(args.model, device_map=dmap, offload_folder=folder)
        places = model.hf.hf_device_map
        assert set(places.values()) == {"cpu", "disk"}, places
        sites, ivs = hooks(model)
        cases = {"batch": make_batch(model.tokenizer, args.prompts)}
        one = Path(folder) / "one_prompt.json"
        one.write_text(json.dumps(json.loads(Path(args.prompts).read_text())[:1]))
        cases["one_prompt"] = make_batch(model.tokenizer, str(one))
        out = {"model": "SmolLM2-135M-Instruct", "version": version("mechanic"),
               "transformers": version("transformers"), "accelerate": version("accelerate"), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "repeats": args.repeats, "warmup": args.warmup,
               "layers_on_disk": sum(v == "disk" for v in places.values()),
               "layers_on_cpu": sum(v == "cpu" and k.startswith(model.arch.layers) for k, v in places.items()),
               "sites": sites, "interventions": [f"{iv.op} {iv.site}" for iv in ivs], "cases": {}}
        for name, batch in cases.items():
            plain = lambda b=batch: model.hf(**b, use_cache=False)   # noqa: E731 - the same forward mechanic runs
            fns = {"plain": plain,
                   "run": lambda b=batch: model.run(b),
                   "cache": lambda b=batch: model.run(b, cache=sites),
                   "cache_and_interventions": lambda b=batch: model.run(b, cache=sites, interventions=ivs)}
            with torch.no_grad():
                t0 = time.perf_counter()
                times = timed(fns, args.repeats, args.warmup)
                for clock in ("wall", "cpu"):
                    plain_s = statistics.median(times["plain"][clock])
                    log(f"{name}, {clock} ({time.perf_counter() - t0:.0f} s): " + ", ".join(
                        f"{k} {statistics.median(v[clock]) / plain_s:.3f}x" for k, v in times.items()))
                # checked after timing: hooks that do nothing leave the forward bit for bit; the dispatched model
                # equals the undispatched one; the interventions change the logits
                logits = plain().logits
                checks = {"run_equals_plain": bool(model.run(batch).logits.equal(logits)),
                          "dispatched_equals_undispatched": bool(ref.hf(**batch, use_cache=False).logits.equal(logits)),
                          "cache_equals_undispatched": all(
                              model.run(batch, cache=sites)[s].equal(ref.run(batch, cache=sites)[s]) for s in sites),
                          "interventions_change_logits": not model.run(batch, interventions=ivs).logits.equal(logits),
                          "intervened_equals_undispatched": bool(model.run(batch, interventions=ivs).logits.equal(
                              ref.run(batch, interventions=ivs).logits))}
            assert all(checks.values()), checks
            out["cases"][name] = {"shape": list(batch["input_ids"].shape), "seconds": times, "checks": checks}
        assert model.hook_count() == 0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
