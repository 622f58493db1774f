"""Sequential editing: the plan equals applying the methods batch after batch by hand, undoes bit for bit, reports
each batch to a callback on the model as edited so far; averaged tracing picks the argmax of the mean effect."""

import pytest
import torch

import mechanic
from mechanic.improve.edit_metrics import counterfact, running_scores
from mechanic.locate.scores import Scores
from mechanic.locate.trace import causal_trace, subject_positions
from mechanic.steer import edit as edit_module
from mechanic.steer.alphaedit import NullSpaces, alphaedit, alphaedit_update
from mechanic.steer.edit import Fact, context_prefixes, memit, memit_targets, memit_update, rome, spread, trace_layers
from mechanic.steer.plan import Plan, PlanError
from mechanic.steer.sequential import sequential
from mechanic.steer.stats import second_moments
from mechanic.testing.tiny import tiny_model

FACTS = [
    Fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Rome", " Paris",
         ("The Eiffel Tower stands in",), ("The old bridge is located in the city of",)),
    Fact("The river Thames flows through the city of", "The river Thames", " Berlin", " London"),
    Fact("The old castle was built by the king of", "The old castle", " Spain", " France"),
    Fact("The young doctor was born in the town of", "The young doctor", " Boston", " York"),
]
TOKENS = 2000
OPT = dict(steps=3, stats_tokens=TOKENS)
LAYERS = {"rome": [0], "memit": [0, 1], "alphaedit": [0, 1]}
EXTRA = {"rome": {}, "memit": {"lam": 1.0}, "alphaedit": {"threshold": 2e-4, "alpha": 1e-4}}


