"""Data-parallel work over 2 gloo ranks on CPU equals the single-process run (max abs diff <= 1e-6).

Two processes are spawned once per group of checks (torch.multiprocessing, a file store, 1 thread each);
rank 0 saves what every entry point returned and the parent compares it with the same call in one process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mechanic import distributed as D
from mechanic.tasks import TaskBatch
from mechanic.testing.tiny import left_padded, tiny_model

TOL = 1e-6
N = 5            # odd: the two shards have 3 and 2 examples


def tiny_batch(model, n=N):
    """n left-padded clean/corrupted prompts of different lengths with random answer and wrong tokens."""
    lengths = [6, 5, 6, 4, 6, 5, 3][:n]
    clean = model.inputs(left_padded(lengths, seed=1))
    corr = model.inputs(left_padded(lengths, seed=2))
    g = torch.Generator().manual_seed(3)
    ans, wrong = torch.randint(3, 100, (n,), generator=g), torch.randint(3, 100, (n,), generator=g)
    toks = [[f"t{i}" for i in range(6)]] * n
    return TaskBatch(clean, corr, ans, wrong, toks)


def locate_jobs():
    """Every located Scores, by name, from the calls the test compares (run under 1 or 2 ranks)."""
    import mechanic
    from mechanic.locate.causal import patch
    from mechanic.locate.gradient import atp, eap
    from mechanic.locate.neurons import neuron_attribution
    from mechanic.locate.parallel import data_parallel, parallel

    m = mechanic.load(tiny_model("llama"))
    b = tiny_batch(m)
    out = {"patch_resid": parallel(patch, m, b, kind="resid_pre", positions="all", progress=False),
           "patch_head_noise": parallel(patch, m, b, kind="head", positions=None, direction="noise", progress=False),
           "patch_mean_ablation": parallel(patch, m, b, kind="mlp_out", positions=[-1], ablation="mean",
                                           progress=False),
           "patch_decorated": data_parallel(patch)(m, b, "attn_out", [-1, 2], progress=False),   # positional
           "eap": parallel(eap, m, b),
           "eap_ig": parallel(eap, m, b, ig_steps=2)}
    out.update({f"atp_{k}": v for k, v in parallel(atp, m, b, kind=["head", "resid_pre"], batch_size=2).items()})
    out.update({f"neurons_{k}": v for k, v in parallel(neuron_attribution, m, b, kinds=["head", "neuron"]).items()})
    out["neurons_decorated"] = neuron_attribution(m, b, ["attn", "mlp"])["mlp"]       # splits by itself (positional)
    out["shards"] = [D.bounds(b.n, r) for r in range(D.world())]
    out.update(collect_jobs(m, b))
    return out


def collect_jobs(m, b):
    """Cached activations of 5 left-padded rows (shards 3 + 2) at several sites, and of 1 row (one empty shard)."""
    from mechanic.model.parallel import collect

    sites = ["L1.resid_post", "L0.head", "L1.neuron"]
    many = collect(m, b.clean, sites, batch_size=2)
    one = collect(m, {k: v[:1] for k, v in b.clean.items()}, "L0.attn_out")
    plain = m.run(b.clean, cache=sites)       # one forward of every row, no batching: the reference
    flags = D.gather_rows(torch.tensor([True, False]) if D.is_main() else None)   # bool; rank 1 sends no rows
    return {"collect": many, "collect_ref": {s: plain[s] for s in sites}, "collect_one": one, "bools": flags}


def evaluate_jobs():
    """evaluate, plain and with collect_before's values (as recipes call it), of an ablation on a worded tiny model."""
    import mechanic
    from conftest import build_word_tokenizer
    from mechanic.improve.evaluate import (EditMeasure, FluencyMeasure, KLMeasure, PerplexityMeasure, TaskMeasure,
                                           collect_before, evaluate)
    from mechanic.steer.ablate import ablate
    from mechanic.steer.edit import Fact
    from mechanic.tasks.builtin import load_task

    tok = build_word_tokenizer()
    m = mechanic.load(tiny_model("qwen2", vocab_size=len(tok)), tokenizer=tok)
    facts = [Fact("Paris is a city in the country of", "Paris", " Italy", " France",
                  ("Paris is located in the country of",), ("Lyon is a city in the country of",)),
             Fact("Toyota is a company from", "Toyota", " Germany", " Japan")]
    measures = [TaskMeasure(load_task("facts", n=5)), EditMeasure(facts), PerplexityMeasure(max_tokens=192, seq_len=64),
                KLMeasure(max_tokens=128, seq_len=64), FluencyMeasure(["The weather", "Once upon a time"],
                                                                      max_new_tokens=6)]
    plan = ablate(m, ["L1.mlp_out", "L2.head0"], "zero")
    plain = evaluate(m, plan, measures, n_boot=200, n_perm=200).to_dict()
    before = collect_before(m, measures)
    staged = evaluate(m, plan, measures, n_boot=200, n_perm=200, before=before).to_dict()
    return {"plain": plain, "staged": staged, **sweep_jobs(m)}


