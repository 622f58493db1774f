"""Fine-tuning baselines for editing: FT-L raises the new target within an exact L-inf bound on one parameter and
undoes bit for bit; LoRA's merged delta equals B @ A * scale and peft's own merge, has rank <= r, and leaves the
model unwrapped; both run in sequential batches and as recipe methods; on SmolLM2 FT-L makes new targets win."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import ARCHS, MOE_ARCHS

import mechanic
from mechanic.improve.edit_metrics import running_scores, target_logprobs
from mechanic.steer.edit import Fact
from mechanic.steer.finetune import clamp_linf, ft
from mechanic.steer.lora import lora, lora_factors, lora_plan
from mechanic.steer.plan import Plan, PlanError
from mechanic.steer.sequential import sequential
from mechanic.testing.tiny import tiny_model

FACTS = [
    Fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Rome", " Paris"),
    Fact("The river Thames flows through the city of", "The river Thames", " Berlin", " London"),
    Fact("The old castle was built by the king of", "The old castle", " Spain", " France"),
    Fact("The young doctor was born in the town of", "The young doctor", " Boston", " York"),
]
ALL_MOE = [a for a in MOE_ARCHS if a != "qwen2_moe"]   # qwen2_moe's layer 1 is dense (mlp_only_layers)
EPS = 1e-2


def worded(arch, tokenizer):
    return mechanic.load(tiny_model(arch, vocab_size=len(tokenizer)), tokenizer=tokenizer)


@pytest.fixture(params=ARCHS)
def tiny(request, word_tokenizer):
    """A tiny random model of every architecture that reads words (the conftest tokenizer)."""
    return worded(request.param, word_tokenizer)


def weights(m) -> dict:
    return {n: p.detach().clone() for n, p in m.hf.named_parameters()}


def new_logprobs(m, facts) -> torch.Tensor:
    return target_logprobs(m, [f.prompt for f in facts], [f.target_new for f in facts])


def down_name(m, layer: int) -> str:
    w = m.layer_module(layer, m.arch.down_proj).weight
    return next(n for n, p in m.hf.named_parameters() if p is w)


def test_ft_raises_the_target_within_the_bound_on_one_parameter(tiny, tmp_path):
    m = tiny
    if m.hf.config.model_type in ALL_MOE:   # a real reason: every layer is a mixture of experts, no dense down_proj
        with pytest.raises(PlanError, match="every layer of this model is a mixture of experts"):
            ft(m, FACTS[:2], 1)
        with pytest.raises(PlanError, match="every layer of this model is a mixture of experts"):
            ft(m, FACTS[:2])   # before any tracing
        return
    before, fp = weights(m), m.fingerprint
    lp0 = new_logprobs(m, FACTS[:2])
    plan = ft(m, FACTS[:2], 1, eps=EPS, lr=EPS, steps=8)
    assert m.fingerprint == fp and all(torch.equal(before[n], p) for n, p in weights(m).items())   # model left as is
    assert [e.param for e in plan.edits] == [down_name(m, 1)]
    handle = plan.apply(m)
    after = weights(m)
    lp1 = new_logprobs(m, FACTS[:2])
    assert (lp1 > lp0).all(), (lp0, lp1)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed == [down_name(m, 1)]
    d = (after[changed[0]].double() - before[changed[0]].double()).abs()
    assert d.max().item() <= EPS and d.max().item() > 0.5 * EPS   # the bound holds, and training reached it
    assert plan.settings["max_abs_change"][0] == d.max().item()
    handle.undo()
    assert all(torch.equal(before[n], p) for n, p in weights(m).items())
    again = Plan.load(plan.save(tmp_path / "ft.safetensors"))
    with m.applied(again):
        assert all(torch.equal(after[n], p) for n, p in weights(m).items())


def test_training_loss_is_the_targets_mean_nll(word_tokenizer):
    from mechanic.steer.finetune import forward, requests, target_nll

    m = worded("gpt2", word_tokenizer)
    facts = FACTS[:3]
    inputs, reads = requests(m, facts)
    with torch.no_grad():
        got = float(target_nll(forward(m, inputs), reads, len(facts)))
    n_tokens = torch.tensor([len(m.tokenizer(f.target_new, add_special_tokens=False)["input_ids"]) for f in facts])
    assert n_tokens.max() > 1   # a multi-token target, so the per-target mean matters
    ref = float((-new_logprobs(m, facts) / n_tokens).mean())   # edit_metrics' own teacher forcing
    assert abs(got - ref) < 1e-4


def test_loss_on_the_kept_positions_equals_the_full_logits(word_tokenizer):
    """fit reads the logits of the target positions only (kept): loss and gradient equal the full forward's."""
    from mechanic.steer.finetune import down_param, forward, kept, requests, target_nll, trainable

    m = worded("llama", word_tokenizer)
    facts = FACTS[:3]
    inputs, reads = requests(m, facts)
    keep, local = kept(inputs, reads)
    assert keep < inputs["input_ids"].shape[1]
    _, W = down_param(m, 1)
    out = []
    for logits, rd in ((lambda: forward(m, inputs), reads), (lambda: forward(m, inputs, keep), local)):
        with trainable(m, [W]):
            loss = target_nll(logits(), rd, len(facts))
            loss.backward()
            out.append((float(loss.detach()), W.grad.clone()))
    assert abs(out[0][0] - out[1][0]) < 1e-5
    assert (out[0][1] - out[1][1]).abs().max().item() < 1e-6 * max(1.0, out[0][1].abs().max().item())
    assert out[0][1].abs().max() > 0


