"""Training dictionaries: every architecture learns, the buffer keeps sites aligned, one pass feeds several
dictionaries on every model family, and an interrupted training resumes to exactly the same weights."""

import json

import pytest
import torch
import torch.nn.functional as F

import mechanic
from mechanic.data.text import calibration
from mechanic.features import FeaturesError, load
from mechanic.features.activations import ShuffleBuffer
from mechanic.features.dictionary import topk_acts
from mechanic.features.train import DictConfig, train
from mechanic.features.trainer import _JumpReLU, _Step
from mechanic.testing.tiny import tiny_model


@pytest.fixture(scope="module")
def worded(word_tokenizer):
    """A tiny llama that reads real words (shipped prose)."""
    m = mechanic.load(tiny_model("llama", vocab_size=word_tokenizer.vocab_size))
    m.tokenizer = word_tokenizer
    return m


SMALL = dict(batch_size=256, buffer_tokens=2048, seq_len=64, progress=False)


def test_every_architecture_learns_from_one_pass(worded, tmp_path):
    cfgs = [DictConfig("L1.resid_post", "topk", expansion=4, k=8, lr=3e-3),
            DictConfig("L1.resid_post", "batchtopk", expansion=4, k=8, lr=3e-3),
            DictConfig("L1.resid_post", "jumprelu", expansion=4, lr=3e-3),
            DictConfig("L1.resid_post", "relu", expansion=4, lr=3e-3),
            DictConfig("L1.mlp_in", "topk", expansion=4, k=8, out_site="L1.mlp_out", skip=True, lr=3e-3)]
    dicts = train(worded, cfgs, tmp_path, tokens=8192, text=calibration(), **SMALL)
    log = json.loads((tmp_path / "train.json").read_text())["log"]
    assert log[-1]["tokens"] == 8192 and len(dicts) == 5
    for c in cfgs:
        first, last = log[0][f"{c.label}.fvu"], log[-1][f"{c.label}.fvu"]
        # measured (seeded, so fixed): topk 0.74 -> 0.48, batchtopk 0.84 -> 0.52, jumprelu 3.0 -> 0.20,
        # relu 0.96 -> 0.86, transcoder 1.62 -> 0.95 (first batch -> batch at 8k tokens)
        assert last < 0.92 * first, (c.label, first, last)
    assert log[-1]["L1.resid_post.topk.l0"] == 8.0
    # the saved files are the trained dictionaries in raw units: FVU on fresh activations matches training's
    run = worded.run(worded.tokenizer(calibration()[0], return_tensors="pt")["input_ids"][:, :64], cache=["L1.resid_post"])
    x = run["L1.resid_post"][0, 1:]
    d = load(tmp_path / "L1.resid_post.topk")
    with torch.no_grad():
        fvu = float((d(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.8
    assert d.transcoder is False and load(tmp_path / "L1.mlp_in-L1.mlp_out.topk").W_skip is not None


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2_moe", "olmoe", "gemma2"])
def test_sae_and_transcoder_train_on_each_family(arch, tmp_path):
    m = mechanic.load(tiny_model(arch))
    ids = torch.randint(3, 101, (64, 32), generator=torch.Generator().manual_seed(0))
    cfgs = [DictConfig("L2.resid_post", "topk", expansion=2, k=4),
            DictConfig("L0.mlp_in", "relu", expansion=2, out_site="L0.mlp_out"),
            DictConfig("L1.head.z", "jumprelu", expansion=2)]
    dicts = train(m, cfgs, tmp_path, tokens=1024, text=ids, batch_size=128, buffer_tokens=512, seq_len=32,
                  progress=False)
    for d in dicts:
        d.check(m)
        assert all(torch.isfinite(p).all() for p in d.parameters())


def test_buffer_keeps_sites_aligned_and_bounded():
    g = torch.Generator().manual_seed(0)
    buf = ShuffleBuffer({"a": 1, "b": 2}, capacity=40, generator=g)
    rows = torch.arange(48.0)[:, None]
    buf.add({"a": rows, "b": torch.cat([rows * 2, rows * 3], 1)})
    seen = []
    for batch in buf.take_half(8):
        assert torch.equal(batch["b"][:, 0], batch["a"][:, 0] * 2) and torch.equal(batch["b"][:, 1], batch["a"][:, 0] * 3)
        seen += batch["a"][:, 0].tolist()
    assert len(seen) == 24 and len(buf) == 24 and len(set(seen)) == 24
    assert seen != sorted(seen)                                 # shuffled
    assert set(seen).isdisjoint(buf.rows["a"][:, 0].tolist())   # kept rows are the others


def test_sparse_topk_decode_and_jumprelu_gradients_match_references():
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(5, 30, generator=g)
    W = torch.randn(30, 7, generator=g)
    vals, idx = pre.topk(4, dim=-1, sorted=False)
    sparse = F.embedding_bag(idx, W, per_sample_weights=vals.relu(), mode="sum")
    assert (sparse - topk_acts(pre, 4) @ W).abs().max() < 1e-5
    x = torch.tensor([[0.05, 0.5, 1.0]], requires_grad=True)
    theta = torch.tensor([0.06, 0.2, 1.2], requires_grad=True)
    out = _JumpReLU.apply(x, theta, 0.1)
    out.sum().backward()
    assert torch.equal(out.detach(), torch.tensor([[0.0, 0.5, 0.0]]))
    assert torch.equal(x.grad, torch.tensor([[0.0, 1.0, 0.0]]))
    # only x within bandwidth/2 of theta moves theta: d/dtheta = -(theta / bw) for the first latent
    assert torch.allclose(theta.grad, torch.tensor([-0.6, 0.0, 0.0]))
    theta.grad = None
    _Step.apply(x.detach(), theta, 0.1).sum().backward()
    assert torch.allclose(theta.grad, torch.tensor([-10.0, 0.0, 0.0]))


def test_interrupted_training_resumes_to_identical_weights(worded, tmp_path):
    cfgs = [DictConfig("L1.resid_post", "topk", expansion=4, k=8, lr=3e-3, dead_after=1024),
            DictConfig("L0.resid_post", "jumprelu", expansion=2, lr=3e-3)]
    kw = dict(tokens=6144, text=calibration(), checkpoint_every=1024, **SMALL)
    whole = train(worded, cfgs, tmp_path / "whole", **kw)

    class Interrupt(Exception):
        pass

    def stop(row):
        if row["tokens"] == 4096:
            raise Interrupt
    with pytest.raises(Interrupt):
        train(worded, cfgs, tmp_path / "cut", on_step=stop, **kw)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert 0 < state["seen"] < 4096                          # it stopped after a checkpoint, mid-run
    resumed = train(worded, cfgs, tmp_path / "cut", **kw)
    for a, b in zip(whole, resumed):
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(p, q), n
    assert not (tmp_path / "cut" / "checkpoint").exists()
    other = [DictConfig("L1.resid_post", "topk", expansion=4, k=4)]
    (tmp_path / "cut" / "checkpoint").mkdir()
    (tmp_path / "cut" / "checkpoint" / "state.json").write_text(json.dumps({**state}))
    with pytest.raises(FeaturesError, match="other settings"):
        train(worded, other, tmp_path / "cut", **kw)


def test_training_errors_are_clear(worded, tmp_path):
    with pytest.raises(FeaturesError, match="gated"):
        DictConfig("L1.resid_post", "gated")
    with pytest.raises(FeaturesError, match="out of range"):
        train(worded, DictConfig("L9.resid_post"), tmp_path, tokens=512, text=calibration(), **SMALL)
    with pytest.raises(FeaturesError, match="not a site"):
        train(worded, DictConfig("L1.attn_in"), tmp_path, tokens=512, text=calibration(), **SMALL)


def test_automatic_forward_batch_resumes_where_less_memory_chooses_another(worded, tmp_path, monkeypatch):
    """forward_batch=None keys the checkpoint on "automatic", not on the choice: a machine with less free memory (a
    smaller budget here) picks fewer windows per forward and still continues the checkpoint rather than refusing."""
    from mechanic import memory

    cfg = DictConfig("L1.resid_post", "topk", expansion=4, k=8, lr=3e-3)
    kw = dict(tokens=6144, text=calibration(), checkpoint_every=1024, forward_batch=None, **SMALL)
    d = worded.dims.d_model
    est = memory.training_run(worded, [(d, 4 * d, d, "topk", False)], [d], SMALL["batch_size"],
                              SMALL["buffer_tokens"], SMALL["seq_len"], 1, True)
    room = {n: str(est.at(n) + (est.at(n + 1) - est.at(n)) // 2) for n in (3, 6)}   # n windows a forward, not n+1

    class Interrupt(Exception):
        pass

    def stop(row):
        if row["tokens"] == 4096:
            raise Interrupt
    monkeypatch.setenv("MECHANIC_MEMORY_BUDGET", room[6])
    with pytest.raises(Interrupt):
        train(worded, cfg, tmp_path, on_step=stop, **kw)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["settings"]["forward_batch"] == 6 and 0 < state["seen"] < 4096
    monkeypatch.setenv("MECHANIC_MEMORY_BUDGET", room[3])
    rows = []
    train(worded, cfg, tmp_path, on_step=rows.append, **kw)
    assert rows[0]["tokens"] == state["seen"] + SMALL["batch_size"]     # continued, not started afresh
    record = json.loads((tmp_path / "train.json").read_text())
    assert record["settings"]["forward_batch"] == 3 and record["log"][0] == state["log"][0]
    monkeypatch.setenv("MECHANIC_MEMORY_BUDGET", room[6])
    (tmp_path / "checkpoint").mkdir()                                   # a forward batch given still must match
    (tmp_path / "checkpoint" / "state.json").write_text(json.dumps(state))
    with pytest.raises(FeaturesError, match="other settings"):
        train(worded, cfg, tmp_path, **{**kw, "forward_batch": 6})
