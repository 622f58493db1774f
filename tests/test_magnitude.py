"""Magnitude analysis against plain references: massive activations, planted super weights and experts, sinks."""

import copy

import pytest
import torch

import mechanic
from mechanic.data.windows import batches, windows
from mechanic.model.perplexity import perplexity
from mechanic.locate import magnitude as mg
from mechanic.model.interventions import Intervention, scale, zero
from mechanic.testing.tiny import tiny_model

DENSE = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "gpt_neox_seq"]


def random_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 101, (n,), generator=torch.Generator().manual_seed(seed))


def sampled_text(hf, n: int = 6, length: int = 48, seed: int = 0) -> torch.Tensor:
    """Token ids sampled from the model itself: text on which any real change to it raises perplexity."""
    ids = torch.randint(3, 101, (n, 1), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                      max_new_tokens=length - 1, min_new_tokens=length - 1, pad_token_id=0)
    return out.reshape(-1)


def bits(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().view(torch.int32) for k, v in model.hf.state_dict().items()}


def same_bits(model, before) -> bool:
    return all(torch.equal(v.detach().view(torch.int32), before[k]) for k, v in model.hf.state_dict().items())


# ---------------------------------------------------------------- massive activations
def naive_resid_max(model, wins, batch_size):
    """Max |h| per layer and dim over all tokens, from output_hidden_states (and a plain hook on the last layer)."""
    L = model.dims.n_layers
    best = torch.zeros(L, model.dims.d_model)
    every = [[] for _ in range(L)]
    last = {}
    h = model.layers[L - 1].register_forward_hook(
        lambda m, a, out: last.update(x=out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            for ids in batches(wins, batch_size):
                hs = model.hf(input_ids=ids, output_hidden_states=True).hidden_states
                for l in range(L):
                    x = (hs[l + 1] if l < L - 1 else last["x"]).abs().reshape(-1, best.shape[1])
                    best[l] = torch.maximum(best[l], x.max(0).values)
                    every[l].append(x.reshape(-1))
    finally:
        h.remove()
    return best, [torch.cat(e).median().item() for e in every]


def test_massive_activations_equal_naive_max(tiny):
    ids = random_ids(200)
    r = mg.massive_activations(tiny, ids, seq_len=32, batch_size=3, k=3)
    best, medians = naive_resid_max(tiny, windows(tiny, ids, 32), 3)
    assert (r.scores.values - best).abs().max() == 0
    for got, ref in zip(r.medians, medians):
        assert abs(got / ref - 1) <= r.settings["median_rel_error"] * 1.01
    for t in r.top:  # the reported location holds the reported value
        assert abs(abs(t["value"]) - best[t["layer"], t["dim"]]) == 0
    assert not r.massive  # a random model has none


def test_massive_activation_is_flagged_with_its_place():
    m = mechanic.load(tiny_model("llama"))
    ids = random_ids(96, seed=3)
    spike = torch.zeros(m.dims.d_model)
    spike[7] = 5000.0
    iv = Intervention("L1.resid_post", "fn", lambda x: x + spike, pos=0, rows=[1])
    r = mg.massive_activations(m, ids, seq_len=32, interventions=[iv], min_value=100, ratio=1000)
    flagged = [(t["layer"], t["dim"], t["window"], t["position"], t["token"]) for t in r.massive]
    assert flagged == [(1, 7, 1, 0, str(int(ids[32]))), (2, 7, 1, 0, str(int(ids[32])))]  # it persists
    assert r.massive[0]["value"] > 4990 and r.massive[0]["ratio"] >= 1000


# ---------------------------------------------------------------- super weights
def plant_super_weight(model, layer: int, row: int, col: int, scale: float = 20.0, weight: float = 30.0) -> None:
    """Make neuron `col` of `layer` fire hard (its input weights x scale) and down_proj[row, col] huge."""
    a, d_mlp = model.arch, model.dims.d_mlp
    down = model.layer_module(layer, a.down_proj)
    with torch.no_grad():
        for name, mod in model.layer_module(layer, a.mlp).named_modules():
            if mod is down or not hasattr(mod, "weight") or mod.weight.dim() != 2:
                continue
            conv = type(mod).__name__ == "Conv1D"
            out = mod.weight.shape[1] if conv else mod.weight.shape[0]
            if out % d_mlp:
                continue
            for r in range(col, out, d_mlp):      # fused gate_up: both halves
                (mod.weight[:, r] if conv else mod.weight[r]).mul_(scale)
                if getattr(mod, "bias", None) is not None:  # a positive bias: it fires on every token
                    mod.bias[r] = scale
        a.down_weight(down)[row, col] = weight


@pytest.mark.parametrize("arch", DENSE)
def test_planted_super_weight_is_found_verified_and_restored(arch):
    m = mechanic.load(tiny_model(arch))
    plant_super_weight(m, 1, row=5, col=11)
    text = sampled_text(m.hf)
    before = bits(m)
    r = mg.super_weights(m, text[:144], text[144:], seq_len=48, max_iter=2, n_random=3)
    c = r.candidates[0]
    assert (c.layer, c.row, c.col) == (1, 5, 11)
    assert c.verified, (c.ppl, r.baseline_ppl, c.ppl_random)
    assert c.ppl > r.baseline_ppl and len(c.ppl_random) == 3
    assert all((j, k) != (5, 11) for j, k, _ in c.random_weights)
    assert same_bits(m, before)
    assert r.scores.sites == [f"L{l}.mlp_out" for l in range(3)] and r.scores.settings["spike_ratio"] == 10.0


def test_iteration_finds_the_next_spike_after_zeroing():
    m = mechanic.load(tiny_model("llama", num_hidden_layers=6))  # spikes are judged against the median layer
    plant_super_weight(m, 1, row=3, col=20)
    plant_super_weight(m, 4, row=9, col=40, weight=60.0)
    r = mg.super_weights(m, random_ids(128), seq_len=64, max_iter=4, verify=False)
    found = [(c.layer, c.row, c.col, c.iteration) for c in r.candidates]
    assert found[:2] == [(1, 3, 20, 0), (4, 9, 40, 1)]


def test_candidate_equals_naive_argmax_of_down_proj_input_and_output():
    m = mechanic.load(tiny_model("qwen2"))
    plant_super_weight(m, 1, row=17, col=3)
    ids = random_ids(64)
    seen = {}
    down = m.layers[1].mlp.down_proj
    h = down.register_forward_hook(lambda mod, a, out: seen.update(x=a[0][0], y=out[0]))
    try:
        with torch.no_grad():
            m.hf(input_ids=ids[None])
    finally:
        h.remove()
    t, j = divmod(int(seen["y"].abs().argmax()), seen["y"].shape[-1])
    k = int(seen["x"][t].abs().argmax())
    c = mg.super_weights(m, ids, seq_len=64, max_iter=1, verify=False).candidates[0]
    assert (c.layer, c.row, c.col) == (1, j, k)
    assert abs(c.max_output - float(seen["y"].abs().max())) < 1e-4 * c.max_output


def test_weights_are_restored_bit_for_bit_on_errors(monkeypatch):
    m = mechanic.load(tiny_model("llama"))
    plant_super_weight(m, 1, row=5, col=11)
    before = bits(m)
    with pytest.raises(RuntimeError):
        with mg.zeroed_weight(m, 1, 5, 11):
            assert m.layers[1].mlp.down_proj.weight[5, 11] == 0
            raise RuntimeError("boom")
    assert same_bits(m, before)
    calls = {"n": 0}
    real = mg._down_proj_stats

    def failing(*a, **k):  # fail on the second search pass, after one scalar was zeroed
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("interrupted")
        return real(*a, **k)
    monkeypatch.setattr(mg, "_down_proj_stats", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        mg.super_weights(m, random_ids(64), seq_len=64, max_iter=3)
    assert same_bits(m, before)
    monkeypatch.setattr(mg, "_down_proj_stats", real)
    monkeypatch.setattr(mg, "perplexity", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("ppl failed")))
    with pytest.raises(RuntimeError, match="ppl failed"):
        mg.super_weights(m, random_ids(64), seq_len=64, max_iter=1)
    assert same_bits(m, before)


def test_super_weights_of_an_all_moe_model_is_refused():
    with pytest.raises(mg.MagnitudeError, match="super_experts"):
        mg.super_weights(mechanic.load(tiny_model("mixtral")), random_ids(64))


# ---------------------------------------------------------------- attention sinks
def test_sinks_equal_eager_attention_weights(tiny):
    ids = random_ids(150, seed=2)
    ids[::7] = 5                                    # a recurring token to use as an extra sink
    r = mg.attention_sinks(tiny, ids, seq_len=40, batch_size=2, sink_tokens=(5,))
    eager = copy.deepcopy(tiny.hf)
    eager.set_attn_implementation("eager")
    d = tiny.dims
    total = torch.zeros(d.n_layers, d.n_heads, 2, dtype=torch.float64)
    n = 0
    with torch.no_grad():
        for w in windows(tiny, ids, 40):
            att = eager(input_ids=w[None], output_attentions=True).attentions
            for l, a in enumerate(att):
                a = a[0, :, 1:].double()                # [H, q >= 1, k]
                total[l, :, 0] += a[..., 0].sum(-1)
                keys = (w == 5).clone()
                keys[0] = False
                total[l, :, 1] += a[..., keys].sum((-1, -2))
            n += w.numel() - 1
    ref = (total / n).reshape(-1, 2)
    assert (r.values.double() - ref).abs().max() < 1e-5
    assert r.positions == ["first", "5"] and r.sites[1] == "L0.head1"


def test_sinks_change_with_an_intervention_and_bad_sink_token():
    m = mechanic.load(tiny_model("llama"))
    ids = random_ids(64)
    before = mg.attention_sinks(m, ids, seq_len=32)
    after = mg.attention_sinks(m, ids, [scale("L0.head2.q", 40.0)], seq_len=32)  # a sharper head 2
    diff = (before.values - after.values).abs()[:, 0]
    assert diff[2] > 1e-3
    assert diff[[0, 1, 3]].max() == 0  # the other heads of layer 0 are untouched
    with pytest.raises(mg.MagnitudeError, match="single token"):
        mg.attention_sinks(m, ids, sink_tokens=("\n",))


# ---------------------------------------------------------------- super experts
def naive_expert_max(model) -> tuple[dict, list]:
    """Max |expert output| per expert from plain pre-hooks on each experts module (routed rows only)."""
    M, handles = {}, []
    a = model.arch
    for l in range(model.dims.n_layers):
        if not model.is_moe(l):
            continue
        ex = model.layer_module(l, a.experts)

        def hook(mod, args, l=l):
            x, idx = args[0], args[1]
            for e in range(mod.num_experts):
                rows = (idx == e).any(-1)
                if rows.any():
                    gate, up = torch.nn.functional.linear(x[rows], mod.gate_up_proj[e]).chunk(2, -1)
                    y = torch.nn.functional.linear(mod.act_fn(gate) * up, mod.down_proj[e])
                    M[f"L{l}.expert{e}"] = max(M.get(f"L{l}.expert{e}", 0.0), float(y.abs().max()))
        handles.append(ex.register_forward_pre_hook(hook))
        if a.shared_expert:
            handles.append(model.layer_module(l, a.shared_expert).register_forward_hook(
                lambda mod, args, out, l=l: M.update({f"L{l}.shared_expert": max(
                    M.get(f"L{l}.shared_expert", 0.0), float(out.abs().max()))})))
    return M, handles


def test_planted_super_expert_is_found_and_pruned_both_ways(tiny_moe):
    m = tiny_moe
    with torch.no_grad():
        m.layer_module(0, m.arch.experts).down_proj[2] *= 40
    ids, held = random_ids(192), random_ids(96, seed=5)
    r = mg.super_experts(m, ids, held, seq_len=32, batch_size=3, prune_tokens=96)
    assert [s["site"] for s in r.super] == ["L0.expert2"]
    M, handles = naive_expert_max(m)
    try:
        with torch.no_grad():
            for b in batches(windows(m, ids, 32), 3):
                m.hf(input_ids=b)
    finally:
        for h in handles:
            h.remove()
    got = dict(zip(r.scores.sites, r.scores.values.tolist()))
    assert set(got) == set(M)
    assert max(abs(got[k] - M[k]) / max(M[k], 1e-6) for k in M) < 1e-5
    assert r.settings["layers_searched"] == [l for l in range(3) if m.is_moe(l) and l < 2.25]
    modes = {p["mode"]: p for p in r.pruning}
    assert set(modes) == {"zero", "router_mask"}
    ref = perplexity(m, held, 32, 3, 96, interventions=[zero("L0.expert2")]).ppl
    assert abs(modes["zero"]["ppl"] - ref) < 1e-6 * ref
    assert modes["zero"]["ppl"] != modes["router_mask"]["ppl"]
    assert abs(r.baseline["ppl"] - perplexity(m, held, 32, 3, 96).ppl) < 1e-6 * r.baseline["ppl"]


def test_router_mask_zeroes_the_expert_and_keeps_the_weight_sum():
    m = mechanic.load(tiny_model("qwen2_moe"))
    ids = random_ids(40)
    plain = m.run(ids, cache=["L0.router"])["L0.router"]
    masked = m.run(ids, cache=["L0.router"], interventions=[mg.router_mask(0, 1)])["L0.router"]
    assert masked[..., 1].abs().max() == 0
    keep = (plain - plain[..., 1:2] * torch.nn.functional.one_hot(torch.tensor(1), 4)).sum(-1) > 0
    assert (masked.sum(-1) - plain.sum(-1))[keep].abs().max() < 1e-6
    assert (masked - plain).abs().max() > 0


def test_super_experts_of_a_dense_model_is_refused():
    with pytest.raises(mg.MagnitudeError, match="super_weights"):
        mg.super_experts(mechanic.load(tiny_model("llama")), random_ids(64))


# ---------------------------------------------------------------- SmolLM2
@pytest.mark.real
def test_smollm2_massive_activation_and_super_weight(smollm2):
    from mechanic.data import text

    r = mg.massive_activations(smollm2, text.calibration(), max_tokens=256, k=1)
    top = {t["layer"]: t for t in r.top}
    # one dimension (507) carries a massive activation at the window's first token from layer 11 to 27
    for l in range(11, 28):
        assert top[l]["dim"] == 507 and top[l]["position"] == 0 and top[l]["massive"]
        assert top[l]["abs"] > 10_000 and top[l]["ratio"] > 1000
    assert not any(top[l]["massive"] for l in range(11))
    # it is written by one down_proj scalar of layer 11, found by the iterative search and verified
    sw = mg.super_weights(smollm2, text.calibration(), text.heldout(), detect_tokens=128, verify_tokens=128,
                          max_iter=3, n_random=1)
    found = {(c.layer, c.row, c.col): c for c in sw.candidates}
    c = found[(11, 507, 1229)]
    assert c.verified and c.ppl > 2 * sw.baseline_ppl
    assert all(row == 507 for _, row, _ in found)


@pytest.mark.real
def test_smollm2_sink_heads(smollm2):
    from mechanic.data import text

    s = mg.attention_sinks(smollm2, text.heldout(), max_tokens=256)
    first = s.values[:, 0].reshape(30, 9)
    assert first[20:].mean() > 0.5          # most attention of the late layers goes to the first token
    assert first[:2].mean() < 0.1           # the first layers do not sink yet
