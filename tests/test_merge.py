"""Neuron-level merging: equal to a plain neuron-by-neuron reference merge, exact at the extremes, undoable,
planted neurons kept, saved merges load in transformers; on SmolLM2 the merge lands between base and tuned."""

import copy
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

import mechanic
from mechanic.steer.merge import MergeError, merge, neuron_shifts
from mechanic.steer.plan import Plan
from mechanic.testing.tiny import left_padded, tiny_model

REFERENCE_ARCHS = ["llama", "qwen2", "gpt2", "phi3", "gpt_neox", "mixtral", "qwen2_moe"]


# ---------------------------------------------------------------- helpers
def finetune(hf, steps: int = 3, lr: float = 1e-2, seed: int = 0):
    """A copy of `hf` trained a few Adam steps on a tiny next-token task (deterministic)."""
    tuned = copy.deepcopy(hf)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, tuned.config.vocab_size, (2, 12), generator=g)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(tuned.parameters(), lr=lr)
    for _ in range(steps):
        tuned(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return tuned.eval()


def pair(arch: str, **kw):
    hf = tiny_model(arch, **kw)
    return mechanic.load(hf), mechanic.load(finetune(hf))


def weights(m):
    return {n: p.detach().clone() for n, p in m.hf.named_parameters()}


def merged_weights(tuned, plan):
    with tuned.applied(plan):
        return weights(tuned)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


# ---------------------------------------------------------------- the plain reference
def ffn_units(sd, prefix: str, arch: str) -> list[list[tuple]]:
    """Per FFN neuron j, its (parameter, index) pieces, written out per family."""
    if arch == "gpt2":
        d = sd[prefix + "mlp.c_fc.weight"].shape[1]
        return [[(prefix + "mlp.c_fc.weight", (slice(None), j)), (prefix + "mlp.c_fc.bias", (j,)),
                 (prefix + "mlp.c_proj.weight", (j, slice(None)))] for j in range(d)]
    if arch == "gpt_neox":
        d = sd[prefix + "mlp.dense_h_to_4h.weight"].shape[0]
        return [[(prefix + "mlp.dense_h_to_4h.weight", (j, slice(None))), (prefix + "mlp.dense_h_to_4h.bias", (j,)),
                 (prefix + "mlp.dense_4h_to_h.weight", (slice(None), j))] for j in range(d)]
    if arch == "phi3":
        d = sd[prefix + "mlp.down_proj.weight"].shape[1]
        return [[(prefix + "mlp.gate_up_proj.weight", (j, slice(None))),
                 (prefix + "mlp.gate_up_proj.weight", (d + j, slice(None))),
                 (prefix + "mlp.down_proj.weight", (slice(None), j))] for j in range(d)]
    d = sd[prefix + "down_proj.weight"].shape[1]
    return [[(prefix + "gate_proj.weight", (j, slice(None))), (prefix + "up_proj.weight", (j, slice(None))),
             (prefix + "down_proj.weight", (slice(None), j))] for j in range(d)]


def head_units(sd, prefix: str, arch: str, H: int, KV: int, dh: int) -> list[list[tuple]]:
    """Per head h: its q rows, the k/v rows of its kv head, its o_proj columns (and the matching biases)."""
    out = []
    for h in range(H):
        q, kv = slice(h * dh, (h + 1) * dh), h // (H // KV)
        k = slice(kv * dh, (kv + 1) * dh)
        if arch == "gpt2":
            D = H * dh
            w, b = prefix + "attn.c_attn.weight", prefix + "attn.c_attn.bias"
            cols = [q, slice(D + h * dh, D + (h + 1) * dh), slice(2 * D + h * dh, 2 * D + (h + 1) * dh)]
            out.append([(w, (slice(None), c)) for c in cols] + [(b, (c,)) for c in cols]
                       + [(prefix + "attn.c_proj.weight", (q, slice(None)))])
        elif arch == "gpt_neox":
            rows = slice(h * 3 * dh, (h + 1) * 3 * dh)
            out.append([(prefix + "attention.query_key_value.weight", (rows, slice(None))),
                        (prefix + "attention.query_key_value.bias", (rows,)),
                        (prefix + "attention.dense.weight", (slice(None), q))])
        elif arch == "phi3":
            w = prefix + "self_attn.qkv_proj.weight"
            ko, vo = H * dh, H * dh + KV * dh
            out.append([(w, (q, slice(None))), (w, (slice(ko + k.start, ko + k.stop), slice(None))),
                        (w, (slice(vo + k.start, vo + k.stop), slice(None))),
                        (prefix + "self_attn.o_proj.weight", (slice(None), q))])
        else:
            a = prefix + "self_attn."
            pieces = [(a + "q_proj.weight", (q, slice(None))), (a + "k_proj.weight", (k, slice(None))),
                      (a + "v_proj.weight", (k, slice(None))), (a + "o_proj.weight", (slice(None), q))]
            pieces += [(a + f"{x}_proj.bias", (r,)) for x, r in (("q", q), ("k", k), ("v", k))
                       if a + f"{x}_proj.bias" in sd]
            out.append(pieces)
    return out


def expert_units(sd, prefix: str) -> list[list[list[tuple]]]:
    """Per expert, per neuron j: rows j and d + j of gate_up_proj[e], column j of down_proj[e]."""
    gu, down = prefix + "mlp.experts.gate_up_proj", prefix + "mlp.experts.down_proj"
    E, _, d = sd[down].shape
    return [[[(gu, (e, j, slice(None))), (gu, (e, d + j, slice(None))), (down, (e, slice(None), j))]
             for j in range(d)] for e in range(E)]


def reference_groups(m, arch: str, scope) -> list[list[list[tuple]]]:
    """Every ranking block (a list of units, each a list of pieces), layer by layer."""
    sd = dict(m.hf.named_parameters())
    d = m.dims
    layers = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}.get(arch, "model.layers")
    blocks = []
    for L in range(d.n_layers):
        prefix = f"{layers}.{L}."
        if "attn" in scope:
            blocks.append(head_units(sd, prefix, arch, d.n_heads, d.n_kv_heads, d.d_head))
        if "mlp" in scope:
            if prefix + "mlp.experts.down_proj" in sd:
                blocks += expert_units(sd, prefix)
                if prefix + "mlp.shared_expert.down_proj.weight" in sd:
                    blocks.append(ffn_units(sd, prefix + "mlp.shared_expert.", "llama"))
            else:
                blocks.append(ffn_units(sd, prefix + ("" if arch in ("gpt2", "gpt_neox", "phi3") else "mlp."), arch))
    return blocks


