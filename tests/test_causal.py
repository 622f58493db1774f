"""Activation patching: the fast batched, cache-reusing implementation equals a plain-hook reference
(tests/naive.py: HF modules, torch hooks, the metric by hand; nothing from mechanic's engine)."""

import itertools

import pytest
import torch
from naive import patch_reference, patch_tolerance

import mechanic
from mechanic.locate import Scores
from mechanic.locate.causal import patch
from mechanic.tasks import Example, Task, TaskBatch
from mechanic.testing.tiny import left_padded, tiny_model


def tiny_batch(model, n=2):
    """Clean/corrupted token ids with the same padding, and random answer/wrong tokens."""
    clean = model.inputs(left_padded([6, 5, 6][:n], seed=1))
    corr = model.inputs(left_padded([6, 5, 6][:n], seed=2))
    g = torch.Generator().manual_seed(3)
    ans, wrong = torch.randint(3, 100, (n,), generator=g), torch.randint(3, 100, (n,), generator=g)
    return TaskBatch(clean, corr, ans, wrong, [[f"t{i}" for i in range(6)]] * n)


CASES = [("llama", k, p) for k, p in [("resid_pre", "all"), ("attn_out", [-1, 2]), ("head", None),
                                      ("resid_mid", [4]), ("mlp_out", None)]]
CASES += [("qwen2_moe", "head", [3]), ("gemma2", "resid_pre", "all"), ("gpt2", "resid_post", [1, -1])]


@pytest.mark.parametrize("arch,kind,positions", CASES)
def test_fast_patching_equals_naive(arch, kind, positions):
    m = mechanic.load(tiny_model(arch))
    b = tiny_batch(m)
    tol = patch_tolerance(m, b)
    fast = patch(m, b, kind, positions=positions, batch_size=5, layer_span=1, progress=False)
    ref, names = patch_reference(m, b, kind, positions)
    assert fast.sites == names and fast.values.shape == ref.shape
    assert (fast.values - ref).abs().max().item() < tol
    noise = patch(m, b, kind, positions=positions, direction="noise", progress=False)
    ref, _ = patch_reference(m, b, kind, positions, direction="noise")
    assert (noise.values - ref).abs().max().item() < tol
    assert ref.abs().max().item() > 0.1  # the patches do something: a no-op would not match


@pytest.mark.parametrize("kind", ["resid_pre", "head", "neuron"])
def test_patches_that_change_nothing_are_not_rerun_and_still_exact(kind):
    m = mechanic.load(tiny_model("llama"))
    b = tiny_batch(m)
    ids = b.clean["input_ids"].clone()
    ids[:, 4:] = b.corrupted["input_ids"][:, 4:]  # clean and corrupted agree on columns 0-3
    b = TaskBatch(b.clean, {**b.clean, "input_ids": ids}, b.answer, b.wrong, b.tokens)
    fast = patch(m, b, kind, positions="all", batch_size=7, progress=False)
    full = patch(m, b, kind, positions="all", skip_unchanged=False, progress=False)
    ref, _ = patch_reference(m, b, kind, "all")
    n_units = len(m.sites(kind))
    assert fast.settings["runs_unchanged"] == n_units * 4 * b.n  # every unit at columns 0-3, both examples
    assert fast.settings["runs_computed"] + fast.settings["runs_unchanged"] == full.settings["runs_computed"]
    tol = patch_tolerance(m, b)
    assert (fast.values - ref).abs().max().item() < tol
    assert (full.values - ref).abs().max().item() < tol


def test_neurons_and_experts():
    m = mechanic.load(tiny_model("llama"))
    b = tiny_batch(m, 1)
    fast = patch(m, b, "neuron", positions=None, progress=False)
    assert fast.values.shape == (3 * 96,)
    ref, names = patch_reference(m, b, "neuron", None)
    assert fast.sites == names and (fast.values - ref).abs().max().item() < patch_tolerance(m, b)
    moe = mechanic.load(tiny_model("mixtral"))
    b = tiny_batch(moe)
    fast = patch(moe, b, "expert", positions=[-1], progress=False)
    ref, names = patch_reference(moe, b, "expert", [-1])
    assert fast.sites == names and (fast.values - ref).abs().max().item() < patch_tolerance(moe, b)
    assert ref.abs().max().item() > 0.1


def test_patching_the_whole_last_layer_restores_everything():
    """Denoising resid_post of the last layer at every position gives back the clean metric exactly (1.0)."""
    m = mechanic.load(tiny_model("llama"))
    b = tiny_batch(m)
    s = patch(m, b, "resid_post", positions=None, progress=False)
    assert s.values[-1].item() == pytest.approx(1.0, abs=1e-5)


