"""Memory planning (mechanic.memory): estimates against measured peaks, planned batch sizes, the refusal when nothing
fits, and caches spilled to disk past the budget (mechanic.model.spill)."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mechanic
from mechanic import memory
from mechanic.locate.causal import patch
from mechanic.locate import gradient
from mechanic.locate.gradient import atp, eap, rows
from mechanic.model.parallel import collect
from mechanic.model.spill import SpilledCache
from mechanic.tasks.task import Example, Task
from mechanic.testing.peak import peak
from mechanic.testing.tiny import tiny_model

MB = 2 ** 20
WORDS = "the cat sat on a mat while people in the old town walked to market and talked about rain".split()


def wide(tok, name: str = "llama"):
    """A random model of family `name`, wide enough that its activations dwarf the measuring noise (a few MB)."""
    extra = {"n_embd": 256, "n_layer": 4, "n_positions": 512} if name == "gpt2" else {}
    return mechanic.load(tiny_model(name, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=len(tok),
                                    max_position_embeddings=512, **extra), tokenizer=tok)


def small(tok):
    return mechanic.load(tiny_model("llama", vocab_size=len(tok)), tokenizer=tok)


def ids(rows: int, seq: int, vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(3, vocab, (rows, seq), generator=g)
    return {"input_ids": t, "attention_mask": torch.ones_like(t)}


def texts(n: int, words: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (words,), generator=g)) for _ in range(n)]


def task(model, n: int, words: int):
    """A task batch of n prompt pairs that differ in their first word and all have one token length (no padding),
    so patching at the first differing column runs every example over (nearly) the whole prompt."""
    from collections import Counter

    tok, cands = model.tokenizer, texts(8 * n, words, seed=1)
    size = {c: len(tok("John " + c)["input_ids"]) for c in cands}
    same = [c for c in cands if size[c] == len(tok("dog " + c)["input_ids"])]
    common = Counter(size[c] for c in same).most_common(1)[0][0]
    chosen = [c for c in same if size[c] == common][:n]
    assert len(chosen) == n
    return Task("memory", [Example("John " + c, " Mary", " John", "dog " + c) for c in chosen]).tokenize(model)


def first_diff(batch) -> int:
    """The first column where the clean and corrupted prompts differ."""
    return int((batch.clean["input_ids"] != batch.corrupted["input_ids"]).any(0).nonzero()[0])


def close(predicted: int, measured: int, tol: float = 0.25) -> None:
    ratio = predicted / measured
    print(f"predicted {predicted / MB:.1f} MB, measured {measured / MB:.1f} MB, ratio {ratio:.2f}")
    assert 1 - tol <= ratio <= 1 + tol, f"estimate {predicted / MB:.1f} MB vs measured {measured / MB:.1f} MB"


def warm(model) -> None:
    model.run(ids(2, 8, model.dims.vocab))


# ---------------------------------------------------------------- estimates against measured peaks
_FRESH = "MECHANIC_TEST_MEMORY_FRESH"


def fresh_process(test):
    """Run the test in a fresh Python process: measured peaks are this process's resident growth, and after the
    rest of the suite (threads started, heap grown, lazily built caches) a call's growth is up to 2x what the same
    call measures in a process of its own, which is the state the estimates describe."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        if os.environ.get(_FRESH):
            return test(*args, **kwargs)
        node = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]
        root = Path(__file__).resolve().parent.parent
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node], cwd=root,
                           env={**os.environ, _FRESH: "1"}, capture_output=True, text=True)
        assert r.returncode == 0, f"{node} failed in a fresh process:\n{r.stdout[-4000:]}{r.stderr[-2000:]}"
    return run


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@fresh_process
def test_cache_estimate_matches_measured_peak(name, word_tokenizer):
    m = wide(word_tokenizer, name)
    warm(m)
    sites = [f"L{i}.resid_post" for i in range(m.dims.n_layers)] + ["L2.mlp_out"]
    x = ids(96, 128, m.dims.vocab)
    est = memory.cache(m, sites, 96, 128)
    out, got = peak(lambda: collect(m, x, sites, batch_size=16, budget="64GiB"))
    assert isinstance(out, dict)
    close(est.at(16), got)


