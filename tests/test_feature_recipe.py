"""Feature recipes: feature_attribution ranks latents like a plain-autograd loop, feature_steer builds the
feature plans one would by hand, and a tiny recipe trains (once), locates, steers and evaluates end to end."""

import json

import pytest
import torch
from naive import blocks

import mechanic
from mechanic.features import Dictionary, save
from mechanic.recipes.methods import StageOut, run_method
from mechanic.recipes.schema import MethodSpec, RecipeError
from mechanic.steer.feature_plans import feature_ablate, feature_clamp, feature_scale
from mechanic.steer.plan import Plan
from mechanic.tasks.builtin import load_task
from mechanic.testing.tiny import tiny_model

SITE = "L1.resid_post"


@pytest.fixture(scope="module")
def worded(word_tokenizer):
    """A tiny random qwen2 that reads words, so built-in suites tokenize."""
    return lambda: mechanic.load(tiny_model("qwen2", vocab_size=len(word_tokenizer)), tokenizer=word_tokenizer)


@pytest.fixture(scope="module")
def gender(tmp_path_factory, word_tokenizer) -> str:
    """The gender suite's rows whose clean and corrupted prompts have equal lengths under the word tokenizer."""
    from dataclasses import asdict

    tok = lambda t: len(word_tokenizer(t)["input_ids"])  # noqa: E731
    rows = [asdict(e) for e in load_task("gender").split(["train", "validation", "test"]).examples
            if tok(e.prompt) == tok(e.corrupted)]
    path = tmp_path_factory.mktemp("task") / "gender.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def random_dictionary(m, tmp_path, seed=0):
    """A ReLU SAE with random weights at SITE, saved in the SAELens format."""
    D = m.dims.d_model
    d = Dictionary(D, 4 * D, "relu", site=SITE)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save(d, tmp_path / "sae"), d


def naive_latent_scores(m, d, b) -> torch.Tensor:
    """(a_clean - a_corr) . dmetric/da per latent at the corrupted run, summed over positions, mean over examples:
    a plain forward hook on block 1 replaces its output by relu((x - b_dec) W_enc + b_enc) W_dec + b_dec + error,
    the latents an autograd leaf, metric logit(answer) - logit(wrong) by hand."""
    blk = blocks(m.hf)[1]
    W_enc, b_enc, W_dec, b_dec = (t.detach() for t in (d.W_enc, d.b_enc, d.W_dec, d.b_dec))
    got = {}

    def read(mod, args, out):
        got["x"] = (out[0] if isinstance(out, tuple) else out).detach()
    h = blk.register_forward_hook(read)
    with torch.no_grad():
        m.hf(**b.clean)
        a_clean = torch.relu((got["x"] - b_dec) @ W_enc + b_enc)
        m.hf(**b.corrupted)
        x = got["x"]
    h.remove()
    a_corr = torch.relu((x - b_dec) @ W_enc + b_enc)
    err = x - (a_corr @ W_dec + b_dec)
    A = a_corr.clone().requires_grad_()

    def write(mod, args, out):
        new = A @ W_dec + b_dec + err
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
    h = blk.register_forward_hook(write)
    lg = m.hf(**b.corrupted).logits[:, -1]
    h.remove()
    rows = torch.arange(lg.shape[0])
    (g,) = torch.autograd.grad((lg[rows, b.answer] - lg[rows, b.wrong]).sum(), [A])
    return ((a_clean - a_corr) * g).sum((0, 1)) / lg.shape[0]


def locate(m, task, path, tmp_path, **settings):
    spec = MethodSpec(method="feature_attribution", dictionary=str(path), **settings)
    (tmp_path / "locate").mkdir(exist_ok=True)
    return run_method("locate", {"model": m, "task": task, "dir": tmp_path / "locate"}, spec)


@pytest.mark.parametrize("by", ["max", "abs"])
def test_feature_attribution_top_latents_equal_a_plain_autograd_ranking(worded, gender, tmp_path, by):
    m = worded()
    task = load_task(gender).split("train")
    path, d = random_dictionary(m, tmp_path)
    out = locate(m, task, path, tmp_path, top_k=8, by=by)
    ref = naive_latent_scores(m, d, task.tokenize(m))
    assert ref.abs().max() > 1e-4                                     # not a ranking of zeros
    key = ref if by == "max" else ref.abs()
    want = [f"{SITE}.sae{i}" for i in key.argsort(descending=True)[:8].tolist()]
    assert out.data["latents"] == want
    assert out.data["site"] == SITE and out.data["dictionary"] == str(path)
    table = next(f for f in out.figures if f["id"] == "latents")
    assert [r[0] for r in table["rows"]] == want
    assert abs(table["rows"][0][1] - float(ref[int(want[0].split("sae")[-1])])) < 1e-4 * float(ref.abs().max())