def reference_merge(base, tuned, arch, keep, coefficient, scope=("mlp", "attn"), keep_other="pull"):
    """The merge written plainly: loop over units, score, keep the top ones, copy their tuned pieces."""
    b, t = weights(base), weights(tuned)
    blocks = reference_groups(tuned, arch, scope)
    owned = {name for block in blocks for unit in block for name, _ in unit}
    merged = {}
    for n in t:
        if n not in owned and keep_other == "tuned":
            merged[n] = t[n].clone()
        else:
            merged[n] = b[n] + coefficient * (t[n] - b[n])
    kept = []
    for block in blocks:
        scores = []
        for unit in block:
            delta2 = sum(float((t[n][ix].double() - b[n][ix].double()).square().sum()) for n, ix in unit)
            base2 = sum(float(b[n][ix].double().square().sum()) for n, ix in unit)
            scores.append(delta2 ** 0.5 / base2 ** 0.5)
        k = keep if isinstance(keep, int) else round(keep * len(block))
        top = sorted(range(len(block)), key=lambda i: -scores[i])[:k]
        kept.append(sorted(top))
        for i in top:
            for n, ix in block[i]:
                merged[n][ix] = t[n][ix]
    return merged, kept, blocks


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("arch", REFERENCE_ARCHS)
@pytest.mark.parametrize("keep,coefficient,scope,keep_other",
                         [(0.25, 0.3, ("mlp", "attn"), "pull"), (2, 0.0, ("mlp",), "tuned")])