@fresh_process
def test_gradient_estimate_matches_measured_peak(word_tokenizer):
    m = wide(word_tokenizer)
    warm(m)
    batch = task(m, 24, 100)
    sites = [f"L{i}.head.z" for i in range(m.dims.n_layers)]     # what atp caches for heads
    est = memory.gradient(m, sites, batch.n, batch.seq)
    _, got = peak(lambda: atp(m, batch, "head", batch_size=8))
    close(est.at(8), got)


@fresh_process
def test_patching_estimate_matches_measured_peak(word_tokenizer):
    m = wide(word_tokenizer)
    warm(m)
    batch = task(m, 16, 100)
    sites = [f"L{i}.resid_pre" for i in range(m.dims.n_layers)]
    est = memory.patching(m, batch.n, batch.seq, sites)
    _, got = peak(lambda: patch(m, batch, "resid_pre", positions=[first_diff(batch)], batch_size=32, progress=False))
    close(est.at(32), got)


@pytest.mark.parametrize("ig_steps, ig_batch", [(None, 1), (3, 1), (4, 2)])
@fresh_process
def test_edges_estimate_matches_measured_peak(ig_steps, ig_batch, word_tokenizer):
    m = wide(word_tokenizer)
    batch = task(m, 8, 60)
    eap(m, rows(batch, slice(0, 2)), batch_size=2, ig_steps=ig_steps, ig_batch=ig_batch)    # warm-up
    est = memory.edges(m, batch.n, batch.seq, ig_steps, ig_batch, padded=False)
    _, got = peak(lambda: eap(m, batch, batch_size=4, ig_steps=ig_steps, ig_batch=ig_batch))
    close(est.at(4), got)


@fresh_process
def test_training_estimate_matches_measured_peak():
    from mechanic.features.trainer import DictConfig, Trainer

    d_in, d_sae, b = 256, 4096, 2048
    x = torch.randn(b, d_in)
    est = memory.training(d_in, d_sae, b)

    def step():
        tr = Trainer(DictConfig(site="L1.resid_post", d_sae=d_sae, k=16), d_in, d_in, 10 * b, b, 0)
        tr.init_from(x, x)
        tr.step(x, x)
        return tr
    step()          # untimed warm-up: the first step loads kernels and grows thread state once per process
    _, got = peak(step)
    close(est.at(b), got)


def _train_setup(word_tokenizer):
    """A wide random model, 200k random token ids to train on, and a TopK SAE on L2.resid_post."""
    from mechanic.features.train import DictConfig

    m = wide(word_tokenizer)
    warm(m)
    text = torch.randint(3, m.dims.vocab, (200_000,), generator=torch.Generator().manual_seed(0))
    return m, text, DictConfig("L2.resid_post", "topk", expansion=16, k=16)


@pytest.mark.parametrize("expansion, settings", [
    (32, dict(tokens=32768, batch_size=2048, buffer_tokens=16384, seq_len=64, forward_batch=8)),   # a step is the peak
    (16, dict(tokens=65536, batch_size=1024, buffer_tokens=65536, seq_len=64, forward_batch=8)),   # the shuffle
    (16, dict(tokens=8192, batch_size=512, buffer_tokens=8192, seq_len=128, forward_batch=64)),    # a forward
    (64, dict(tokens=8192, batch_size=512, buffer_tokens=4096, seq_len=64, forward_batch=8, checkpoint_every=2048))],
    ids=["step", "shuffle", "forward", "checkpoint"])
@fresh_process
def test_training_run_estimate_matches_measured_peak(expansion, settings, word_tokenizer, tmp_path):
    """The whole run's peak, with each phase of training_run the largest in turn. Sizes: the measured peak of a run
    varies by up to ~15 MB between identical processes (W_enc-sized blocks resident between steps in some runs and
    not others), so every case holds 100 MB or more."""
    from mechanic.features.train import train

    m, text, cfg = _train_setup(word_tokenizer)
    cfg.expansion = expansion
    b = settings["batch_size"]
    train(m, cfg, tmp_path / "warm", tokens=2 * b, text=text, batch_size=b, buffer_tokens=2 * b, seq_len=64,
          forward_batch=2, progress=False)     # untimed warm-up: kernels and thread state, once per process
    d = m.dims.d_model
    est = memory.training_run(m, [(d, expansion * d, d, "topk", False)], [d], b, settings["buffer_tokens"],
                              settings["seq_len"], checkpoint="checkpoint_every" in settings)
    _, got = peak(lambda: train(m, cfg, tmp_path / "run", text=text, progress=False, **settings))
    close(est.at(settings["forward_batch"]), got)