def test_clamp_linf_is_exact_in_float64():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(200, 300, generator=g)
    W = W0 + torch.randn(200, 300, generator=g)
    for eps in (1e-3, 0.1, 1 / 3):
        out = clamp_linf(W, W0, eps)
        d = (out.double() - W0.double()).abs()
        assert d.max().item() <= eps
        inside = (W.double() - W0.double()).abs() <= eps * (1 - 1e-6)
        assert torch.equal(out[inside], W[inside])         # weights inside the ball are untouched
        assert (d[~inside] >= eps - 1e-6).all()              # the rest sit on the boundary


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_lora_delta_equals_hand_written_and_peft_merge(tiny):
    from peft import LoraConfig, get_peft_model

    m = tiny
    if m.hf.config.model_type in ALL_MOE:
        with pytest.raises(PlanError, match="every layer of this model is a mixture of experts"):
            lora(m, FACTS[:2], 1)
        return
    before, fp = weights(m), m.fingerprint
    flags = [p.requires_grad for p in m.hf.parameters()]
    types = [type(x) for x in m.hf.modules()]
    rank = 2
    factors, settings = lora_factors(m, FACTS[:2], 1, rank=rank, alpha=6.0, steps=6, lr=1e-2)
    # the user's model is never left wrapped: same modules, flags, weights, fingerprint
    assert [type(x) for x in m.hf.modules()] == types and [p.requires_grad for p in m.hf.parameters()] == flags
    assert m.fingerprint == fp and all(torch.equal(before[n], p) for n, p in weights(m).items())
    plan = lora_plan(m, factors, settings)
    name = down_name(m, 1)
    (A, B, scaling), = factors.values()
    assert list(factors) == [name] and scaling == 3.0 and A.shape[0] == rank
    with m.applied(plan):
        after = weights(m)
        lp1 = new_logprobs(m, FACTS[:2])
    assert [n for n in before if not torch.equal(before[n], after[n])] == [name]
    delta = after[name].double() - before[name].double()
    ref = (B.double() @ A.double()) * scaling                       # hand-written: out x in
    ref = ref.T if m.arch.conv1d else ref
    assert (delta - ref).abs().max().item() < 1e-6
    assert ref.abs().max().item() > 1e-4                            # training moved B away from zero
    assert torch.linalg.matrix_rank(delta, rtol=1e-5).item() <= rank
    # peft's own merge of the same factors, on a copy of the model
    path = next(n for n, x in m.hf.named_modules() if x is m.layer_module(1, m.arch.down_proj))
    twin = get_peft_model(copy.deepcopy(m.hf), LoraConfig(r=rank, lora_alpha=6.0, target_modules=[path],
                                                           fan_in_fan_out=m.arch.conv1d, lora_dropout=0.0))
    mod = twin.get_submodule("base_model.model." + path)
    with torch.no_grad():
        mod.lora_A["default"].weight.copy_(A)
        mod.lora_B["default"].weight.copy_(B)
    ids = m.inputs([f.prompt for f in FACTS[:2]])
    with torch.no_grad():
        adapter_logits = twin(**ids, use_cache=False).logits
    merged = dict(twin.merge_and_unload().named_parameters())[name]
    assert (merged.double() - after[name].double()).abs().max().item() < 1e-6
    with m.applied(plan), torch.no_grad():
        assert (m.hf(**ids, use_cache=False).logits - adapter_logits).abs().max().item() < 1e-4
    assert (lp1 > new_logprobs(m, FACTS[:2])).all()                # and it raised the new targets


@pytest.mark.parametrize("method,options", [("ft", {"eps": EPS, "lr": EPS, "steps": 4}),
                                            ("lora", {"rank": 2, "steps": 4})])