def test_feature_attribution_refuses_a_dictionary_that_does_not_fit(worded, gender, tmp_path):
    m = worded()
    d = Dictionary(m.dims.d_model + 3, 8, "relu", site=SITE)
    path = save(d, tmp_path / "wide")
    with pytest.raises(RecipeError, match="dictionary .*wide.*width"):
        locate(m, load_task(gender).split("train"), path, tmp_path)


def steer(m, found, tmp_path, name="steer", seed=0, **settings):
    d = tmp_path / name
    d.mkdir()
    spec = MethodSpec(method="feature_steer", **settings)
    run_method("steer", {"model": m, "task": None, "dir": d, "found": found, "seed": seed}, spec)
    return Plan.load(d / "plan.safetensors")


def effect(m, plan, ids) -> torch.Tensor:
    with m.applied(plan):
        return m.run(ids).logits


@pytest.mark.parametrize("how, by_hand", [
    ("scale", lambda m, x: feature_scale(m, x, 0.5)),
    ("clamp", lambda m, x: feature_clamp(m, x, 2.0)),
    ("ablate", lambda m, x: feature_ablate(m, x)),
])
def test_feature_steer_plan_equals_feature_plans_applied_by_hand(worded, tmp_path, how, by_hand):
    m = worded()
    path, d = random_dictionary(m, tmp_path, seed=1)
    latents = [f"{SITE}.sae{i}" for i in (5, 2, 9, 30)]
    found = StageOut(data={"latents": latents, "dictionary": str(path)})
    plan = steer(m, found, tmp_path, how=how, factor=0.5, value=2.0, count=3)
    assert plan.settings["latents"] == latents[:3]
    hand = Plan()
    for x in latents[:3]:
        hand = hand + by_hand(m, x)
    assert [(iv.op, str(iv.site)) for iv in plan.interventions] == [(iv.op, str(iv.site)) for iv in hand.interventions]
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    got, want, plain = effect(m, plan, ids), effect(m, hand, ids), m.run(ids).logits
    assert (got - want).abs().max() < 1e-5 and (got - plain).abs().max() > 1e-3   # the same, and not a no-op


def test_feature_steer_random_draws_other_latents_of_the_same_dictionary(worded, tmp_path):
    m = worded()
    path, d = random_dictionary(m, tmp_path)
    latents = [f"{SITE}.sae{i}" for i in range(6)]
    found = StageOut(data={"latents": latents, "dictionary": str(path)})
    a = steer(m, found, tmp_path, "a", seed=3, count=4, random=True).settings["latents"]
    b = steer(m, found, tmp_path, "b", seed=3, count=4, random=True).settings["latents"]
    c = steer(m, found, tmp_path, "c", seed=4, count=4, random=True).settings["latents"]
    assert a == b != c and len(a) == 4 and not set(a) & set(latents)
    assert all(x.startswith(f"{SITE}.sae") and int(x.split("sae")[-1]) < d.d_sae for x in a + c)
    with pytest.raises(RecipeError, match="needs steer.value"):
        steer(m, found, tmp_path, "d", how="clamp")


TINY = """\
name: tiny-features
title: "Gender latents, tiny"
task: {file: GENDER, label: gender}
locate:
  method: feature_attribution
  top_k: 4
  dictionary: {train: {site: L1.resid_post, expansion: 2, k: 4, tokens: 2048, batch_size: 256, buffer_tokens: 1024,
                       seq_len: 32}}
steer: {method: feature_steer, how: scale, factor: 0.0}
select: {grid: {count: [1, 4], factor: [0.0]}}
baselines: {random: {method: feature_steer, how: scale, factor: 0.0, random: true, draws: 2}}
evaluate: {target: [task], better: lower, contrast: true, task: {file: GENDER, label: gender}, side_effects: [kl],
           n_boot: 200}
"""