def two_rank_training_job():
    """One rank of a 2-rank training with checkpoints (the 'checkpoint' case above): (rank, its plan, its measured
    peak) of every rank. peak() is called once first, so glibc serves every large tensor from its own mapping from the
    start: freed blocks the warm-up left in malloc's heaps would otherwise be reused, stay resident after the next free
    and move a rank's peak by up to 2x the dictionary's parameters from run to run."""
    import tempfile

    from mechanic import distributed as D
    from mechanic.features.train import train
    from mechanic.testing.tiny import word_tokenizer

    peak(lambda: None)
    m, text, cfg = _train_setup(word_tokenizer())
    cfg.expansion = 64
    settings = dict(tokens=8192, batch_size=512, buffer_tokens=4096, seq_len=64, forward_batch=8, checkpoint_every=2048)
    tmp = Path(D.decide(tempfile.mkdtemp()))
    train(m, cfg, tmp / "warm", tokens=1024, text=text, batch_size=512, buffer_tokens=1024, seq_len=64,
          forward_batch=2, progress=False)     # untimed warm-up
    d = m.dims.d_model
    est = memory.training_run(m, [(d, 64 * d, d, "topk", False)], [d], 512, 4096, 64, checkpoint=True)
    one = memory.training_run(m, [(d, 64 * d, d, "topk", False)], [d], 512, 4096, 64, checkpoint=True, ranks=1)
    _, got = peak(lambda: train(m, cfg, tmp / "run", text=text, progress=False, **settings))
    return D.gather((D.rank(), est.at(8), got, one.at(8)))


def test_training_run_estimate_matches_each_ranks_measured_peak(tmp_path):
    """Under torch.distributed each rank's plan counts what it does: its block of each forward, the rows joined from
    every rank, its block of each step next to the whole batch scaled, DDP's gradient copy while backward fills the
    buckets, and on rank 0 alone the checkpoint and the saved files. Rank 1 (no checkpoint) peaks in a step, rank 0
    in a checkpoint; the one-process plan would overstate rank 1 by a third."""
    from test_distributed import spawn

    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        ranks = spawn(two_rank_training_job, tmp_path)
    assert [r for r, *_ in ranks] == [0, 1]
    for rank, planned, measured, one in ranks:
        print(f"rank {rank}: one-process plan {one / MB:.1f} MB")
        close(planned, measured)
    assert ranks[0][1] > ranks[1][1] and ranks[1][3] / ranks[1][2] > 1.25     # the old plan missed rank 1


def plan_agreement_job():
    """On 2 ranks, rank 1 with room for 3 windows a forward and rank 0 with plenty: the forward batch both read, then
    the error each rank raises when rank 1 has room for nothing."""
    import json
    import tempfile

    from mechanic import distributed as D
    from mechanic.features.train import DictConfig, train
    from mechanic.testing.tiny import word_tokenizer

    m = small(word_tokenizer())
    text = torch.randint(3, m.dims.vocab, (20_000,), generator=torch.Generator().manual_seed(0))
    d = m.dims.d_model
    settings = dict(tokens=1024, text=text, batch_size=128, buffer_tokens=1024, seq_len=16, progress=False)
    est = memory.training_run(m, [(d, 8 * d, d, "topk", False)], [d], 128, 1024, 16)      # this rank's plan
    tight = est.at(3) + (est.at(4) - est.at(3)) // 2
    os.environ["MECHANIC_MEMORY_BUDGET"] = str(tight if D.rank() == 1 else 2 ** 36)
    out = Path(D.decide(tempfile.mkdtemp()))
    train(m, DictConfig("L1.resid_post", "topk", expansion=8, k=4), out / "planned", forward_batch=None, **settings)
    chosen = json.loads((out / "planned" / "train.json").read_text())["settings"]["forward_batch"]
    os.environ["MECHANIC_MEMORY_BUDGET"] = str(est.at(1) - 1 if D.rank() == 1 else 2 ** 36)
    try:
        train(m, DictConfig("L1.resid_post", "topk", expansion=8, k=4), out / "none", forward_batch=None, **settings)
        refusal = None
    except memory.MemoryPlanError as e:
        refusal = str(e)
    return D.gather((chosen, refusal))


