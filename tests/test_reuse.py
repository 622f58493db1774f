"""Causal reuse: a run that starts at column p and layer s from the unpatched run's cache equals a full run."""

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import mechanic
from mechanic import replace
from mechanic.model.reuse import logit_columns, packed_logits, packing, packs, prefix, suffix_logits
from mechanic.tasks import metrics as M
from mechanic.tasks.task import TaskBatch
from mechanic.testing.tiny import left_padded, tiny_model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "gpt_neox", "phi3", "mixtral", "qwen2_moe"])
def test_suffix_run_equals_full_run(arch):
    m = mechanic.load(tiny_model(arch))
    clean = left_padded([6, 5], seed=1)
    corr = left_padded([6, 5], seed=2)
    corr["attention_mask"] = clean["attention_mask"]
    source = m.run(clean, cache=["L1.resid_pre", "L2.head1"])
    base = prefix(m, corr)
    rows = torch.tensor([0, 1, 1])
    worst = 0.0
    for p in range(1, 6):
        for s in range(0, 2):
            fast = suffix_logits(m, base, rows, p, s, [
                replace("L1.resid_pre", source["L1.resid_pre"][rows, p], pos=0, rows=[0, 1, 2]),
                replace("L2.head1", source["L2.head1"][rows[[0, 2]], p:], rows=[0, 2])])
            full_inputs = {k: v[rows] for k, v in m.inputs(corr).items()}
            slow = m.run(full_inputs, interventions=[
                replace("L1.resid_pre", source["L1.resid_pre"][rows, p], pos=p, rows=[0, 1, 2]),
                replace("L2.head1", source["L2.head1"][rows[[0, 2]], p:], pos=list(range(p, 6)), rows=[0, 2])]).logits[:, -1]
            worst = max(worst, (fast - slow).abs().max().item())
    assert worst < 1e-5
    assert m.hook_count() == 0 and not any("forward" in layer.__dict__ for layer in m.layers)
    assert (base.logits - m.run(corr).logits[:, -1]).abs().max().item() == 0.0


@pytest.mark.parametrize("arch,lengths", [(a, [6, 5]) for a in ["llama", "gpt2", "gpt_neox", "phi3", "mixtral",
                                                                  "qwen2_moe"]] + [("llama", [6, 6])])
def test_packed_runs_equal_full_runs(arch, lengths):
    """Runs from different columns and layers laid end to end in one sequence (attention per run through the
    AttentionInterface) equal each run done in full, on left-padded prompts (and unpadded ones: plain causal
    attention), with patches at a run's start column and across all its columns; the forward and the registry
    are restored afterwards."""
    m = mechanic.load(tiny_model(arch))
    clean = left_padded(lengths, seed=1)
    corr = left_padded(lengths, seed=2)
    corr["attention_mask"] = clean["attention_mask"]
    source = m.run(clean, cache=["L1.resid_pre", "L2.head1", "L0.mlp_out"])
    base = prefix(m, corr)
    assert packs(m, base)
    # (example, start column, start layer); a whole-row head patch starts at column 0
    runs = [(0, 3, 1), (1, 5, 1), (1, 2, 2), (0, 0, 2), (1, 0, 0), (0, 4, 0), (1, 1, 1)]
    rows, cols, layers = (torch.tensor(x) for x in zip(*runs))
    pk = packing(base, rows, cols, layers, m.dims.n_layers)
    assert pk.tokens == sum(6 - c for _, c, _ in runs)
    ivs, full_ivs = [], []
    for i, (e, c, layer) in enumerate(runs):
        site = {0: "L0.mlp_out", 1: "L1.resid_pre", 2: "L2.head1"}[layer]
        if layer == 2 and c == 0:      # every column of the row at once
            ivs.append(replace(site, source[site][e], pos=list(range(int(pk.first[i]), int(pk.first[i]) + 6))))
            full_ivs.append(replace(site, source[site][e], rows=[i]))
        else:
            ivs.append(replace(site, source[site][e, c], pos=[int(pk.first[i])]))
            full_ivs.append(replace(site, source[site][e, c], pos=c, rows=[i]))
    before = ALL_ATTENTION_FUNCTIONS[m.hf.config._attn_implementation]
    fast = packed_logits(m, base, pk, ivs)
    assert ALL_ATTENTION_FUNCTIONS[m.hf.config._attn_implementation] is before
    full_inputs = {k: v[rows] for k, v in m.inputs(corr).items()}
    slow = m.run(full_inputs, interventions=full_ivs).logits[:, -1]
    assert (fast - slow).abs().max().item() < 1e-5
    assert (slow - base.logits[rows]).abs().max().item() > 1e-3    # the patches change the logits
    assert m.hook_count() == 0 and not any("forward" in layer.__dict__ for layer in m.layers)
    assert (m.run(corr).logits[:, -1] - base.logits).abs().max().item() == 0.0


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "gpt_neox", "phi3", "mixtral", "qwen2_moe"])
def test_logit_columns_equal_the_full_logits_columns(arch):
    """Logits of a few vocabulary columns (what a logit difference reads) equal those columns of the full
    logits (gemma2's soft-capping included), the metric on them equals the metric on the full logits, and the
    output embedding is restored."""
    m = mechanic.load(tiny_model(arch))
    inputs = left_padded([6, 5], seed=1)
    full = m.run(inputs).logits
    batch = TaskBatch(m.inputs(inputs), None, torch.tensor([40, 3]), torch.tensor([17, 40]), [])
    ids = M.columns("logit_diff", batch)
    assert ids.tolist() == [3, 17, 40] and M.columns("logprob", batch) is None
    with logit_columns(m, ids) as narrowed:
        part = m.run(inputs).logits
    assert narrowed and part.shape == (*full.shape[:-1], 3)
    assert (part - full[..., ids]).abs().max().item() < 1e-5
    diff = M.logit_diff(part[:, -1], M.on_columns(batch, ids)) - M.logit_diff(full[:, -1], batch)
    assert diff.abs().max().item() < 1e-5 and M.logit_diff(full[:, -1], batch).abs().min().item() > 1e-4
    assert "forward" not in m.hf.get_output_embeddings().__dict__
    assert (m.run(inputs).logits - full).abs().max().item() == 0.0
    with logit_columns(m, None) as narrowed:
        assert not narrowed and m.run(inputs).logits.shape == full.shape


def test_logit_columns_leave_an_offloaded_unembedding_alone():
    """An output embedding under an accelerate hook (offloaded) keeps every column: the caller is told."""
    m = mechanic.load(tiny_model("llama"))
    out = m.hf.get_output_embeddings()
    out._hf_hook = object()
    try:
        with logit_columns(m, torch.tensor([1, 2])) as narrowed:
            assert not narrowed and m.run(left_padded([4], seed=1)).logits.shape[-1] == out.weight.shape[0]
    finally:
        del out._hf_hook