def test_sequential_two_batches_equal_batches_by_hand(word_tokenizer, method, options):
    m = worded("llama", word_tokenizer)
    before = weights(m)
    seen = []

    def on_batch(model_now, step, done):
        seen.append(weights(model_now))
        return running_scores(model_now, step, done)

    plan = sequential(m, FACTS, method, 2, [1], on_batch=on_batch, progress=False, **options)
    assert all(torch.equal(before[n], p) for n, p in weights(m).items())
    assert [c["edits"] for c in plan.settings["curve"]] == [2, 4] and "es" in plan.settings["curve"][0]
    fn = {"ft": ft, "lora": lora}[method]
    handles, by_hand = [], []
    for batch in (FACTS[:2], FACTS[2:]):
        handles.append(fn(m, batch, [1], **options).apply(m))
        by_hand.append(weights(m))
    for h in reversed(handles):
        h.undo()
    assert all(torch.equal(seen[i][n], by_hand[i][n]) for i in range(2) for n in before)
    name = down_name(m, 1)
    with m.applied(plan):
        assert torch.equal(dict(m.hf.named_parameters())[name], by_hand[1][name])
    if method == "ft":   # each batch moves each weight by at most eps from where that batch started
        for a, b in ((before, by_hand[0]), (by_hand[0], by_hand[1])):
            assert (b[name].double() - a[name].double()).abs().max().item() <= EPS
    assert plan.settings["layers"] == [1] and plan.settings["stats_tokens"] == {}


def paragraph(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and len(msg) > 40
    return msg


def test_bad_settings_are_one_paragraph(word_tokenizer):
    m = worded("llama", word_tokenizer)
    for eps in (0, -1e-3, math.nan):
        with pytest.raises(PlanError, match="eps must be a positive") as e:
            ft(m, FACTS[:1], 1, eps=eps)
        paragraph(e)
    for layer in (3, -1, [0, 7], "two"):
        with pytest.raises(PlanError, match="layers 0..2") as e:
            ft(m, FACTS[:1], layer)
        paragraph(e)
    with pytest.raises(PlanError, match="layers 0..2") as e:
        lora(m, FACTS[:1], 9)
    paragraph(e)
    with pytest.raises(PlanError, match=r"layer\(s\) \[0\] are mixtures of experts. Choose a dense layer \(1\)") as e:
        ft(worded("qwen2_moe", word_tokenizer), FACTS[:1], 0)
    paragraph(e)
    with pytest.raises(PlanError, match="steps must be") as e:
        ft(m, FACTS[:1], 1, steps=0)
    paragraph(e)
    with pytest.raises(PlanError, match="rank must be") as e:
        lora(m, FACTS[:1], 1, rank=0)
    paragraph(e)
    with pytest.raises(PlanError, match="Fact") as e:
        ft(m, [], 1)
    paragraph(e)
    with pytest.raises(PlanError, match="no setting") as e:
        sequential(m, FACTS, "ft", 2, [1], rank=2)
    with pytest.raises(PlanError, match="hook interventions") as e:
        from mechanic.model.interventions import scale
        with m.applied(Plan([scale("L0.mlp_out", 0.5)])):
            ft(m, FACTS[:1], 1)
    paragraph(e)


@pytest.mark.parametrize("name,spec", [("ft", {"layer": 1, "eps": EPS, "lr": EPS, "steps": 3, "batch_size": 2}),
                                       ("lora", {"layers": [1], "rank": 2, "steps": 3, "batch_size": 2})])
def test_recipe_methods_edit_the_tasks_facts(word_tokenizer, tmp_path, name, spec):
    from mechanic.recipes.methods import run_method
    from mechanic.recipes.runner import EDIT_METHODS
    from mechanic.recipes.schema import Strict

    m = worded("llama", word_tokenizer)
    Spec = type("Spec", (Strict,), {"__annotations__": {"method": str, **{k: type(v) for k, v in spec.items()}},
                                    "method": name, **spec})
    rows = [SimpleNamespace(prompt=f.prompt, answer=f.target_true, wrong=f.target_new, split="train",
                            meta={"subject": f.subject}) for f in FACTS[:3]]
    out = run_method("steer", {"model": m, "task": SimpleNamespace(name="tiny facts", examples=rows), "dir": tmp_path,
                               "found": None, "seed": 0}, Spec())
    plan = Plan.load(tmp_path / out.artifacts["plan"])
    assert name in EDIT_METHODS and plan.method == f"sequential {name}" and out.data["layers"] == [1]
    assert [b["facts"] for b in plan.settings["batches"]] == [2, 1] and [e.param for e in plan.edits] == [down_name(m, 1)]


@pytest.mark.real
def test_ft_on_smollm2_makes_the_new_targets_greedy(smollm2):
    from mechanic.locate.trace import subject_positions
    from mechanic.steer.edit import facts_from_task
    from mechanic.tasks.builtin import load_task

    m = smollm2
    facts = [f for f in facts_from_task(load_task("facts", split="test"))
             if subject_positions(m, f.prompt, f.subject)[-1] > 0][:2]

    def greedy(f):
        return int(m.run(f.prompt, last_only=True).logits[0, -1].argmax())

    first = [m.tokenizer(f.target_new, add_special_tokens=False)["input_ids"][0] for f in facts]
    assert [greedy(f) for f in facts] != first
    plan = ft(m, facts, 5)
    with m.applied(plan):
        assert [greedy(f) for f in facts] == first
    assert plan.settings["max_abs_change"][0] <= plan.settings["eps"]
