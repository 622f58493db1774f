"""Fuzzing with hypothesis (issue 16): site strings, task JSONL/CSV files, recipe YAML, plan and vector files
(truncated, corrupted, wrong shapes and dtypes, NaN/inf), CLI arguments. Every generated case must end in
the project's own error (one message, from the CLI exit code 2 and no traceback) or in a correct result,
checked here. Cases are counted for docs/RELIABILITY.md. Deterministic (derandomize), tiny models only."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mechanic
from mechanic.model.sites import GLOBAL_KINDS, HEAD_PARTS, LAYER_KINDS, Site, SiteError
from mechanic.testing.tiny import tiny_model
from reliability import CLEAR, CORRECT, Tally


SCALE = float(os.environ.get("MECHANIC_FUZZ_SCALE", "1"))   # < 1 for a quick look while developing


def fuzz(n: int):
    return settings(max_examples=max(5, int(n * SCALE)), deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


def clear(e: BaseException) -> str:
    """The message of one of the project's errors: non-empty, no traceback or repr noise in it."""
    msg = str(e)
    assert msg.strip() and "Traceback" not in msg, repr(e)
    return msg


# ---------------------------------------------------------------- sites
KINDS = list(LAYER_KINDS) + ["head", "neuron", "expert", "expert_neuron", "shared_expert", "shared_expert_neuron"]
idx = st.none() | st.integers(0, 10**6)


@st.composite
def sites(draw):
    kind = draw(st.sampled_from(KINDS + list(GLOBAL_KINDS)))
    if kind in GLOBAL_KINDS:
        return Site(kind)
    layer = draw(st.integers(0, 10**4))
    if kind in LAYER_KINDS or kind == "shared_expert":
        return Site(kind, layer)
    if kind == "head":
        return Site(kind, layer, draw(idx), draw(st.none() | st.sampled_from(HEAD_PARTS)))
    if kind == "expert_neuron":
        return Site(kind, layer, draw(idx), neuron=draw(idx))
    return Site(kind, layer, draw(idx))


PIECES = ["L", "L3", ".", "head", "neuron", "expert", "shared_expert", "resid_post", "resid_pre", "attn_out",
          "mlp_out", "router", "q", "k", "v", "z", "pattern", "embed", "final", "logits", "0", "12", "-1", " ",
          "\n", "٣", "²", "[", "]", "..", "L-1", "1e3", "\x00", "é"]
site_like = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)


def test_sites_round_trip():
    tally = Tally("fuzz_sites", "input", "site strings (the grammar, round trips, arbitrary text)")

    @fuzz(2000)
    @given(sites())
    def valid(site):
        assert Site.parse(str(site)) == site and str(Site.parse(str(site))) == str(site)
        tally.add(CORRECT, "valid site round trip")

    @fuzz(2500)
    @given(st.text(max_size=40) | site_like)
    def anything(text):
        try:
            site = Site.parse(text)
        except SiteError as e:
            clear(e)
            tally.add(CLEAR, "invalid string")
            return
        assert Site.parse(str(site)) == site            # whatever parses has a canonical form that parses back
        assert str(site).isascii() and str(site) == str(site).strip()
        tally.add(CORRECT, "string parsed")
    valid()
    anything()
    tally.save()
    assert tally.total >= 4500 * SCALE


# ---------------------------------------------------------------- task files
scalar = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=12)
json_value = st.recursive(scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                          max_leaves=6)
field_value = st.one_of(st.text(min_size=1, max_size=15), st.just(""), st.none(), json_value)
row = st.fixed_dictionaries({}, optional={"prompt": field_value, "answer": field_value, "wrong": field_value,
                                          "corrupted": field_value, "split": st.sampled_from(["train", "test",
                                          "validation", "dev", None]) | field_value,
                                          "meta": json_value, "extra": json_value})
good_row = st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=20).filter(str.strip),
                                  "answer": st.text(min_size=1, max_size=8).filter(str.strip)},
                                 optional={"split": st.sampled_from(["train", "validation", "test"])})


