"""What `evaluate` measures: a Measure collects per-item values from a model in its current state.

`evaluate` calls `collect(model, None)` with the plan off ("before"), then `collect(model, before)`
with the plan on ("after"), where `before` is what the first call returned. Keys starting with "_"
are private payload (cached logits, generated texts) and never become table rows; every other key is
a metric whose value is a 1-D tensor with one value per item (prompt, fact, window), paired between
before and after so a paired test applies.
"""

from __future__ import annotations

import torch


class Measure:
    """One block of the evaluation table: a name, a role (target or side effect) and metrics."""

    name: str = "measure"
    kind: str = "side"                  # "target": the behaviour the plan should change; "side": should not move
    better: dict[str, str] = {}         # metric -> "higher" | "lower" | "none" (direction of improvement)
    description: str = ""               # one line for the report: what the items are and how a value is read

    def collect(self, model, before: dict | None) -> dict[str, torch.Tensor | object]:
        """Per-item values of each metric for the model as it is now (plan on or off)."""
        raise NotImplementedError

    def settings(self) -> dict:
        """Everything needed to reproduce the measurement (sizes, seeds, text sources)."""
        return {}

    def prefixed(self, prefix: str) -> Measure:
        """The same measure with `prefix` before every prompt it sends (the prompting baseline).

        Measures of raw prose (perplexity, KL on text windows) have no prompt and return themselves.
        """
        return self