def test_merge_equals_plain_reference(arch, keep, coefficient, scope, keep_other):
    base, tuned = pair(arch)
    ref, kept, _ = reference_merge(base, tuned, arch, keep, coefficient, scope, keep_other)
    plan = merge(base, tuned, keep=keep, coefficient=coefficient, scope=scope, keep_other=keep_other)
    assert max_diff(merged_weights(tuned, plan), ref) == 0
    ours = [v["units"] for v in plan.settings["kept"].values()]
    flat = []  # our expert groups list e * d_expert + j; the reference has one block per expert
    for key, units in zip(plan.settings["kept"], ours):
        if key.endswith(".expert"):
            d = tuned.dims.d_expert
            flat += [[u - e * d for u in units if u // d == e] for e in range(tuned.dims.n_experts)]
        else:
            flat.append(units)
    assert flat == kept


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "gpt_neox", "qwen2_moe"])
def test_shift_scores_equal_reference(arch):
    base, tuned = pair(arch)
    s = neuron_shifts(base, tuned)
    blocks = reference_groups(tuned, arch, ("mlp", "attn"))
    b, t = weights(base), weights(tuned)
    ref = [sum(float((t[n][ix].double() - b[n][ix].double()).square().sum()) for n, ix in u) ** 0.5
           / sum(float(b[n][ix].double().square().sum()) for n, ix in u) ** 0.5 for block in blocks for u in block]
    assert len(ref) == len(s.sites)
    assert (s.values.double() - torch.tensor(ref)).abs().max().item() <= 1e-6 * max(ref)
    assert s.method == "neuron_shift" and s.fingerprint == tuned.fingerprint
    assert any(x.startswith("L0.head") for x in s.sites) and any(".neuron" in x for x in s.sites)


def test_extremes_give_tuned_or_base_exactly(tiny):
    arch = tiny.hf.config.model_type
    base, tuned = tiny, mechanic.load(finetune(tiny.hf))
    b, t = weights(base), weights(tuned)
    assert max_diff(b, t) > 0
    everything = merge(base, tuned, keep=1.0, keep_other="tuned")
    assert everything.edits == [] and max_diff(merged_weights(tuned, everything), t) == 0
    assert merge(base, tuned, keep=0, coefficient=1.0).edits == []
    nothing = merge(base, tuned, keep=0, coefficient=0.0)
    assert max_diff(merged_weights(tuned, nothing), b) == 0, arch
    # keep everything but pull "other" parameters (embeddings, norms) back to the base
    owned_only = merged_weights(tuned, merge(base, tuned, keep=1.0))
    assert any(torch.equal(owned_only[n], b[n]) and not torch.equal(b[n], t[n]) for n in b)
    assert any(torch.equal(owned_only[n], t[n]) and not torch.equal(b[n], t[n]) for n in b)


def test_undo_restores_tuned_bit_for_bit_and_plan_file_round_trips(tmp_path):
    base, tuned = pair("llama")
    before = weights(tuned)
    plan = merge(base, tuned, keep=0.2, coefficient=0.5)
    assert plan.fingerprint == tuned.fingerprint and plan.method == "merge"
    handle = plan.apply(tuned)
    merged = weights(tuned)
    assert max_diff(merged, before) > 0
    handle.undo()
    assert all(torch.equal(before[n], p) for n, p in weights(tuned).items())
    back = Plan.load(plan.save(tmp_path / "merge.safetensors"))
    assert back.settings["kept"] == plan.settings["kept"] and back.settings["keep"] == 0.2
    assert max_diff(merged_weights(tuned, back), merged) == 0
    assert any(e.index is not None for e in plan.edits)  # kept rows are left out of the edits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "gpt_neox"])