def expect_rows_or_error(load, path, rows):
    from mechanic.tasks.task import TaskError
    try:
        task = load(path)
    except TaskError as e:
        clear(e)
        return "clear"
    assert len(task.examples) >= 1
    for ex in task.examples:
        assert isinstance(ex.prompt, str) and ex.prompt and isinstance(ex.answer, str) and ex.answer
        assert ex.split in (None, "train", "validation", "test") and isinstance(ex.meta, dict)
    if rows is not None:
        assert [(e.prompt, e.answer) for e in task.examples] == [(r["prompt"], r["answer"]) for r in rows]
    return "ok"


def test_task_files(tmp_path_factory):
    from mechanic.tasks.io import from_csv, from_jsonl

    d = tmp_path_factory.mktemp("tasks")
    tally = Tally("fuzz_tasks", "input", "task files (JSONL and CSV: rows, types, encodings, damage)")

    @fuzz(500)
    @given(st.lists(st.one_of(row.map(lambda r: json.dumps(r, allow_nan=True)), json_value.map(json.dumps),
                              st.text(max_size=30)), max_size=6),
           st.lists(good_row, min_size=1, max_size=4), st.booleans(), st.binary(max_size=8))
    def jsonl(lines, good, clean, junk):
        path = d / "t.jsonl"
        if clean:
            path.write_text("".join(json.dumps(r) + "\n" for r in good))
        else:
            path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + junk)
        out = expect_rows_or_error(from_jsonl, path, good if clean else None)
        if clean:
            assert out == "ok"
        tally.add(CLEAR if out == "clear" else CORRECT, f"jsonl {out}")

    @fuzz(500)
    @given(st.lists(st.lists(st.text(max_size=10), max_size=5), max_size=5),
           st.lists(st.sampled_from(["prompt", "answer", "wrong", "corrupted", "split", "meta", "x", ""]),
                    max_size=6), st.sampled_from([",", "\t"]), st.binary(max_size=6),
           st.lists(good_row, min_size=1, max_size=4), st.booleans())
    def csv_file(cells, header, delim, junk, good, clean):
        import csv
        import io
        path = d / ("t.csv" if delim == "," else "t.tsv")
        buf = io.StringIO()
        w = csv.writer(buf, delimiter=delim)
        if clean:
            w.writerow(["prompt", "answer", "split"])
            for r in good:
                w.writerow([r["prompt"], r["answer"], r.get("split", "")])
            path.write_text(buf.getvalue())
        else:
            w.writerow(header)
            for c in cells:
                w.writerow(c)
            path.write_bytes(buf.getvalue().encode("utf-8", "surrogatepass") + junk)
        out = expect_rows_or_error(lambda p: from_csv(p, delimiter=delim), path, good if clean else None)
        if clean:
            assert out == "ok"
        tally.add(CLEAR if out == "clear" else CORRECT, f"csv {out}")
    jsonl()
    csv_file()
    tally.save()


# ---------------------------------------------------------------- recipes
RECIPE = {"name": "cheap", "title": "Gender neurons, tiny", "task": {"name": "gender", "n": 6},
          "locate": {"method": "neuron_attribution", "top_k": 4, "keep": 2},
          "steer": {"method": "neuron_edit", "factor": 0.0},
          "evaluate": {"target": ["task"], "better": "lower", "contrast": True, "task": {"name": "gender", "n": 8},
                       "side_effects": ["kl"], "n_boot": 200},
          "sizes": {"ci": {"task": {"n": 2}}}}


def paths(d, prefix=()):
    out = [prefix] if prefix else []
    if isinstance(d, dict):
        for k, v in d.items():
            out += paths(v, prefix + (k,))
    return out


@st.composite
def recipes(draw):
    import copy
    r = copy.deepcopy(RECIPE)
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(paths(r)))
        node = r
        for k in where[:-1]:
            node = node[k]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            node.pop(where[-1], None)
        elif action == "replace":
            node[where[-1]] = draw(json_value)
        elif isinstance(node, dict):
            node[draw(st.text(max_size=6))] = draw(json_value)
    return r


