"""Causal tracing and the magnitude analyses over 2 gloo ranks equal the single-process run.

Tracing splits its restorations (rows of (layer, token) x noise sample), the magnitude statistics split their
batches of windows and reduce maxima / counts / sums, and the perplexity checks are dealt over the ranks whole.
Each job runs on 2 ranks (tests/test_distributed.py's spawn) and in this process; the results are compared
(max abs diff <= 1e-6; bit for bit where a rank computes whole batches), with the work each rank did recorded
to show it was split. `mechanic locate trace` / `outliers` under 2 ranks: rank 0 alone writes and prints.
"""

import contextlib
import json
import tempfile
from pathlib import Path

import pytest
import torch

from mechanic import distributed as D
from mechanic.testing.tiny import tiny_model
from test_distributed import TOL, same, spawn
from test_magnitude import plant_super_weight, random_ids

IDS = torch.randint(3, 101, (7,), generator=torch.Generator().manual_seed(3))


@contextlib.contextmanager
def counting(owner, name: str, rows_of):
    """Inside, owner.name is wrapped to record the rows of each call (rows_of(args)) in the yielded list."""
    inner, seen = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        seen.append(rows_of(*args, **kwargs))
        return inner(*args, **kwargs)
    setattr(owner, name, wrapper)
    try:
        yield seen
    finally:
        setattr(owner, name, inner)


def trace_jobs():
    """Hidden, MLP and attention traces of a 6-layer tiny llama (ragged batches of 5 rows), the three at once, a
    restricted grid, and how many restoration rows each rank ran."""
    import mechanic
    import mechanic.locate.trace as T

    m = mechanic.load(tiny_model("llama", num_hidden_layers=6, initializer_range=0.2))
    answer = int(m.run(IDS[None]).logits[0, -1].argmax())    # the clean top token: restorations move it by ~0.1
    kw = dict(samples=4, window=3, batch_size=5)
    with counting(T, "suffix_logits", lambda model, base, rows, *a: len(rows)) as rows:
        out = {f"trace_{k}": T.causal_trace(m, IDS, answer, [1, 2], k, **kw) for k in ("hidden", "mlp", "attn")}
        out.update({f"traces_{k}": v for k, v in T.causal_traces(m, IDS, answer, [2], seed=3, **kw).items()})
        out["trace_grid"] = T.causal_trace(m, IDS, answer, [3], "mlp", layers=[1, 4], positions=[-1, 3], samples=3)
    out["rows"] = D.gather(sum(rows))
    return out


def outlier_jobs():
    """Massive activations (a planted spike; whole batches per rank, and one batch split by windows), super weights
    (a planted one, verified against random scalars), attention sinks, super experts (a planted one, pruned both
    ways), and the windows each rank ran forward."""
    import mechanic
    from mechanic.locate import magnitude as mg
    from mechanic.model.interventions import Intervention

    m, moe = mechanic.load(tiny_model("llama")), mechanic.load(tiny_model("qwen2_moe"))
    ids = random_ids(300, seed=3)
    spike = torch.zeros(m.dims.d_model)
    spike[7] = 5000.0
    iv = Intervention("L1.resid_post", "fn", lambda x: x + spike, pos=0, rows=[1])
    with counting(m, "run", lambda ids, *a, **k: ids.shape[0]) as rows, \
            counting(moe, "run", lambda ids, *a, **k: ids.shape[0]) as moe_rows:
        out = {"massive": mg.massive_activations(m, ids[:288], seq_len=32, batch_size=3, k=3, interventions=[iv]),
               "massive_one_batch": mg.massive_activations(m, ids[:288], seq_len=32, batch_size=16, k=2),
               "sinks": mg.attention_sinks(m, ids, seq_len=32, batch_size=2,
                                           sink_tokens=(int(ids[5]), int(ids[40])))}
        plant_super_weight(m, 1, row=5, col=11)
        out["super_weights"] = mg.super_weights(m, ids[:160], ids[160:], seq_len=32, batch_size=2, max_iter=2,
                                                n_random=3)
        with torch.no_grad():
            moe.layer_module(0, moe.arch.experts).down_proj[2] *= 40
        out["super_experts"] = mg.super_experts(moe, ids[:192], ids[192:], seq_len=32, batch_size=3,
                                                prune_tokens=96)
    out["rows"] = D.gather(sum(rows) + sum(moe_rows))
    return out


