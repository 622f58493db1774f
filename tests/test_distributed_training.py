"""Dictionary training over 2 gloo ranks (DistributedDataParallel) equals the one-process training.

Each step's summed gradients equal the one-process gradients to 1e-6 (of the tensor's scale) for every architecture,
with AuxK and resampling running; a whole training from text gives every rank the same weights bit for bit, rank 0
alone writes the files, the same latents are dead at every step, and the weights agree with one process to 1e-4;
its checkpoint resumes in one process, and `mechanic sae train` under torchrun writes and prints once.
Why not 1e-6 for whole trainings: Adam divides each gradient entry by its running RMS plus eps = 1e-8, so an entry
within a few eps of zero moves by up to lr depending on its last bits, which a reordered sum changes; the steps'
gradients (checked to 1e-6) are where the reduction acts.
"""

import json
import tempfile
from pathlib import Path

import pytest
import torch

from mechanic import distributed as D
from mechanic.testing.tiny import tiny_model
from test_distributed import spawn

TOL = 1e-6


def scale(v: torch.Tensor) -> float:
    """A tensor's largest entry, at least 1: tolerances are relative to it (saved W_enc carries the input scale)."""
    return max(1.0, v.abs().max().item())


def step_job():
    """Two Trainer steps of each architecture on batches of 101 rows (shards 51 + 50); after the first, 8 latents are
    pushed down so they are dead in the second (AuxK, resampling). The summed gradients, weights and stats."""
    from mechanic.features.trainer import DictConfig, Trainer

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(101, 16, generator=g) * 3 + 1 for _ in range(2)]
    out = {}
    for arch in ("topk", "batchtopk", "relu", "jumprelu"):
        t = Trainer(DictConfig("L0.resid_post", arch, d_sae=48, k=4, dead_after=60), 16, 16, total_tokens=10_000,
                    batch_size=101, seed=1)
        t.init_from(xs[0], xs[0])
        t.step(xs[0], xs[0])
        with torch.no_grad():
            t.dict.b_enc[:8] -= 4.0 if arch in ("topk", "batchtopk") else 30.0
        stats = t.step(xs[1], xs[1])
        names = [n for n, _ in t.dict.named_parameters() if n != "threshold"] + ["log_threshold"] * (arch == "jumprelu")
        out[arch] = {"grads": {n: p.grad.clone() for n, p in zip(names, t.params())},
                     "weights": {n: p.detach().clone() for n, p in zip(names, t.params())},
                     "stats": stats, "since_fired": t.since_fired.clone()}
    return out


def train_job():
    """Dictionaries of every trained architecture from one pass over 64 windows of random ids, batches of 101 rows and
    forwards of 5 windows (uneven shards), latents dead after 101-150 tokens and JumpReLU thresholds that start high
    (AuxK and resampling run). Every rank's weights, rank 0's files and log, the buffer reader's split read, and a
    second training with checkpoints stopped on every rank at 808 tokens (its directory, to resume elsewhere)."""
    import mechanic
    from mechanic.features import load
    from mechanic.features.activations import SiteReader
    from mechanic.features.train import DictConfig, train

    m = mechanic.load(tiny_model("llama"))
    ids = torch.randint(3, 101, (64, 33), generator=torch.Generator().manual_seed(0))
    out = Path(D.decide(tempfile.mkdtemp()))
    cfgs = [DictConfig("L1.resid_post", "topk", expansion=2, k=4, lr=3e-3, dead_after=150),
            DictConfig("L1.resid_post", "batchtopk", expansion=2, k=4, lr=3e-3, dead_after=150),
            DictConfig("L1.resid_post", "relu", expansion=2, lr=3e-3),
            DictConfig("L2.resid_post", "jumprelu", expansion=2, lr=3e-3, dead_after=101, init_threshold=2.0),
            DictConfig("L0.mlp_in", "topk", expansion=2, k=4, out_site="L0.mlp_out", skip=True, lr=3e-3)]
    dicts = train(m, cfgs, out, **train_kw(ids))
    weights = D.gather({c.label: {k: v.detach().clone() for k, v in d.state_dict().items()}
                        for c, d in zip(cfgs, dicts)})
    saved = {c.label: {k: v.clone() for k, v in load(out / c.label).state_dict().items()} for c in cfgs}
    read = SiteReader(m, ["L1.resid_post", "L0.mlp_in"]).read_split(ids[:5])

    def stop(row):
        if row["tokens"] == 808:
            raise Stop
    cut = Path(D.decide(tempfile.mkdtemp()))
    with pytest.raises(Stop):
        train(m, cfgs, cut, checkpoint_every=202, on_step=stop, **train_kw(ids))
    D.barrier()
    return {"ranks": weights, "saved": saved, "log": json.loads((out / "train.json").read_text()),
            "files": sorted(p.name for p in out.iterdir()), "read": read, "cfgs": cfgs, "cut": cut}


class Stop(Exception):
    """Stops a training mid-run (on_step)."""


def train_kw(ids) -> dict:
    """The training settings train_job uses (and a resume must repeat)."""
    return dict(tokens=1212, text=ids, batch_size=101, buffer_tokens=404, seq_len=33, forward_batch=5, progress=False)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both jobs on 2 ranks (OMP_NUM_THREADS=1 only while spawning them: it must not leak into later tests)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        return {job.__name__: spawn(job, tmp_path_factory.mktemp("dist")) for job in (step_job, train_job)}


