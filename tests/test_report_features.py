"""Feature cards in the run report: a feature recipe's `features` stage pages the steered and top located latents
on the dictionary corpus's held-out split (resumable, no task rows read), and headless Chromium draws every card
with its histogram, numbers equal to results.json and hostile text inert."""

import copy
import json
import os

import pytest
import torch
from naive import blocks
from test_feature_recipe import TINY, gender, worded  # noqa: F401  (fixtures)
from test_report import lookup, n_plots
from test_untrusted import HOSTILE

import mechanic
from mechanic.data.windows import stream_windows
from mechanic.features import load
from mechanic.features.corpus import passages
from mechanic.recipes.feature_pages import CALIBRATION, GCIDE_HELDOUT, MAX_CARDS, page_tokens, text_source, wanted
from mechanic.recipes.methods import StageOut
from mechanic.report import build_report
from mechanic.report.feature_pages import visible
from mechanic.report.screenshot import CHROMIUM, opened

SITE = "L1.resid_post"


@pytest.fixture(scope="module")
def tiny_run(worded, gender, tmp_path_factory):  # noqa: F811
    """The tiny feature recipe (12 latents located) run twice into one directory: (results, rerun, logs, model, dir)."""
    from mechanic.recipes.runner import run

    tiny = worded()
    mp = pytest.MonkeyPatch()
    mp.setattr(mechanic, "load", lambda name, **kw: tiny)
    p = tmp_path_factory.mktemp("recipe") / "r.yaml"
    p.write_text(TINY.replace("GENDER", gender).replace("top_k: 4", "top_k: 12"))
    out = p.parent / "run"
    logs: list[str] = []
    try:
        res = run(p, out, log=lambda s: None, report=build_report)
        again = run(p, out, log=logs.append, report=build_report)
    finally:
        mp.undo()
    return res, again, logs, tiny, out


def test_cards_are_the_steered_latents_then_the_top_located(tiny_run):
    res, _, _, _, _ = tiny_run
    st = {s["name"]: s for s in res["stages"]}
    assert list(st) == ["dictionary", "locate", "select", "steer"]       # the pages are not a stage card
    located, steered = st["locate"]["data"]["latents"], st["steer"]["data"]["latents"]
    fp = res["feature_pages"]
    want = list(dict.fromkeys(steered + located))[:MAX_CARDS]
    assert len(located) == 12 and len(want) == MAX_CARDS
    assert [f["role"]["latent"] for f in fp["features"]] == want
    assert [f["id"] for f in fp["features"]] == [int(x.split("sae")[-1]) for x in want]
    score = {r[0]: r[1] for r in st["locate"]["figures"][0]["rows"]}
    for f in fp["features"]:
        r = f["role"]
        assert r["steered"] == (r["latent"] in steered)
        assert r["rank"] == located.index(r["latent"]) + 1 and r["attribution"] == score[r["latent"]]
    assert fp["text"] == GCIDE_HELDOUT and fp["dictionary"]["path"] == st["locate"]["data"]["dictionary"]
    assert fp["tokens"] == fp["windows"] * (fp["seq_len"] - 1) and fp["windows"] * fp["seq_len"] >= page_tokens(2048)
    assert sum(f["count"] > 0 for f in fp["features"]) > 0
    assert "features" in res["manifest"]["timings"]
    assert not [x for x in res["manifest"]["reads"] if x["stage"] == "features"]    # no task rows read
    json.dumps(res)