def test_ranks_agree_on_the_planned_forward_batch_and_refuse_together(tmp_path):
    from test_distributed import spawn

    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        ranks = spawn(plan_agreement_job, tmp_path)
    assert [chosen for chosen, _ in ranks] == [3, 3]                    # rank 1's plan bounds both
    for _, refusal in ranks:                                            # both stop, naming rank 1
        assert refusal is not None and refusal.startswith("On rank 1 of 2: Not enough memory") and "\n" not in refusal


def test_training_run_plans_its_forward_batch_and_refuses_what_cannot_fit(monkeypatch, word_tokenizer, tmp_path):
    import json

    from mechanic.features.train import DictConfig, train

    m = small(word_tokenizer)
    text = torch.randint(3, m.dims.vocab, (20_000,), generator=torch.Generator().manual_seed(0))
    cfg = DictConfig("L1.resid_post", "topk", expansion=8, k=4)
    d = m.dims.d_model
    settings = dict(tokens=1024, text=text, batch_size=128, buffer_tokens=1024, seq_len=16, progress=False)
    est = memory.training_run(m, [(d, 8 * d, d, "topk", False)], [d], 128, 1024, 16)
    budget = est.at(3) + (est.at(4) - est.at(3)) // 2              # room for 3 windows a forward, not 4
    assert est.at(3) < est.at(4)
    monkeypatch.setenv("MECHANIC_MEMORY_BUDGET", str(budget))
    planned = train(m, cfg, tmp_path / "planned", forward_batch=None, **settings)[0]
    assert json.loads((tmp_path / "planned" / "train.json").read_text())["settings"]["forward_batch"] == 3
    given = train(m, cfg, tmp_path / "given", forward_batch=3, **settings)[0]   # the same run, batch given
    assert torch.equal(planned.W_dec, given.W_dec)
    with pytest.raises(memory.MemoryPlanError) as e:                # 16 windows a forward do not fit
        train(m, cfg, tmp_path / "big", forward_batch=16, **settings)
    text_ = str(e.value)
    assert "\n" not in text_ and "forward_batch=3 " in text_ and "What would fit" in text_ and "budget" in text_
    assert not (tmp_path / "big").exists()                          # refused before anything was written
    monkeypatch.setenv("MECHANIC_MEMORY_BUDGET", str(est.at(1) - 1))   # not even one window a forward
    with pytest.raises(memory.MemoryPlanError) as e:
        train(m, cfg, tmp_path / "none", forward_batch=None, **settings)
    fits = str(e.value)
    assert "forward_batch=" not in fits.split("What would fit")[1].split(";")[0]
    assert "buffer_tokens=" in fits or "batch_size=" in fits
    for option in ("buffer_tokens", "batch_size"):                  # each named alternative really fits
        if f"{option}=" in fits:
            n = int(fits.split(f"{option}=")[1].split()[0].rstrip(";").replace(",", ""))
            alt = {"buffer_tokens": 1024, "batch_size": 128, option: n}
            assert memory.training_run(m, [(d, 8 * d, d, "topk", False)], [d], alt["batch_size"],
                                       alt["buffer_tokens"], 16).at(1) <= est.at(1) - 1


# ---------------------------------------------------------------- planning
def test_plan_batch_is_the_largest_that_fits():
    est = memory.Estimate("x", fixed=1000, per_row=100, floor=0, rows=50)
    assert memory.plan_batch(est, 1000 + 100 * 7 + 99) == 7
    assert memory.plan_batch(est, 10 ** 9) == 50                       # never more rows than the request has
    with pytest.raises(memory.MemoryPlanError, match="What would fit"):
        memory.plan_batch(est, 1099)
    with pytest.raises(memory.MemoryPlanError):                         # the floor phase alone does not fit
        memory.plan_batch(memory.Estimate("x", 0, 1, floor=500, rows=5), 400)


