"""GPU check (issue 15 item 6): the default model on one device in a low-precision dtype, checked and timed
against plain transformers in a few minutes, so anyone with a GPU can see mechanic works there.

    bash benchmarks/gpu_check.sh                 # cuda, bfloat16, SmolLM2-135M-Instruct
    python benchmarks/gpu_check.py --device cpu --dtype float32 --model tiny   # the same on this machine

Four checks, each printed as a row (and written as JSON with --out):
  parity    mechanic's forward (with a full residual cache) vs the plain HF forward: max |logit diff|,
            and cached resid_post of every layer vs HF's hidden states
  patching  activation patching of resid_pre over every (layer, position) of one IOI pair vs a plain
            hook loop with the same batching: max |score diff| and the time ratio (plain / mechanic)
  steering  greedy generation with a vector added at one layer: tokens equal to a plain forward-hook
            version, and the time ratio
  memory    peak device memory (CUDA only)
Tolerances scale with the dtype (bfloat16 rounds to ~3 significant digits); the script exits 1 when a
check fails, so it can gate a machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import mechanic
from mechanic.locate.causal import patch
from mechanic.model.interventions import add
from mechanic.tasks import Example, Task

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"   # S2 -> IO flips the answer
TOL = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2e-1}   # logit units, relative to typical |logit| ~ 20


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int = 3):
    """(result, median seconds) after one warm-up."""
    fn()
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return out, sorted(times)[len(times) // 2]


def load(spec: str, device: str, dtype: torch.dtype):
    if spec == "tiny":      # a tiny random llama with a real-word tokenizer: checks the script, not a GPU
        from mechanic.testing.tiny import tiny_model, word_tokenizer
        tok = word_tokenizer()
        return mechanic.load(tiny_model("llama", vocab_size=len(tok)), tokenizer=tok, device=device, dtype=dtype)
    return mechanic.load(spec, device=device, dtype=dtype)


def check_parity(m, device: str) -> dict:
    ids = m.tokenizer([CLEAN], return_tensors="pt").to(device)
    with torch.no_grad():
        ref = m.hf(**ids, output_hidden_states=True)
        sites = [f"L{layer}.resid_post" for layer in range(m.dims.n_layers)]
        out = m.run(ids, cache=sites)
    logit = float((out.logits.float() - ref.logits.float()).abs().max())
    # HF's last hidden state is after the final norm; compare the layers below it
    resid = max(float((out.cache[f"L{layer}.resid_post"].float() - ref.hidden_states[layer + 1].float()).abs().max())
                for layer in range(m.dims.n_layers - 1))
    return {"max_logit_diff": logit, "max_resid_diff": resid}


def plain_patching(m, clean_ids, corr_ids, answer: int, wrong: int) -> torch.Tensor:
    """resid_pre(l, p) of the clean run patched into the corrupted run with plain forward pre-hooks, one layer a forward."""
    hf, L, P = m.hf, m.dims.n_layers, clean_ids.shape[1]
    with torch.no_grad():
        hs = hf(clean_ids, output_hidden_states=True).hidden_states

        def ld(logits):
            return (logits[:, -1, answer] - logits[:, -1, wrong]).float()
        c, k = ld(hf(clean_ids).logits), ld(hf(corr_ids).logits)
        out = torch.zeros(L, P)
        for layer in range(L):
            def hook(mod, args, layer=layer):
                x = args[0].clone()
                idx = torch.arange(P, device=x.device)
                x[idx, idx] = hs[layer][0, idx]
                return (x,) + args[1:]
            h = m.layers[layer].register_forward_pre_hook(hook)
            try:
                out[layer] = ((ld(hf(corr_ids.expand(P, P)).logits) - k) / (c - k)).cpu()
            finally:
                h.remove()
    return out


def check_patching(m, device: str) -> dict:
    tok = m.tokenizer
    answer, wrong = tok(" Mary", add_special_tokens=False)["input_ids"][0], tok(" John", add_special_tokens=False)["input_ids"][0]
    task = Task("pair", [Example(CLEAN, " Mary", " John", CORRUPT)])
    b = task.tokenize(m)
    clean, corr = b.clean["input_ids"].to(device), b.corrupted["input_ids"].to(device)
    ours, t_ours = timed(lambda: patch(m, task, "resid_pre", positions="all", progress=False, skip_unchanged=False), device)
    ref, t_ref = timed(lambda: plain_patching(m, clean, corr, answer, wrong), device)
    return {"max_score_diff": float((ours.values.float().cpu() - ref).abs().max()), "seconds": t_ours,
            "plain_seconds": t_ref, "ratio_plain_over_mechanic": t_ref / t_ours}


def check_steering(m, device: str, new: int = 24) -> dict:
    layer = m.dims.n_layers // 2
    g = torch.Generator().manual_seed(0)
    vec = torch.randn(m.dims.d_model, generator=g)
    vec = (4 * vec / vec.norm()).to(device=device, dtype=next(m.hf.parameters()).dtype)
    inputs = m.tokenizer(["The weather today is", "My favourite food is"], return_tensors="pt", padding=True).to(device)
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=m.tokenizer.pad_token_id)

    def plain():
        h = m.layers[layer].register_forward_hook(
            lambda mod, a, o: ((o[0] + vec,) + tuple(o[1:])) if isinstance(o, tuple) else o + vec)
        try:
            with torch.no_grad():
                return m.hf.generate(**inputs, **gen)
        finally:
            h.remove()

    ivs = [add(f"L{layer}.resid_post", vec, coef=1.0)]
    ours, t_ours = timed(lambda: m.generate(inputs, interventions=ivs, **gen), device)
    ref, t_ref = timed(plain, device)
    ours_ids = ours if torch.is_tensor(ours) else ours.sequences
    return {"same_tokens": bool(torch.equal(ours_ids.cpu(), ref.cpu())), "seconds": t_ours, "plain_seconds": t_ref,
            "ratio_plain_over_mechanic": t_ref / t_ours}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch (torch.cuda.is_available() is False). Install a CUDA "
              "build of torch on the GPU machine, or run with --device cpu to check this script here.")
        return 2
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    m = load(args.model, args.device, dtype)
    res = {"model": args.model, "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
           "load_seconds": time.perf_counter() - t0}
    if args.device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name(0)
        torch.cuda.reset_peak_memory_stats()
    res["parity"] = check_parity(m, args.device)
    res["patching"] = check_patching(m, args.device)
    res["steering"] = check_steering(m, args.device)
    if args.device.startswith("cuda"):
        res["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    tol = TOL[dtype]
    ok = {"parity": res["parity"]["max_logit_diff"] <= tol,
          "patching": res["patching"]["max_score_diff"] <= max(1e-4, 50 * tol),
          "steering": res["steering"]["same_tokens"] or dtype != torch.float32}
    res["ok"] = ok
    for k in ("parity", "patching", "steering"):
        print(f"{k:9s} {'ok  ' if ok[k] else 'FAIL'} {json.dumps(res[k])}")
    if "peak_memory_gib" in res:
        print(f"memory    peak {res['peak_memory_gib']:.2f} GiB on {res['gpu']}")
    if args.out:
        from mechanic.files import write_text
        write_text(args.out, json.dumps(res, indent=1))
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