@torch.no_grad()
def test_contexts_are_held_out_windows_with_activations_of_a_plain_forward(tiny_run):
    """Each card's best context: the window of the corpus's held-out stream it names, activations recomputed with a
    plain forward hook on block 1 and the dictionary's encoder by hand."""
    res, _, _, m, _ = tiny_run
    fp = res["feature_pages"]
    d = load(fp["dictionary"]["path"])
    stream = stream_windows(m, passages(None, "heldout"), fp["seq_len"], chunk=64)
    wins = torch.stack([next(stream) for _ in range(fp["windows"])])
    got = {}
    h = blocks(m.hf)[1].register_forward_hook(lambda mod, a, o: got.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    m.hf(input_ids=wins)
    h.remove()
    assert d.architecture == "topk" and d.normalize == "none" and d.apply_b_dec_to_input
    assert not d.rescale_acts_by_decoder_norm
    z = (got["x"] - d.b_dec) @ d.W_enc + d.b_enc                       # TopK by hand: the k largest pre-activations
    acts = torch.zeros_like(z).scatter(-1, z.topk(d.k, -1).indices, z.topk(d.k, -1).values.clamp_min(0))
    worst, seen = 0.0, 0
    for f in fp["features"]:
        for c in f["contexts"][:3]:
            w, p = c["window"], c["position"]
            worst = max(worst, abs(c["value"] - float(acts[w, p, f["id"]])))
            lo = p - c["at"]
            assert "".join(c["tokens"]) == m.tokenizer.decode(wins[w, lo:lo + len(c["tokens"])])
            ref = [float(acts[w, lo + j, f["id"]]) for j in range(len(c["acts"]))]
            worst = max([worst] + [abs(a - r) for a, r in zip(c["acts"], ref) if a is not None])
            seen += 1
        if f["contexts"]:
            assert f["contexts"][0]["value"] == pytest.approx(float(acts[:, 1:, f["id"]].max()), abs=1e-4)
    assert seen > 0 and worst < 1e-4, worst


def test_a_rerun_reuses_the_features_stage(tiny_run):
    res, again, logs, _, out = tiny_run
    assert any(s.startswith("[features] reused") for s in logs)
    a, b = copy.deepcopy(res["feature_pages"]), copy.deepcopy(again["feature_pages"])
    assert a.pop("stage")["reused"] is False and b.pop("stage")["reused"] is True
    assert a == b
    assert json.loads((out / "results.json").read_text())["feature_pages"]["features"] == a["features"]


def test_wanted_keeps_every_steered_latent_and_skips_recipes_without_latents():
    located = [f"{SITE}.sae{i}" for i in (7, 3, 11, 0, 5, 9, 2, 8, 1, 4, 6, 10)]
    fig = {"id": "latents", "rows": [[x, 1.0 / (i + 1)] for i, x in enumerate(located)]}
    found = StageOut(figures=[fig], data={"site": SITE, "dictionary": "d", "latents": located})
    w = wanted(found, StageOut(data={"latents": located[:2]}))
    assert [c[0] for c in w["cards"]] == [7, 3, 11, 0, 5, 9, 2, 8, 1, 4]
    assert [c[1] for c in w["cards"]] == [True, True] + [False] * 8
    assert [c[2] for c in w["cards"]] == list(range(1, 11)) and w["cards"][2][3] == 1.0 / 3
    many = [f"{SITE}.sae{i}" for i in range(20, 32)]                   # steered beyond the cap: all shown
    w = wanted(StageOut(data={"site": SITE, "dictionary": "d", "latents": located}), StageOut(data={"latents": many}))
    assert [c[0] for c in w["cards"]] == list(range(20, 32)) and all(c[2] is None for c in w["cards"])
    assert wanted(StageOut(data={"layer": 3, "sites": ["L3.neuron5"]}), StageOut(data={"latents": many})) is None
    assert page_tokens(16384) == 4096 and page_tokens(1_000_000) == 32768 and page_tokens(100) == 2048


def test_without_the_corpus_the_pages_read_calibration_prose_not_the_evaluations(monkeypatch):
    from mechanic.data.text import calibration, heldout

    assert text_source() == (None, GCIDE_HELDOUT)
    monkeypatch.setattr("mechanic.features.corpus.corpus_file", lambda: None)
    text, said = text_source()
    assert said == CALIBRATION and text == calibration() and not set(text) & set(heldout())


def hostile(results: dict) -> dict:
    """The run's results with hostile strings as context tokens, logit tokens, latent names, text and path."""
    r = copy.deepcopy(results)
    fp = r["feature_pages"]
    fp["text"], fp["dictionary"]["path"] = HOSTILE[0], HOSTILE[1]
    fp["stage"]["text"] = " | ".join(HOSTILE)
    for i, h in enumerate(HOSTILE):
        f = fp["features"][i % len(fp["features"])]
        f["logits"]["suppressed"][0]["token"] = h
        f["role"]["latent"] = h
        if f["contexts"]:
            f["contexts"][0]["tokens"][0] = h
    return r


@pytest.fixture(scope="module")
def view(tiny_run, tmp_path_factory):
    results = hostile(tiny_run[0])
    path = build_report(results, tmp_path_factory.mktemp("report") / "report.html")
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: apt-get install chromium"
    with opened(path, width=1200) as (page, errors):
        page.hover("section.feature .tok")
        out = page.evaluate("""() => ({
            pwned: window.__pwned === undefined ? null : window.__pwned,
            handlers: document.querySelectorAll('[onmouseover], [onerror], [onload]').length,
            imgs: document.querySelectorAll('img').length,
            text: document.body.innerText,
            rendered: Number(document.body.dataset.plotsRendered),
            drawn: [...document.querySelectorAll('.js-plotly-plot')].filter(d => d.querySelector('.main-svg')).length,
            keys: [...document.querySelectorAll('[data-key]')].map(e => [e.dataset.key, e.dataset.value]),
            features: [...document.querySelectorAll('section.feature')].map(s => ({
                id: Number(s.dataset.feature),
                height: s.getBoundingClientRect().height,
                plots: [...s.querySelectorAll('.js-plotly-plot')].filter(d => d.querySelector('.main-svg')).length,
                contexts: [...s.querySelectorAll('.ctx-text')].map(c => c.textContent),
                steered: s.querySelectorAll('.role .badge').length,
            })),
        })""")
        out["errors"] = list(errors)
    return results, out


def test_report_draws_a_card_per_latent_without_errors(view):
    results, v = view
    fp = results["feature_pages"]
    assert v["errors"] == [] and v["pwned"] is None and v["handlers"] == 0 and v["imgs"] == 0
    assert [f["id"] for f in v["features"]] == [f["id"] for f in fp["features"]]
    assert all(f["height"] > 100 for f in v["features"])
    assert [f["plots"] for f in v["features"]] == [1 if f["count"] else 0 for f in fp["features"]]
    assert [f["steered"] for f in v["features"]] == [int(f["role"]["steered"]) for f in fp["features"]]
    assert v["rendered"] == v["drawn"] == n_plots(results) + sum(f["count"] > 0 for f in fp["features"])
    for f, seen in zip(fp["features"], v["features"]):
        assert seen["contexts"] == ["".join(visible(p) for p in c["tokens"]) for c in f["contexts"]]


def test_report_numbers_equal_results_and_hostile_text_is_shown_as_written(view):
    results, v = view
    keys = [(k, val) for k, val in v["keys"] if k.startswith("feature_pages.")]
    assert [(k, val) for k, val in keys if json.loads(val) != lookup(results, k)] == []
    fp = results["feature_pages"]
    n_ctx = sum(len(f["contexts"]) for f in fp["features"])
    assert len({k for k, _ in keys if k.endswith(".value") and ".contexts." in k}) == n_ctx > 0
    assert {"feature_pages.tokens", "feature_pages.windows", "feature_pages.features.0.role.rank"} <= {k for k, _ in keys}
    text = " ".join(v["text"].split())
    for h in HOSTILE:
        assert " ".join(h.split()) in text
