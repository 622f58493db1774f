"""Dictionary maths against hand-written references, the SAELens file format, hook names and clear errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

import mechanic
from mechanic.features import Dictionary, FeaturesError, load, save
from mechanic.features.hooknames import hook_from_site, site_from_hook
from mechanic.testing.tiny import tiny_model

D_IN, D_SAE = 12, 40


def rand(d: Dictionary, seed: int = 0) -> Dictionary:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in d.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.4 if name.startswith("W") else 0.2))
        if hasattr(d, "threshold"):
            d.threshold.copy_(torch.rand(d.threshold.shape, generator=g) * 0.3)
    return d


def naive_encode(d: Dictionary, x: torch.Tensor) -> torch.Tensor:
    """Per-token loops, written from the papers' definitions rather than from Dictionary."""
    out = torch.zeros(x.shape[0], d.d_sae)
    for t in range(x.shape[0]):
        s = x[t] - (d.b_dec if d.apply_b_dec_to_input else 0)
        if d.architecture == "gated":
            for i in range(d.d_sae):
                gate = float(s @ d.W_enc[:, i] + d.b_gate[i]) > 0
                mag = float(s @ d.W_enc[:, i] * d.r_mag[i].exp() + d.b_mag[i])
                out[t, i] = max(mag, 0.0) if gate else 0.0
            continue
        pre = [float(s @ d.W_enc[:, i] + d.b_enc[i]) for i in range(d.d_sae)]
        if d.architecture == "relu":
            out[t] = torch.tensor([max(p, 0.0) for p in pre])
        elif d.architecture == "topk":
            order = sorted(range(d.d_sae), key=lambda i: -pre[i])[: d.k]
            for i in order:
                out[t, i] = max(pre[i], 0.0)
        else:  # jumprelu, batchtopk at inference
            out[t] = torch.tensor([p if p > float(d.threshold[i]) and p > 0 else 0.0 for i, p in enumerate(pre)])
    return out


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "gated"])
def test_encode_decode_match_naive_references(arch):
    d = rand(Dictionary(D_IN, D_SAE, arch, k=5 if arch in ("topk", "batchtopk") else None, site="L0.resid_post"))
    x = torch.randn(9, D_IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        acts = d.encode(x)
        ref = naive_encode(d, x)
        assert (acts - ref).abs().max() < 1e-5
        assert 0 < int((acts != 0).sum()) < acts.numel()            # neither all off nor all on
        recon = torch.stack([sum(acts[t, i] * d.W_dec[i] for i in range(D_SAE)) + d.b_dec for t in range(9)])
        assert (d.decode(acts) - recon).abs().max() < 1e-5
        assert (d(x) - recon).abs().max() < 1e-5
    if arch == "topk":
        assert ((acts != 0).sum(-1) <= 5).all()


def test_transcoder_skip_and_normalisations_match_references():
    t = rand(Dictionary(D_IN, D_SAE, "relu", site="L0.mlp_in", out_site="L0.mlp_out", skip=True))
    x = torch.randn(6, D_IN)
    with torch.no_grad():
        ref = torch.relu(x @ t.W_enc + t.b_enc) @ t.W_dec + t.b_dec + x @ t.W_skip.T   # no b_dec on a transcoder input
        assert (t(x) - ref).abs().max() < 1e-5 and not t.apply_b_dec_to_input
        for norm in ("layer_norm", "constant_norm_rescale"):
            d = rand(Dictionary(D_IN, D_SAE, "relu", normalize=norm, site="L0.resid_post"), 3)
            if norm == "layer_norm":
                mu, sd = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
                xn = (x - mu) / (sd + 1e-5)
                ref = (torch.relu((xn - d.b_dec) @ d.W_enc + d.b_enc) @ d.W_dec + d.b_dec) * sd + mu
            else:
                c = D_IN ** 0.5 / x.norm(dim=-1, keepdim=True)
                ref = (torch.relu((x * c - d.b_dec) @ d.W_enc + d.b_enc) @ d.W_dec + d.b_dec) / c
            assert (d(x) - ref).abs().max() < 1e-4


def test_head_z_input_is_flattened():
    d = rand(Dictionary(8, 20, "relu", site="L1.head.z"))
    z = torch.randn(2, 3, 4, 2)
    assert torch.equal(d.encode(z), d.encode(z.flatten(-2)))


CASES = [("relu", {}), ("topk", {"k": 4}), ("batchtopk", {"k": 4}), ("jumprelu", {}), ("gated", {}),
         ("relu", {"out_site": "L1.mlp_out", "skip": True}), ("jumprelu", {"out_site": "L1.mlp_out"}),
         ("topk", {"k": 3, "out_site": "L1.mlp_out"})]


@pytest.mark.parametrize("arch,kw", CASES)
def test_save_load_round_trip_is_exact(tmp_path, arch, kw):
    site = "L1.mlp_in" if "out_site" in kw else "L1.resid_post"
    d = rand(Dictionary(D_IN, D_SAE, arch, site=site, **kw))
    save(d, tmp_path / "d", model_name="tiny")
    e = load(tmp_path / "d")
    x = torch.randn(5, D_IN)
    with torch.no_grad():
        assert torch.equal(d(x), e(x)) and torch.equal(d.encode(x), e.encode(x))
    assert (e.site, e.out_site, e.transcoder) == (d.site, d.out_site, d.transcoder)
    if arch == "batchtopk":   # written as a JumpReLU with its threshold, as SAELens does
        assert e.architecture == "jumprelu" and e.metadata["training_architecture"] == "batchtopk"
    else:
        assert (e.architecture, e.k) == (d.architecture, d.k)
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    expected = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "gated": "gated"}
    if "out_site" in kw:
        assert cfg["architecture"].endswith("transcoder") and cfg["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
        assert cfg["d_out"] == D_IN and cfg["apply_b_dec_to_input"] is False
    else:
        assert cfg["architecture"] == expected[arch]
    assert cfg["metadata"]["hook_name"] == hook_from_site(site)
    with pytest.raises(FileExistsError):
        save(d, tmp_path / "d")


def test_hook_names_map_both_ways():
    table = {"blocks.3.hook_resid_post": "L3.resid_post", "blocks.0.hook_resid_pre": "L0.resid_pre",
             "blocks.2.hook_mlp_out": "L2.mlp_out", "blocks.5.attn.hook_z": "L5.head.z",
             "blocks.1.ln2.hook_normalized": "L1.mlp_in", "blocks.1.hook_mlp_in": "L1.resid_mid",
             "blocks.4.mlp.hook_post": "L4.neuron", "blocks.4.hook_attn_out": "L4.attn_out"}
    for hook, site in table.items():
        assert site_from_hook(hook) == site
        assert site_from_hook(hook_from_site(site)) == site
    with pytest.raises(FeaturesError, match="cannot map"):
        site_from_hook("blocks.3.hook_q_input")


def test_old_flat_config_loads(tmp_path):
    """A pre-6 SAELens file: flat config, hook_point, activation_fn_kwargs.k, boolean normalisation."""
    d = rand(Dictionary(D_IN, D_SAE, "topk", k=6))
    (tmp_path / "old").mkdir()
    save_file({n: getattr(d, n).detach().contiguous() for n in ("W_enc", "W_dec", "b_enc", "b_dec")},
              str(tmp_path / "old" / "sae_weights.safetensors"))
    (tmp_path / "old" / "cfg.json").write_text(json.dumps({
        "d_in": D_IN, "d_sae": D_SAE, "hook_point": "blocks.2.hook_resid_pre", "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 6}, "normalize_activations": False, "dtype": "float32"}))
    e = load(tmp_path / "old")
    x = torch.randn(4, D_IN)
    assert e.architecture == "topk" and e.k == 6 and e.site == "L2.resid_pre"
    assert torch.equal(e(x), d(x))


def test_clear_errors(tmp_path):
    m = mechanic.load(tiny_model("llama"))
    d = Dictionary(32, 64, "relu", site="L1.resid_post")
    with pytest.raises(FeaturesError, match="width is 32.*has width 64"):
        d.check(m)
    with pytest.raises(FeaturesError, match="out of range"):
        Dictionary(64, 64, "relu", site="L7.resid_post").check(m)
    with pytest.raises(FeaturesError, match="parallel residual"):
        Dictionary(64, 64, "relu", site="L1.resid_mid").check(mechanic.load(tiny_model("gpt_neox")))
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "sae.pt").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(FeaturesError, match="never loaded"):
        load(tmp_path / "pt")
    save(Dictionary(8, 16, "relu", site="L0.resid_post"), tmp_path / "x")
    cfg = json.loads((tmp_path / "x" / "cfg.json").read_text())
    cfg["architecture"] = "matryoshka_batchtopk"
    (tmp_path / "x" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(FeaturesError, match="not supported"):
        load(tmp_path / "x")
    with pytest.raises(FeaturesError, match="needs k"):
        Dictionary(8, 16, "topk")
