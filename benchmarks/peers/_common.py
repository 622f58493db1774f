"""Shared harness for the peer resid-cache benchmarks: CLI, model load, left-padded batch, interleaved timing, JSON report."""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from importlib.metadata import version
from typing import Callable

import torch


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="HF save_pretrained directory (Llama arch)")
    p.add_argument("--prompts", required=True, help="JSON file: list of prompt strings")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args()


def setup_torch() -> None:
    """Threads from $BENCH_THREADS (benchmarks/run.py --threads; 2 by default), no autograd."""
    import os

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.set_grad_enabled(False)


def load_model(model_dir: str):
    """fp32, eval model + tokenizer from a local dir (never touches the hub)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    # A config saved by transformers>=5 keeps rope_theta under `rope_parameters`;
    # transformers 4.x ignores that key and silently falls back to rope_theta=1e4.
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope and getattr(config, "rope_theta", None) != rope["rope_theta"]:
        if rope.get("rope_type", "default") != "default":
            raise SystemExit(f"unsupported rope_parameters for transformers 4.x: {rope}")
        log(f"config: rope_theta {config.rope_theta} -> {rope['rope_theta']} (from rope_parameters)")
        config.rope_theta = rope["rope_theta"]
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, config=config, dtype=torch.float32, local_files_only=True
    )
    model.eval()
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except ValueError as e:  # tokenizer_class "TokenizersBackend" is transformers>=5 only
        from transformers import PreTrainedTokenizerFast

        log(f"tokenizer: {e} -> PreTrainedTokenizerFast")
        tok = PreTrainedTokenizerFast.from_pretrained(model_dir, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok


def make_batch(tok, prompts_file: str) -> dict[str, torch.Tensor]:
    """All prompts as one left-padded batch, with mask-derived position_ids."""
    with open(prompts_file) as f:
        prompts = json.load(f)
    if tok.pad_token is None:
        tok = copy.deepcopy(tok)
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    mask = enc["attention_mask"]
    assert bool(mask[:, -1].all()), "expected left padding"
    pos = mask.long().cumsum(-1) - 1
    pos.masked_fill_(mask == 0, 1)
    log(f"batch: {tuple(enc['input_ids'].shape)}, real tokens/prompt {mask.sum(-1).tolist()}")
    return {"input_ids": enc["input_ids"], "attention_mask": mask, "position_ids": pos}


def shared_weight_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A structurally separate copy of `model` whose parameters ARE `model`'s tensors.

    Peers instrument the module tree in place (TransformerBridge swaps in its own
    components, nnsight installs a controller `forward` on every module), so the
    plain-HF baseline runs on this untouched twin: same weight storage, same
    process, no peer code on its path.
    """
    twin = copy.deepcopy(model)
    twin.load_state_dict(model.state_dict(), assign=True)
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert a.data_ptr() == b.data_ptr(), n
    gc.collect()
    return twin.eval()


def plain_forward(model, batch):
    return model(**batch)


def reference_layers(model, batch) -> tuple[list[torch.Tensor], bool]:
    """Each decoder layer's output from a plain HF forward; also whether hidden_states[-1] is post-norm."""
    pre_norm = {}
    h = model.model.norm.register_forward_pre_hook(lambda m, a: pre_norm.__setitem__("x", a[0]))
    try:
        out = model(**batch, output_hidden_states=True)
    finally:
        h.remove()
    hs = out.hidden_states  # (embeddings, layer 0 .. layer L-1) -- last one may be normed
    last = pre_norm["x"]
    post_norm = not torch.allclose(hs[-1], last) and torch.allclose(hs[-1], model.model.norm(last))
    return [*hs[1:-1], last], post_norm


def max_abs_diff(got: list[torch.Tensor], ref: list[torch.Tensor], mask: torch.Tensor) -> float:
    """Max |got - ref| over all layers, real (unpadded) tokens only."""
    assert len(got) == len(ref), (len(got), len(ref))
    keep = mask.bool()
    return max(float((g[keep] - r[keep]).abs().max()) for g, r in zip(got, ref))


