"""Half precision: bfloat16 and float16 runs match float32 on every architecture within a tolerance derived from the
dtype's unit roundoff and the number of roundings on the way to each site (docs/ENGINE.md, "Big models"), dispatched
or not, and the default GGUF model loads in both."""

import math

import pytest
import torch

import mechanic
from mechanic.testing.tiny import CONFIGS, left_padded, tiny_model

LENGTHS = [6, 3, 5]
PER_LAYER = 24    # sequential roundings through one decoder layer (norm 3, qkv 1, rope 1, scores 1, softmax 1,
                  # mix 1, o_proj 1, add 1, norm 3, gate/up 1, act 1, mul 1, down 1, add 1, weights 4, slack 2)
LAMBDA = 3.0      # Higham & Mary (2019): error <= lambda sqrt(k) u with probability >= 1 - 2 exp(-lambda^2 / 2)


def roundings(site: str, n_layers: int) -> int:
    """k: roundings from the token embedding to `site` (a site inside layer L counts the whole layer)."""
    if site == "logits":
        return 1 + PER_LAYER * n_layers + 5      # final norm 3, lm_head weight and output
    if site == "final":
        return 1 + PER_LAYER * n_layers + 3
    if site == "embed":
        return 1
    layer = int(site[1:site.index(".")])
    return 1 + PER_LAYER * (layer + 1)


def tolerance(site: str, dtype: torch.dtype, n_layers: int) -> float:
    """Relative (Frobenius) error allowed at `site`: lambda sqrt(k) u, with u = eps / 2 the unit roundoff."""
    return LAMBDA * math.sqrt(roundings(site, n_layers)) * torch.finfo(dtype).eps / 2


def sites(model) -> list[str]:
    return [str(s) for s in model.sites() if not str(s).endswith(("expert", "router", "shared_expert"))]


def routes(model, batch) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """(router logits, chosen expert ids) of every MoE layer for `batch`, read off the router modules' outputs."""
    got, handles = {}, []
    for L in range(model.dims.n_layers):
        if model.is_moe(L):
            def keep(mod, args, out, L=L):
                got[L] = (out[0].detach().float(), out[2].detach().sort(-1).values)
            handles.append(model.layer_module(L, model.arch.router).register_forward_hook(keep))
    try:
        model.run(batch)
    finally:
        for h in handles:
            h.remove()
    return got


def flipped(ref, low, batch, dtype) -> dict[int, int]:
    """Rows whose top-k expert choice differs between the runs: row -> first layer where it does. Each must be a
    near tie in float32 (a gap between the k-th and (k+1)-th router logit that the admitted error can close);
    past it the run takes another branch of the model, where no rounding bound applies."""
    out: dict[int, int] = {}
    a, b = routes(ref, batch), routes(low, batch)
    width = batch["input_ids"].shape
    for L in sorted(a):
        logits, ids = a[L]
        differs = (ids != b[L][1]).any(-1).view(width)
        for row, col in differs.nonzero().tolist():
            top = logits.view(*width, -1)[row, col].sort(descending=True).values
            k = ids.shape[-1]
            gap, scale = (top[k - 1] - top[k]).item(), top.abs().max().item()
            assert gap <= 2 * tolerance(f"L{L}.resid_mid", dtype, ref.dims.n_layers) * scale, (L, row, col, gap)
            out.setdefault(row, L)
    return out


def check_close(ref, low, dtype):
    """Every site and the logits of `low` within tolerance of `ref`, on real (unpadded) tokens; errors are not 0."""
    batch = left_padded(LENGTHS)
    real = batch["attention_mask"].bool()
    names = sites(ref)
    a, b = ref.run(batch, cache=names), low.run(batch, cache=names)
    flips = flipped(ref, low, batch, dtype)
    assert len(flips) < len(LENGTHS)
    for s in names + ["logits"]:
        layer = ref.dims.n_layers if s in ("final", "logits") else (-1 if s == "embed" else int(s[1:s.index(".")]))
        keep = real.clone()
        for row, L in flips.items():
            keep[row] &= layer < L
        x, y = a[s][keep].double(), b[s][keep].double()
        assert b[s].dtype == dtype, s
        rel = ((y - x).norm() / x.norm()).item()
        tol = tolerance(s, dtype, ref.dims.n_layers)
        assert rel <= tol, f"{s}: relative error {rel:.3g} > {tol:.3g}"
    assert not torch.equal(a.logits, b.logits.float())   # really computed in the low precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_half_precision_matches_float32_within_derived_tolerance(arch, dtype):
    ref = mechanic.load(tiny_model(arch))
    low = mechanic.load(tiny_model(arch), dtype=dtype)
    assert {p.dtype for p in low.hf.parameters()} == {dtype}
    check_close(ref, low, dtype)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2_moe"])
def test_half_precision_disk_offload_equals_undispatched_half(arch, tmp_path):
    """A float32 checkpoint loaded as bfloat16 with disk offload: offloaded weights are converted once into
    offload_folder, and the run equals the undispatched bfloat16 load bit for bit."""
    tiny_model(arch).save_pretrained(tmp_path / "ckpt")
    ckpt = str(tmp_path / "ckpt")
    plain = mechanic.load(ckpt, dtype="bf16")
    big = mechanic.load(ckpt, dtype=torch.bfloat16, device_map={"": "disk"}, offload_folder=tmp_path / "off")
    assert {p.dtype for p in big.hf.parameters()} == {torch.bfloat16}
    assert any(p.name.startswith("mechanic-") for p in (tmp_path / "off").iterdir())
    batch = left_padded(LENGTHS)
    names = sites(plain)
    a, b = plain.run(batch, cache=names), big.run(batch, cache=names)
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(a[s], b[s]) for s in names)
    check_close(mechanic.load(ckpt), big, torch.bfloat16)


@pytest.mark.real
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_default_gguf_model_loads_in_half_precision(smollm2, dtype):
    """The GGUF file is dequantized to a float32 cache once; the half-precision load casts that cache."""
    low = mechanic.load("smollm2", dtype=dtype)
    assert {p.dtype for p in low.hf.parameters()} == {dtype}
    prompt = ["The capital of France is"]
    x, y = smollm2.run(prompt).logits[0, -1].double(), low.run(prompt).logits[0, -1].double()
    rel = ((y - x).norm() / x.norm()).item()
    assert 0 < rel <= tolerance("logits", dtype, smollm2.dims.n_layers)