def test_recipe_yaml(tmp_path_factory):
    import yaml

    from mechanic.recipes.schema import RecipeError, load_recipe

    d = tmp_path_factory.mktemp("recipes")
    tally = Tally("fuzz_recipes", "input", "recipe YAML (mutated fields, types, sizes, damaged text)")

    @fuzz(400)
    @given(recipes(), st.none() | st.sampled_from(["ci", "huge"]), st.sampled_from(["ok", "cut", "bytes"]),
           st.integers(0, 400), st.binary(max_size=4))
    def prop(r, size, damage, at, junk):
        text = yaml.safe_dump(r, allow_unicode=True)
        path = d / "r.yaml"
        if damage == "cut":
            path.write_text(text[:at])
        elif damage == "bytes":
            path.write_bytes(text.encode()[:at] + junk + text.encode()[at:])
        else:
            path.write_text(text)
        try:
            recipe, data = load_recipe(path, size)
        except RecipeError as e:
            clear(e)
            tally.add(CLEAR, "invalid recipe")
            return
        assert recipe.name == data["name"] and recipe.steer is not None or recipe.locate is not None
        tally.add(CORRECT, "valid recipe")
    prop()
    tally.save()


# ---------------------------------------------------------------- plans
@pytest.fixture(scope="module")
def tiny():
    return mechanic.load(tiny_model("llama"))


def weights(model) -> dict:
    return {k: v.clone() for k, v in model.hf.state_dict().items()}


def a_plan(model):
    from mechanic.steer.plan import Orthogonalize, Plan, WeightEdit

    w = model.hf.model.layers[1].mlp.down_proj.weight
    return Plan([mechanic.add("L1.resid_post", torch.randn(64), coef=2.0, pos=-1), mechanic.zero("L0.head1"),
                 mechanic.scale("L2.neuron3", 0.5)],
                [WeightEdit("model.layers.1.mlp.down_proj.weight", torch.zeros(64, 2), (None, [3, 5])),
                 Orthogonalize("model.layers.0.self_attn.o_proj.weight", torch.randn(64), dim=0)],
                method="fuzz", fingerprint=model.fingerprint, settings={"k": 1}), w


def safetensors_parts(blob: bytes):
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def with_header(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@st.composite
def meta_mutation(draw, meta):
    """The plan metadata with one value anywhere replaced by arbitrary JSON, or a key removed."""
    import copy
    m = copy.deepcopy(meta)
    spots = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                spots.append(path + (k,))
                walk(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                spots.append(path + (i,))
                walk(v, path + (i,))
    walk(m, ())
    where = draw(st.sampled_from(spots))
    node = m
    for k in where[:-1]:
        node = node[k]
    if draw(st.booleans()) and isinstance(node, dict):
        del node[where[-1]]
    else:
        node[where[-1]] = draw(json_value)
    return m


def test_plan_files(tiny, tmp_path_factory):
    from safetensors.torch import load_file, save_file

    from mechanic.steer.plan import Plan, PlanError

    d = tmp_path_factory.mktemp("plans")
    plan, _ = a_plan(tiny)
    good = plan.save(d / "good.safetensors").read_bytes()
    header, data = safetensors_parts(good)
    meta = json.loads(header["__metadata__"]["plan"])
    tensors = load_file(str(d / "good.safetensors"))
    base = weights(tiny)
    x = torch.tensor([[5, 6, 7, 8]])
    tally = Tally("fuzz_plans", "file", "plan files (truncated, corrupted, wrong shapes/dtypes, NaN/inf, metadata)")

    def outcome(path, label):
        try:
            p = Plan.load(path)
        except PlanError as e:
            clear(e)
            tally.add(CLEAR, f"{label}: refused at load")
            return
        try:
            handle = p.apply(tiny)
        except (PlanError, SiteError) as e:
            clear(e)
            assert all(torch.equal(v, base[k]) for k, v in tiny.hf.state_dict().items())   # nothing left applied
            assert tiny.steering == []
            tally.add(CLEAR, f"{label}: refused at apply")
            return
        from mechanic.model.interventions import InterventionError
        try:
            logits = tiny.run(x).logits
        except InterventionError as e:
            clear(e)
            logits = None
        finally:
            handle.undo()
        assert all(torch.equal(v, base[k]) for k, v in tiny.hf.state_dict().items()) and tiny.steering == []
        if logits is None:
            tally.add(CLEAR, f"{label}: refused when run, undone bit for bit")
            return
        assert logits.shape == (1, 4, 101)
        tally.add(CORRECT, f"{label}: applied, ran, undone bit for bit")

    @fuzz(200)
    @given(st.integers(0, len(good)), st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)),
                                               max_size=4), st.booleans())
    def damaged(cut, flips, truncate):
        blob = bytearray(good[:cut] if truncate else good)
        for at, b in flips:
            if at < len(blob):
                blob[at] = b
        path = d / "p.safetensors"
        path.write_bytes(bytes(blob))
        outcome(path, "damaged bytes")

    @fuzz(200)
    @given(meta_mutation(meta))
    def metadata(m):
        h = dict(header, __metadata__={"plan": json.dumps(m)})
        path = d / "p.safetensors"
        path.write_bytes(with_header(h, data))
        outcome(path, "damaged metadata")

    @fuzz(150)
    @given(st.sampled_from(sorted(tensors)), st.sampled_from(["shape", "dtype", "nan", "inf", "empty"]),
           st.integers(1, 70))
    def tensor(name, how, n):
        ts = dict(tensors)
        t = ts[name]
        if how == "shape":
            ts[name] = torch.randn(*( [n] if t.dim() <= 1 else [n, t.shape[-1]] ))
        elif how == "dtype":
            ts[name] = t.to(torch.float16) if n % 3 == 0 else t.to(torch.int64) if n % 3 == 1 else t.to(torch.bfloat16)
        elif how == "empty":
            ts[name] = torch.zeros(0)
        else:
            t = t.clone().float()
            t.view(-1)[n % t.numel()] = float("nan") if how == "nan" else float("inf")
            ts[name] = t
        path = d / "p.safetensors"
        save_file(ts, str(path), metadata={"plan": json.dumps(meta)})
        outcome(path, f"tensor {how}")
    damaged()
    metadata()
    tensor()
    tally.save()


