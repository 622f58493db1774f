"""Faults (issue 16): SIGKILL at random moments of `mechanic run`, a full disk during a stage or a cache
write, two runs into one directory, two processes filling one cache entry. A tiny random llama with a
real-word tokenizer stands in for a model, so each run takes seconds."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reliability import CLEAR, CORRECT, Tally

MECHANIC = str(Path(sys.executable).with_name("mechanic"))
RECIPE = """\
name: cheap
title: "Word neurons, tiny"
task: {{file: {task}, n: 6}}
locate: {{method: neuron_attribution, top_k: 4, keep: 2}}
steer: {{method: neuron_edit, factor: {factor}}}
evaluate: {{target: [task], better: lower, contrast: true, task: {{file: {task}, n: 8}}, side_effects: [kl],
           n_boot: 200}}
"""
VOLATILE = {"command", "finished", "timings", "seconds", "reused"}   # wall-clock facts, not results


def normalised(x):
    """results.json without wall-clock facts (timings, dates, the command line): the numbers themselves."""
    if isinstance(x, dict):
        return {k: normalised(v) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list):
        return [normalised(v) for v in x]
    return x


def partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".partial-" in p.name]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny llama saved as a model directory (with a word tokenizer), a task file whose clean/corrupted
    prompts have equal token lengths, and a cheap recipe over it."""
    from conftest import build_word_tokenizer
    from mechanic.testing.tiny import tiny_model

    root = tmp_path_factory.mktemp("faults")
    tok = build_word_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), pad_token_id=None, bos_token_id=None,
                       eos_token_id=tok.eos_token_id)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    vocab = tok.get_vocab()
    words = sorted(w[1:] for w in vocab if w.startswith("Ġ") and w[1:].isalpha() and w[1:].islower() and len(w) > 5)
    words = words[:200:3][:64]
    rows = [{"prompt": f"The {w} said that", "answer": " she", "wrong": " he",
             "corrupted": f"The {words[(i + 1) % len(words)]} said that"} for i, w in enumerate(words)]
    rows = [r for r in rows if len(tok(r["prompt"])["input_ids"]) == len(tok(r["corrupted"])["input_ids"])]
    task = root / "words.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = root / "cheap.yaml"
    recipe.write_text(RECIPE.format(task=task, factor=0.0))
    return {"root": root, "model": root / "model", "task": task, "recipe": recipe}


def command(bench, out: Path, recipe: Path | None = None) -> list[str]:
    return [MECHANIC, "run", str(recipe or bench["recipe"]), "--model", str(bench["model"]), "-o", str(out)]


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_to_end(cmd) -> list[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.splitlines()


@pytest.fixture(scope="module")
def reference(bench):
    out = bench["root"] / "reference"
    run_to_end(command(bench, out))
    return out, normalised(json.loads((out / "results.json").read_text()))


# The stage a log line starts (the runner prints "[stage] ..." lines; "report:" after the report is written).
STARTS = [("[locate]", "locate"), ("[steer]", "steer"), ("[evaluate]", "evaluate")]


def stage_of(lines: list[str]) -> str:
    """Which stage a process was in, from the lines it had printed when it was killed."""
    stage = "load"
    for line in lines:
        if "] reused" in line:       # a reused stage is not entered; after a reused evaluation comes the report
            stage = "report" if line.startswith("[evaluate]") else stage
            continue
        for tag, name in STARTS:
            if line.startswith(tag):
                stage = name
        if line.startswith("[evaluate] done"):
            stage = "report"
        if line.startswith("report:"):
            stage = "after report"
    return stage


STAGE_TAIL = 0.4   # seconds a killed-run child waits after a stage's work, before the stage is marked done


def _lengthen_stages() -> None:
    """Make each stage last STAGE_TAIL s longer, after its work and before done.json: the tiny recipe's locate and
    steer last milliseconds, too short for a kill aimed at them to land there, and a kill in this window
    finds the stage's artifacts written to its temporary directory but the stage not finished."""
    from mechanic.recipes.runner import Runner

    stage = Runner.stage

    def slow(self, name, key, title, fn):
        def work(tmp):
            out = fn(tmp)
            time.sleep(STAGE_TAIL)
            return out
        return stage(self, name, key, title, work)
    Runner.stage = slow


def _cli_child(argv: list[str], log: str, lengthen: bool = False) -> None:
    """`mechanic ARGV` in a process forked from a server that imported mechanic once (no 3 s import per run),
    its output in `log`; `lengthen` makes each stage last STAGE_TAIL s longer (see _lengthen_stages)."""
    if lengthen:
        _lengthen_stages()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    from mechanic.cli import main

    try:
        main(argv)
    except SystemExit as e:
        sys.stdout.flush()
        os._exit(e.code if isinstance(e.code, int) else 1)
    os._exit(0)


def forkserver():
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["mechanic.cli", "mechanic.recipes.runner", "torch", "transformers"])
    return ctx