@pytest.fixture
def model(word_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("MECHANIC_CACHE", str(tmp_path))
    return mechanic.load(tiny_model("llama", vocab_size=len(word_tokenizer)), tokenizer=word_tokenizer)


def weights(m) -> dict:
    return {n: p.detach().clone() for n, p in m.hf.named_parameters()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def by_hand(m, method, batches):
    """Each batch computed with the earlier ones applied, written out; the weights after each batch. The statistics
    are those of the unedited model (an edited model has another fingerprint, so its own would be recomputed)."""
    prefixes = context_prefixes(m, 2, seed=0)
    OPT = dict(steps=3, moments=second_moments(m, LAYERS[method], max_tokens=TOKENS))
    state = NullSpaces(EXTRA["alphaedit"]["threshold"])
    handles, after = [], []
    for batch in batches:
        for f in (batch if method == "rome" else [batch]):
            if method == "rome":
                p = rome(m, f, LAYERS["rome"][0], prefixes=prefixes, **OPT)
            elif method == "memit":
                p = memit(m, f, LAYERS["memit"], prefixes=prefixes, **OPT, **EXTRA["memit"])
            else:
                p = alphaedit(m, f, LAYERS["alphaedit"], prefixes=prefixes, state=state, **OPT, **EXTRA["alphaedit"])
            handles.append(p.apply(m))
        after.append(weights(m))
    for h in reversed(handles):
        h.undo()
    return after


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_sequential_equals_batches_applied_by_hand(model, method):
    m = model
    original = weights(m)
    seen = []

    def on_batch(model_now, step, done):
        seen.append((step, len(done), weights(model_now)))
        return running_scores(model_now, step, done)

    plan = sequential(m, FACTS, method, 2, LAYERS[method], n_prefixes=2, on_batch=on_batch, progress=False, **OPT,
                      **EXTRA[method])
    assert same(weights(m), original)  # the model is left as it was
    after = by_hand(m, method, [FACTS[:2], FACTS[2:]])
    assert [(s, n) for s, n, _ in seen] == [(0, 2), (1, 4)]
    assert same(seen[0][2], after[0]) and same(seen[1][2], after[1])
    with m.applied(plan):
        assert same(weights(m), after[1])
        assert not same(weights(m), original)
    assert [c["edits"] for c in plan.settings["curve"]] == [2, 4]
    assert {"es", "ps", "ns"} <= set(plan.settings["curve"][0])
    assert plan.settings["layers"] == LAYERS[method] and plan.settings["layers_from"] == "given"


def test_sequential_plan_undoes_bit_for_bit_and_saves(model, tmp_path):
    m = model
    original = weights(m)
    plan = sequential(m, FACTS, "memit", 3, [0, 1], n_prefixes=2, progress=False, **OPT, lam=1.0)
    assert len(plan.edits) == 2 and plan.method == "sequential memit"
    handle = plan.apply(m)
    edited = weights(m)
    assert not same(edited, original)
    handle.undo()
    assert same(weights(m), original)
    again = Plan.load(plan.save(tmp_path / "seq.safetensors"))
    with m.applied(again):
        assert same(weights(m), edited)
    assert same(weights(m), original)


FULL = dict(steps=3, lr=0.5, kl_factor=0.0625, weight_decay=0.5, clamp=4.0)    # memit_targets' settings


class HoldsAnchor(NullSpaces):
    """AlphaEdit's null spaces holding, besides the edits so far, an anchor prompt's keys read on the model as the
    solve finds it (a variant under study, like benchmarks/editing_ns_validation.py's anchored candidate)."""

    def __init__(self, model, anchor: str, threshold: float):
        super().__init__(threshold)
        self.model, self.anchor = model, anchor

    def held(self, layer):
        Ka = self.model.run(self.anchor, cache=[f"L{layer}.neuron"], stop_at="auto")[f"L{layer}.neuron"][0].double().T
        prev = super().held(layer)
        return Ka @ Ka.T if prev is None else prev + Ka @ Ka.T


def loop_by_hand(m, facts, batch, layers, solve, record, prompt_key):
    """The benchmarks' former own loop (editing_sequential.sequence_scores): targets and spread per batch with a
    custom solve, each batch applied before the next; CounterFact scores and weights after every batch."""
    prefixes = context_prefixes(m, 2, seed=0)
    handles, scores, after = [], [], []
    try:
        for i in range(0, len(facts), batch):
            rows, Z, _ = memit_targets(m, facts[i:i + batch], layers[-1], prefixes, prompt_key=prompt_key, **FULL)
            edits, keys = spread(m, rows, Z, layers, solve, "validation sequence")
            if record is not None:
                record(keys)
            handles.append(Plan(edits=edits).apply(m))
            scores.append(counterfact(m, facts[:i + batch]))
            after.append(weights(m))
    finally:
        for h in reversed(handles):
            h.undo()
    return scores, after


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_targets_cache_and_state_hooks_equal_the_loop_by_hand(model, method, monkeypatch):
    """sequential with a targets cache (and for AlphaEdit a NullSpaces subclass holding more keys) gives the weights
    and scores of the loop the benchmarks wrote out, and a second sequence reusing the cache optimises the first
    batch once yet ends in the same weights."""
    m, layers, thr, alpha = model, LAYERS[method], EXTRA["alphaedit"]["threshold"], EXTRA["alphaedit"]["alpha"]
    C = second_moments(m, layers, max_tokens=TOKENS)
    if method == "alphaedit":
        ns = HoldsAnchor(m, "The old bridge is located in the city of", thr)
        solve = lambda L, K, R: alphaedit_update(ns.projection(L, C[L][0]), K, R, ns.held(L), alpha)  # noqa: E731
        record, extra = ns.record, dict(threshold=thr, alpha=alpha)
    else:
        solve = lambda L, K, R: memit_update(C[L][0], K, R, 1.0)  # noqa: E731
        record, extra = None, dict(lam=1.0)
    want_scores, want = loop_by_hand(m, FACTS, 2, layers, solve, record, True)
    calls = []
    optimise = edit_module.memit_targets
    monkeypatch.setattr(edit_module, "memit_targets", lambda *a, **k: calls.append(1) or optimise(*a, **k))
    cache, seen = {}, []

    def run():
        state = HoldsAnchor(m, "The old bridge is located in the city of", thr) if method == "alphaedit" else None
        seen.clear()
        plan = sequential(m, FACTS, method, 2, layers, n_prefixes=2, stats_tokens=TOKENS, progress=False,
                          targets=cache, state=state, prompt_key=True, on_batch=lambda mm, step, done:
                          seen.append(weights(mm)) or running_scores(mm, step, done), **FULL, **extra)
        return plan, state

    plan, state = run()
    assert len(calls) == 2 and len(cache) == 1                      # both batches optimised, the first one kept
    for got, ref in zip(seen, want):
        assert max((got[k] - ref[k]).abs().max().item() for k in ref) == 0.0
    assert [{k: c[k] for k in ("es", "ps", "ns")} for c in plan.settings["curve"]] == \
        [{k: s[k] for k in ("es", "ps", "ns")} for s in want_scores]
    if method == "alphaedit":
        assert sorted(state.projections) == layers and plan.settings["null_dims"] == state.dims
    again, _ = run()
    assert len(calls) == 3                                          # the first batch's targets came from the cache
    with m.applied(plan):
        first = weights(m)
    with m.applied(again):
        assert max((weights(m)[k] - first[k]).abs().max().item() for k in first) == 0.0
    with pytest.raises(PlanError, match="targets"):
        sequential(m, FACTS, "rome", 2, [0], targets=cache)
    with pytest.raises(PlanError, match="state"):
        sequential(m, FACTS, "memit", 2, [0], state=NullSpaces())


def fake_trace(values: dict):
    def trace_layer(model, fact, samples=5):
        v = torch.tensor(values[fact.subject]).view(-1, 1)
        return int(v.argmax()), Scores(v, [f"L{i}.mlp_out" for i in range(len(v))], "fake")
    return trace_layer


def test_averaged_tracing_picks_the_argmax_of_the_mean(model, monkeypatch):
    m = model
    # each fact alone would pick layer 0 or 2; the mean effect peaks at layer 1
    values = {FACTS[0].subject: [1.0, 0.6, 0.0], FACTS[1].subject: [0.0, 0.6, 1.0]}
    monkeypatch.setattr(edit_module, "trace_layer", fake_trace(values))
    top, mean = trace_layers(m, FACTS[:2])
    assert top == 1 and torch.allclose(mean, torch.tensor([0.5, 0.6, 0.5]))
    plan = sequential(m, FACTS[2:], "memit", 2, trace_facts=FACTS[:2], n_prefixes=2, progress=False, **OPT)
    assert plan.settings["layers"] == [0, 1]
    assert plan.settings["trace_mean"] == pytest.approx([0.5, 0.6, 0.5])
    assert "averaged over 2 facts" in plan.settings["layers_from"]


def test_averaged_tracing_on_a_model(model):
    m = model
    traces = []
    for f in FACTS[:3]:
        pos = subject_positions(m, f.prompt, f.subject)[-1]
        traces.append(causal_trace(m, f.prompt, f.target_true, f.subject, "mlp", samples=3, positions=[pos]).values[:, 0])
    mean = torch.stack(traces).mean(0)
    top, got = trace_layers(m, FACTS[:3], samples=3)
    assert torch.allclose(got, mean) and top == int(mean.argmax())


def test_sequential_errors(model):
    with pytest.raises(PlanError, match="Unknown editing method"):
        sequential(model, FACTS, "sgd", 2, [0])
    with pytest.raises(PlanError, match="no setting lam"):
        sequential(model, FACTS, "rome", 2, [0], lam=1.0)
    with pytest.raises(PlanError, match="batch_size"):
        sequential(model, FACTS, "memit", 0, [0])
    with pytest.raises(PlanError, match="one layer"):
        sequential(model, FACTS, "rome", 2, [0, 1])


def test_alphaedit_steer_method_edits_the_tasks_facts_in_batches(model, tmp_path):
    from types import SimpleNamespace

    from mechanic.recipes.methods import run_method
    from mechanic.recipes.schema import Strict

    class Spec(Strict):
        method: str = "alphaedit"
        layers: list[int] = [0, 1]
        threshold: float = 2e-4
        alpha: float = 1e-4
        batch_size: int = 2

    rows = [SimpleNamespace(prompt=f.prompt, answer=f.target_true, wrong=f.target_new, split="train",
                            meta={"subject": f.subject}) for f in FACTS[:3]]
    task = SimpleNamespace(name="tiny facts", examples=rows)
    out = run_method("steer", {"model": model, "task": task, "dir": tmp_path}, Spec())
    plan = Plan.load(tmp_path / out.artifacts["plan"])
    assert plan.method == "sequential alphaedit" and plan.settings["batch_size"] == 2
    assert [b["facts"] for b in plan.settings["batches"]] == [2, 1] and out.data["layers"] == [0, 1]


def test_rome_steer_method_edits_one_fact_after_another_with_one_statistics(model, tmp_path):
    """The recipe's ROME stage is sequential ROME: its end state equals sequential(..., "rome"), and the second moment
    is computed once on the unedited model (per fact on the edited model it was recomputed for every fact)."""
    from types import SimpleNamespace

    from mechanic.recipes.methods import run_method
    from mechanic.recipes.schema import Strict

    class Spec(Strict):
        method: str = "rome"
        layer: int = 0
        n_prefixes: int = 2
        steps: int = 3
        stats_tokens: int = 2000

    rows = [SimpleNamespace(prompt=f.prompt, answer=f.target_true, wrong=f.target_new, split="train",
                            meta={"subject": f.subject}) for f in FACTS[:3]]
    task = SimpleNamespace(name="tiny facts", examples=rows)
    (tmp_path / "stage").mkdir()
    out = run_method("steer", {"model": model, "task": task, "dir": tmp_path / "stage"}, Spec())
    plan = Plan.load(tmp_path / "stage" / out.artifacts["plan"])
    assert plan.method == "rome" and plan.settings["facts"] == 3
    assert len(list((tmp_path / "stats").rglob("*.safetensors"))) == 1
    want = sequential(model, FACTS[:3], "rome", 3, [0], n_prefixes=2, steps=3, stats_tokens=2000, progress=False)
    before = weights(model)
    with model.applied(plan):
        got = weights(model)
    with model.applied(want):
        assert same(got, weights(model))
    assert not same(got, before)


def test_causal_trace_locate_method_averages_over_train_facts(model, tmp_path):
    """locate `causal_trace` with facts: N picks the layer trace_layers picks over the task's first N facts."""
    from types import SimpleNamespace

    from mechanic.recipes.methods import run_method
    from mechanic.recipes.schema import Strict

    class Spec(Strict):
        method: str = "causal_trace"
        samples: int = 3
        facts: int = 3
        heatmap: bool = False

    rows = [SimpleNamespace(prompt=f.prompt, answer=f.target_new, wrong=f.target_true, split="train",
                            meta={"subject": f.subject, "target_true": f.target_true.strip(),
                                  "target_new": f.target_new.strip()}) for f in FACTS]
    task = SimpleNamespace(name="tiny facts", examples=rows)
    out = run_method("locate", {"model": model, "task": task, "dir": tmp_path, "seed": 0}, Spec())
    from mechanic.steer.edit import facts_from_task
    top, mean = trace_layers(model, facts_from_task(task)[:3], samples=3)
    assert out.data["layer"] == top and out.data["facts"] == 3
    assert out.data["effects"] == [round(float(v), 5) for v in mean]
    assert "averaged over 3 train facts" in out.text
