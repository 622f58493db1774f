"""Greedy ACDC pruning equals a plain greedy loop over `faithfulness` calls and the former one-run-per-edge loop
(every architecture, every patch kind, any number of batched candidates); thresholds behave at the extremes."""

import pytest
import torch

import mechanic
from mechanic.locate.acdc import acdc
from mechanic.locate.circuit import Circuit, PatchedGraph, faithfulness, prune, top_edges
from mechanic.locate.gradient import ComponentGraph, eap
from mechanic.testing.tiny import CONFIGS, tiny_model
from test_gradient import tiny_batch


def naive_acdc(m, b, start: Circuit, threshold: float) -> torch.Tensor:
    """The greedy loop written plainly: one faithfulness() call per edge, same visiting order."""
    ref = faithfulness(m, b, start)
    gap = abs(ref["metric_clean"] - ref["metric_corrupted"])
    keep, current = start.keep.clone(), ref["metric"]
    for j in reversed(range(len(start.receivers))):
        for i in reversed(range(len(start.senders))):
            if not keep[i, j]:
                continue
            keep[i, j] = False
            m_without = faithfulness(m, b, Circuit(start.senders, start.receivers, keep))["metric"]
            if abs(m_without - current) < threshold * gap:
                current = m_without
            else:
                keep[i, j] = True
    return prune(start.senders, start.receivers, keep)


def loop_acdc(m, b, start: Circuit, threshold: float, patch: str = "corrupted", batch_size: int = 8):
    """The former implementation, kept as a reference: one full patched-graph run per candidate edge.
    Returns (pruned keep, [(edge, metric_without, removed)] per step)."""
    runner = PatchedGraph(m, b, patch, None, batch_size)
    gap = abs(runner.metric_clean - runner.metric_corrupted)
    keep = start.keep.clone()
    current, steps = runner.metric(keep), []
    for j in reversed(range(len(start.receivers))):
        for i in reversed(range(len(start.senders))):
            if keep[i, j]:
                keep[i, j] = False
                m_without = runner.metric(keep)
                removed = abs(m_without - current) < threshold * gap
                if removed:
                    current = m_without
                else:
                    keep[i, j] = True
                steps.append(((start.senders[i], start.receivers[j]), m_without, removed))
    return prune(start.senders, start.receivers, keep), steps


def _supports_edges(m) -> bool:
    try:
        ComponentGraph(m)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_batched_acdc_equals_one_run_per_edge(arch):
    """Same decisions, same order, same metrics (1e-5) as the former loop; batched candidates with mispredicted
    decisions, uneven example chunks and every patch kind."""
    m = mechanic.load(tiny_model(arch))
    b = tiny_batch(n=5)
    if not _supports_edges(m):
        with pytest.raises(ValueError, match="residual"):
            acdc(m, b, Circuit(["embed"], ["logits"], torch.ones(1, 1)), progress=False)
        return
    start = top_edges(eap(m, b), 40)
    kinds = [("corrupted", 3, 2), ("mean", 4, 5), ("zero", 1, 5)] if arch in ("llama", "gpt2", "gpt_neox") \
        else [("corrupted", 3, 3)]
    for patch, candidates, batch_size in kinds:
        for threshold in (0.2, 0.5, 1.0, 2.0):  # the first that keeps some edges and removes others
            ref_keep, ref_steps = loop_acdc(m, b, start, threshold, patch, batch_size)
            if sum(r for *_, r in ref_steps) > 0:
                break
        circuit, log = acdc(m, b, start, threshold=threshold, patch=patch, candidates=candidates,
                            batch_size=batch_size, progress=False)
        assert torch.equal(circuit.keep, ref_keep)
        assert [(tuple(s["edge"]), s["removed"]) for s in log["steps"]] == [(e, r) for e, _, r in ref_steps]
        assert max(abs(s["metric_without"] - r) for s, (_, r, _) in zip(log["steps"], ref_steps)) <= 1e-5
        assert 0 < sum(r for *_, r in ref_steps) < len(ref_steps)  # mixed decisions: speculation is exercised
        if patch == "corrupted":  # receivers without circuit edges are taken from the corrupted run
            assert log["receivers_from_reference"] > 0 and log["receivers_run"] > 0
    assert m.hook_count() == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_acdc_equals_plain_greedy_loop(arch):
    m = mechanic.load(tiny_model(arch))
    b = tiny_batch()
    start = top_edges(eap(m, b), 25)
    circuit, log = acdc(m, b, start, threshold=0.2, progress=False)
    assert torch.equal(circuit.keep, naive_acdc(m, b, start, 0.2))
    assert 0 < len(circuit) < len(start)  # something went, something stayed
    assert log["runs"] == len(start) + 1 and sum(s["removed"] for s in log["steps"]) >= len(start) - len(circuit)
    again = faithfulness(m, b, circuit)
    assert abs(again["faithfulness"] - log["faithfulness"]) < 1e-5


def test_acdc_threshold_extremes_and_errors():
    m = mechanic.load(tiny_model("llama"))
    b = tiny_batch()
    start = top_edges(eap(m, b), 15)
    kept, _ = acdc(m, b, start, threshold=0.0, progress=False)
    assert torch.equal(kept.keep, start.keep)
    gone, log = acdc(m, b, start, threshold=1e9, progress=False)
    assert len(gone) == 0 and abs(log["faithfulness"]) < 1e-5  # nothing left: the corrupted run
    with pytest.raises(ValueError, match="threshold"):
        acdc(m, b, start, threshold=-1)
    with pytest.raises(ValueError, match="another model"):
        acdc(m, b, Circuit(["embed"], ["logits"], torch.ones(1, 1)))


@pytest.mark.real
def test_batched_acdc_equals_one_run_per_edge_on_smollm2(smollm2):
    """On the real model: the top-150 EAP circuit of 4 IOI examples, pruned at 1% of the gap, same decisions."""
    from mechanic.tasks.builtin import load_task

    suite = load_task("ioi")
    b = mechanic.tasks.Task("ioi", suite.examples[::max(1, len(suite) // 4)][:4], suite.metric).tokenize(smollm2)
    start = top_edges(eap(smollm2, b), 150)
    assert len(start) >= 10  # edges on paths from embed to logits
    circuit, log = acdc(smollm2, b, start, threshold=0.01, candidates=3, progress=False)
    ref_keep, ref_steps = loop_acdc(smollm2, b, start, 0.01)
    assert torch.equal(circuit.keep, ref_keep)
    assert [(tuple(s["edge"]), s["removed"]) for s in log["steps"]] == [(e, r) for e, _, r in ref_steps]
    assert max(abs(s["metric_without"] - r) for s, (_, r, _) in zip(log["steps"], ref_steps)) <= 1e-4
    assert 0 < len(circuit) < len(start)
