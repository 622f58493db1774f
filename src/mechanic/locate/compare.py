"""Comparative methods: head scans by ablation, Comparative Neuron Analysis (CNA) and in-context heads.

CNA (Yu & Ananiadou, EMNLP 2024): the log-probability increase of each neuron in the model M minus the
same in M with chosen heads H ablated, CNA(n) = Imp_M(n) - Imp_{M\\H}(n), with the final norm's scale
sigma* and the target token taken from M, so the difference is what the heads feed the neurons.
A head scan ablates one head at a time (all heads batched: one batch row per (head, example)).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mechanic.locate.gradient import metric_fn, task_batch
from mechanic.locate.neurons import _check_kinds, _check_layers, _scores, importance
from mechanic.locate.readout import Readout, collect, targets
from mechanic.locate.scores import Scores
from mechanic.model.interventions import mean_ablate, zero
from mechanic.model.sites import Site
from mechanic.tasks import metrics as _metrics
from mechanic.tasks.task import Task, TaskBatch

ABLATIONS = ("zero", "mean")


def _heads(model, heads) -> list[Site]:
    """Head sites from 'L3.head4' strings, Sites or (layer, head) pairs; None = every head."""
    if heads is None:
        return [s for s in model.sites("head")]
    if isinstance(heads, (str, Site)):
        heads = [heads]
    out = []
    for h in heads:
        s = model.check(f"L{h[0]}.head{h[1]}" if isinstance(h, (tuple, list)) else h)
        if s.kind != "head" or s.index is None or s.part is not None:
            raise ValueError(f"{h!r} is not one attention head; name heads like 'L17.head3' or (17, 3).")
        out.append(s)
    if not out:
        raise ValueError("No heads given; name at least one head, like 'L17.head3'.")
    return out


def head_means(model, inputs) -> dict[int, torch.Tensor]:
    """layer -> [H, d_model]: each head's write averaged over every real token of the inputs (for mean ablation)."""
    N = model.dims.n_layers
    run = model.run(inputs, cache=[f"L{L}.head" for L in range(N)])
    mask = inputs["attention_mask"].bool()
    return {L: run[f"L{L}.head"][mask].mean(0) for L in range(N)}


def ablations(model, heads: list[Site], ablation: str, means: dict | None, rows=None) -> list:
    """Interventions that ablate each head (zero, or set to its mean write) on the given batch rows."""
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be 'zero' or 'mean', got {ablation!r}.")
    if ablation == "zero":
        return [zero(s, rows=rows) for s in heads]
    return [mean_ablate(s, means[s.layer][s.index], rows=rows) for s in heads]


def _tile(inputs: dict, k: int) -> dict:
    return {key: v.repeat(k, *[1] * (v.dim() - 1)) for key, v in inputs.items()}


