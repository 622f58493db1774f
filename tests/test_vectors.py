"""Steering vectors: extraction against naive HF hidden-state references, PCA signs, files (safetensors, llama.cpp
GGUF read back with plain gguf), interventions against a plain forward hook, and sentiment steering on SmolLM2."""

import gguf
import pytest
import torch

import mechanic
from mechanic.model.readout import ReadError
from mechanic.steer import Vector, VectorError, actadd, caa, extract, from_gguf, pca_center, pca_diff, to_gguf
from mechanic.steer.vectors import direction
from mechanic.testing.tiny import left_padded, tiny_model


def _pairs(n=6):
    return left_padded([5, 7, 6, 4, 8, 5][:n], seed=1), left_padded([6, 5, 7, 5, 4, 6][:n], seed=2)


def naive_hidden(model, batch):
    """HF hidden states: hs[L + 1] is the output of decoder layer L (below the last layer, which HF norms)."""
    with torch.no_grad():
        return model.hf(**model.inputs(batch), output_hidden_states=True, use_cache=False).hidden_states


def naive_read(h, mask, read):
    """Per-row plain loop: the token or span mean that `read` names, counting real tokens only."""
    rows = []
    for i in range(h.shape[0]):
        real = h[i][mask[i].bool()]
        if read == "last":
            rows.append(real[-1])
        elif isinstance(read, int):
            rows.append(real[read])
        elif read == "mean":
            rows.append(real.mean(0))
        else:
            rows.append(real[read].mean(0))
    return torch.stack(rows)


@pytest.mark.parametrize("read", ["last", 1, -2, "mean", slice(-3, None)])
def test_caa_equals_naive_mean_difference(tiny, read):
    pos, neg = _pairs()
    layers = list(range(tiny.dims.n_layers - 1))
    v = caa(tiny, (pos, neg), layers=layers, read=read, batch_size=4)
    hp, hn = naive_hidden(tiny, pos), naive_hidden(tiny, neg)
    for L in layers:
        ref = (naive_read(hp[L + 1], pos["attention_mask"], read) - naive_read(hn[L + 1], neg["attention_mask"], read))
        assert (v.directions[L] - ref.mean(0)).abs().max() < 1e-5
    assert v.method == "caa" and v.site == "resid_post" and v.norm == "raw"
    assert v.fingerprint == tiny.fingerprint


def test_pca_methods_against_naive_svd_and_sign():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(16, generator=g)
    u /= u.norm()
    t = 2.0 + torch.rand(40, generator=g)          # every pair differs along u by a positive amount
    base = torch.randn(40, 16, generator=g)
    pos = base + t[:, None] * u + 0.05 * torch.randn(40, 16, generator=g)
    neg = base
    d = (pos - neg).double()
    # pca_diff: first PC of the centred differences, sign so the mean difference projects positively
    v, info = direction(pos, neg, "pca_diff")
    ref = torch.linalg.svd(d - d.mean(0), full_matrices=False)[2][0]
    ref = ref if float(d.mean(0) @ ref) > 0 else -ref
    assert (v.double() - ref).abs().max() < 1e-6 and float(d.mean(0) @ v.double()) > 0
    assert 0 < info["explained"] <= 1
    # pca_center equals the uncentred PCA of the differences (pairs contribute +d/2 and -d/2)
    vc, _ = direction(pos, neg, "pca_center")
    ref_c = torch.linalg.svd(d, full_matrices=False)[2][0]
    ref_c = ref_c if float(d.mean(0) @ ref_c) > 0 else -ref_c
    assert (vc.double() - ref_c).abs().max() < 1e-6
    assert float(vc @ u) > 0.99
    # swapping the sides flips every direction
    assert (direction(neg, pos, "pca_center")[0] + vc).abs().max() < 1e-6
    assert (direction(neg, pos, "pca_diff")[0] + v).abs().max() < 1e-6


def test_pca_vectors_on_a_model_are_unit_and_aligned():
    model = mechanic.load(tiny_model("qwen2"))
    pos, neg = _pairs()
    m = caa(model, (pos, neg))
    for fn in (pca_diff, pca_center):
        v = fn(model, (pos, neg))
        assert v.norm == "unit" and all(abs(n - 1) < 1e-5 for n in v.norms().values())
        assert all(float(v.directions[L] @ m.directions[L]) > 0 for L in v.layers)