def test_planted_neurons_and_heads_are_kept(arch):
    hf = tiny_model(arch)
    base = mechanic.load(hf)
    t = copy.deepcopy(hf)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in t.parameters():  # a small shift everywhere, so no ranking is decided by ties
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    tuned = mechanic.load(t)
    d = tuned.dims
    planted_neurons = {0: [5, 17], 1: [40, 2], 2: [3, d.d_mlp - 1]}
    planted_heads = {0: [1], 1: [3], 2: [0]}
    sd = dict(tuned.hf.named_parameters())
    layers = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}.get(arch, "model.layers")
    with torch.no_grad():
        for L in range(d.n_layers):
            prefix = f"{layers}.{L}."
            ffn = ffn_units(sd, prefix + ("" if arch in ("gpt2", "gpt_neox", "phi3") else "mlp."), arch)
            heads = head_units(sd, prefix, arch, d.n_heads, d.n_kv_heads, d.d_head)
            for j in planted_neurons[L]:
                for n, ix in ffn[j]:
                    sd[n][ix] += 0.5 * torch.randn(sd[n][ix].shape, generator=g)
            for h in planted_heads[L]:
                for n, ix in heads[h]:
                    if ".o_proj" in n or ".c_proj" in n or ".dense." in n:
                        sd[n][ix] += 0.5 * torch.randn(sd[n][ix].shape, generator=g)
    plan = merge(base, tuned, keep=2, scope=("mlp",))
    assert {int(k[1:].split(".")[0]): v["units"] for k, v in plan.settings["kept"].items()} == \
        {L: sorted(js) for L, js in planted_neurons.items()}
    plan = merge(base, tuned, keep=1, scope=("attn",))
    assert {k: v["units"] for k, v in plan.settings["kept"].items()} == \
        {f"L{L}.head": hs for L, hs in planted_heads.items()}
    top = {site for site, _, _ in neuron_shifts(base, tuned).top(9)}
    assert top == {f"L{L}.neuron{j}" for L, js in planted_neurons.items() for j in js} | \
        {f"L{L}.head{h}" for L, hs in planted_heads.items() for h in hs}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_merge_loads_in_plain_transformers(arch, tmp_path):
    base, tuned = pair(arch)
    x = tuned.inputs(left_padded([6, 4], seed=1))
    tuned_logits = tuned.run(x).logits
    plan = merge(base, tuned, keep=0.3, coefficient=0.2)
    with tuned.applied(plan):
        merged_logits = tuned.run(x).logits
        out = tuned.save(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        again = plain(**x).logits
    assert (again - merged_logits).abs().max().item() <= 1e-5
    assert (merged_logits - tuned_logits).abs().max().item() > 1e-3
    assert torch.equal(tuned.run(x).logits, tuned_logits)


def test_moe_experts_are_merged_per_expert(tiny_moe):
    base, tuned = tiny_moe, mechanic.load(finetune(tiny_moe.hf))
    plan = merge(base, tuned, keep=3)
    d = tuned.dims
    for key, v in plan.settings["kept"].items():
        if key.endswith(".expert"):
            per_expert = [sum(u // d.d_expert == e for u in v["units"]) for e in range(d.n_experts)]
            assert per_expert == [3] * d.n_experts, key
    assert max_diff(merged_weights(tuned, merge(base, tuned, keep=0)), weights(base)) == 0


def test_bad_inputs_raise_clear_errors():
    base, tuned = pair("llama")
    other_arch = mechanic.load(tiny_model("gpt2"))
    with pytest.raises(MergeError, match="same architecture"):
        merge(base, other_arch)
    with pytest.raises(MergeError, match="shapes differ"):
        merge(base, mechanic.load(tiny_model("llama", intermediate_size=80)))
    with pytest.raises(MergeError, match="different parameters"):
        merge(base, mechanic.load(tiny_model("llama", num_hidden_layers=2)))
    with pytest.raises(MergeError, match="mechanic Models"):
        merge(base.hf, tuned)
    for keep in (1.5, -1, True, "10%"):
        with pytest.raises(MergeError, match="keep"):
            merge(base, tuned, keep=keep)
    with pytest.raises(MergeError, match="unit"):
        merge(base, tuned, unit="layer")
    with pytest.raises(MergeError, match="scope"):
        merge(base, tuned, scope=("embed",))
    with pytest.raises(MergeError, match="keep_other"):
        merge(base, tuned, keep_other="base")
    with pytest.raises(MergeError, match="coefficient"):
        merge(base, tuned, coefficient=float("nan"))
    with pytest.raises(MergeError, match="score"):
        merge(base, tuned, score="l1")
    with pytest.raises(MergeError, match="shifts"):
        merge(base, tuned, shifts=neuron_shifts(base, tuned, scope=("mlp",)))
    with pytest.raises(MergeError, match="shifts"):
        merge(tuned, base, shifts=neuron_shifts(base, tuned))


# ---------------------------------------------------------------- real model
@pytest.mark.real
def test_merge_smollm2_lands_between_base_and_tuned(smollm2):
    """Fine-tune the MLPs of two layers 3 Adam steps on one sentence; keep 5% of neurons per layer."""
    layers = (8, 20)
    hf = copy.deepcopy(smollm2.hf)
    for p in hf.parameters():
        p.requires_grad_(False)
    params = [p for L in layers for p in hf.model.layers[L].mlp.parameters()]
    for p in params:
        p.requires_grad_(True)
    ids = smollm2.tokenizer("The lighthouse keeper on Vellmar Island always painted his boats bright orange.",
                            return_tensors="pt").input_ids
    opt = torch.optim.Adam(params, lr=1e-3)
    for _ in range(3):
        hf(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    hf.eval()
    tuned = mechanic.Model(hf, smollm2.tokenizer, name="SmolLM2-tuned")

    def loss(model) -> float:
        with torch.no_grad():
            return float(model.hf(input_ids=ids, labels=ids).loss)

    shifts = neuron_shifts(smollm2, tuned)
    top = merge(smollm2, tuned, keep=0.05, shifts=shifts)
    bottom = merge(smollm2, tuned, keep=0.05, shifts=dataclasses.replace(shifts, values=-shifts.values))
    with tuned.applied(top):
        merged = loss(tuned)
    with tuned.applied(bottom):
        smallest = loss(tuned)
    with tuned.applied(merge(smollm2, tuned, keep=0.05, score="absolute")):
        absolute = loss(tuned)
    base, fine = loss(smollm2), loss(tuned)
    # measured: base 7.07, tuned 2.90, top 5% kept 6.22 (by absolute shift 6.37), smallest-shift 5% kept 6.67
    assert fine < merged < smallest < base
    assert merged < absolute < base
    moved = {s.split(".")[0] + "." + s.split(".")[1].rstrip("0123456789") for s, v in zip(shifts.sites, shifts.values)
             if v > 0}
    assert moved == {f"L{L}.neuron" for L in layers}
    for L in layers:
        kept = top.settings["kept"][f"L{L}.neuron"]
        assert len(kept["units"]) == round(0.05 * smollm2.dims.d_mlp)
        rest = shifts.values[[i for i, s in enumerate(shifts.sites) if s.startswith(f"L{L}.neuron")]]
        assert min(kept["shift"]) >= float(rest.sort(descending=True).values[len(kept["units"]) - 1]) * (1 - 1e-6)
    assert {e.param.split(".mlp.")[0] for e in top.edits} == {f"model.layers.{L}" for L in layers}