# ---------------------------------------------------------------- vectors
def test_vector_files(tiny, tmp_path_factory):
    from mechanic.model.vector import Vector, VectorError

    d = tmp_path_factory.mktemp("vectors")
    v = Vector({1: torch.randn(64), 2: torch.randn(64)}, fingerprint=tiny.fingerprint, model="tiny")
    st_good = v.save(d / "v.safetensors").read_bytes()
    gguf_good = v.save(d / "v.gguf").read_bytes()
    tally = Tally("fuzz_vectors", "file", "vector files (safetensors and llama.cpp GGUF: truncated, corrupted headers)")

    def outcome(path, label):
        try:
            got = Vector.load(path)
        except VectorError as e:
            clear(e)
            tally.add(CLEAR, f"{label}: refused at load")
            return
        try:
            got.check(tiny)
        except VectorError as e:
            clear(e)
            tally.add(CLEAR, f"{label}: refused for this model")
            return
        assert all(torch.isfinite(t).all() and t.shape == (64,) for t in got.directions.values())
        logits = tiny.run(torch.tensor([[5, 6, 7]]), interventions=got.interventions(1.0)).logits
        assert torch.isfinite(logits).all()
        tally.add(CORRECT, f"{label}: loaded, checked, steered")

    @fuzz(200)
    @given(st.sampled_from(["safetensors", "gguf"]), st.integers(0, 100_000),
           st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4), st.booleans())
    def damaged(kind, cut, flips, truncate):
        good = st_good if kind == "safetensors" else gguf_good
        blob = bytearray(good[:cut % (len(good) + 1)] if truncate else good)
        for at, b in flips:
            if blob:
                blob[at % min(len(blob), 600)] = b          # mostly the header: names, types, shapes, offsets
        path = d / f"x.{kind}"
        path.write_bytes(bytes(blob))
        outcome(path, f"{kind} damaged")

    @fuzz(150)
    @given(st.dictionaries(st.sampled_from(["direction.1", "direction.2", "direction.-1", "direction.x", "other",
                                            "direction.01"]),
                           st.tuples(st.sampled_from([(64,), (32,), (64, 2), (0,), ()]),
                                     st.sampled_from([torch.float32, torch.float16, torch.int32, torch.bfloat16]),
                                     st.sampled_from(["ok", "nan", "inf"])), max_size=3),
           st.one_of(st.just(json.dumps(v.metadata())), json_value.map(json.dumps), st.text(max_size=10)),
           st.sampled_from(["safetensors", "gguf"]))
    def shapes(spec, meta, kind):
        from safetensors.torch import save_file
        ts = {}
        for name, (shape, dtype, fill) in spec.items():
            t = torch.randn(shape) if shape else torch.tensor(1.0)
            if fill != "ok" and t.numel():
                t.view(-1)[0] = float("nan") if fill == "nan" else float("inf")
            ts[name] = t.to(dtype)
        path = d / f"y.{kind}"
        if kind == "safetensors":
            save_file(ts, str(path), metadata={"format": "mechanic-vector/1", "mechanic.vector": meta})
        else:
            import gguf
            import numpy as np
            w = gguf.GGUFWriter(str(path), "controlvector")
            w.add_string("mechanic.vector", meta)
            for name, t in ts.items():
                w.add_tensor(name, t.float().numpy().astype(np.float16 if t.dtype == torch.float16 else np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        outcome(path, f"{kind} tensors/metadata")
    damaged()
    shapes()
    tally.save()


# ---------------------------------------------------------------- CLI arguments
def test_cli_arguments(tmp_path_factory):
    """Random argument lists for every command: exit 0 with output, or exit 2 with one message and no
    traceback (usage errors included). Models are tiny random ones saved to a directory."""
    from typer.testing import CliRunner

    from mechanic.cli import app

    d = tmp_path_factory.mktemp("cli")
    tiny_model("llama").save_pretrained(d / "model")
    (d / "bad.yaml").write_text("name: [unclosed\n")
    (d / "plan.safetensors").write_bytes(b"not a plan")
    (d / "task.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{"prompt": 3}\n')
    runner = CliRunner()
    commands = [["inspect"], ["check"], ["locate", "patch"], ["locate", "atp"], ["locate", "trace"],
                ["locate", "neurons"], ["steer", "vector"], ["steer", "ablate"], ["steer", "edit"], ["run"],
                ["eval"], ["report"], ["locate", "eap"]]
    values = st.sampled_from([str(d / "model"), str(d / "bad.yaml"), str(d / "plan.safetensors"),
                              str(d / "task.jsonl"), str(d / "missing"), "ioi", "head", "L99.head", "L0.neuron",
                              "-1", "0", "nan", "1e309", "", "--json", "<script>", "[bold]x[/]", "../../x",
                              "cheap", "smollm2x"])
    options = st.sampled_from(["--model", "--task", "--kind", "--n", "--layers", "--plan", "--scores", "--size",
                               "--prompt", "--answer", "--subject", "--target", "--method", "-o", "--json",
                               "--coefficient", "--site", "--bogus"])
    tally = Tally("fuzz_cli", "input", "CLI argument lists (every command; bad values, paths, markup)")

    @fuzz(150)
    @given(st.sampled_from(commands), st.lists(st.tuples(options, values), max_size=4),
           st.lists(values, max_size=2))
    def prop(cmd, opts, positional):
        argv = list(cmd) + positional + [x for o, v in opts for x in ((o,) if o == "--json" else (o, v))]
        if cmd[0] in ("inspect", "check") and not positional:
            argv.insert(1, str(d / "model"))
        if cmd[0] not in ("inspect", "check", "report", "run") and "--model" not in argv:
            argv += ["--model", str(d / "model")]
        if "-o" not in argv:
            argv += ["-o", str(d / "out")] if cmd[0] in ("locate", "steer", "run") else []
        res = runner.invoke(app, argv)
        assert res.exception is None or isinstance(res.exception, SystemExit), (argv, res.exception)
        assert "Traceback" not in res.output, (argv, res.output)
        assert res.exit_code in (0, 2), (argv, res.exit_code, res.output)
        if res.exit_code == 2:
            assert res.output.strip(), argv
            tally.add(CLEAR, f"exit 2: {cmd[0]}")
        else:
            tally.add(CORRECT, f"exit 0: {cmd[0]}")
    prop()
    tally.save()
