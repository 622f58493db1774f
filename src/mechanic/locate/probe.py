"""Linear probes: can a site's activation tell two classes apart on held-out prompts, more than a control task?

For each site, a logistic-regression probe (L2 weight decay, trained in torch with L-BFGS or Adam, in
float64, from zeros: deterministic) is fit on a training split and scored on a held-out split. The
control task (Hewitt & Liang 2019) gives the same probe the same inputs with labels re-assigned at
random, either per example (a permutation of the labels, so the class balance is kept) or per type (each
type, e.g. a token or an item, gets one random label drawn from the label distribution); selectivity =
accuracy - control accuracy says how much of the accuracy is the representation and not the probe's
own capacity to memorise. Pairs (a Task's prompt vs corrupted prompt) never straddle the split.

Features are centred with the training mean and divided by one scalar (their RMS), so the fitted
weight vector stays a direction in model space: `ProbeResult.directions[site]` is that unit vector,
pointing towards label 1, and `ProbeResult.vector()` turns it into a steering Vector.

Cost: one batched forward over all prompts (stopped after the deepest site), then one small convex fit
per site and per control.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable

import torch

from mechanic.locate.scores import Scores
from mechanic.model.readout import Read, check_read, describe, n_rows, read as read_sites


class ProbeError(ValueError):
    """A probing dataset or setting that cannot be used as given."""


# ---------------------------------------------------------------- the fit
def fit_logistic(X: torch.Tensor, y: torch.Tensor, weight_decay: float = 1e-3, optimizer: str = "lbfgs",
                 max_iter: int = 200, lr: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [d], b []) minimising mean BCE(X w + b, y) + weight_decay * |w|^2, in float64 from zeros.

    optimizer: "lbfgs" (strong-Wolfe line search, up to max_iter iterations; exact to ~1e-8 on this
    strictly convex loss) or "adam" (max_iter steps at learning rate lr).
    """
    X = X.detach().double()
    y = y.detach().double().reshape(-1)
    if X.dim() != 2 or X.shape[0] != y.shape[0]:
        raise ProbeError(f"fit_logistic needs X [n, d] and y [n]; got {list(X.shape)} and {list(y.shape)}.")
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)

    def loss_fn():
        z = X @ w + b
        return torch.nn.functional.binary_cross_entropy_with_logits(z, y) + weight_decay * (w * w).sum()

    with torch.enable_grad(), _one_thread():
        if optimizer == "lbfgs":
            opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-10,
                                    tolerance_change=1e-14, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = loss_fn()
                loss.backward()
                return loss
            opt.step(closure)
        elif optimizer == "adam":
            opt = torch.optim.Adam([w, b], lr=lr)
            for _ in range(max_iter):
                opt.zero_grad()
                loss_fn().backward()
                opt.step()
        else:
            raise ProbeError(f"Unknown optimizer {optimizer!r}; use 'lbfgs' or 'adam'.")
    return w.detach(), b.detach()


@contextmanager
def _one_thread():
    """Run small fits on one thread: for [n, d] of a few hundred, thread hand-offs cost more than the math
    (measured 0.4 ms vs 30 ms per loss+gradient on a busy 2-core machine)."""
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        yield
    finally:
        torch.set_num_threads(n)