def test_tiny_feature_recipe_trains_once_locates_steers_and_evaluates(worded, gender, tmp_path, monkeypatch):
    from mechanic.recipes.runner import run

    tiny = worded()
    monkeypatch.setattr(mechanic, "load", lambda name, **kw: tiny)
    p = tmp_path / "r.yaml"
    recipe = TINY.replace("GENDER", gender)
    p.write_text(recipe)
    out = tmp_path / "run"
    res = run(p, out, log=lambda s: None)
    stages = {s["name"]: s for s in res["stages"]}
    assert list(stages) == ["dictionary", "locate", "select", "steer"]
    trained = next((out / "stages").glob("dictionary-*")) / "L1.resid_post.topk"
    assert (trained / "cfg.json").is_file() and stages["locate"]["data"]["dictionary"] == str(trained)
    located = stages["locate"]["data"]["latents"]
    assert len(located) == 4 and all(x.startswith("L1.resid_post.sae") for x in located)
    assert stages["steer"]["data"]["latents"] == located[: stages["select"]["data"]["choice"]["count"]]
    assert len(res["baselines"]["random"]["rows"]["gender.logit_diff"]["draws"]) == 2
    assert any(r["id"] == "gender.logit_diff" for r in res["evaluation"]["rows"])
    json.dumps(res)

    logs = []            # another top_k: the locate stage re-runs, the dictionary is reused, not retrained
    p.write_text(recipe.replace("top_k: 4", "top_k: 3"))
    again = run(p, out, log=logs.append)
    assert [x.split("]")[0] for x in logs if "reused" in x] == ["[dictionary"]
    assert again["stages"][1]["data"]["dictionary"] == str(trained)

    # the same dictionary given as a directory: no training stage, the same latents located
    spec = "dictionary: {train: {site: L1.resid_post, expansion: 2, k: 4, tokens: 2048, batch_size: 256, " \
           "buffer_tokens: 1024,\n                       seq_len: 32}}"
    assert spec in recipe
    import shutil

    mine = shutil.copytree(trained, tmp_path / "mine")
    p.write_text(recipe.replace(spec, f"dictionary: {mine}"))
    given = run(p, tmp_path / "given", log=lambda s: None)
    assert [s["name"] for s in given["stages"]][0] == "locate"
    assert given["stages"][0]["data"]["latents"] == located

    logs.clear()        # new weights in that directory: its digest changes, so locate runs again
    random_dictionary(tiny, tmp_path, seed=5)
    shutil.copy(tmp_path / "sae" / "sae_weights.safetensors", mine / "sae_weights.safetensors")
    shutil.copy(tmp_path / "sae" / "cfg.json", mine / "cfg.json")
    run(p, tmp_path / "given", log=logs.append)
    assert not [x for x in logs if "reused" in x]


def test_feature_scale_matches_a_plain_hook(worded, tmp_path):
    """feature_scale(f, c) adds (c - 1) a_f W_dec[f] to the block output; a_f computed by hand from the SAE."""
    from mechanic.features import attach

    m = worded()
    _, d = random_dictionary(m, tmp_path, seed=2)
    attach(m, d)
    W_enc, b_enc, W_dec, b_dec = (t.detach() for t in (d.W_enc, d.b_enc, d.W_dec, d.b_dec))
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(4))
    acts = lambda x: torch.relu((x - b_dec) @ W_enc + b_enc)  # noqa: E731
    seen = {}

    def read(mod, args, out):
        seen["x"] = (out[0] if isinstance(out, tuple) else out).detach()
    h = blocks(m.hf)[1].register_forward_hook(read)
    with torch.no_grad():
        m.hf(input_ids=ids)
    h.remove()
    f = int(acts(seen["x"]).sum((0, 1)).argmax())                  # a latent that fires, so the test can fail

    def hook(mod, args, out):
        x = out[0] if isinstance(out, tuple) else out
        new = x + (0.25 - 1) * acts(x)[..., f:f + 1] * W_dec[f]
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
    h = blocks(m.hf)[1].register_forward_hook(hook)
    with torch.no_grad():
        want = m.hf(input_ids=ids).logits
    h.remove()
    got, plain = effect(m, feature_scale(m, f"{SITE}.sae{f}", 0.25), ids), m.run(ids).logits
    assert (got - want).abs().max() < 1e-4 and (got - plain).abs().max() > 1e-3