def test_planned_batches_give_the_same_results(monkeypatch, word_tokenizer):
    m = small(word_tokenizer)
    t = task(m, 6, 6)
    monkeypatch.setenv("MECHANIC_MEMORY_BUDGET", "64MiB")
    a = patch(m, t, "resid_pre", positions="all", batch_size=None, progress=False)
    b = patch(m, t, "resid_pre", positions="all", batch_size=7, progress=False)
    assert (a.values - b.values).abs().max() < 1e-5
    g1 = atp(m, t, "head", batch_size=None)
    g2 = atp(m, t, "head", batch_size=2)
    assert (g1.values - g2.values).abs().max() < 1e-5
    x = ids(10, 12, m.dims.vocab)
    c1 = collect(m, x, ["L1.resid_post", "L0.head"], batch_size=None)
    c2 = collect(m, x, ["L1.resid_post", "L0.head"], batch_size=3)
    whole = m.run(x, cache=["L1.resid_post", "L0.head"])       # one forward of every row: the reference
    for s in c1:
        assert torch.equal(c1[s], c2[s])
        assert (c1[s] - whole[s]).abs().max() < 1e-5


def test_refuses_with_what_would_fit(monkeypatch, word_tokenizer):
    m = small(word_tokenizer)
    monkeypatch.setenv("MECHANIC_MEMORY_BUDGET", "20KiB")
    with pytest.raises(memory.MemoryPlanError) as e:
        patch(m, task(m, 4, 6), "resid_pre", batch_size=None, progress=False)
    text = str(e.value)
    assert "\n" not in text and "What would fit" in text and "device_map" in text and "dtype" in text
    assert isinstance(e.value, ValueError)            # the CLI prints ValueErrors as one paragraph
    with pytest.raises(memory.MemoryPlanError):
        atp(m, task(m, 4, 6), "head", batch_size=None)


def test_eap_plans_its_chunks_and_refuses_what_cannot_fit(monkeypatch, word_tokenizer):
    m = small(word_tokenizer)
    t = task(m, 6, 6)
    est = memory.edges(m, t.n, t.seq, ig_steps=3, padded=False)
    budget = est.at(2) + est.per_row // 2                     # room for 2 examples a chunk, not 3
    assert memory.plan_batch(est, budget) == 2
    sizes = []
    chunks = gradient._edge_chunks
    monkeypatch.setattr(gradient, "_edge_chunks", lambda *a, **k: sizes.append(a[5]) or chunks(*a, **k))
    monkeypatch.setenv("MECHANIC_MEMORY_BUDGET", str(budget))
    planned = eap(m, t, ig_steps=3, batch_size=None)
    assert sizes == [2]
    whole = eap(m, t, ig_steps=3, batch_size=t.n)              # one chunk of every example: the reference
    assert (planned.values - whole.values).abs().max() < 1e-5
    monkeypatch.setenv("MECHANIC_MEMORY_BUDGET", str(est.at(1) - 1))
    with pytest.raises(memory.MemoryPlanError) as e:
        eap(m, t, ig_steps=3, batch_size=None)
    text = str(e.value)
    assert "\n" not in text and "EAP-IG" in text and "What would fit" in text and "dtype" in text


def test_available_is_positive_and_bounded_by_meminfo():
    free = memory.available()
    total = int(next(x for x in open("/proc/meminfo") if x.startswith("MemTotal")).split()[1]) * 1024
    assert 0 < free <= total
    assert memory.parse_bytes("1.5GiB") == 3 * 2 ** 29 and memory.parse_bytes("512MiB") == 2 ** 29