def accuracy(X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of rows whose predicted label (X w + b > 0) equals y."""
    pred = (X.double() @ w + b) > 0
    return float((pred == y.bool()).double().mean())


def log_loss(X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    """Mean binary cross-entropy of the probe on (X, y): separates probes that tie on accuracy."""
    return float(torch.nn.functional.binary_cross_entropy_with_logits(X.double() @ w + b, y.double()))


# ---------------------------------------------------------------- data
def _dataset(model, dataset) -> tuple[object, torch.Tensor, torch.Tensor, str | None]:
    """(inputs, labels [n] in {0, 1}, groups [n], task name) from a Task, (text, label) items or (inputs, labels)."""
    from mechanic.tasks.task import Task

    if isinstance(dataset, Task):
        bad = [i for i, e in enumerate(dataset.examples) if e.corrupted is None]
        if bad:
            raise ProbeError(f"Task {dataset.name!r} has no corrupted prompts (examples {bad[:5]}); a probe on a task "
                             "contrasts prompt (label 1) with corrupted prompt (label 0). Pass (text, label) items "
                             "instead.")
        n = len(dataset.examples)
        texts = [e.prompt for e in dataset.examples] + [e.corrupted for e in dataset.examples]
        labels = torch.cat([torch.ones(n), torch.zeros(n)]).long()
        groups = torch.cat([torch.arange(n), torch.arange(n)])
        return texts, labels, groups, dataset.name
    if isinstance(dataset, tuple) and len(dataset) == 2 and not isinstance(dataset[0], str):
        inputs, labels = dataset
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.numel() != n_rows(inputs):
            raise ProbeError(f"{n_rows(inputs)} inputs but {labels.numel()} labels; give one label per prompt.")
    else:
        items = list(dataset)
        if not items or any(not isinstance(it, (tuple, list)) or len(it) != 2 for it in items):
            raise ProbeError("A probing dataset is a Task, a list of (text, label) items, or a tuple (inputs, labels).")
        inputs = [it[0] for it in items]
        labels = torch.as_tensor([it[1] for it in items]).reshape(-1)
    values = labels.unique()
    if values.numel() != 2:
        raise ProbeError(f"A linear probe here separates two classes; the labels have {values.numel()} distinct "
                         f"values ({values.tolist()[:5]}). Map them to 0 and 1.")
    labels = (labels == values[1]).long()
    return inputs, labels, torch.arange(labels.numel()), None


def split(groups: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, test rows): whole groups go to one side, test_fraction of the groups held out."""
    if not 0 < test_fraction < 1:
        raise ProbeError(f"test_fraction must be between 0 and 1 (exclusive); got {test_fraction}.")
    ids = groups.unique()
    g = torch.Generator().manual_seed(seed)
    order = ids[torch.randperm(ids.numel(), generator=g)]
    n_test = max(1, round(test_fraction * ids.numel()))
    if n_test >= ids.numel():
        raise ProbeError(f"Only {ids.numel()} examples: nothing left to train on after holding out {n_test}.")
    test = torch.isin(groups, order[:n_test])
    return (~test).nonzero().reshape(-1), test.nonzero().reshape(-1)


def control_labels(labels: torch.Tensor, kind: str = "example", types=None, seed: int = 0) -> torch.Tensor:
    """Random labels for the control task: a permutation per example, or one draw per type (Hewitt & Liang)."""
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "example":
        return labels[torch.randperm(labels.numel(), generator=g)]
    if kind != "type":
        raise ProbeError(f"Unknown control {kind!r}; use 'example' or 'type'.")
    if types is None or len(types) != labels.numel():
        raise ProbeError(f"control='type' needs one type per prompt ({labels.numel()}), e.g. the token at the read "
                         "position or an item name; pass types=[...].")
    keys = sorted({str(t) for t in types})
    p1 = float(labels.double().mean())
    draw = (torch.rand(len(keys), generator=g, dtype=torch.float64) < p1).long()
    lookup = dict(zip(keys, draw.tolist()))
    return torch.tensor([lookup[str(t)] for t in types], dtype=torch.long)


# ---------------------------------------------------------------- result
@dataclass
class ProbeResult:
    """Held-out accuracy (Scores over sites), its control and selectivity, and each site's probe.

    directions[site]: unit [d] vector in model space pointing towards label 1.
    weights[site]: (w [d], b) acting on raw activations: label 1 when x . w + b > 0.
    """

    scores: Scores
    control: Scores
    selectivity: Scores
    directions: dict[str, torch.Tensor]
    weights: dict[str, tuple[torch.Tensor, float]]
    train_accuracy: dict[str, float] = field(default_factory=dict)

    def best(self) -> str:
        """The site with the highest held-out accuracy; ties go to the lowest held-out log loss."""
        v, loss = self.scores.values, self.scores.settings["heldout_loss"]
        tied = (v == v.max()).nonzero().reshape(-1).tolist()
        return self.scores.sites[min(tied, key=lambda i: loss[i])]

    def vector(self, sites: Iterable[str] | None = None):
        """The probe directions of per-layer sites of one kind as a unit-norm steering Vector."""
        from mechanic.model.sites import Site
        from mechanic.model.vector import KINDS, Vector

        names = list(self.directions) if sites is None else [str(Site.parse(s)) for s in sites]
        parsed = [Site.parse(s) for s in names]
        kinds = {s.kind for s in parsed}
        if len(kinds) != 1 or next(iter(kinds)) not in KINDS or any(s.index is not None for s in parsed):
            raise ProbeError(f"A steering vector needs per-layer sites of one kind ({', '.join(KINDS)}); got "
                             f"{names}. Pick them with result.vector(['L5.resid_post', ...]).")
        missing = [n for n in names if n not in self.directions]
        if missing:
            raise ProbeError(f"No probe was trained at {missing}; trained sites: {list(self.directions)}.")
        st = self.scores
        acc = dict(zip(st.sites, st.values.tolist()))
        return Vector({s.layer: self.directions[str(s)] for s in parsed}, site=parsed[0].kind, method="probe",
                      read=st.settings.get("read", "last"), model=st.model, model_type=st.settings.get("model_type"),
                      fingerprint=st.fingerprint, norm="unit",
                      settings={"heldout_accuracy": {str(s.layer): acc[str(s)] for s in parsed}, "task": st.task})


# ---------------------------------------------------------------- probe
def probe(model, dataset, sites, *, read: Read = "last", test_fraction: float = 0.25, seed: int = 0,
          control: str = "example", types=None, weight_decay: float = 1e-3, optimizer: str = "lbfgs",
          max_iter: int = 200, batch_size: int = 16) -> ProbeResult:
    """Train a linear probe per site on a training split; score held-out accuracy against a control task.

    dataset: a Task (prompt = label 1, corrupted prompt = label 0, pairs kept on one side of the split),
    a list of (text, label) items, or (inputs, labels) with inputs as texts / token ids / a tokenized dict.
    sites: site names (e.g. ["L5.resid_post", "L9.mlp_out"]) or a kind ("resid_post" = every layer).
    read: "last", an int token, a slice (mean over it) or "mean" (see mechanic.model.readout).
    control: "example" (labels permuted) or "type" (one random label per entry of `types`, e.g. the
    item or word each prompt is about). Returns a ProbeResult (Scores of held-out accuracy first).
    """
    check_read(read)
    if read == "answer":
        raise ProbeError("read='answer' is for contrastive (prompt, answer) pairs; a probe reads 'last', a token, "
                         "a slice or 'mean'.")
    site_list = _sites(model, sites)
    inputs, labels, groups, task_name = _dataset(model, dataset)
    train, test = split(groups, test_fraction, seed)
    ctrl = control_labels(labels, control, types, seed)
    acts = read_sites(model, inputs, site_list, read, None, batch_size)
    acc, ctrl_acc, loss, train_acc, dirs, weights = [], [], [], {}, {}, {}
    for s in site_list:
        X = acts[s].double()
        mu = X[train].mean(0)
        scale = (X[train] - mu).pow(2).mean().sqrt().clamp_min(1e-12)
        Z = (X - mu) / scale
        w, b = fit_logistic(Z[train], labels[train], weight_decay, optimizer, max_iter)
        acc.append(accuracy(Z[test], labels[test], w, b))
        loss.append(log_loss(Z[test], labels[test], w, b))
        train_acc[s] = accuracy(Z[train], labels[train], w, b)
        wc, bc = fit_logistic(Z[train], ctrl[train], weight_decay, optimizer, max_iter)
        ctrl_acc.append(accuracy(Z[test], ctrl[test], wc, bc))
        w_raw = w / scale
        dirs[s] = (w / w.norm().clamp_min(1e-30)).float()
        weights[s] = (w_raw.float(), float(b - w_raw @ mu))
    settings = {"read": describe(read), "test_fraction": test_fraction, "seed": seed, "control": control,
                "weight_decay": weight_decay, "optimizer": optimizer, "max_iter": max_iter,
                "n_train": int(train.numel()), "n_test": int(test.numel()),
                "model_type": getattr(model.hf.config, "model_type", None)}
    common = dict(sites=site_list, task=task_name, model=model.name, fingerprint=model.fingerprint)
    acc_t, ctrl_t = torch.tensor(acc), torch.tensor(ctrl_acc)
    scores = Scores(acc_t, method="probe", metric="heldout_accuracy", **common,
                    settings=dict(settings, control_accuracy=ctrl_acc, selectivity=(acc_t - ctrl_t).tolist(),
                                  train_accuracy=[train_acc[s] for s in site_list], heldout_loss=loss))
    return ProbeResult(scores,
                       Scores(ctrl_t, method="probe_control", metric="heldout_accuracy", **common, settings=settings),
                       Scores(acc_t - ctrl_t, method="probe_selectivity", metric="accuracy_minus_control", **common,
                              settings=settings),
                       dirs, weights, train_acc)


def _sites(model, sites) -> list[str]:
    """Site names from a list, one name, or a kind meaning every layer's site of that kind."""
    from mechanic.model.sites import Site

    if isinstance(sites, str):
        try:
            s = Site.parse(sites)
        except Exception:
            s = None
        if s is None or (s.layer is None and s.kind not in ("embed", "final")):
            found = model.sites(sites)
            if not found:
                raise ProbeError(f"{sites!r} names no site of this model; give site names like 'L5.resid_post' or a "
                                 "kind such as 'resid_post' (every layer).")
            return [str(x) for x in found]
        sites = [sites]
    out = [str(model.check(s)) for s in sites]
    if not out:
        raise ProbeError("No sites given to probe.")
    return out