def killed_run(ctx, argv, target: str, delay: float, log: Path) -> tuple[int, list[str], str]:
    """Run `mechanic ARGV` in a child process and SIGKILL it `delay` s after it enters stage `target` (by its
    log lines; `load` = from its start); return its exit code, its lines and the stage it was in when killed."""
    log.write_text("")
    proc = ctx.Process(target=_cli_child, args=(argv, str(log), True))
    proc.start()
    lines = lambda: log.read_text().splitlines()  # noqa: E731
    t0 = time.monotonic()
    while target != "load" and proc.is_alive() and stage_of(lines()) != target and time.monotonic() - t0 < 300:
        time.sleep(0.005)
    time.sleep(delay)
    at = stage_of(lines())
    if proc.is_alive():
        proc.kill()
    proc.join(60)
    return proc.exitcode, lines(), at


def check_consistent(out: Path, ref: dict) -> list[str]:
    """What a killed run may leave: finished stages (each with done.json), temporary .partial- files and
    the outputs it had finished; never a final file with partial contents. Returns the finished stages."""
    finished = []
    stages = out / "stages"
    if stages.is_dir():
        for d in stages.iterdir():
            if ".partial-" in d.name:
                continue
            assert (d / "done.json").is_file(), f"{d} has no done.json"
            json.loads((d / "done.json").read_text())
            finished.append(d.name.split("-")[0])
    if (out / "results.json").exists():
        assert normalised(json.loads((out / "results.json").read_text())) == ref
    if (out / "report.html").exists():
        assert (out / "report.html").read_text().rstrip().endswith("</html>")
    return finished


KILLS_PER_CHAIN, CHAINS = 6, 4
TARGETS = ["load", "locate", "steer", "evaluate", "report"]
DELAYS = {"load": 0.4, "locate": STAGE_TAIL, "steer": STAGE_TAIL, "evaluate": 1.0, "report": 0.3}   # s, within a stage


def test_sigkill_at_random_moments_then_resume_gives_the_same_results(bench, reference):
    """20 SIGKILLs, 5 per run directory at random moments of each stage; after each, the directory holds only
    finished work; the next run resumes from the finished stages; the last one completes with results.json
    equal to an uninterrupted run's and no partial file left."""
    ref_dir, ref = reference
    rng = random.Random(16)
    tally = Tally("faults_sigkill", "fault", "SIGKILL of `mechanic run` at a random moment, then a re-run")
    landed = []
    ctx = forkserver()
    for c in range(CHAINS):
        out = bench["root"] / f"killed{c}"
        finished: list[str] = []
        for k in range(KILLS_PER_CHAIN + 1):
            todo = [t for t in TARGETS if t not in finished]      # stages this run will compute, load and report
            target = todo[(k + c) % len(todo)] if k < KILLS_PER_CHAIN else "end"
            code, lines, at = killed_run(ctx, command(bench, out)[1:], target, rng.uniform(0, DELAYS.get(target, 0)),
                                         bench["root"] / "log.txt")
            for name in finished:    # resumed: a stage the killed run had finished is reused, never redone
                assert all("] reused" in line for line in lines if line.startswith(f"[{name}]")), (name, lines)
            if code == 0:            # finished before the signal (or the last run, target "end"): the same results
                assert normalised(json.loads((out / "results.json").read_text())) == ref
                finished = check_consistent(out, ref)
                continue
            assert code == -signal.SIGKILL and target != "end", "\n".join(lines)
            landed.append(at)
            finished = check_consistent(out, ref)
            tally.add(CORRECT, f"killed during {at}")
        assert normalised(json.loads((out / "results.json").read_text())) == ref
        assert partials(out) == [], partials(out)
        assert (out / "report.html").read_text().rstrip().endswith("</html>")
    tally.save()
    assert len(landed) >= 20, landed
    assert set(TARGETS) <= set(landed), landed   # every stage was hit (locate and steer lengthened in the child)


def enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every output file's bytes (recipe.yaml is the recipe of the run being attempted, written first)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (".mechanic.lock", "recipe.yaml")}


def half_then_enospc(real):
    """A writer that writes half its file, then fails as a full disk does."""
    def write(tensors, filename, *a, **k):
        real(tensors, filename, *a, **k)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise enospc(filename)
    return write