def test_actadd_is_one_pair_difference():
    model = mechanic.load(tiny_model("llama"))
    pos, neg = _pairs(1)
    v = actadd(model, pos["input_ids"], neg["input_ids"], layers=[0, 1])
    hp, hn = naive_hidden(model, pos), naive_hidden(model, neg)
    for L in (0, 1):
        assert (v.directions[L] - (hp[L + 1][0, -1] - hn[L + 1][0, -1])).abs().max() < 1e-5
    with pytest.raises(VectorError, match="single pair"):
        extract(model, _pairs(2), "actadd")


def test_bad_pairs_and_reads_raise_clear_errors():
    model = mechanic.load(tiny_model("llama"))
    pos, neg = _pairs()
    with pytest.raises(VectorError, match="same number of rows"):
        caa(model, (pos, {k: t[:2] for k, t in neg.items()}))
    with pytest.raises(VectorError, match="Unknown method"):
        extract(model, (pos, neg), "svd")
    with pytest.raises(ReadError, match="has only"):
        caa(model, (pos, neg), read=7)
    with pytest.raises(VectorError, match="answer"):
        caa(model, (pos, neg), read="answer")
    with pytest.raises(VectorError, match="at least 2 pairs"):
        pca_diff(model, _pairs(1))


def _vector(model):
    return caa(model, _pairs(), layers=[1, 2])


def test_save_load_round_trip_is_exact(tmp_path):
    model = mechanic.load(tiny_model("llama"))
    v = _vector(model)
    v.settings["note"] = "round trip"
    path = v.save(tmp_path / "v.safetensors")
    w = Vector.load(path)
    assert w.layers == v.layers and all(torch.equal(w.directions[L], v.directions[L]) for L in v.layers)
    assert w.metadata() == v.metadata()
    assert not [p for p in tmp_path.iterdir() if p.name != "v.safetensors"]  # no temporary left behind


def test_gguf_round_trip_and_plain_reader(tmp_path):
    model = mechanic.load(tiny_model("llama"))
    v = _vector(model)
    path = to_gguf(v, tmp_path / "v.gguf")
    w = from_gguf(path)
    assert all(torch.equal(w.directions[L], v.directions[L]) for L in v.layers)
    assert w.metadata() == v.metadata()
    r = gguf.GGUFReader(str(path))

    def string(key):
        f = r.get_field(key)
        return bytes(f.parts[f.data[0]]).decode()
    assert string("general.architecture") == "controlvector"
    assert string("controlvector.model_hint") == "llama"
    f = r.get_field("controlvector.layer_count")
    assert int(f.parts[f.data[0]][0]) == 2
    assert sorted(t.name for t in r.tensors) == ["direction.1", "direction.2"]
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == [model.dims.d_model]
        assert torch.equal(torch.from_numpy(t.data.copy()), v.directions[int(t.name.split(".")[1])])
    scaled = from_gguf(to_gguf(v, tmp_path / "x2.gguf", coefficient=2.0))  # stored times 2, read back divided
    assert (scaled.directions[1] - v.directions[1]).abs().max() < 1e-6


