"""Sequential, batched editing: N facts in batches of B with ROME, MEMIT or AlphaEdit (or the fine-tuning
baselines FT-L and LoRA, mechanic.steer.finetune / lora, which need no prefixes or statistics), as deployed.

Each batch is computed on the model with the earlier batches applied (ROME edits the facts of a batch one
after the other); the context prefixes and the second-moment statistics are computed once, on the unedited
model, and AlphaEdit's null-space projections once per layer. The result is one Plan holding the final value of
every edited parameter, so applying it reproduces the sequence's end state exactly and undo restores the
original weights bit for bit. `on_batch(model, step, done)` runs after every batch with the edits so far
applied (e.g. mechanic.improve.edit_metrics.running_scores); what it returns is shown on the progress bar and
kept as the plan's curve. Unless given, layers come from causal tracing averaged over `trace_facts` (ROME's
and MEMIT's choice once per model, not per fact).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable

from mechanic.progress import counter
from mechanic.steer.alphaedit import NullSpaces, alphaedit
from mechanic.steer.edit import Fact, _fact_dict, context_prefixes, layer_range, memit, rome, trace_layers
from mechanic.steer.finetune import ft
from mechanic.steer.lora import lora
from mechanic.steer.plan import Plan, PlanError, WeightEdit
from mechanic.steer.stats import second_moments

METHODS = {"rome": rome, "memit": memit, "alphaedit": alphaedit, "ft": ft, "lora": lora}
TRAINED = ("ft", "lora")    # fine-tuning baselines: no prefixes, no statistics; one layer (the traced one) by default
_OWN = {"model", "fact", "facts", "layer", "layers", "prefixes", "n_prefixes", "moments", "stats_tokens", "seed",
        "state", "targets"}
_BULKY = ("facts", "fact", "prefixes", "delta", "trace")


def _layers(model, method: str, layers, trace_facts: list[Fact] | None, facts: list[Fact], samples: int):
    """The edit layers (a one-element list for ROME) and how they were chosen."""
    if layers is not None:
        layers = [int(layers)] if isinstance(layers, int) else sorted(int(x) for x in layers)
        if not layers or (method == "rome" and len(layers) != 1):
            raise PlanError(f"{method} needs {'one layer' if method == 'rome' else 'at least one layer'}; got "
                            f"{layers}.")
        return layers, {"layers_from": "given"}
    pool = trace_facts if trace_facts is not None else facts
    top, mean = trace_layers(model, pool, samples)
    chosen = [top] if method in ("rome", *TRAINED) else layer_range(top)
    return chosen, {"layers_from": f"causal trace (mlp) averaged over {len(pool)} facts",
                    "trace_mean": [round(float(x), 6) for x in mean]}


def _options(method: str, options: dict) -> dict:
    """The method's own settings (steps, lam, threshold, ...), refused by name when it has no such setting."""
    params = set(inspect.signature(METHODS[method]).parameters) - _OWN
    bad = sorted(set(options) - params)
    if bad:
        raise PlanError(f"{method} has no setting {', '.join(bad)}; its settings are {', '.join(sorted(params))}.")
    return options


def _numbers(d) -> dict:
    return {k: round(float(v), 4) for k, v in (d or {}).items() if isinstance(v, (int, float))}