def test_full_disk_during_a_stage_and_a_result_write_keeps_previous_outputs(bench, reference, monkeypatch, tmp_path):
    """ENOSPC while the steer stage writes its plan, then while results.json is written: a one-paragraph
    WriteError (exit 2 from the CLI), every previous output byte for byte intact, no partial file."""
    import shutil

    import mechanic.steer.plan as plan_mod
    from mechanic.files import WriteError
    from mechanic.recipes.runner import run

    ref_dir, ref = reference
    out = tmp_path / "run"
    shutil.copytree(ref_dir, out)
    before = snapshot(out)
    tally = Tally("faults_enospc", "fault", "a full disk (ENOSPC) during a stage, a result or a cache write")
    changed = tmp_path / "changed.yaml"          # another steer factor: locate is reused, steer runs and writes
    changed.write_text(RECIPE.format(task=bench["task"], factor=0.5))
    monkeypatch.setattr(plan_mod, "save_file", half_then_enospc(plan_mod.save_file))
    with pytest.raises(WriteError) as e:
        run(changed, out, model=str(bench["model"]), log=lambda m: None)
    msg = str(e.value)
    assert "plan.safetensors" in msg and "No space left" in msg and "intact" in msg and "\n" not in msg
    assert snapshot(out) == before and partials(out) == []
    tally.add(CLEAR, "stage artifact (plan.safetensors)")
    monkeypatch.undo()

    real_write = Path.write_text

    def full_disk(self, data, *a, **k):
        if self.name.startswith(".results.json"):
            real_write(self, data[: len(data) // 2], *a, **k)
            raise enospc(self)
        return real_write(self, data, *a, **k)
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(WriteError, match="results.json"):
        run(changed, out, model=str(bench["model"]), log=lambda m: None)
    monkeypatch.undo()
    assert json.loads((out / "results.json").read_bytes()) == json.loads(before["results.json"])
    assert partials(out) == []
    tally.add(CLEAR, "results.json")

    # the CLI says the same in one paragraph, exit code 2, no traceback (a child process whose disk fills up
    # while it writes results.json)
    before = snapshot(out)
    script = ("import errno, os, sys\nfrom pathlib import Path\nreal = Path.write_text\n"
              "def full(self, data, *a, **k):\n"
              "    if self.name.startswith('.results.json'):\n"
              "        real(self, data[:len(data) // 2])\n"
              "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))\n"
              "    return real(self, data, *a, **k)\n"
              "Path.write_text = full\nfrom mechanic.cli import app\nsys.argv = ['mechanic'] + sys.argv[1:]\napp()\n")
    r = subprocess.run([sys.executable, "-c", script, *command(bench, out, changed)[1:]], capture_output=True,
                       text=True, env=ENV, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "No space left" in r.stderr, r.stderr
    assert "results.json" in r.stderr and snapshot(out) == before and partials(out) == []
    tally.add(CLEAR, "CLI, results.json")
    tally.save()


def test_full_disk_during_a_cache_write_leaves_no_entry_and_recomputes(bench, monkeypatch, tmp_path):
    """Second-moment statistics (the ROME/MEMIT cache): a full disk gives a WriteError and leaves no entry and
    no partial file; a damaged entry is recomputed and replaced."""
    import mechanic
    import mechanic.steer.stats as S
    from mechanic.files import WriteError

    monkeypatch.setenv("MECHANIC_CACHE", str(tmp_path / "cache"))
    tally = Tally("faults_enospc", "fault", "a full disk (ENOSPC) during a stage, a result or a cache write")
    m = mechanic.load(str(bench["model"]))
    texts = ["The quick brown fox jumps over the lazy dog. " * 20]
    want = S.second_moments(m, [1], texts, max_tokens=256, cache=False)[1][0]
    monkeypatch.setattr(S, "save_file", half_then_enospc(S.save_file))
    with pytest.raises(WriteError, match="No space left"):
        S.second_moments(m, [1], texts, max_tokens=256)
    monkeypatch.undo()
    monkeypatch.setenv("MECHANIC_CACHE", str(tmp_path / "cache"))
    stats = tmp_path / "cache" / "stats"
    assert partials(stats) == [] and not list(stats.rglob("*.safetensors"))
    tally.add(CLEAR, "cache entry (second moments)")
    got = S.second_moments(m, [1], texts, max_tokens=256)[1][0]
    entry = next(stats.rglob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:100])                     # damaged on disk
    again = S.second_moments(m, [1], texts, max_tokens=256)[1][0]
    assert (got - want).abs().max() == 0 and (again - want).abs().max() == 0
    assert S._cached(entry) is not None
    tally.add(CORRECT, "damaged cache entry recomputed")
    tally.save()


def test_a_second_run_into_the_same_directory_is_refused_until_the_first_ends(bench, tmp_path):
    """The lock: a live holder makes a second run refuse in one paragraph (exit 2); once the holder is killed
    (a stale lock: the OS drops it), the next run proceeds."""
    from mechanic.files import LOCK

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom mechanic.files import locked\n"
                               "with locked(sys.argv[1], 'x'):\n    print('held', flush=True)\n    time.sleep(600)\n",
                               str(out / LOCK)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    tally = Tally("faults_lock", "fault", "a second `mechanic run` into a directory in use, then after the holder died")
    r = subprocess.run(command(bench, out), capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"pid {holder.pid}" in r.stderr and "in use by another mechanic process" in r.stderr
    assert not (out / "stages").exists()
    tally.add(CLEAR, "refused while the first run lives")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    from mechanic.files import locked
    with locked(out / LOCK, "x"):        # the stale lock was dropped with its holder
        pass
    tally.add(CORRECT, "stale lock recovered")
    tally.save()


CONVERTER = r"""
import sys, time
from pathlib import Path
import transformers
import mechanic.model.load as L

model_dir, out, log = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

def slow_model(*a, **k):          # stands in for dequantising a GGUF file: slow, then a model
    with open(log, "a") as f:
        f.write("convert\n")
    time.sleep(1.5)
    return real_model(str(model_dir))

transformers.AutoModelForCausalLM.from_pretrained = slow_model
transformers.AutoTokenizer.from_pretrained = lambda *a, **k: real_tok(str(model_dir))
print("start", flush=True)
L.convert_gguf(model_dir / "fake.gguf", out)
print("done", flush=True)
"""


def test_two_processes_filling_one_cache_entry_convert_once(bench, tmp_path):
    """GGUF conversion into the model cache from two processes at once: one converts, the other waits and
    reuses; a converter killed half way leaves nothing the next one would read."""
    import torch

    import mechanic

    out = tmp_path / "cache" / "models" / "tiny"
    log = tmp_path / "conversions.log"
    args = [sys.executable, "-c", CONVERTER, str(bench["model"]), str(out), str(log)]
    tally = Tally("faults_cache", "fault", "two processes filling one model cache entry; a converter killed")
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert log.read_text().splitlines() == ["convert"]          # the second one reused the first one's work
    assert partials(out.parent) == []
    ref = mechanic.load(str(bench["model"])).hf.state_dict()

    def same_weights(path) -> bool:
        got = mechanic.load(str(path)).hf.state_dict()
        return got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert same_weights(out)
    tally.add(CORRECT, "two converters at once: one conversion, one reuse")

    out2 = tmp_path / "cache" / "models" / "tiny2"
    p = subprocess.Popen(args[:4] + [str(out2), str(log)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "start"
    time.sleep(0.5)                                   # inside the conversion (1.5 s of "dequantising")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out2.exists()
    stale = out2.parent / ".tiny2.partial-killed"     # what a converter killed while writing leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    subprocess.run(args[:4] + [str(out2), str(log)], check=True, capture_output=True, timeout=600)
    assert partials(out2.parent) == [] and same_weights(out2)
    tally.add(CORRECT, "converter killed, next one completes")
    tally.save()


def test_task_and_recipe_names_cannot_write_outside_the_run_directory(bench, tmp_path):
    """Traversal in every user-named thing a recipe holds (task label, task file path, title): every file the
    run writes is inside its run directory."""
    from mechanic.recipes.runner import run

    tally = Tally("untrusted_paths", "file", "recipes naming paths outside the run directory")
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    task = root / "a" / "b" / ".." / ".." / "words.jsonl"          # a legitimate read through '..'
    task.write_bytes(bench["task"].read_bytes())
    recipe = root / "evil.yaml"
    recipe.write_text(RECIPE.format(task=task, factor=0.0)
                      .replace('title: "Word neurons, tiny"', 'title: "../../../../tmp/escaped/title"')
                      .replace("n: 6}", "n: 6, label: ../../../escaped}"))
    out = root / "a" / "b" / "run"
    before = {p for p in tmp_path.rglob("*")}
    run(recipe, out, model=str(bench["model"]), log=lambda m: None)
    created = {p for p in tmp_path.rglob("*")} - before
    outside = [p for p in created if out not in p.parents and p != out]
    assert created and outside == [], outside
    assert not Path("/tmp/escaped").exists()
    tally.add(CORRECT, "every write inside the run directory")
    tally.save()