def failing_jobs():
    """Rank 1's restorations and forwards raise: every rank gets a DistributedError naming it (its message here)."""
    import mechanic
    import mechanic.locate.trace as T
    from mechanic.locate import magnitude as mg

    m = mechanic.load(tiny_model("llama", initializer_range=0.2))
    errors = {}

    def broken(*args, **kwargs):
        raise ValueError("a broken forward on this rank")
    if D.rank() == 1:
        T.suffix_logits, m.run = broken, broken
    for name, call in (("trace", lambda: T.causal_trace(m, IDS, 17, [1], samples=2)),
                       ("massive", lambda: mg.massive_activations(m, random_ids(200), seq_len=32, batch_size=2))):
        try:
            call()
        except D.DistributedError as e:
            errors[name] = str(e)
    return errors


def cli_jobs():
    """`mechanic locate trace` and `outliers` as torchrun runs them (each rank its own -o, to see who writes)."""
    from typer.testing import CliRunner

    from conftest import build_word_tokenizer
    from mechanic.cli import app
    from mechanic.locate import Scores

    root = Path(D.decide(tempfile.mkdtemp()))
    if D.is_main():
        tok = build_word_tokenizer()
        tiny_model("qwen2", vocab_size=len(tok), initializer_range=0.2).save_pretrained(root / "tiny")
        tok.save_pretrained(root / "tiny")
    D.barrier()
    import mechanic

    prompt = "In the morning the man went to the"
    tiny = mechanic.load(str(root / "tiny"))       # trace the tiny model's own answer: a random word's
    answer = tiny.tokenizer.decode([int(tiny.run(prompt, last_only=True).logits[0, -1].argmax())])  # P is ~1e-7
    out = {}
    runs = {"trace": (["trace", "--prompt", prompt, "--answer", answer,
                       "--subject", "the man", "--kind", "mlp", "--samples", "3", "--window", "2"], "scores.json"),
            "outliers": (["outliers", "--tokens", "256", "--detect-tokens", "128", "--verify-tokens", "128",
                          "--max-iter", "1", "--n-random", "1"], "attention_sinks.json")}
    for name, (args, first) in runs.items():
        where = root / f"{name}-rank{D.rank()}"
        res = CliRunner().invoke(app, ["locate", *args, "--model", str(root / "tiny"), "--json", "-o", str(where)])
        assert res.exit_code == 0, res.output
        files = sorted(p.name for p in where.iterdir()) if where.exists() else []
        out[name] = D.gather({"stdout": res.stdout, "files": files,
                              "scores": {f: Scores.load(where / f) for f in files if f.endswith(".json")}})
    return out


def smollm2_jobs():
    """SmolLM2: an MLP trace at the subject's last token and the last token, massive activations and sinks."""
    import mechanic
    from mechanic.data import text
    from mechanic.locate import magnitude as mg
    from mechanic.locate.trace import causal_trace

    m = mechanic.load("smollm2")
    return {"trace": causal_trace(m, "The Eiffel Tower is located in the city of", " Paris", "The Eiffel Tower", "mlp",
                                  samples=3, positions=[3, -1]),
            "massive": mg.massive_activations(m, text.calibration(), max_tokens=512, batch_size=2, k=1),
            "sinks": mg.attention_sinks(m, text.heldout(), max_tokens=256, batch_size=1)}


def spawn_one_thread(job, tmp_path):
    with pytest.MonkeyPatch.context() as env:     # only for the spawned ranks: never leak into later tests
        env.setenv("OMP_NUM_THREADS", "1")
        return spawn(job, tmp_path)


def equal_scores(a, b, exact: bool = False) -> float:
    """Assert two Scores agree (values within TOL, or bit for bit) and return the max abs diff of their values."""
    assert a.sites == b.sites and a.positions == b.positions and a.method == b.method
    assert a.values.shape == b.values.shape and b.values.abs().max() > 1e-3     # zeros would match trivially
    diff = (a.values - b.values).abs().max().item()
    print(f"{a.method}: max abs diff {diff:.3g}")      # shown with pytest -s
    assert diff == 0 if exact else diff <= TOL, diff
    same(a.settings, b.settings, a.method)
    return diff