def sweep_jobs(m):
    """Steering sweeps split by layer (3 layers: shards of 2 and 1) and by coefficient."""
    from mechanic.steer.parallel import parallel_sweep
    from mechanic.steer.vectors import caa, pairs_from_task
    from mechanic.tasks import Example, Task

    task = Task("t", [Example("I loved this film, it was", " great", " awful", "I hated this film, it was"),
                      Example("What a good day, so", " happy", " sad", "What a bad day, so")])
    v = caa(m, pairs_from_task(task), layers=[0, 1, 2])
    kw = dict(neutral=["It was the best of times, it was the worst of times, it was the age of wisdom."] * 4,
              neutral_tokens=48, seq_len=16)
    return {"sweep_layers": parallel_sweep(m, v, task, [0, 1, 2], [0.0, 3.0], **kw),
            "sweep_coefficients": parallel_sweep(m, v, task, [1], [-2.0, 0.0, 3.0], **kw),
            **recipe_sweep_jobs(m, task)}


def recipe_sweep_jobs(m, task):
    """The vector_sweep recipe method (as a recipe's locate stage calls it): its stage output, and the layers each
    rank swept (steer.sweep.sweep's calls, recorded)."""
    import tempfile

    import mechanic.steer.parallel as P
    from mechanic.recipes.locate_methods import VectorSweep, vector_sweep
    from mechanic.recipes.methods import Context

    swept, inner = [], P.sweep

    def recording(model, vector, task, layers, coefficients, **kw):
        swept.append([int(x) for x in layers])
        return inner(model, vector, task, layers, coefficients, **kw)
    settings = VectorSweep(layers=[0, 1, 2], coefficients=[0.0, 3.0], max_kl=5.0, neutral_tokens=64)
    P.sweep = recording
    try:
        out = vector_sweep(Context(m, task, settings, Path(tempfile.mkdtemp()), validation=task))
    finally:
        P.sweep = inner
    return {"recipe_sweep": out.to_dict(), "recipe_swept": D.gather(swept)}


def cli_jobs():
    """`mechanic locate patch` and `neurons` as torchrun runs them (every rank the same command; here each rank gets
    its own -o, to see who writes): every rank's output, files written and Scores."""
    import tempfile

    from typer.testing import CliRunner

    from conftest import build_word_tokenizer
    from mechanic.cli import app
    from mechanic.locate import Scores

    root = Path(D.decide(tempfile.mkdtemp()))
    if D.is_main():
        recipe_files(root, build_word_tokenizer())
    D.barrier()
    common = ["--task", str(root / "task.jsonl"), "--model", str(root / "tiny"), "--json"]
    out = {}
    for name, args in (("patch", ["patch", "--kind", "resid_pre", "--positions", "-1"]), ("neurons", ["neurons"])):
        where = root / f"{name}-rank{D.rank()}"
        res = CliRunner().invoke(app, ["locate", *args, *common, "-o", str(where)])
        assert res.exit_code == 0, res.output
        files = sorted(p.name for p in where.iterdir()) if where.exists() else []
        out[name] = D.gather({"stdout": res.stdout, "files": files,
                              "scores": Scores.load(where / "scores.json") if files else None})
    return out


def failing_job():
    """Rank 1 raises; rank 0 would succeed."""
    from mechanic import distributed as D

    def work():
        if D.rank() == 1:
            raise ValueError("shard 1 has a broken example")
        return 1
    return D.run(work)


JOBS = {"locate": locate_jobs, "evaluate": evaluate_jobs, "cli": cli_jobs, "fail": failing_job}