def test_gguf_from_a_plain_writer_and_refusals(tmp_path):
    d = 64
    writer = gguf.GGUFWriter(str(tmp_path / "plain.gguf"), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 1)
    writer.add_tensor("direction.2", torch.arange(d, dtype=torch.float32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    v = from_gguf(tmp_path / "plain.gguf")
    assert v.layers == [2] and v.site == "resid_post" and v.operation == "add" and v.model_type == "llama"
    assert torch.equal(v.directions[2], torch.arange(d, dtype=torch.float32))
    model = mechanic.load(tiny_model("llama"))
    with pytest.raises(VectorError, match="layer 0"):
        to_gguf(caa(model, _pairs(), layers=[0, 1]), tmp_path / "bad.gguf")
    with pytest.raises(VectorError, match="resid_post"):
        to_gguf(caa(model, _pairs(), layers=[1], site="mlp_out"), tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()


def _hooked_logits(model, batch, vector, c):
    """Reference: a plain forward hook on each decoder layer adding c * v to its output."""
    def hook(v):
        def fn(mod, args, out):
            if isinstance(out, tuple):
                return (out[0] + c * v,) + out[1:]
            return out + c * v
        return fn
    handles = [model.layers[L].register_forward_hook(hook(d)) for L, d in vector.directions.items()]
    try:
        with torch.no_grad():
            return model.hf(**model.inputs(batch), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def test_interventions_equal_a_plain_forward_hook(tiny):
    pos, neg = _pairs()
    v = caa(tiny, (pos, neg), layers=list(range(tiny.dims.n_layers)))
    batch = left_padded([6, 4, 7], seed=5)
    for c in (4.0, -1.5):
        ours = tiny.run(batch, interventions=v.interventions(c)).logits
        ref = _hooked_logits(tiny, batch, v, c)
        assert (ours - ref).abs().max() < 1e-5
    assert (tiny.run(batch, interventions=v.interventions(4.0)).logits - tiny.run(batch).logits).abs().max() > 1e-3
    only = v.interventions(2.0, layers=[1], positions=-1)
    assert len(only) == 1 and str(only[0].site) == "L1.resid_post" and only[0].coef == 2.0 and only[0].pos == -1
    with pytest.raises(VectorError, match="no direction at layer"):
        v.select([0]).interventions(1.0, layers=[2])


def test_generate_with_vector_equals_hooked_generate():
    model = mechanic.load(tiny_model("llama"))
    v = caa(model, _pairs(), layers=[1, 2]) * 3.0
    batch = left_padded([5, 5], seed=7)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ours = model.generate(batch, interventions=v.interventions(1.0), **kw)
    handles = [model.layers[L].register_forward_hook(
        lambda mod, args, out, d=d: (out[0] + d,) + out[1:] if isinstance(out, tuple) else out + d)
        for L, d in v.directions.items()]
    try:
        with torch.no_grad():
            ref = model.hf.generate(**{k: t for k, t in batch.items()}, **kw)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(ours, ref)


def test_vector_arithmetic_and_checks():
    model = mechanic.load(tiny_model("llama"))
    v = _vector(model)
    assert torch.equal((v + v).directions[1], 2 * v.directions[1])
    assert (v - v).norms() == {1: 0.0, 2: 0.0}
    assert v.check(model) is v
    with pytest.raises(VectorError, match="d_model"):
        Vector({1: torch.zeros(8)}).check(model)
    with pytest.raises(VectorError, match="site kind"):
        Vector({1: torch.zeros(8)}, site="head")
    p = Vector({1: torch.ones(64)}, operation="project").interventions()
    assert p[0].op == "project"


@pytest.mark.real
def test_sentiment_caa_steers_smollm2(smollm2):
    from mechanic.tasks.builtin import load_task

    task = load_task("sentiment")
    v = caa(smollm2, task.subset(32), layers=[12])
    held = task.subset(8, start=150).tokenize(smollm2)

    def logit_diff(inputs, c):
        lg = smollm2.run(inputs, interventions=v.interventions(c), last_only=True).logits[:, -1]
        return (lg.gather(1, held.answer[:, None]) - lg.gather(1, held.wrong[:, None])).squeeze(1)

    # held-out negative reviews: adding the positive-minus-negative direction pushes " great" over " terrible"
    base, up = logit_diff(held.corrupted, 0.0), logit_diff(held.corrupted, 4.0)
    assert float((up - base).mean()) > 1.0 and bool((up > base).all())
    # held-out positive reviews: subtracting it pulls the other way
    base_p, down = logit_diff(held.clean, 0.0), logit_diff(held.clean, -4.0)
    assert float((base_p - down).mean()) > 1.0


@pytest.mark.real
def test_answer_read_position_on_smollm2(smollm2):
    triples = [("The movie was", " great", " awful"), ("Dinner tonight tasted", " wonderful", " terrible"),
               ("Overall the hotel was", " lovely", " dreadful")]
    v = caa(smollm2, triples, layers=[2], read="answer")
    tok = smollm2.tokenizer
    diffs = []
    for prompt, a, b in triples:
        sides = []
        for ans in (a, b):
            n = len(tok(prompt)["input_ids"])
            h = naive_hidden(smollm2, [prompt + ans])[3][0]
            sides.append(h[n:].mean(0))
        diffs.append(sides[0] - sides[1])
    assert (v.directions[2] - torch.stack(diffs).mean(0)).abs().max() < 1e-4