# ---------------------------------------------------------------- spilling to disk
def test_cache_past_the_budget_is_spilled_and_reads_back_equal(tmp_path):
    m = mechanic.load(tiny_model("llama"))
    x = ids(9, 11, 101)
    sites = ["L0.resid_pre", "L2.head", "L1.neuron"]
    ref = collect(m, x, sites, batch_size=4)
    budget = 3 * memory.cache(m, sites, 9, 11).fixed // 2     # the cache alone is more than half the budget
    got = collect(m, x, sites, batch_size=4, budget=budget, spill_dir=tmp_path)
    assert isinstance(got, SpilledCache) and set(got) == set(sites)
    for s in sites:
        assert torch.equal(got[s], ref[s])
        assert torch.equal(got[s][2:5, -1], ref[s][2:5, -1])          # the same indexing as the in-memory cache
        assert torch.equal(load_file(str(tmp_path / f"{s}.safetensors"))[s], ref[s])   # plain safetensors files
    assert not list(tmp_path.glob(".*partial*"))                       # written atomically: nothing left over
    again = SpilledCache(tmp_path)                                      # reopened from the folder alone
    assert torch.equal(again["L2.head"], ref["L2.head"])
    half = collect(m, x, sites, batch_size=None, budget=budget, dtype=torch.float16)   # a smaller dtype fits in memory
    assert isinstance(half, dict) and half["L0.resid_pre"].dtype == torch.float16


def test_spilled_cache_in_a_temporary_directory_is_removed_with_it():
    m = mechanic.load(tiny_model("llama"))
    x = ids(5, 7, 101)
    got = collect(m, x, ["L1.resid_post"], batch_size=2, budget=1000)
    folder = got.folder
    value = got["L1.resid_post"].clone()
    assert folder.exists()
    del got
    import gc

    gc.collect()
    assert not folder.exists()
    assert torch.equal(value, collect(m, x, ["L1.resid_post"], batch_size=2)["L1.resid_post"])


# ---------------------------------------------------------------- the real model
@pytest.mark.real
def test_estimates_match_measured_peaks_on_smollm2(smollm2):
    m = smollm2
    warm(m)
    sites = [f"L{i}.resid_post" for i in range(m.dims.n_layers)]
    x = texts(48, 50)
    seq = m.inputs(x)["input_ids"].shape[1]
    out, got = peak(lambda: collect(m, x, sites, batch_size=16, budget="64GiB"))
    close(memory.cache(m, sites, 48, seq).at(16), got)
    del out
    batch = task(m, 8, 30)
    heads = [f"L{i}.head.z" for i in range(m.dims.n_layers)]     # what atp caches for heads
    _, got = peak(lambda: atp(m, batch, "head", batch_size=4))
    close(memory.gradient(m, heads, batch.n, batch.seq).at(4), got)
    resid = [f"L{i}.resid_pre" for i in range(m.dims.n_layers)]
    _, got = peak(lambda: patch(m, batch, "resid_pre", positions=[first_diff(batch)], batch_size=60, progress=False))
    close(memory.patching(m, batch.n, batch.seq, resid).at(60), got)


@pytest.mark.real
@fresh_process
def test_training_run_estimate_matches_measured_peak_on_smollm2(smollm2, tmp_path):
    from mechanic.features.train import DictConfig, train

    m = smollm2
    warm(m)
    text = texts(400, 200)
    cfg = DictConfig("L6.resid_post", "topk", expansion=16, k=32)
    settings = dict(tokens=8192, batch_size=2048, buffer_tokens=8192, seq_len=128, forward_batch=16)
    train(m, cfg, tmp_path / "warm", tokens=1024, text=text, batch_size=512, buffer_tokens=1024, seq_len=128,
          forward_batch=2, progress=False)      # untimed warm-up
    d = m.dims.d_model
    est = memory.training_run(m, [(d, 16 * d, d, "topk", False)], [d], 2048, 8192, 128)
    _, got = peak(lambda: train(m, cfg, tmp_path / "run", text=text, progress=False, **settings))
    close(est.at(16), got)


@pytest.mark.real
@pytest.mark.parametrize("ig_steps", [None, 3])
@fresh_process
def test_edges_estimate_matches_measured_peak_on_smollm2(ig_steps, smollm2):
    from mechanic.tasks.builtin import load_task

    m, suite = smollm2, load_task("ioi")
    batch = Task("ioi", suite.examples[:4], suite.metric).tokenize(m)
    eap(m, rows(batch, slice(0, 1)), batch_size=1, ig_steps=ig_steps)    # warm-up
    padded = bool((batch.clean["attention_mask"] == 0).any())
    est = memory.edges(m, batch.n, batch.seq, ig_steps, padded=padded)
    _, got = peak(lambda: eap(m, batch, batch_size=4, ig_steps=ig_steps))
    close(est.at(4), got)