def _worker(rank, world, store, job, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = (JOBS[job] if isinstance(job, str) else job)()
        if rank == 0:
            torch.save(result, out)
        dist.barrier()      # neither rank tears gloo down while the other still uses it (SIGABRT in CI under load)
    finally:
        dist.destroy_process_group()


def spawn(job, tmp_path, world=2):
    """Run JOBS[job] (or job, a module-level function) on `world` gloo ranks; rank 0's result."""
    name = job if isinstance(job, str) else job.__name__
    store, out = tmp_path / f"store-{name}", tmp_path / f"{name}.pt"
    mp.spawn(_worker, args=(world, str(store), job, str(out)), nprocs=world, join=True)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def located(tmp_path_factory):
    """(2 ranks, 1 process) results of locate_jobs."""
    with pytest.MonkeyPatch.context() as mp_env:      # only for the spawned ranks: never leak into later tests
        mp_env.setenv("OMP_NUM_THREADS", "1")
        two = spawn("locate", tmp_path_factory.mktemp("dist"))
    one = locate_jobs()
    return two, one


KEYS = ["patch_resid", "patch_decorated", "patch_head_noise", "patch_mean_ablation", "eap", "eap_ig", "atp_head",
        "atp_resid_pre", "neurons_head", "neurons_neuron", "neurons_decorated"]


@pytest.mark.parametrize("key", KEYS)
def test_two_ranks_equal_one_process(located, key):
    two, one = located
    a, b = two[key], one[key]
    assert a.sites == b.sites and a.positions == b.positions and a.method == b.method and a.task == b.task
    assert a.values.shape == b.values.shape
    assert (a.values - b.values).abs().max().item() <= TOL
    assert b.values.abs().max().item() > 1e-3        # something was scored: zeros would match trivially
    assert set(a.settings) == set(b.settings)
    for k, v in b.settings.items():
        if isinstance(v, float):
            assert abs(a.settings[k] - v) <= TOL, k
        else:
            assert a.settings[k] == v, k


def test_collected_activations_equal_one_process(located):
    two, one = located
    for key in ("collect", "collect_one"):
        assert set(two[key]) == set(one[key])
        for site, v in one[key].items():
            assert two[key][site].shape == v.shape and v.abs().max().item() > 0, site
            assert (two[key][site] - v).abs().max().item() <= TOL, site
    for site, v in one["collect_ref"].items():
        assert (two["collect"][site] - v).abs().max().item() <= TOL, site
    assert one["collect"]["L1.resid_post"].shape[0] == N
    assert two["bools"].tolist() == [True, False]


def test_shards_are_uneven_contiguous_and_cover_every_example(located):
    two, _ = located
    assert two["shards"] == [(0, 3), (3, 5)]
    assert [D.bounds(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert D.bounds(1, 1, 2) == (1, 1)       # more ranks than examples: an empty shard
    assert D.shard(list(range(5)), 1, 2) == [3, 4]


def same(a, b, where="") -> None:
    """a equals b: floats within TOL, everything else exactly (timings and threads per process aside)."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            if k not in ("seconds", "torch_threads"):     # torchrun gives each rank 1 thread by default
                same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == b or abs(a - b) <= TOL or (a != a and b != b), (where, a, b)
    else:
        assert a == b, (where, a, b)


def test_evaluate_and_sweeps_on_two_ranks_equal_one_process(tmp_path):
    two = spawn("evaluate", tmp_path)
    one = evaluate_jobs()
    for k in ("plain", "staged"):
        same(two[k], one[k], k)
        assert {r["measure"] for r in two[k]["rows"]} == {"facts", "edit", "perplexity", "kl", "fluency"}
    assert one["plain"]["rows"][0]["delta"]["mean"] != 0      # the plan moves something
    same(two["plain"]["rows"], two["staged"]["rows"])
    for k in ("sweep_layers", "sweep_coefficients"):
        for part in ("target", "kl", "ppl"):
            a, b = getattr(two[k], part), getattr(one[k], part)
            assert a.sites == b.sites and a.positions == b.positions and a.settings == b.settings, (k, part)
            assert (a.values - b.values).abs().max().item() <= TOL, (k, part)
        assert two[k].baseline == one[k].baseline
    assert one["sweep_layers"].target.values.shape == (3, 2) and one["sweep_layers"].kl.values.max() > 1e-4
    same(two["recipe_sweep"], one["recipe_sweep"], "recipe_sweep")      # text, heatmaps, chosen cell, baseline
    assert two["recipe_swept"] == [[[0, 1]], [[2]]] and one["recipe_swept"] == [[[0, 1, 2]]]   # the cells were split


def test_locate_cli_splits_and_rank_0_alone_writes_and_prints(tmp_path):
    with pytest.MonkeyPatch.context() as mp_env:
        mp_env.setenv("OMP_NUM_THREADS", "1")
        two = spawn("cli", tmp_path)
    one = cli_jobs()
    for name in ("patch", "neurons"):
        (main, other), (alone,) = two[name], one[name]
        assert other == {"stdout": "", "files": [], "scores": None}, name      # rank 1 wrote and printed nothing
        assert main["files"] == alone["files"] == ["heatmap.html", "scores.json", "scores.safetensors"], name
        sa, sb = main["scores"], alone["scores"]
        assert sa.sites == sb.sites and sa.values.shape == sb.values.shape and sb.values.abs().max() > 1e-3, name
        a, b = sa.values, sb.values
        if name == "patch":   # undo the normalisation by the clean - corrupted gap (tiny here: it magnifies 1e-7)
            a, b = (x.values * (x.settings["metric_clean"] - x.settings["metric_corrupted"]) +
                    x.settings["metric_corrupted"] for x in (sa, sb))
        assert (a - b).abs().max().item() <= TOL * max(1.0, b.abs().max().item()), name
        n = "n_examples" if name == "neurons" else "examples"
        assert json.loads(main["stdout"])["settings"][n] == sb.settings[n] > 1, name


def test_a_rank_that_raises_is_named_in_the_parent(tmp_path):
    with pytest.raises(Exception) as err:
        spawn("fail", tmp_path)
    text = str(err.value)
    assert "rank 1 raised ValueError: shard 1 has a broken example" in text
    assert "DistributedError" in text


def test_single_process_calls_pass_through():
    assert not D.is_distributed() and D.rank() == 0 and D.world() == 1 and D.is_main()
    assert D.run(lambda: 7) == [7] and D.decide("x") == "x" and D.gather(3) == [3]
    with pytest.raises(ValueError, match="plain"):
        D.run(lambda: (_ for _ in ()).throw(ValueError("plain")))


# ---------------------------------------------------------------- a recipe run under torchrun
WORDS = [" man", " woman", " king", " father", " mother", " city", " house", " river", " water", " fire", " land",
         " war", " peace", " law", " church", " people", " world", " day", " night"]   # one token each


def recipe_files(tmp_path, tok) -> Path:
    """A tiny worded model directory, a 24-row task file (train/validation/test rows) and a recipe using both."""
    d = tmp_path / "tiny"
    tiny_model("qwen2", vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    rows = []
    for i in range(24):
        a, b = WORDS[i % 19], WORDS[(i * 7 + 3) % 19]
        ans, wrong = WORDS[(i * 5 + 1) % 19], WORDS[(i * 3 + 2) % 19]
        rows.append({"prompt": f"In the morning the{a} went to the", "answer": ans,
                     "wrong": wrong if wrong != ans else WORDS[(i * 3 + 3) % 19],
                     "corrupted": f"In the morning the{b if b != a else WORDS[(i + 1) % 19]} went to the",
                     "split": "train" if i < 12 else ("validation" if i < 16 else "test")})
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: tiny
title: "Neurons, tiny"
model: {d}
task: {{file: {tmp_path / 'task.jsonl'}}}
locate: {{method: neuron_attribution, top_k: 4, keep: 2}}
steer: {{method: neuron_edit, factor: 0.0}}
evaluate: {{target: [task], side_effects: [kl], n_boot: 200}}
""")
    return recipe


def without_clocks(results: dict) -> dict:
    """results.json without what differs between any two runs (timings, command line, finish time)."""
    r = json.loads(json.dumps(results))
    for k in ("timings", "command", "finished"):
        r["manifest"].pop(k)
    r["evaluation"].pop("seconds")
    for s in r["stages"]:
        s.pop("seconds")
    return r


def test_recipe_with_two_procs_writes_the_same_results_once(tmp_path, word_tokenizer):
    from typer.testing import CliRunner

    from mechanic.cli import app

    recipe = recipe_files(tmp_path, word_tokenizer)
    one = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "one"), "--json"])
    assert one.exit_code == 0, one.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "mechanic", "run", str(recipe), "-o", str(tmp_path / "two"),
                          "--procs", "2", "--json"], capture_output=True, text=True, env=env, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    same(without_clocks(b), without_clocks(a))
    assert json.loads(two.stdout[two.stdout.index("{"):]) == b         # rank 0 alone printed
    left = [p.name for p in (tmp_path / "two").rglob("*") if "rank" in p.name or p.name.startswith(".")]
    assert sorted(p.name for p in (tmp_path / "two" / "stages").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one" / "stages").iterdir()) and not [x for x in left if "rank" in x]
