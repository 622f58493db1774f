"""Built-in task suites, user task files (JSONL/CSV) and their errors, tokenization and the set metrics."""

import json
import re
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from mechanic.tasks import (Example, Task, TaskError, from_csv, from_jsonl, list_tasks, load_task, to_jsonl)
from mechanic.tasks import metrics as M
from mechanic.tasks import splits as S
from mechanic.tasks.splits import check_disjoint
from mechanic.tasks.task import TaskBatch

SUITES = ["ioi", "facts", "facts_large", "greater_than", "gender", "sentiment", "icl_labels"]
# IOI is unfiltered, so 0.95 is a real claim (docs/TASKS.md). The facts suite keeps only facts SmolLM2 answers
# top-1 when it is built, so anything below 1.0 means loading, tokenization or batching now differs from the
# build: a consistency check, not an accuracy claim.
CLAIMED = {"ioi": 0.95, "facts": 1.0}


# ---- a word-level tokenizer, so tokenization tests need no model --------------------------------

class WordTok:
    pad_token_id = 0

    def __init__(self):
        self.vocab = {"<pad>": 0}

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in re.findall(r" ?\S+", text)]}

    def convert_ids_to_tokens(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return [inv[i] for i in ids]


def word_model():
    return SimpleNamespace(tokenizer=WordTok(), device=torch.device("cpu"))


# ---- the shipped suites ---------------------------------------------------------------------------

def test_list_and_unknown_name():
    assert list_tasks() == SUITES
    with pytest.raises(TaskError, match=r"Unknown task 'iio'.*ioi, facts, facts_large, greater_than"):
        load_task("iio")


@pytest.mark.parametrize("name", SUITES)
def test_suite_fields(name):
    task = load_task(name)
    assert task.name == name and task.description
    M.get(task.metric)
    assert len(task) >= 100
    for e in task.examples:
        assert e.prompt and e.answer and e.wrong and e.answer != e.wrong
        if name != "facts_large":           # made for editing: no corrupted prompts
            assert e.corrupted and e.corrupted != e.prompt
        assert isinstance(e.meta, dict)
    assert len(load_task(name, n=5)) == 5


def test_ioi_orders_and_corruption():
    task = load_task("ioi")
    assert len(task) >= 100 and task.metric == "logit_diff"
    orders = {e.meta["order"] for e in task.examples}
    assert orders == {"ABBA", "BABA"}
    for e in task.examples:
        io, s, c = e.meta["IO"], e.meta["S"], e.meta["C"]
        assert e.answer == " " + io and e.wrong == " " + s and len({io, s, c}) == 3
        assert e.prompt.count(" " + s) == 2 and e.prompt.count(" " + io) == 1
        assert e.corrupted.count(" " + s) == 1 and e.corrupted.count(" " + c) == 1   # ABC: S2 -> C
        first = e.prompt.index(" " + io) < e.prompt.index(" " + s)
        assert first == (e.meta["order"] == "ABBA")
        assert {"template", "order", "IO", "S"} <= set(e.meta)


def test_facts_counterfact_fields():
    task = load_task("facts")
    assert len(task) >= 60
    for e in task.examples:
        m = e.meta
        assert {"subject", "relation", "target_true", "target_new", "paraphrases", "neighborhood"} <= set(m)
        assert e.answer == " " + m["target_true"] and e.wrong == " " + m["target_new"]
        assert m["subject"] in e.prompt and len(m["paraphrases"]) >= 2 and len(m["neighborhood"]) >= 2
        assert all(m["subject"] not in p for p in m["neighborhood"])
        assert all(m["subject"] in p for p in m["paraphrases"])
    assert len({e.meta["relation"] for e in task.examples}) >= 5


def test_facts_large_is_big_counterfact_and_keeps_the_facts_splits():
    task, small = load_task("facts_large"), load_task("facts")
    assert len(task) >= 300 and len({e.meta["relation"] for e in task.examples}) >= 10
    answer_of = {e.prompt: e.meta["target_true"] for e in task.examples}
    for e in task.examples:
        m = e.meta
        assert e.answer == " " + m["target_true"] and e.wrong == " " + m["target_new"] and e.corrupted is None
        assert m["subject"] in e.prompt and len(m["paraphrases"]) >= 2 and len(m["neighborhood"]) >= 2
        assert all(m["subject"] in p for p in m["paraphrases"])
        assert all(m["subject"] not in p for p in m["neighborhood"])
        # a neighbourhood prompt's true answer is the fact's true answer (CounterFact's definition)
        assert all(answer_of.get(p, m["target_true"]) == m["target_true"] for p in m["neighborhood"])
    split_of = {e.meta["subject"]: e.split for e in small.examples}
    for e in task.examples:            # a subject of both suites sits in the same split in both
        assert split_of.get(e.meta["subject"], e.split) == e.split
    assert {s: sum(e.split == s for e in task.examples) >= 70 for s in ("train", "validation", "test")} == \
        {"train": True, "validation": True, "test": True}


def test_greater_than_sets_and_gender_meta():
    gt = load_task("greater_than")
    assert gt.metric == "prob_diff"
    kinds = {e.meta["kind"] for e in gt.examples}
    assert kinds == {"year", "arithmetic"}
    for e in gt.examples:
        ans, wr = set(e.meta["answers"]), set(e.meta["wrongs"])
        assert e.answer in ans and e.wrong in wr and not ans & wr and ans | wr <= set("0123456789")
        if e.meta["kind"] == "year":
            assert ans == {str(d) for d in range(e.meta["start_digit"] + 1, 10)}
            assert e.prompt.endswith(str(e.meta["start"])[:3])
    gender = load_task("gender")
    assert len({e.meta["profession"] for e in gender.examples}) >= 40
    for e in gender.examples:
        assert {e.answer, e.wrong} == {" he", " she"}
        assert e.answer == (" she" if e.meta["stereotype"] == "female" else " he")


def test_icl_corruption_swaps_labels():
    for e in load_task("icl_labels").examples:
        assert {e.answer, e.wrong} == {" foo", " bar"}
        swapped = e.prompt.replace(" foo", " X").replace(" bar", " foo").replace(" X", " bar")
        assert swapped == e.corrupted


# ---- splits ----------------------------------------------------------------------------------------

SPLIT_NAMES = ("train", "validation", "test")
# Split sizes the recipes rely on: enough rows to choose on (train, validation) and to test with power.
MIN_ROWS = {"train": 40, "validation": 16, "test": 40}
# Words that name each suite's entities in the prompts, read straight from meta (independent of splits.py).
ENTITY_WORDS = {
    "ioi": lambda m: {m["IO"], m["S"], m["C"]},
    "gender": lambda m: {m["profession"], m["corrupted_profession"]},
    "facts": lambda m: {m["subject"], m["corrupted_subject"]},
    "facts_large": lambda m: {m["subject"]},
    "sentiment": lambda m: {m["item"]},
    "icl_labels": lambda m: {m["query"]},
    "greater_than": lambda m: {m["event"], str(m["start"])} if m["kind"] == "year"
    else {f"{m['a']} + {m['b']}", f"{m['corrupted_a']} + {m['corrupted_b']}"},
}


@pytest.mark.parametrize("name", SUITES)
def test_suite_splits_are_labelled_and_entity_disjoint(name):
    task = load_task(name)
    assert all(e.split in SPLIT_NAMES for e in task.examples)      # every shipped row carries its label
    parts = {s: load_task(name, split=s) for s in SPLIT_NAMES}
    for s, part in parts.items():
        assert len(part) >= MIN_ROWS[s], (name, s, len(part))
        assert part.name == name and part.metric == task.metric and part.description == task.description
        assert [e.prompt for e in part.examples] == [e.prompt for e in task.examples if e.split == s]
    assert sum(map(len, parts.values())) == len(task)
    # row-disjoint and entity-disjoint, computed here from meta without mechanic.tasks.splits
    prompts = {s: {e.prompt for e in p.examples} for s, p in parts.items()}
    ents = {s: set().union(*(ENTITY_WORDS[name](e.meta) for e in p.examples)) for s, p in parts.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not prompts[a] & prompts[b] and not ents[a] & ents[b], (name, a, b, ents[a] & ents[b])
    sizes = check_disjoint(task)
    assert {s: d["rows"] for s, d in sizes.items()} == {s: len(p) for s, p in parts.items()}
    assert {s: d["entities"] for s, d in sizes.items()} == {s: len(v) for s, v in ents.items()}
    # check_disjoint can fail: a test row sharing an entity with another test row, relabelled as train
    words = [ENTITY_WORDS[name](e.meta) if e.split == "test" else set() for e in task.examples]
    i = next(i for i, w in enumerate(words) if any(w & v for j, v in enumerate(words) if j != i))
    leaked = Task(name, [replace(e, split="train") if j == i else e for j, e in enumerate(task.examples)])
    with pytest.raises(TaskError, match="not disjoint"):
        check_disjoint(leaked)


def test_held_out_entities_never_appear_in_train_prompts():
    """The reviewer's check: no test profession / name / item occurs as a word in a train or validation prompt
    (clean or corrupted)."""
    for name, key in (("gender", "profession"), ("ioi", "IO"), ("sentiment", "item"), ("facts", "subject")):
        held = {e.meta[key] for e in load_task(name, split="test").examples}
        seen = " ".join(f"{e.prompt} {e.corrupted}" for e in load_task(name, split=["train", "validation"]).examples)
        found = {w for w in held if re.search(rf"(?<!\w){re.escape(w)}(?!\w)", seen)}
        assert not found, (name, sorted(found))


def test_load_task_split_default_and_n():
    from mechanic.tasks.builtin import suite_path

    every = load_task("ioi")                # split=None: every row, in file order
    in_file = [json.loads(line)["prompt"] for line in suite_path("ioi").read_text().splitlines()]
    assert len(every) == 128 and [e.prompt for e in every.examples] == in_file
    test = load_task("ioi", split="test", n=5)
    assert len(test) == 5 and all(e.split == "test" for e in test.examples)
    both = load_task("gender", split=["train", "validation"])
    assert {e.split for e in both.examples} == {"train", "validation"}
    assert len(both) == len(load_task("gender", split="train")) + len(load_task("gender", split="validation"))
    with pytest.raises(TaskError, match=r"unknown split 'dev'.*'train', 'validation', 'test'"):
        load_task("ioi", split="dev")


def test_task_split_round_trip(tmp_path):
    rows = [Example(f"p{i}", " a", " b", meta={"i": i}, split=s)
            for i, s in enumerate(["train", "test", "validation", "test", "train"])]
    task = Task("mine", rows, "prob", "mine, labelled")
    test = task.split("test")
    assert [e.prompt for e in test.examples] == ["p1", "p3"] and (test.name, test.metric) == ("mine", "prob")
    assert test.description == "mine, labelled"
    assert [e.prompt for e in task.split(["train", "validation"]).examples] == ["p0", "p2", "p4"]
    again = from_jsonl(to_jsonl(task, tmp_path / "mine.jsonl"))
    assert [(e.prompt, e.split, e.meta) for e in again.examples] == [(e.prompt, e.split, e.meta) for e in rows]
    assert [e.prompt for e in again.split("validation").examples] == ["p2"]
    assert Example("x", " y", split="train") == Example("x", " y", split="test")   # like meta, not compared
    with pytest.raises(TaskError, match=r"'mine' has no validation rows \(rows per split: train 1, validation 0, "
                                        r"test 1\)"):
        task.subset(2).split("validation")
    with pytest.raises(TaskError, match="unknown split 'eval'"):
        task.split(["test", "eval"])
    with pytest.raises(TaskError, match="unknown split"):
        task.split([])
    p = tmp_path / "mine.csv"
    p.write_text("prompt,answer,split\na, b,test\nc, d,\n")
    csv_task = from_csv(p)
    assert [e.split for e in csv_task.examples] == ["test", None] and "split" not in csv_task.examples[0].meta


def test_unlabelled_rows_get_a_stable_hash_split(tmp_path):
    # sha256 of the key, first 8 bytes / 2**64: train < 0.5 <= validation < 0.7 <= test (values checked by hand
    # with `printf %s alpha | sha256sum`: alpha 0.558, beta 0.954, delta 0.310)
    assert {k: S.assign(k) for k in ("alpha", "beta", "delta", "gamma", "theta")} == \
        {"alpha": "validation", "beta": "test", "delta": "train", "gamma": "test", "theta": "validation"}
    counts = {s: 0 for s in SPLIT_NAMES}
    for i in range(3000):
        counts[S.assign(f"key{i}")] += 1
    assert abs(counts["train"] / 3000 - 0.5) < 0.03 and abs(counts["validation"] / 3000 - 0.2) < 0.03
    # a hand-made file without labels: rows about one entity (meta.entity) stay together, others split by prompt
    p = tmp_path / "people.jsonl"
    lines = [f'{{"prompt": "{who} works as a {job} and", "answer": " x", "meta": {{"entity": "{who}"}}}}'
             for who in ("Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "John")
             for job in ("teacher", "baker", "pilot")]
    lines += [f'{{"prompt": "Fact {i} is", "answer": " y"}}' for i in range(20)]
    p.write_text("\n".join(lines) + "\n")
    first, second = (S.labels(load_task(str(p)).examples) for _ in range(2))
    assert first == second and set(first) == set(SPLIT_NAMES)
    by_entity = {}
    for e, s in zip(load_task(str(p)).examples, first):
        by_entity.setdefault(S.entity_key(e), set()).add(s)
    assert all(len(v) == 1 for v in by_entity.values()) and len(by_entity) == 8 + 20
    assert by_entity["Ada"] == {S.assign("Ada")} and by_entity["Fact 3 is"] == {S.assign("Fact 3 is")}
    check_disjoint(load_task(str(p)))
    parts = [load_task(str(p), split=s) for s in SPLIT_NAMES]
    assert sum(map(len, parts)) == len(lines)
    # an unlabelled row takes the label of a labelled row with the same entity
    mixed = Task("m", [Example("Ada codes", " x", meta={"entity": "Ada"}, split="test"),
                       Example("Ada sings", " x", meta={"entity": "Ada"})])
    assert S.labels(mixed.examples) == ["test", "test"] and len(mixed.split("test")) == 2


@pytest.mark.parametrize("value", ['"dev"', '"Test"', "3"])
def test_bad_split_value_is_reported(tmp_path, value):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok", "answer": " fine", "split": "train"}\n'
                 f'{{"prompt": "a", "answer": " b", "split": {value}}}\n')
    with pytest.raises(TaskError) as err:
        from_jsonl(p)
    msg = str(err.value)
    assert str(p) in msg and "line 2" in msg and repr(json.loads(value)) in msg
    assert "'train', 'validation', 'test'" in msg and "\n" not in msg


# ---- tokenization ---------------------------------------------------------------------------------

def test_length_mismatch_error_and_align():
    task = Task("mine", [Example("When Mary and John left, John waved to", " Mary", " John",
                                 corrupted="When Mary and John left, Bob waved at him")])
    model = word_model()
    with pytest.raises(TaskError, match=r"'mine', example 0.*8 tokens.*9.*align=True"):
        task.tokenize(model)
    b = task.tokenize(model, align=True)
    assert b.clean["input_ids"].shape == b.corrupted["input_ids"].shape == (1, 9)
    assert b.clean["attention_mask"].tolist() == [[0] + [1] * 8]
    assert b.clean["position_ids"][0, 1:].tolist() == list(range(8))
    assert b.corrupted["attention_mask"].tolist() == [[1] * 9]
    tok = model.tokenizer
    assert tok.convert_ids_to_tokens([int(b.clean["input_ids"][0, -1])]) == [" to"]
    assert tok.convert_ids_to_tokens([int(b.corrupted["input_ids"][0, -1])]) == [" him"]
    assert b.tokens[0][0] == "<pad>" and b.answer_sets is None


def test_mixed_corrupted_is_refused():
    task = Task("mix", [Example("a b", " c", " d", corrupted="a e"), Example("a b", " c", " d")])
    with pytest.raises(TaskError, match="some examples have a corrupted prompt"):
        task.tokenize(word_model())


def test_answer_sets_and_set_metrics():
    task = Task("gt", [Example("x y", " 5", " 1", meta={"answers": [" 5", " 6"], "wrongs": [" 1"]}),
                       Example("x z", " 6", " 2")])     # no sets: falls back to {answer} / {wrong}
    model = word_model()
    b = task.tokenize(model)
    ids = {w: model.tokenizer(w)["input_ids"][0] for w in (" 5", " 6", " 1", " 2")}
    assert b.answer_sets.shape == (2, 2) and b.answer_sets[1].tolist() == [ids[" 6"], -1]
    logits = torch.full((2, len(model.tokenizer.vocab)), -1e9)
    logits[0, ids[" 6"]] = 0.0          # all mass on " 6": acceptable for row 0
    logits[1, ids[" 2"]] = 0.0          # all mass on the wrong answer for row 1
    assert M.prob_diff(logits, b).tolist() == pytest.approx([1.0, -1.0])
    assert M.accuracy(logits, b).tolist() == [1.0, 0.0]
    logits[1, ids[" 6"]] = 0.0          # half and half
    assert M.prob_diff(logits, b)[1].item() == pytest.approx(0.0, abs=1e-6)
    assert "prob_diff" in M.METRICS
    one = b.select([1])                 # row selection keeps the sets with their rows
    assert one.n == 1 and one.answer_sets.tolist() == [[ids[" 6"], -1]] and one.wrong.tolist() == [ids[" 2"]]
    assert M.prob_diff(logits[1:], one).item() == pytest.approx(M.prob_diff(logits, b)[1].item())
    assert b.select(slice(0, 1)).clean["input_ids"].shape == (1, 2) and len(b.select(slice(0, 1)).tokens) == 1
    nowrong = TaskBatch(b.clean, None, b.answer, None, b.tokens)
    with pytest.raises(TaskError, match="wrong answer"):
        M.prob_diff(logits, nowrong)


# ---- user task files ------------------------------------------------------------------------------

def test_jsonl_roundtrip_and_extra_keys(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text('{"prompt": "The capital of France is", "answer": " Paris", "wrong": " Rome", "level": 1}\n'
                 "\n"
                 '{"prompt": "2 + 2 =", "answer": " 4", "corrupted": null, "meta": {"kind": "math"}}\n')
    task = from_jsonl(p, metric="prob")
    assert task.name == "mine" and task.metric == "prob" and len(task) == 2
    assert task.examples[0].meta == {"level": 1} and task.examples[1].wrong is None
    out = to_jsonl(task, tmp_path / "again.jsonl")
    again = from_jsonl(out, name="again")
    assert [(e.prompt, e.answer, e.wrong, e.corrupted, e.meta) for e in again.examples] == \
           [(e.prompt, e.answer, e.wrong, e.corrupted, e.meta) for e in task.examples]
    assert len(load_task(str(p))) == 2      # a path works where a suite name does


@pytest.mark.parametrize("line, expect", [
    ('{"prompt": "a", "answer": " b"', "line 2: this line is not valid JSON"),
    ('["a", "b"]', "line 2: this line is a JSON list, not an object"),
    ('{"prompt": "a"}', 'line 2: "answer" is missing'),
    ('{"prompt": "", "answer": " b"}', 'line 2: "prompt" is \'\''),
    ('{"prompt": "a", "answer": " b", "wrong": 3}', 'line 2: "wrong" is a int'),
    ('{"prompt": "a", "answer": " b", "meta": [1]}', 'line 2: "meta" is a list'),
])
def test_jsonl_errors(tmp_path, line, expect):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok", "answer": " fine"}\n' + line + "\n")
    with pytest.raises(TaskError) as err:
        from_jsonl(p)
    msg = str(err.value)
    assert str(p) in msg and expect in msg and '"prompt" and "answer"' in msg


def test_file_level_errors(tmp_path):
    with pytest.raises(TaskError, match="no such task file"):
        from_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(TaskError, match="has no examples"):
        from_jsonl(tmp_path / "empty.jsonl")
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "answer": " b"}\n')
    with pytest.raises(TaskError, match="Unknown metric 'nope'"):
        from_jsonl(tmp_path / "t.jsonl", metric="nope")


def test_csv_loading(tmp_path):
    p = tmp_path / "mine.csv"
    p.write_text('prompt,answer,wrong,corrupted,source,meta\n'
                 '"When Mary and John left, John waved to", Mary, John,"When Mary and John left, Bob waved to",'
                 'hand,"{""order"": ""ABBA""}"\n'
                 '"The capital of France is", Paris,,,hand,\n')
    task = from_csv(p)
    assert task.name == "mine" and len(task) == 2
    e0, e1 = task.examples
    assert e0.prompt == "When Mary and John left, John waved to" and e0.answer == " Mary"
    assert e0.corrupted.endswith("Bob waved to") and e0.meta == {"source": "hand", "order": "ABBA"}
    assert e1.wrong is None and e1.corrupted is None and e1.meta == {"source": "hand"}
    tsv = tmp_path / "mine.tsv"
    tsv.write_text("prompt\tanswer\nThe sky is\t blue\n")
    assert load_task(str(tsv)).examples[0].answer == " blue"


@pytest.mark.parametrize("body, expect", [
    ("question,answer\nx, y\n", "line 1: the header row has columns ['question', 'answer'] but is missing prompt"),
    ("prompt,answer\na, b\nc, d, e\n", "line 3: this row has 3 cells but the header has 2 columns"),
    ("prompt,answer,wrong\na, b, c\nc\n", "line 3: this row has fewer cells"),
    ('prompt,answer\n"multi\nline", b\n,x\n', 'line 4: "prompt" is \'\''),
    ("prompt,answer,meta\na, b,{oops\n", "line 2: the meta cell is not valid JSON"),
])
def test_csv_errors(tmp_path, body, expect):
    p = tmp_path / "bad.csv"
    p.write_text(body)
    with pytest.raises(TaskError) as err:
        from_csv(p)
    assert str(p) in str(err.value) and expect in str(err.value)


# ---- on SmolLM2 -------------------------------------------------------------------------------------

@pytest.mark.real
def test_suites_tokenize_aligned_on_smollm2(smollm2):
    """Clean and corrupted prompts have the same token length (no align needed); answers differ in the first token."""
    tok = smollm2.tokenizer
    for name in SUITES:
        task = load_task(name)
        b = task.tokenize(smollm2)            # raises if any pair differs in length
        assert (b.answer != b.wrong).all(), name
        if name != "facts_large":         # no corrupted prompts
            lens = [len(tok(e.prompt)["input_ids"]) for e in task.examples]
            assert lens == [len(tok(e.corrupted)["input_ids"]) for e in task.examples], name
    for e in load_task("ioi").examples:
        assert all(len(tok(" " + e.meta[k], add_special_tokens=False)["input_ids"]) == 1 for k in ("IO", "S", "C"))
    assert load_task("greater_than").tokenize(smollm2).answer_sets is not None


def plain_logit_diffs(model, task, rows):
    """The logit difference computed one prompt at a time with the plain HF model (no mechanic)."""
    tok = model.tokenizer
    out = []
    for i in rows:
        e = task.examples[i]
        ids = tok(e.prompt, return_tensors="pt")
        with torch.no_grad():
            logits = model.hf(**ids).logits[0, -1]
        a = tok(e.answer, add_special_tokens=False)["input_ids"][0]
        w = tok(e.wrong, add_special_tokens=False)["input_ids"][0]
        out.append(float(logits[a] - logits[w]))
    return torch.tensor(out)


@pytest.mark.real
@pytest.mark.parametrize("name", ["ioi", "facts"])
def test_claimed_accuracy_on_smollm2(smollm2, name):
    task = load_task(name)
    b = task.tokenize(smollm2)
    logits = smollm2.run(b.clean).logits[:, -1].float()        # one batched run, left padded
    ld = M.logit_diff(logits, b)
    acc = (ld > 0).float().mean().item() if name == "ioi" else M.accuracy(logits, b).mean().item()
    assert acc >= CLAIMED[name], f"{name}: {acc:.3f} < claimed {CLAIMED[name]}"
    rows = [0, len(task) // 3, len(task) // 2, len(task) - 1]
    ref = plain_logit_diffs(smollm2, task, rows)
    assert (ld[rows] - ref).abs().max().item() < 1e-3
