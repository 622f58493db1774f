"""Causal reuse: a run that starts at column p and layer s from the unpatched run's cache equals a full run."""

import pytest
import torch

import mechanic
from mechanic import replace
from mechanic.model.reuse import prefix, suffix_logits
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