def verify(got: list[torch.Tensor], plain, batch) -> tuple[float, dict]:
    """Compare cached layer outputs with the plain forward (real tokens only).

    Returns (max_abs_diff vs the timed plain forward, meta). Layer outputs of this
    model reach |x|~2e4, where SDPA vs eager attention alone differs by ~5e-4; so a
    peer that re-implements attention eagerly is also checked against an eager
    plain forward before being called wrong.
    """
    keep = batch["attention_mask"].bool()
    ref, post_norm = reference_layers(plain, batch)
    diff = max_abs_diff(got, ref, batch["attention_mask"])
    meta = {"n_layers_cached": len(got), "batch_shape": list(batch["input_ids"].shape),
            "resid_absmax": float(max(r[keep].abs().max() for r in ref)),
            "hf_hidden_states_last_is_post_norm": post_norm}
    ok = diff <= 1e-4
    if not ok:
        impl = plain.config._attn_implementation
        plain.set_attn_implementation("eager")
        try:
            meta["max_abs_diff_vs_eager"] = max_abs_diff(got, reference_layers(plain, batch)[0], batch["attention_mask"])
        finally:
            plain.set_attn_implementation(impl)
        assert plain.config._attn_implementation == impl
        ok = meta["max_abs_diff_vs_eager"] <= 1e-4
    meta["ok"] = ok
    log(f"verify: max_abs_diff {diff:.3g} (resid |x| max {meta['resid_absmax']:.0f})"
        + (f", vs eager plain {meta['max_abs_diff_vs_eager']:.3g}" if "max_abs_diff_vs_eager" in meta else "")
        + f" -> {'OK' if ok else 'MISMATCH'}; hidden_states[-1] post-norm: {post_norm}")
    return diff, meta


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Run each fn once per round, in dict order, warmup rounds untimed; per-round seconds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
            del out
            if r >= warmup:
                times[k].append(dt)
    return times


def time_against_plain(plain: Callable[[], object], fns: dict[str, Callable[[], object]], repeats: int,
                       warmup: int) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Slow methods timed with the plain forward right before each run, so their ratio cancels machine noise.

    Round r runs, for every method k in order: plain(), then fn_k(). Rounds < warmup are untimed. Returns
    (seconds: {"plain": [...repeats * len(fns)], k: [...repeats]}, the last output of each method). Every
    benchmark process (mechanic or peer) calls this with the same repeats and warmup.
    """
    times: dict[str, list[float]] = {"plain": [], **{k: [] for k in fns}}
    outs: dict[str, object] = {}
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            plain()
            t1 = time.perf_counter()
            outs[k] = fn()
            t2 = time.perf_counter()
            if r >= warmup:
                times["plain"].append(t1 - t0)
                times[k].append(t2 - t1)
            log(f"round {r}{' (warm-up)' if r < warmup else ''}: plain {1e3 * (t1 - t0):.0f} ms, {k} {t2 - t1:.2f} s")
    return times, outs


def report(peer: str, package: str, times: dict[str, list[float]], diff: float, meta: dict) -> None:
    """Print the one JSON object to stdout; medians and ratios to stderr."""
    plain = times.pop("plain")
    tool = times.pop("tool")
    med = statistics.median(plain)
    log(f"median plain {med * 1e3:.1f} ms; tool {statistics.median(tool) * 1e3:.1f} ms "
        f"({statistics.median(tool) / med:.2f}x)")
    for k, v in times.items():
        log(f"median {k} {statistics.median(v) * 1e3:.1f} ms ({statistics.median(v) / med:.2f}x)")
    print(json.dumps({
        "peer": peer,
        "version": version(package),
        "transformers": version("transformers"),
        "torch": torch.__version__,
        "plain_s": plain,
        "tool_s": tool,
        "extra": times,
        "max_abs_diff": diff,
        "meta": meta,
    }))