def test_each_step_sums_the_one_process_gradients(ranks):
    two, one = ranks["step_job"], step_job()
    for arch, r in one.items():
        assert r["stats"]["dead"] > 0 and torch.equal(two[arch]["since_fired"], r["since_fired"]), arch
        for part in ("grads", "weights"):
            for name, v in r[part].items():
                assert v.abs().max() > 0, (arch, part, name)       # zeros would match trivially
                assert (two[arch][part][name] - v).abs().max().item() <= TOL * scale(v), (arch, part, name)
        for k, v in r["stats"].items():
            assert abs(two[arch]["stats"][k] - v) <= TOL * max(1.0, abs(v)), (arch, k)


def test_whole_training_equals_one_process_and_rank_0_writes(ranks):
    two, one = ranks["train_job"], train_job()
    assert two["files"] == one["files"] and len(one["files"]) == 6          # 5 dictionaries + train.json, once
    assert len(two["ranks"]) == 2 and two["log"]["ranks"] == 2 and one["log"]["ranks"] == 1
    for label, weights in one["saved"].items():
        for name, w in weights.items():
            assert torch.equal(two["ranks"][0][label][name], two["ranks"][1][label][name]), (label, name)
            assert (two["saved"][label][name] - w).abs().max().item() <= 1e-4 * scale(w), (label, name)
    rows_two, rows_one = two["log"]["log"], one["log"]["log"]
    assert [r["tokens"] for r in rows_two] == [r["tokens"] for r in rows_one] and rows_one[-1]["tokens"] == 1212
    for r2, r1 in zip(rows_two, rows_one):
        for k, v in r1.items():
            if k.endswith(".dead"):
                assert r2[k] == v, k                                       # the same latents dead at every step
            elif k.endswith((".fvu", ".l0", ".loss")):
                assert abs(r2[k] - v) <= 1e-5 * max(1.0, abs(v)), (k, r2[k], v)
    for arch in ("topk", "batchtopk", "jumprelu"):    # AuxK and resampling (relu's rule too) ran
        assert max(r[k] for r in rows_one for k in r if k.endswith(f".{arch}.dead")) > 0, arch
    for site, v in one["read"].items():               # windows read on 2 ranks (3 + 2) and joined: one read
        assert two["read"][site].shape == v.shape == (5 * 32, 64) and (two["read"][site] - v).abs().max() <= TOL


def test_a_two_rank_checkpoint_resumes_in_one_process(ranks):
    import mechanic
    from mechanic.features.train import train

    two, one = ranks["train_job"], train_job()
    cut = two["cut"]
    assert sorted(p.name for p in cut.iterdir()) == ["checkpoint"]           # rank 0's checkpoint, nothing else
    assert json.loads((cut / "checkpoint" / "state.json").read_text())["seen"] == 606
    ids = torch.randint(3, 101, (64, 33), generator=torch.Generator().manual_seed(0))
    resumed = train(mechanic.load(tiny_model("llama")), two["cfgs"], cut, checkpoint_every=202, **train_kw(ids))
    for c, d in zip(two["cfgs"], resumed):
        for name, w in one["saved"][c.label].items():
            assert (d.state_dict()[name] - w).abs().max().item() <= 1e-4 * scale(w), (c.label, name)
    assert not (cut / "checkpoint").exists()


def test_batch_smaller_than_the_ranks_is_refused(monkeypatch, tmp_path):
    import mechanic
    from mechanic.features import FeaturesError
    from mechanic.features.train import DictConfig, train

    monkeypatch.setattr(D, "active", lambda: True)
    monkeypatch.setattr(D, "world", lambda: 4)
    with pytest.raises(FeaturesError, match="smaller than the number of ranks"):
        train(mechanic.load(tiny_model("llama")), DictConfig("L1.resid_post"), tmp_path, tokens=8, batch_size=2,
              buffer_tokens=4, progress=False)


def test_sae_train_under_torchrun_writes_and_prints_once(tmp_path, word_tokenizer):
    import os
    import subprocess
    import sys

    from typer.testing import CliRunner

    from mechanic.cli import app
    from mechanic.data.text import calibration

    model = tmp_path / "tiny"
    tiny_model("llama", vocab_size=len(word_tokenizer)).save_pretrained(model)
    word_tokenizer.save_pretrained(model)
    (tmp_path / "text.txt").write_text("\n\n".join(calibration()[:40]))
    args = ["sae", "train", "--site", "L1.resid_post", "--model", str(model), "--text", str(tmp_path / "text.txt"),
            "--expansion", "2", "--k", "4", "--tokens", "1024", "--batch-size", "128", "--buffer-tokens", "512",
            "--seq-len", "32", "--json"]
    one = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "mechanic", *args, "-o", str(tmp_path / "two")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads(one.output[one.output.index("{"):])
    b = json.loads(two.stdout[two.stdout.index("{"):])         # one JSON document: rank 0 alone printed
    assert a["tokens_seen"] == b["tokens_seen"] == 1024 and b["ranks"] == 2 and a["ranks"] == 1
    for label, s in a["final"].items():
        assert abs(b["final"][label]["fvu"] - s["fvu"]) <= 1e-4 and b["final"][label]["dead"] == s["dead"], label
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