def sequential(model, facts: list[Fact], method: str = "alphaedit", batch_size: int = 10, layers=None, *,
               trace_facts: list[Fact] | None = None, trace_samples: int = 5,
               on_batch: Callable | None = None, progress: bool = True, n_prefixes: int = 10,
               stats_tokens: int = 32768, seed: int = 0, targets: dict | None = None,
               state: NullSpaces | None = None, **options) -> Plan:
    """Edit `facts` in batches of `batch_size` with `method` (rome, memit, alphaedit), each batch on the model
    with the earlier ones applied; one Plan for the whole sequence. `options` go to the method (e.g. lam).

    targets (memit, alphaedit): a dict keeping the first batch's optimised targets (read on the unedited model) by
    what determines them; pass one dict to sequences of the same facts under other settings to optimise them once.
    state (alphaedit): the NullSpaces to carry through the sequence (default: new ones from threshold and energy),
    to read its projections afterwards or to hold more keys (a subclass overriding `held`)."""
    if method not in METHODS:
        raise PlanError(f"Unknown editing method {method!r}; choose one of {', '.join(METHODS)}.")
    if not facts:
        raise PlanError("Sequential editing needs at least one Fact.")
    if batch_size < 1:
        raise PlanError(f"batch_size must be at least 1, got {batch_size}.")
    options = _options(method, options)
    if targets is not None and method not in ("memit", "alphaedit"):
        raise PlanError(f"targets keeps MEMIT's and AlphaEdit's optimised targets; {method} has none to keep.")
    if state is not None and method != "alphaedit":
        raise PlanError(f"state carries AlphaEdit's null spaces through a sequence; {method} has none.")
    t0 = time.perf_counter()
    layers, chosen = _layers(model, method, layers, trace_facts, facts, trace_samples)
    prefixes = context_prefixes(model, n_prefixes, seed=seed) if method not in TRAINED else []
    t1 = time.perf_counter()
    moments = second_moments(model, layers, max_tokens=stats_tokens) if method not in TRAINED else {}
    stats_seconds = time.perf_counter() - t1
    if method == "alphaedit" and state is None:
        state = NullSpaces(options.get("threshold", 2e-2), options.get("energy"))
    shared = {"prefixes": prefixes, "moments": moments, "seed": seed, **options}
    batches = [facts[i:i + batch_size] for i in range(0, len(facts), batch_size)]
    bar = counter(f"{method}: {len(facts)} facts in batches of {batch_size}", len(batches), show=progress,
                  unit="batch")
    handles, touched, steps, curve = [], {}, [], []
    try:
        for step, batch in enumerate(batches):
            start = time.perf_counter()
            plans = []
            for part in ([[f] for f in batch] if method == "rome" else [batch]):  # ROME: one fact after the other
                if method == "rome":
                    p = rome(model, part[0], layers[0], **shared)
                elif method == "memit":
                    p = memit(model, part, layers, targets=targets if step == 0 else None, **shared)
                elif method in TRAINED:
                    p = METHODS[method](model, part, layers, seed=seed, **options)
                else:
                    p = alphaedit(model, part, layers, state=state, targets=targets if step == 0 else None, **shared)
                handles.append(p.apply(model))
                plans.append(p)
                touched.update(dict.fromkeys(e.param for e in p.edits))
            steps.append({"facts": len(batch), "seconds": round(time.perf_counter() - start, 3),
                          "settings": [{k: v for k, v in p.settings.items() if k not in _BULKY} for p in plans]})
            done = facts[:sum(len(b) for b in batches[:step + 1])]
            if on_batch is not None:
                scores = on_batch(model, step, done)
                curve.append({"step": step, "edits": len(done), **(scores or {})})
            bar.update(1, **_numbers(scores if on_batch is not None else {}))
        params = dict(model.hf.named_parameters())
        final = {name: params[name].data.detach().clone() for name in touched}
    finally:
        bar.close()
        for h in reversed(handles):
            h.undo()
    edits = [WeightEdit(name, value, note=f"{method}: {len(facts)} facts in batches of {batch_size}")
             for name, value in final.items()]
    settings = {"method": method, "batch_size": batch_size, "layers": layers, **chosen,
                "facts": [_fact_dict(f) for f in facts], "prefixes": prefixes, "options": options, "seed": seed,
                "stats_tokens": {L: moments[L][1] for L in moments}, "stats_seconds": round(stats_seconds, 3),
                "seconds": round(time.perf_counter() - t0, 3), "batches": steps, "curve": curve}
    if state is not None:
        settings["null_dims"] = state.dims
    return Plan(edits=edits, method=f"sequential {method}", fingerprint=model.fingerprint, settings=settings)