def test_traces_on_two_ranks_equal_one_process(tmp_path):
    two = spawn_one_thread(trace_jobs, tmp_path)
    one = trace_jobs()
    for key in [k for k in one if k != "rows"]:
        equal_scores(two[key], one[key])
        assert two[key].values.shape[0] > 1
    (total,) = one["rows"]
    assert sum(two["rows"]) == total and abs(two["rows"][0] - two["rows"][1]) <= 0.1 * total   # halves of the rows


def test_outliers_on_two_ranks_equal_one_process(tmp_path):
    two = spawn_one_thread(outlier_jobs, tmp_path)
    one = outlier_jobs()
    equal_scores(two["massive"].scores, one["massive"].scores, exact=True)      # whole batches: bit for bit
    assert two["massive"].top == one["massive"].top and two["massive"].medians == one["massive"].medians
    flagged = [(t["layer"], t["dim"], t["window"], t["position"]) for t in one["massive"].massive]
    assert flagged == [(1, 7, 7, 0), (2, 7, 7, 0)]     # the spike is added to row 1 of each batch of 3 windows;
    # it is largest in window 7, rank 1's: its place comes through the reduction
    equal_scores(two["massive_one_batch"].scores, one["massive_one_batch"].scores)   # one batch: split by windows
    assert [(t["layer"], t["dim"], t["window"], t["position"]) for t in two["massive_one_batch"].top] == \
        [(t["layer"], t["dim"], t["window"], t["position"]) for t in one["massive_one_batch"].top]
    equal_scores(two["sinks"], one["sinks"])
    a, b = two["super_weights"], one["super_weights"]
    equal_scores(a.scores, b.scores, exact=True)
    assert [(c.layer, c.row, c.col) for c in b.candidates][:1] == [(1, 5, 11)]
    assert a.candidates == b.candidates and a.baseline_ppl == b.baseline_ppl   # perplexities dealt whole: bit for bit
    assert len(b.candidates[0].ppl_random) == 3 and b.candidates[0].ppl > b.baseline_ppl
    a, b = two["super_experts"], one["super_experts"]
    equal_scores(a.scores, b.scores, exact=True)
    assert [s["site"] for s in b.super] == ["L0.expert2"] and len(b.pruning) == 2
    assert a.pruning == b.pruning and a.baseline == b.baseline
    (total,) = one["rows"]
    assert sum(two["rows"]) < 1.1 * total and max(two["rows"]) < 0.7 * total     # each rank ran about half


def test_a_failing_rank_is_named(tmp_path):
    errors = spawn_one_thread(failing_jobs, tmp_path)
    assert set(errors) == {"trace", "massive"}
    for text in errors.values():
        assert "1 of 2 ranks failed: rank 1 raised ValueError: a broken forward on this rank" in text


def test_locate_trace_and_outliers_cli_rank_0_alone_writes_and_prints(tmp_path):
    two = spawn_one_thread(cli_jobs, tmp_path)
    one = cli_jobs()
    for name in ("trace", "outliers"):
        (main, other), (alone,) = two[name], one[name]
        assert other == {"stdout": "", "files": [], "scores": {}}, name      # rank 1 wrote and printed nothing
        assert main["files"] == alone["files"] and main["files"], name
        for f, s in alone["scores"].items():
            assert (main["scores"][f].values - s.values).abs().max().item() <= TOL, (name, f)
        printed, ref = json.loads(main["stdout"]), json.loads(alone["stdout"])
        for k in ("seconds", "out", "model"):     # the clock, and each run's own temporary directory
            printed.pop(k, None), ref.pop(k, None)
        same(printed, ref, name)
    assert one["trace"][0]["scores"]["scores.json"].values.abs().max() > 1e-3


@pytest.mark.real
def test_smollm2_on_two_ranks_equals_one_process(tmp_path, smollm2):
    two = spawn_one_thread(smollm2_jobs, tmp_path)
    one = smollm2_jobs()
    equal_scores(two["trace"], one["trace"])
    equal_scores(two["massive"].scores, one["massive"].scores, exact=True)
    assert two["massive"].top == one["massive"].top
    equal_scores(two["sinks"], one["sinks"])