@torch.no_grad()
def scan(model, batch: TaskBatch, heads: list[Site], ablation: str, metrics: dict, batch_rows: int = 64) -> dict:
    """metric name -> ([heads] mean metric with that head ablated, clean mean); one row per (head, example)."""
    n = batch.n
    means = head_means(model, batch.clean) if ablation == "mean" else None
    clean_logits = model.run(batch.clean, last_only=True).logits[:, -1]
    clean = {k: float(f(clean_logits, batch).mean()) for k, f in metrics.items()}
    per = max(1, batch_rows // n)                                       # heads per forward
    out = {k: torch.empty(len(heads)) for k in metrics}
    for s in range(0, len(heads), per):
        chunk = heads[s:s + per]
        ivs = [iv for i, h in enumerate(chunk)
               for iv in ablations(model, [h], ablation, means, rows=list(range(i * n, (i + 1) * n)))]
        logits = model.run(_tile(batch.clean, len(chunk)), interventions=ivs, last_only=True).logits[:, -1]
        tiled = batch.select(torch.arange(n).repeat(len(chunk)))
        for k, f in metrics.items():
            out[k][s:s + len(chunk)] = f(logits, tiled).float().view(len(chunk), n).mean(1)
    return {k: (out[k], clean[k]) for k in metrics}


def head_scan(model, task: Task | TaskBatch, ablation: str = "zero", *, metric=None, heads=None,
              batch_rows: int = 64) -> Scores:
    """The change of the metric when each head is ablated alone (zero, or its mean write over the task's tokens):
    metric(ablated) - metric(clean), a mean over examples; negative = the head supports the behaviour.

    heads: a subset (default every head). Heads are batched, one batch row per (head, example),
    batch_rows rows per forward.
    """
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be 'zero' or 'mean', got {ablation!r}.")
    batch, name, task_metric = task_batch(model, task)
    mname, mfn = metric_fn(metric, task_metric)
    units = _heads(model, heads)
    res = scan(model, batch, units, ablation, {mname: mfn}, batch_rows)
    vals, clean = res[mname]
    forwards = 1 + (ablation == "mean") + -(-len(units) // max(1, batch_rows // batch.n))
    return Scores(vals - clean, [str(u) for u in units], "head_scan", task=name, metric=mname, model=model.name,
                  fingerprint=model.fingerprint,
                  settings={"ablation": ablation, "metric_clean": clean, "n_examples": batch.n,
                            "forward_passes": forwards,
                            "value": "metric(head ablated) - metric(clean)"})


def comparative_neurons(model, task: Task | TaskBatch, heads, ablation: str = "zero", *,
                        kinds: str | Iterable[str] = "neuron", target: str = "answer", layers=None,
                        chunk: int = 512) -> dict[str, Scores]:
    """CNA: Imp_M(n) - Imp_{M\\H}(n) for every neuron (or other kind of neuron_attribution), H = `heads` ablated
    (zero or mean), sigma* and target token from M. Two forwards plus batched projections.

    A large positive value: the neuron's log-probability increase depends on the heads (the heads feed it).
    """
    kinds = _check_kinds(model, kinds)
    layers = _check_layers(model, layers)
    batch, name, _ = task_batch(model, task)
    units = _heads(model, heads)
    with torch.no_grad():
        means = head_means(model, batch.clean) if ablation == "mean" else None
        ivs = ablations(model, units, ablation, means)
        col = collect(model, batch.clean, neurons="neuron" in kinds)
        R = Readout(model, col.final)
        w = targets(batch, col.logits, target)
        ablated = collect(model, batch.clean, interventions=ivs, neurons="neuron" in kinds)
        full = importance(model, col, R, w, kinds, chunk, layers)
        cut = importance(model, ablated, R, w, kinds, chunk, layers)
        rows = torch.arange(batch.n)
        p = lambda logits: float(torch.softmax(logits, -1)[rows, w].mean())  # noqa: E731
        extra = {"heads": [str(u) for u in units], "ablation": ablation, "layers": layers,
                 "p_target": p(col.logits), "p_target_ablated": p(ablated.logits),
                 "forward_passes": 2 + (ablation == "mean"), "value": "Imp_M - Imp_{M without heads}"}
    diff = {k: (names, full[k][1] - cut[k][1]) for k, (names, _) in full.items()}
    out = _scores(model, diff, name, batch, w, target, extra)
    for s in out.values():
        s.method = "cna"
    return out


def in_context_heads(model, task: str | Task | TaskBatch = "icl_labels", *, n: int | None = 40,
                     top: int | None = None, layers=None, batch_rows: int = 64) -> dict[str, Scores]:
    """Heads that carry in-context label learning (Yu & Ananiadou 2024), scored two ways over the task's examples:

    "ablation": the accuracy change when the head is zeroed (one head at a time, batched);
    "logprob": log p(label | x + o_h) - log p(label | x), the head's log-probability increase.
    settings["union"] lists the union of the top heads of both scores (default ~1% of the heads each,
    at least 3), and settings["accuracy_union_ablated"] the accuracy with all of them zeroed together.
    """
    if isinstance(task, str):
        from mechanic.tasks.builtin import load_task

        task = load_task(task, n=n)
    elif n is not None and isinstance(task, Task):
        task = task.subset(n)
    batch, name, _ = task_batch(model, task)
    layers = _check_layers(model, layers)
    units = [s for s in model.sites("head") if s.layer in layers]
    res = scan(model, batch, units, "zero", {"accuracy": _metrics.accuracy, "logit_diff": _metrics.logit_diff}
               if batch.wrong is not None else {"accuracy": _metrics.accuracy}, batch_rows)
    acc, acc_clean = res["accuracy"]
    with torch.no_grad():
        col = collect(model, batch.clean, neurons=False)
        R = Readout(model, col.final)
        imp = importance(model, col, R, batch.answer, ["head"], layers=layers)["head"]
    k = top or max(3, round(0.01 * len(units)))
    by_ablation = [str(units[i]) for i in (acc - acc_clean).argsort()[:k].tolist()]
    by_logprob = [imp[0][i] for i in imp[1].mean(0).argsort(descending=True)[:k].tolist()]
    union = list(dict.fromkeys(by_ablation + by_logprob))
    with torch.no_grad():
        cut = model.run(batch.clean, interventions=[zero(s) for s in union], last_only=True).logits[:, -1]
    settings = {"n_examples": batch.n, "accuracy_clean": acc_clean, "top": k, "union": union,
                "top_by_ablation": by_ablation, "top_by_logprob": by_logprob,
                "accuracy_union_ablated": float(_metrics.accuracy(cut, batch).mean()), "layers": layers}
    meta = dict(task=name, model=model.name, fingerprint=model.fingerprint)
    out = {"ablation": Scores(acc - acc_clean, [str(u) for u in units], "in_context_heads", metric="accuracy",
                              settings={**settings, "value": "accuracy(head zeroed) - accuracy(clean)"}, **meta),
           "logprob": Scores(imp[1].mean(0), imp[0], "in_context_heads", metric="logprob_increase",
                             settings={**settings, "value": "log p(label | x + o_h) - log p(label | x)"}, **meta)}
    if "logit_diff" in res:
        ld, ld_clean = res["logit_diff"]
        out["ablation_logit_diff"] = Scores(ld - ld_clean, [str(u) for u in units], "in_context_heads",
                                            metric="logit_diff", settings={**settings, "logit_diff_clean": ld_clean},
                                            **meta)
    return out