def other_rows(n):
    """Every way to give each of n rows another row as its donor (d[e] != e)."""
    return [d for d in itertools.product(range(n), repeat=n) if all(d[e] != e for e in range(n))]


@pytest.mark.parametrize("kind,positions", [("attn_out", [-1]), ("head", [-1, 2]), ("resid_pre", "all")])
def test_mean_and_resample_ablation_equal_plain_hooks(kind, positions):
    """Mean ablation = each column's mean over the clean prompts' real tokens; resample = another prompt's value.
    Both against plain hooks writing those values into the clean run, the metric by hand (raw logit diff)."""
    m = mechanic.load(tiny_model("llama"))
    b = tiny_batch(m, 3)
    tol = patch_tolerance(m, b, normalise=False)
    s = patch(m, b, kind, positions=positions, ablation="mean", normalise=False, progress=False)
    ref, names = patch_reference(m, b, kind, positions, ablation="mean", normalise=False)
    assert s.sites == names and (s.values - ref).abs().max().item() < tol
    base = s.settings["metric_clean"]
    assert (ref - base).abs().max().item() > 10 * tol    # the ablation changes the metric
    # resample: every row takes another row's values (one donor per row, the same for every unit); which donors
    # is the seed's business, so try every assignment without a row donating to itself: exactly one matches
    r = patch(m, b, kind, positions=positions, ablation="resample", normalise=False, seed=4, progress=False)
    assert r.settings["ablation"] == "resample" and r.sites == names
    diffs = {d: (r.values - patch_reference(m, b, kind, positions, ablation="resample", donors=list(d),
                                            normalise=False)[0]).abs().max().item() for d in other_rows(b.n)}
    matches = [d for d, x in diffs.items() if x < tol]
    assert len(matches) == 1, diffs
    assert sorted(matches[0]) == list(range(b.n))      # donors are a permutation: every row donates once
    assert all(x > 10 * tol for d, x in diffs.items() if d not in matches)   # the donors are distinguishable


def test_errors_are_clear():
    m = mechanic.load(tiny_model("llama"))
    b = tiny_batch(m)
    with pytest.raises(ValueError, match="choose one of"):
        patch(m, b, "heads", progress=False)
    no_corr = TaskBatch(b.clean, None, b.answer, b.wrong, b.tokens)
    with pytest.raises(ValueError, match="corrupted prompt"):
        patch(m, no_corr, "resid_pre", progress=False)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        patch(m, b, "expert", progress=False)


def test_scores_round_trip(tmp_path):
    m = mechanic.load(tiny_model("llama"))
    s = patch(m, tiny_batch(m), "resid_pre", progress=False)
    for name in ("s.json", "s.safetensors"):
        back = Scores.load(s.save(tmp_path / name))
        assert back.values.equal(s.values) and back.sites == s.sites and back.positions == s.positions
        assert back.settings == s.settings and back.fingerprint == m.fingerprint
    top = s.top(3)
    assert len(top) == 3 and abs(top[0][2]) >= abs(top[1][2]) >= abs(top[2][2])
    assert all(abs(v) >= 0.1 for _, _, v in s.threshold(0.1))


@pytest.mark.real
def test_ioi_resid_patching_on_smollm2(smollm2):
    task = Task("ioi-one", [Example("When Mary and John went to the store, John gave a drink to", " Mary", " John",
                                    "When Mary and John went to the store, Paul gave a drink to")])
    s = patch(smollm2, task, "resid_pre", positions="all", progress=False)
    assert s.values.shape == (30, 14)
    b = task.tokenize(smollm2)
    ref, _ = patch_reference(smollm2, b, "resid_pre", [-1, 9])
    fast = patch(smollm2, task, "resid_pre", positions=[-1, 9], progress=False)
    print(f"\nSmolLM2 resid_pre patching vs plain hooks: max abs diff {(fast.values - ref).abs().max().item():.2e}, "
          f"tolerance {patch_tolerance(smollm2, b):.2e}")
    assert (fast.values - ref).abs().max().item() < patch_tolerance(smollm2, b)
    # the corrupted token (S2, column 9) carries the signal early, the last position late
    assert s.values[2, 9] > 0.5 and s.values[29, 13] > 0.9 and s.values[2, 13] < 0.1


def test_scores_to_pandas_long_format():
    m = mechanic.load(tiny_model("llama"))
    s = patch(m, tiny_batch(m), "resid_pre", positions=[-1, 2], progress=False)
    df = s.to_pandas()
    assert len(df) == 3 * 2 and set(df.columns) == {"site", "pos", "token", "value"}
    row = df[(df.site == "L1.resid_pre") & (df.pos == 1)].iloc[0]
    assert row.value == pytest.approx(float(s.values[1, 1])) and row.token == s.positions[1]
