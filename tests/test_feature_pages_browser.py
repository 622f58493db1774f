"""Feature pages in headless Chromium: no console errors or network, every feature's card with its plot, contexts
shown token by token exactly as the text was written, and hostile text (tokens, paths, logit tokens) inert."""

import os
import re

import pytest
import torch

import mechanic
from mechanic.features import Dictionary
from mechanic.locate.feature_pages import feature_pages
from mechanic.report.feature_pages import build_page, visible
from mechanic.report.screenshot import CHROMIUM, opened
from mechanic.testing.tiny import tiny_model
from test_untrusted import HOSTILE


@pytest.fixture(scope="module")
def hostile_page(tmp_path_factory, word_tokenizer):
    """Pages of a random dictionary read on text made of hostile strings, with hostile strings also put in as the
    dictionary path and as logit tokens."""
    m = mechanic.load(tiny_model("llama", vocab_size=word_tokenizer.vocab_size))
    m.tokenizer = word_tokenizer
    d = Dictionary(64, 32, "topk", k=4, site="L1.resid_post")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        d.W_enc.copy_(torch.randn(64, 32, generator=g))
        d.W_dec.copy_(torch.randn(32, 64, generator=g))
    text = "\n\n".join(HOSTILE * 6)
    data = feature_pages(m, d, text=[text], features=10, tokens=2048, contexts=6, logits=5, seq_len=64,
                         before=12, after=4)
    data["dictionary"]["path"] = HOSTILE[0] + " " + HOSTILE[3]
    for i, h in enumerate(HOSTILE):
        data["features"][i % len(data["features"])]["logits"]["promoted"][i // len(data["features"])]["token"] = h
    path = build_page(data, tmp_path_factory.mktemp("pages") / "features.html")
    return path, data, text


@pytest.fixture(scope="module")
def view(hostile_page):
    path, _, _ = hostile_page
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: apt-get install chromium"
    with opened(path, width=1200) as (page, errors):
        page.hover("section.feature .tok")
        handlers = page.evaluate("() => document.querySelectorAll('[onmouseover], [onerror], [onload]').length")
        out = page.evaluate("""() => ({
            pwned: window.__pwned === undefined ? null : window.__pwned,
            text: document.body.innerText,
            scripts: document.scripts.length,
            imgs: document.querySelectorAll('img').length,
            rendered: document.body.dataset.plotsRendered,
            features: [...document.querySelectorAll('section.feature')].map(s => ({
                id: s.dataset.feature,
                visible: s.getBoundingClientRect().height > 100,
                plots: [...s.querySelectorAll('.js-plotly-plot')].filter(d => d.querySelector('.main-svg')).length,
                contexts: [...s.querySelectorAll('.ctx-text')].map(c => c.textContent),
                marked: [...s.querySelectorAll('.ctx-text .tok.max')].map(t => Number(t.dataset.act)),
                promoted: [...s.querySelectorAll('table.promoted code')].map(c => c.textContent),
            })),
        })""")
        out["errors"], out["handlers"] = list(errors), handlers
    return out


def test_no_errors_nothing_runs(view, hostile_page):
    html = hostile_page[0].read_text(encoding="utf-8")
    assert "__pwned" not in re.sub(r"&[a-z#0-9]+;", "", "".join(re.findall(r"<script[^>]*>", html)))
    assert view["errors"] == [] and view["pwned"] is None and view["handlers"] == 0
    assert view["scripts"] == 3 and view["imgs"] == 0            # plot specs, plotly.js, the plot runner


def test_every_feature_section_is_shown_with_its_histogram(view, hostile_page):
    _, data, _ = hostile_page
    assert [int(f["id"]) for f in view["features"]] == [f["id"] for f in data["features"]]
    assert all(f["visible"] for f in view["features"])
    assert [f["plots"] for f in view["features"]] == [1 if f["count"] else 0 for f in data["features"]]
    assert int(view["rendered"]) == sum(f["count"] > 0 for f in data["features"]) > 0


def test_contexts_show_the_text_as_written(view, hostile_page):
    _, data, text = hostile_page
    shown_text = text.replace("\n", "↵")
    for f, seen in zip(data["features"], view["features"]):
        want = ["".join(visible(p) for p in c["tokens"]) for c in f["contexts"]]
        assert seen["contexts"] == want and len(want) == 6
        for w in want:                       # a context cut inside a multi-byte character shows U+FFFD there
            assert w.strip("\ufffd") in shown_text, w
        assert seen["marked"] == [c["value"] for c in f["contexts"]]


def test_hostile_strings_shown_as_written(view):
    promoted = [t for f in view["features"] for t in f["promoted"]]
    text = " ".join(view["text"].split())
    for h in HOSTILE:
        assert h in promoted
        assert " ".join(h.split()) in text
    assert sum("<script>" in c for f in view["features"] for c in f["contexts"]) > 0
