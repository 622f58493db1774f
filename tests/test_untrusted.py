"""Untrusted files and text (issue 16): no unpickling anywhere in the code, plans and vectors refused on
another model unless overridden, remote code off unless asked, and report pages that show hostile user
text as written without running any of it (checked in headless Chromium)."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

from reliability import CLEAR, CORRECT, Tally

ROOT = Path(__file__).resolve().parents[1]
CODE = [p for d in ("src", "scripts", "benchmarks") for p in (ROOT / d).rglob("*.py")
        if ".venv" not in p.parts and "site-packages" not in p.parts]


def unsafe_loads(tree: ast.AST) -> list[str]:
    """pickle / joblib / dill / cloudpickle / marshal / shelve use, and torch.load without weights_only=True."""
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for n in names:
                if n.split(".")[0] in ("pickle", "cPickle", "joblib", "dill", "cloudpickle", "marshal", "shelve"):
                    bad.append(f"line {node.lineno}: imports {n}")
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            if name == "load" and owner == "torch":
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)
                if not ok:
                    bad.append(f"line {node.lineno}: torch.load without weights_only=True")
            if name in ("from_pretrained", "load") and any(
                    k.arg == "use_safetensors" and isinstance(k.value, ast.Constant) and k.value.value is False
                    for k in node.keywords):
                bad.append(f"line {node.lineno}: use_safetensors=False")
    return bad


def test_the_scan_finds_what_it_looks_for():
    src = ("import pickle\nfrom joblib import load\nimport torch\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
           "torch.load('x', weights_only=True)\nM.from_pretrained('x', use_safetensors=False)\n")
    assert len(unsafe_loads(ast.parse(src))) == 5


def test_no_pickle_anywhere_in_the_code():
    tally = Tally("untrusted_code_scan", "file", "source files scanned for unpickling")
    found = {}
    for p in CODE:
        bad = unsafe_loads(ast.parse(p.read_text(encoding="utf-8"), str(p)))
        if bad:
            found[str(p.relative_to(ROOT))] = bad
        else:
            tally.add(CORRECT, "no unpickling")
    assert not found, found
    assert len(CODE) > 100
    tally.save()


def test_remote_code_stays_off_unless_asked(monkeypatch, tmp_path):
    """mechanic.load passes trust_remote_code=False (and safetensors only) to transformers unless told."""
    import transformers

    import mechanic
    from mechanic.testing.tiny import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "m")
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):
        seen.append({"trust_remote_code": k.get("trust_remote_code"), "use_safetensors": k.get("use_safetensors")})
        return real(*a, **k)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    mechanic.load(str(tmp_path / "m"))
    mechanic.load(str(tmp_path / "m"), trust_remote_code=True)
    assert seen == [{"trust_remote_code": False, "use_safetensors": True},
                    {"trust_remote_code": True, "use_safetensors": True}]
    import inspect

    from mechanic.cli import model as cli_model
    for fn in (cli_model.inspect, cli_model.check):      # the CLI's --trust-remote-code defaults to off
        assert inspect.signature(fn).parameters["trust_remote_code"].default.default is False


def test_a_directory_of_pickled_weights_is_refused(tmp_path):
    import mechanic
    from mechanic.model.load import LoadError
    from mechanic.testing.tiny import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")   # a pickle's place
    with pytest.raises(LoadError, match="never unpickles"):
        mechanic.load(str(tmp_path / "m"))


def test_plans_and_vectors_made_for_another_model_are_refused(tmp_path):
    """Fingerprint checks with an explicit override: Plan.apply(check=False), Vector.check(any_model=True),
    `mechanic eval --any-model`."""
    import torch
    from typer.testing import CliRunner

    import mechanic
    from mechanic.cli import app
    from mechanic.model.vector import Vector, VectorError
    from mechanic.steer.plan import Plan, PlanError
    from mechanic.testing.tiny import tiny_model

    tally = Tally("untrusted_fingerprint", "file", "plans and vectors applied to another model")
    a, b = mechanic.load(tiny_model("llama", seed=0)), mechanic.load(tiny_model("llama", seed=1))
    assert a.fingerprint != b.fingerprint
    plan = Plan([mechanic.add("L1.resid_post", torch.ones(64))], method="test", fingerprint=a.fingerprint)
    with pytest.raises(PlanError, match="made for a model with fingerprint"):
        plan.apply(b)
    tally.add(CLEAR, "plan on another model")
    plan.apply(b, check=False).undo()
    tally.add(CORRECT, "plan on another model, overridden")
    v = Vector({1: torch.ones(64)}, fingerprint=a.fingerprint, model="tiny-a")
    assert v.check(a) is v
    with pytest.raises(VectorError, match="made for a model with fingerprint .* any_model=True"):
        v.check(b)
    tally.add(CLEAR, "vector on another model")
    assert v.check(b, any_model=True) is v
    tally.add(CORRECT, "vector on another model, overridden")

    # the CLI: `mechanic eval --plan` on another model is one paragraph, exit 2; --any-model applies it
    b.hf.save_pretrained(tmp_path / "b")
    path = plan.save(tmp_path / "plan.safetensors")
    res = CliRunner().invoke(app, ["eval", "--plan", str(path), "--task", "ioi", "--n", "2", "--model",
                                   str(tmp_path / "b"), "--side-effects", "none"])
    assert res.exit_code == 2 and "made for a model with fingerprint" in res.output and "--any-model" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    tally.add(CLEAR, "CLI eval of a plan on another model")
    tally.save()


# ---------------------------------------------------------------- hostile text in the report
HOSTILE = [
    "<script>window.__pwned = 1</script>",
    '<img src=x onerror="window.__pwned = 2">',
    '" onmouseover="window.__pwned = 3" x="',
    "</script><script>window.__pwned = 4</script>",
    "<svg onload=window.__pwned=5></svg>",
    "&lt;b&gt;not bold&lt;/b&gt; &amp; &#x3C;i&#x3E; &nbsp;",
    "\u202eevil.exe\u202c and עברית with العربية",
    "emoji 🧪🔬 👩‍🔬 and ZWJ",
    "javascript:window.__pwned=6 {{7*7}} ${7*7}",
    "<!-- comment --> <![CDATA[ x ]]> <style>body{display:none}</style>",
]


def hostile_results() -> tuple[dict, list[str]]:
    """The sample results with every hostile string as a task name, a prompt, a stage text, a title, a token."""
    from mechanic.report.sample import sample_results

    r = sample_results()
    shown = []
    r["summary"]["title"] = HOSTILE[0] + " " + HOSTILE[6]
    for i, h in enumerate(HOSTILE):
        s = r["evaluation"]["samples"][i % len(r["evaluation"]["samples"])]
        s["prompt"] = (s["prompt"] + " " + h) if i >= len(r["evaluation"]["samples"]) else h
    r["stages"][0]["text"] = " | ".join(HOSTILE)
    fig = r["stages"][1]["figures"][0]
    fig["x"] = [HOSTILE[i % len(HOSTILE)] for i in range(len(fig["x"]))]
    for row in r["evaluation"]["rows"]:          # a hostile task name: every row id of that task carries it
        if row["id"].startswith("sentiment."):
            row["id"] = HOSTILE[3] + row["id"][len("sentiment"):]
    r["recipe"]["name"] = HOSTILE[1]
    r["verdict"]["text"] = HOSTILE[2] + " " + HOSTILE[5]
    shown = list(HOSTILE)
    return r, shown


CHROMIUM = "/usr/bin/chromium"


def test_hostile_text_shows_as_written_and_nothing_runs(tmp_path):
    from mechanic.report import build_report
    from mechanic.report.screenshot import opened

    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: apt-get install chromium"
    results, shown = hostile_results()
    path = build_report(results, tmp_path / "report.html")
    html = path.read_text(encoding="utf-8")
    assert "__pwned" not in re.sub(r"&[a-z#0-9]+;", "", "".join(re.findall(r"<script[^>]*>", html)))
    with opened(path, width=1200) as (page, errors):
        page.hover("body")
        for el in page.query_selector_all("[onmouseover], [onerror], [onload]"):
            raise AssertionError(f"an event-handler attribute reached the page: {el.evaluate('e => e.outerHTML')}")
        view = page.evaluate("""() => ({
            pwned: window.__pwned === undefined ? null : window.__pwned,
            text: document.body.innerText,
            ticks: [...document.querySelectorAll('figure[data-figure-id="pattern"] .xtick text')].map(t => t.textContent),
            imgs: document.querySelectorAll('img[src="x"]').length,
            scripts: document.scripts.length,
        })""")
        errs = list(errors)
    tally = Tally("untrusted_report_text", "input", "hostile strings in report text (checked in Chromium)")
    assert view["pwned"] is None and errs == [] and view["imgs"] == 0 and view["scripts"] == 3, (view["pwned"], errs)
    text = view["text"]
    for h in shown:
        assert h in text or " ".join(h.split()) in " ".join(text.split()), h
        tally.add(CORRECT, "shown as written, nothing executed")
    for t, want in zip(view["ticks"], results["stages"][1]["figures"][0]["x"]):
        assert t == want
    tally.save()


def test_heatmap_pages_show_hostile_tokens_and_task_names_as_written(tmp_path):
    """The locate commands' heatmap.html: prompt tokens (axis labels) and the task name (title) are user text."""
    import torch
    from playwright.sync_api import sync_playwright

    from mechanic.locate.plot import heatmap
    from mechanic.locate.scores import Scores
    from mechanic.report.screenshot import ARGS

    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: apt-get install chromium"
    tokens = HOSTILE[:6]
    sc = Scores(torch.randn(3, len(tokens)), ["L0.resid_pre", "L1.resid_pre", "L2.resid_pre"], "patch",
                positions=tokens, task=HOSTILE[3], metric=HOSTILE[1])
    path = heatmap(sc, tmp_path / "heatmap.html")
    tally = Tally("untrusted_report_text", "input", "hostile strings in report text (checked in Chromium)")
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page()
            page.on("dialog", lambda d: (errors.append(d.message), d.dismiss()))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.resolve().as_uri(), wait_until="load")
            page.wait_for_selector(".main-svg", timeout=60_000)
            view = page.evaluate("""() => ({
                pwned: window.__pwned === undefined ? null : window.__pwned,
                ticks: [...document.querySelectorAll('.xtick text')].map(t => t.textContent),
                title: (document.querySelector('.gtitle') || {}).textContent,
            })""")
        finally:
            browser.close()
    assert view["pwned"] is None and errors == []
    assert view["ticks"] == [f"{i}:{t}" for i, t in enumerate(tokens)], view["ticks"]
    assert HOSTILE[3] in view["title"] and HOSTILE[1] in view["title"], view["title"]
    for _ in tokens + [HOSTILE[3], HOSTILE[1]]:
        tally.add(CORRECT, "heatmap page: shown as written, nothing executed")
    tally.save()
