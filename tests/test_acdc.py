"""Greedy ACDC pruning equals a plain greedy loop over `faithfulness` calls; thresholds behave at the extremes."""

import pytest
import torch

import mechanic
from mechanic.locate.acdc import acdc
from mechanic.locate.circuit import Circuit, faithfulness, prune, top_edges
from mechanic.locate.gradient import eap
from mechanic.testing.tiny import tiny_model
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
