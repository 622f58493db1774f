"""Weight editing: ROME (one fact, one layer), MEMIT (many facts over a range of layers), neuron editing.

ROME (Meng et al. 2022) on down_proj W of layer l, as in METHODS.md:
- key k*: the down_proj input at the subject's last token, averaged over the prompt behind short
  context prefixes the model writes itself (plus no prefix);
- C = E[k k^T] over real text (mechanic.steer.stats, cached);
- value: a delta added to the MLP output at the subject's last token, optimised with Adam for the new
  target's NLL + kl_factor x KL on "{subject} is a" + weight_decay x ||delta|| / ||W k*||^2, its norm
  clamped to clamp x ||W k*||;
- update W <- W + v u^T with u = C^-1 k* / ||C^-1 k*|| and v = delta / (u . k*), the same averaged k*
  in both places (the tiny-divisor failure of using a different key in the denominator cannot happen);
  prompt_key=True also holds the update at the bare prompt's own key (same rank one), which a model without BOS
  needs: there the prompt's key, near the attention sink, is far from k* (rome's docstring).
MEMIT (Meng et al. 2023) optimises a residual target at the last layer of a range and spreads it over
the range: delta_l = R K^T (lambda C + K K^T)^-1, layer by layer (memit_targets and spread, shared with
AlphaEdit). Both return a Plan of weight edits. trace_layers chooses the layer once per model, from causal
tracing averaged over a train split of facts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechanic.locate.scores import Scores
from mechanic.model.interventions import add
from mechanic.progress import track
from mechanic.steer.plan import Plan, PlanError, WeightEdit
from mechanic.steer.stats import second_moments


@dataclass(frozen=True)
class Fact:
    """One rewrite: `prompt` contains `subject`; the model should continue it with `target_new`."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[str, ...] = ()

    def __post_init__(self):
        if self.subject not in self.prompt:
            raise PlanError(f"The subject {self.subject!r} does not occur in the prompt {self.prompt!r}; a fact's "
                            "prompt must contain its subject (exact, case-sensitive).")
        if not self.target_new.strip():
            raise PlanError("target_new is empty; give the new answer, e.g. ' Rome' (leading space as the model "
                            "would write it).")


def facts_from_task(task) -> list[Fact]:
    """Facts from a CounterFact-style task (the built-in `facts` suite): meta subject, paraphrases, neighbourhood."""
    from mechanic.tasks.guard import check

    check(f"task {task.name!r} (facts)", [e.split for e in task.examples])
    out = []
    for e in task.examples:
        m = e.meta
        if "subject" not in m:
            raise PlanError("This task's examples have no meta['subject']; editing needs CounterFact-style facts "
                            "(see the built-in 'facts' suite) or Fact(...) objects.")
        out.append(Fact(e.prompt, m["subject"], e.wrong or " " + m["target_new"], e.answer,
                        tuple(m.get("paraphrases", ())), tuple(m.get("neighborhood", ()))))
    return out


# ---------------------------------------------------------------- inputs
def context_prefixes(model, n: int = 10, length: int = 10, seed: int = 0) -> list[str]:
    """"" plus n short texts the model writes from common openings, each ending in ". " (ROME's templates)."""
    starts = ["The", "Therefore", "Because", "I", "You"]
    if n <= 0:
        return [""]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ids = model.generate([starts[i % len(starts)] for i in range(n)], max_new_tokens=length, do_sample=True,
                             top_k=5)
    texts = model.tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [""] + [t.strip().replace("{", "").replace("}", "") + ". " for t in texts]


def _batch(model, texts: list[str], subject_at: list[int], targets: list[list[int]] | None = None):
    """Left-padded ids of texts (+ target tokens but the last, teacher forced), the subject's last token per
    row, and per row the (position, token) pairs the targets are read at."""
    tok = model.tokenizer
    rows, last, reads = [], [], []
    for i, text in enumerate(texts):
        enc = tok(text, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        at = subject_at[i]
        toks = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < at]
        if not toks:
            raise PlanError(f"The subject ends at character {at} of {text!r}, before any token.")
        last.append(toks[-1])
        tgt = targets[i] if targets else []
        reads.append([(len(ids) - 1 + j, t) for j, t in enumerate(tgt)])
        rows.append(ids + tgt[:-1])
    inputs = model.inputs(rows)  # left padded
    shift = [inputs["input_ids"].shape[1] - len(r) for r in rows]
    last = torch.tensor([p + s for p, s in zip(last, shift)])
    reads = [[(p + s, t) for p, t in rd] for rd, s in zip(reads, shift)]
    return inputs, last, reads


def _target_ids(model, text: str) -> list[int]:
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PlanError(f"The target {text!r} has no tokens.")
    return ids


def _fact_rows(model, fact: Fact, prefixes: list[str]):
    """Texts (each prefix + prompt, then the essence prompt) and where the subject ends in each."""
    texts = [p + fact.prompt for p in prefixes]
    ends = [len(p) + fact.prompt.find(fact.subject) + len(fact.subject) for p in prefixes]
    essence = f"{fact.subject} is a"
    return texts + [essence], ends + [len(fact.subject)]


def _columns(model, inputs, sites: list[str], pos: torch.Tensor, upto: int, prompt_key: bool) -> list[torch.Tensor]:
    """Each site's columns for one fact, [d, 1 or 2] (one forward): its value at `pos` averaged over the first
    `upto` rows (the papers' key), then with prompt_key its value on row 0 alone: the bare prompt, whose subject
    sits near the start, where a model without BOS gives keys unlike the prefixed ones."""
    run = model.run(inputs, cache=list(sites), stop_at="auto")
    out = []
    for s in sites:
        v = run[s][torch.arange(len(pos)), pos]
        out.append(torch.stack([v[:upto].mean(0)] + ([v[0]] if prompt_key else []), 1))
    return out


def _prompt_key(prefixes: list[str], prompt_key: bool) -> bool:
    """Whether a bare-prompt column is added: asked for, and the prefixes hold "" first and something else."""
    if not prompt_key:
        return False
    if not prefixes or prefixes[0] != "":
        raise PlanError("prompt_key=True holds the edit at the bare prompt's key, read from the first prefix, which "
                        f"must be \"\" (context_prefixes puts it first); the prefixes given start with "
                        f"{(prefixes or ['(none)'])[0]!r}. Pass prefixes=[\"\", ...] or prompt_key=False.")
    return len(prefixes) > 1     # with "" alone the mean key is the prompt's key


# ---------------------------------------------------------------- value optimisation
STOP_NLL = 5e-2     # a fact's optimisation stops once its target NLL is below this (ROME's code)
CHUNK = 16          # facts optimised together in one batched forward (bounds the memory of a large batch)


def _optimise(model, facts: list[Fact], prefixes: list[str], site: str, scale_refs: list[float], *, steps: int,
              lr: float, kl_factor: float, weight_decay: float, clamp: float) -> tuple[list[torch.Tensor], list]:
    """Per fact the delta at `site` (its subject's last token) that makes target_new likely, and its loss curve.

    Each fact's loss is its new target's NLL (mean over the prefixed prompts' target tokens) + kl_factor x KL on
    "{subject} is a" + weight_decay x ||delta|| / scale_ref^2; its delta's norm is clamped to clamp x scale_ref,
    and its optimisation stops once the NLL is below STOP_NLL. The facts run together (up to CHUNK per forward,
    losses summed, one Adam over per-fact tensors: a fact's gradient and Adam state depend on its own rows only,
    and a stopped fact's tensor gets no gradient, so Adam leaves it alone), and each step computes only what the
    delta can change: the columns from the earliest subject end on (the earlier ones come from one unedited
    run's key/value cache), the layers from the site's on (the lower ones replay that run), the logits at the
    target positions only. tests/test_edit_speed.py checks this against the plain one-fact-at-a-time loop."""
    deltas, curves = [], []
    for i in range(0, len(facts), CHUNK):
        d, c = _optimise_chunk(model, facts[i:i + CHUNK], prefixes, site, scale_refs[i:i + CHUNK], steps=steps,
                               lr=lr, kl_factor=kl_factor, weight_decay=weight_decay, clamp=clamp)
        deltas += d
        curves += c
    return deltas, curves


def _optimise_chunk(model, facts, prefixes, site, scale_refs, *, steps, lr, kl_factor, weight_decay, clamp):
    """_optimise for a few facts in one batched forward per step."""
    from mechanic.model.reuse import prefix, suffix_run

    n, texts, ends, targets, owner = len(prefixes), [], [], [], []
    for i, f in enumerate(facts):
        t, e = _fact_rows(model, f, prefixes)
        texts, ends, owner = texts + t, ends + e, owner + [i] * (n + 1)
        targets += [_target_ids(model, f.target_new)] * n + [[]]      # the essence row reads no target
    inputs, last, reads = _batch(model, texts, ends, targets)
    width = inputs["input_ids"].shape[1]
    layer = model.check(site).layer
    start = int(last.min())                     # no column before it depends on any delta
    keep = width - min([p for rd in reads for p, _ in rd] + [width - 1])
    base = prefix(model, inputs, upto=layer, last_only=True)
    owner = torch.tensor(owner)
    ess = [i * (n + 1) + n for i in range(len(facts))]   # each fact's essence row
    kl_base = torch.log_softmax(base.logits[ess].float(), -1)
    deltas = [torch.zeros(model.dims.d_model, requires_grad=True) for _ in facts]
    opt = torch.optim.Adam(deltas, lr=lr)
    curves: list[list[float]] = [[] for _ in facts]
    active = list(range(len(facts)))
    title = f"optimising {facts[0].subject!r} -> {facts[0].target_new.strip()!r}" if len(facts) == 1 else \
        f"optimising the targets of {len(facts)} facts"
    for _ in track(range(steps), title, unit="step"):
        opt.zero_grad()
        rows = torch.cat([torch.arange(i * (n + 1), (i + 1) * (n + 1)) for i in active])
        slot = {i: j for j, i in enumerate(active)}
        per_row = torch.stack([deltas[i] for i in active])[torch.tensor([slot[int(o)] for o in owner[rows]])]
        logits = suffix_run(model, base, rows, start, layer, [add(site, per_row, pos=last[rows] - start)],
                            keep=keep, grad=True)
        logp = torch.log_softmax(logits.float(), -1)
        at = {int(r): j for j, r in enumerate(rows)}
        total, done = 0.0, []
        for i in active:
            rr = [(at[r], p - (width - keep), t) for r in range(i * (n + 1), i * (n + 1) + n) for p, t in reads[r]]
            r_idx, p_idx, t_idx = (torch.tensor(x) for x in zip(*rr))
            nll = -logp[r_idx, p_idx, t_idx].mean()
            e = at[ess[i]]
            kl = torch.sum(kl_base[i].exp() * (kl_base[i] - logp[e, -1]))
            wd = weight_decay * deltas[i].norm() / scale_refs[i] ** 2  # ROME's form: small next to the NLL
            loss = nll + kl_factor * kl + wd
            curves[i].append(float(loss.detach()))
            total = total + loss
            if float(nll.detach()) < STOP_NLL:
                done.append(i)
        total.backward()
        for i in done:
            deltas[i].grad = None       # reached: no step (Adam skips a tensor without a gradient)
        active = [i for i in active if i not in done]
        if not active:
            break
        opt.step()
        with torch.no_grad():
            for i in active:
                limit = clamp * scale_refs[i]
                if deltas[i].norm() > limit:
                    deltas[i].mul_(limit / deltas[i].norm())
    return [d.detach() for d in deltas], curves


# ---------------------------------------------------------------- ROME
def _down(model, layer: int):
    a = model.arch
    if model.is_moe(layer):
        raise PlanError(f"Layer {layer} is a mixture of experts; ROME/MEMIT edit a dense MLP's down_proj. "
                        "Choose a dense layer.")
    mod = model.layer_module(layer, a.down_proj)
    name = {id(p): n for n, p in model.hf.named_parameters()}[id(mod.weight)]
    return mod, name


def down_proj_edit(model, layer: int, W: torch.Tensor, note: str) -> WeightEdit:
    """A weight edit that makes layer's down_proj equal W ([d_model, d_mlp] orientation, any layout on disk)."""
    mod, name = _down(model, layer)
    return WeightEdit(name, (W.T if model.arch.conv1d else W).detach().clone(), note=note)


def trace_layer(model, fact: Fact, samples: int = 5) -> tuple[int, Scores]:
    """The layer whose MLP (window) restores the most at the subject's last token (ROME's causal trace)."""
    from mechanic.locate.trace import causal_trace, subject_positions

    pos = subject_positions(model, fact.prompt, fact.subject)[-1]
    answer = fact.target_true
    if answer is None:
        answer = int(model.run(fact.prompt, last_only=True).logits[0, -1].argmax())
    scores = causal_trace(model, fact.prompt, answer, fact.subject, "mlp", samples=samples, positions=[pos])
    dense = [L for L in range(model.dims.n_layers) if not model.is_moe(L)]
    best = max(dense, key=lambda L: float(scores.values[L, 0]))
    return best, scores


def trace_layers(model, facts: list[Fact], samples: int = 5) -> tuple[int, torch.Tensor]:
    """The dense layer whose MLP (window) restores the most on average over `facts` (ROME/MEMIT choose their
    layers once per model this way), and the mean effect per layer [n_layers]."""
    if not facts:
        raise PlanError("Averaged tracing needs at least one Fact (the train split of the facts to edit).")
    mean = torch.stack([trace_layer(model, f, samples)[1].values[:, 0]
                        for f in track(facts, f"causal tracing of {len(facts)} facts", unit="fact")]).mean(0)
    dense = [L for L in range(model.dims.n_layers) if not model.is_moe(L)]
    return max(dense, key=lambda L: float(mean[L])), mean


def layer_range(top: int, n: int = 5) -> list[int]:
    """MEMIT's range: n layers ending at `top` (fewer near the bottom)."""
    return list(range(max(0, top - n + 1), top + 1))


def rome(model, fact: Fact, layer: int | None = None, *, prefixes: list[str] | None = None, n_prefixes: int = 10,
         steps: int = 25, lr: float = 0.5, kl_factor: float = 0.0625, weight_decay: float = 0.5,
         clamp: float = 4.0, stats_tokens: int = 32768, moments: dict | None = None, seed: int = 0,
         prompt_key: bool = False) -> Plan:
    """A rank-one edit of one fact into layer `layer`'s down_proj (chosen by causal tracing when None).

    `moments` ({layer: (C, count)}, from second_moments) skips reading the statistics (sequential edits).
    prompt_key: ROME's equality constraint W' k = W k + delta held at two keys, the averaged k* and the bare
    prompt's own key (ROME's closed form with K = [k*, k_prompt]; still rank one, as both get the same delta,
    with u chosen so that u . k* = u . k_prompt): on a model without BOS the bare prompt's key, near the
    attention sink, gets only a fraction of a k*-only update (on SmolLM2 layer 5, 0.22-1.02 of it).

    A subject that is the prompt's first token is a poor key on models whose first token is an
    attention sink (SmolLM2 has no BOS): its key differs from the averaged one and the edit barely
    reaches the bare prompt. settings["subject_at_first_token"] flags it.
    """
    if model.tokenizer is None:
        raise PlanError("ROME reads prompts as text; this model has no tokenizer.")
    trace = None
    if layer is None:
        layer, trace = trace_layer(model, fact)
    mod, _ = _down(model, layer)
    prefixes = prefixes if prefixes is not None else context_prefixes(model, n_prefixes, seed=seed)
    texts, ends = _fact_rows(model, fact, prefixes)
    inputs, last, _ = _batch(model, texts, ends)
    two = _prompt_key(prefixes, prompt_key)
    K = _columns(model, inputs, [f"L{layer}.neuron"], last, len(prefixes), two)[0].double()   # [d_mlp, 1 or 2]
    k = K[:, 0]
    first = False
    if "" in prefixes:  # the bare prompt: is the subject's last token its first token?
        i = prefixes.index("")
        first = int(last[i]) == int((inputs["attention_mask"][i] == 0).sum())
    C, count = _moments(model, [layer], moments, stats_tokens)[layer]
    W = model.arch.down_weight(mod).detach().double()
    v0 = W @ k
    (delta,), (losses,) = _optimise(model, [fact], prefixes, f"L{layer}.mlp_out", [float(v0.norm())], steps=steps,
                                    lr=lr, kl_factor=kl_factor, weight_decay=weight_decay, clamp=clamp)
    CK = torch.linalg.solve(C.double(), K)
    ck = CK[:, 0]
    u = ck / ck.norm()
    denom = float(u @ k)
    if denom <= 1e-8 * float(k.norm()):
        raise PlanError(f"ROME at layer {layer}: u . k* = {denom:.3g} is too small for a stable update (the second "
                        "moment is degenerate along the key); use more statistics text or another layer.")
    # delta at every key: Delta = D (K^T C^-1 K)^-1 (C^-1 K)^T; with k* alone, ROME's v u^T, v = delta / (u . k*)
    D = delta.double()[:, None].expand(-1, K.shape[1])
    new = W + D @ torch.linalg.solve(K.T @ CK, CK.T)
    edit = down_proj_edit(model, layer, new.float(), f"ROME: {fact.subject} -> {fact.target_new!r}")
    settings = {"layer": layer, "fact": _fact_dict(fact),
                "prefixes": prefixes, "key_norm": float(k.norm()), "value_norm": float(v0.norm()),
                "delta_norm": float(delta.norm()), "delta": delta.tolist(), "u_dot_k": denom, "losses": losses, "stats_tokens": count,
                "steps": steps, "lr": lr, "kl_factor": kl_factor, "weight_decay": weight_decay, "clamp": clamp,
                "seed": seed, "layer_from_trace": trace is not None, "prompt_key": two,
                "subject_at_first_token": first}
    if trace is not None:
        settings["trace"] = trace.values[:, 0].tolist()
    return Plan(edits=[edit], method="rome", fingerprint=model.fingerprint, settings=settings)


# ---------------------------------------------------------------- MEMIT
def memit_targets(model, facts: list[Fact], last_layer: int, prefixes: list[str], *, steps: int, lr: float,
                  kl_factor: float, weight_decay: float, clamp: float, prompt_key: bool = False):
    """Per fact its prompt rows (inputs, subject positions) and the optimised residual target z at `last_layer`
    (stacked [d_model, facts], or [d_model, 2 x facts] with prompt_key: each fact's averaged column, then its
    bare prompt's, both moved by the same delta), with the optimisation losses: MEMIT's first step, shared with
    AlphaEdit."""
    n = len(prefixes)
    rows = []
    for f in facts:
        texts, ends = _fact_rows(model, f, prefixes)
        inputs, last, _ = _batch(model, texts[:n], ends[:n])
        rows.append((inputs, last))
    site = f"L{last_layer}.resid_post"
    two = _prompt_key(prefixes, prompt_key)
    hs = [_columns(model, inputs, [site], last, n, two)[0] for inputs, last in rows]
    deltas, opt_losses = _optimise(model, facts, prefixes, site, [float(h[:, 0].norm()) for h in hs], steps=steps,
                                   lr=lr, kl_factor=kl_factor, weight_decay=weight_decay, clamp=clamp)
    return rows, torch.cat([h + d[:, None] for h, d in zip(hs, deltas)], 1).double(), opt_losses


def spread(model, rows, Z: torch.Tensor, layers: list[int], solve, note: str):
    """MEMIT's second step: layer by layer, the remaining residual (Z minus the current output at the last layer)
    divided over the remaining layers, turned into a down_proj update by solve(layer, K, R) -> [d_model, d_mlp].
    Returns the weight edits and each layer's keys K [d_mlp, facts] (read with the earlier layers edited);
    the model is left unedited. Z with two columns per fact (memit_targets with prompt_key) reads the keys and
    outputs of the bare prompt (each fact's row 0) beside the averaged ones."""
    if Z.shape[1] not in (len(rows), 2 * len(rows)):
        raise PlanError(f"Z has {Z.shape[1]} columns for {len(rows)} facts; give one per fact, or two with the "
                        "bare prompt's (memit_targets with prompt_key).")
    prompt_key = Z.shape[1] == 2 * len(rows)
    site = f"L{layers[-1]}.resid_post"
    edits: list[WeightEdit] = []
    applied, keys = [], {}
    try:
        for i, L in enumerate(layers):
            pairs = [_columns(model, inp, [f"L{L}.neuron", site], last, int(last.numel()), prompt_key)
                     for inp, last in rows]  # one forward each
            K = torch.cat([k for k, _ in pairs], 1).double()
            cur = torch.cat([h for _, h in pairs], 1).double()
            R = (Z - cur) / (len(layers) - i)
            delta_w = solve(L, K, R)
            mod, _ = _down(model, L)
            W = model.arch.down_weight(mod).detach().double()
            edit = down_proj_edit(model, L, (W + delta_w).float(), f"{note} layer {L}")
            edits.append(edit)
            keys[L] = K
            applied.append((edit, edit.apply(model)))  # later layers see this one's update
    finally:
        for e, old in reversed(applied):
            e.restore(model, old)
    return edits, keys


def _moments(model, layers: list[int], moments: dict | None, stats_tokens: int) -> dict:
    """The given second moments (checked to cover `layers`) or those of the shipped text, cached."""
    if moments is None:
        return second_moments(model, layers, max_tokens=stats_tokens)
    missing = [L for L in layers if L not in moments]
    if missing:
        raise PlanError(f"The second moments passed cover layers {sorted(moments)} but not {missing}; compute them "
                        "with mechanic.steer.stats.second_moments(model, layers) for every edited layer.")
    return moments


def prepare(model, facts: list[Fact], layers: list[int] | None, prefixes: list[str] | None, moments: dict | None, *,
            n_prefixes: int, stats_tokens: int, seed: int, prompt_key: bool = False, targets: dict | None = None,
            **optimise):
    """What MEMIT and AlphaEdit share before their per-layer solve: the layers (default: 5 ending at the first
    fact's traced layer), prefixes, second moments and the optimised targets (see memit_targets), read from and
    written to `targets` when given, keyed on what determines them."""
    if layers is None:
        layers = layer_range(trace_layer(model, facts[0])[0])
    layers = sorted(int(x) for x in layers)
    for L in layers:
        _down(model, L)
    prefixes = prefixes if prefixes is not None else context_prefixes(model, n_prefixes, seed=seed)
    moments = _moments(model, layers, moments, stats_tokens)
    key = None if targets is None else (model.fingerprint, tuple(facts), layers[-1], tuple(prefixes), prompt_key,
                                        *sorted(optimise.items()))
    found = None if key is None else targets.get(key)
    if found is None:
        found = memit_targets(model, facts, layers[-1], prefixes, prompt_key=prompt_key, **optimise)
        if key is not None:
            targets[key] = found
    return layers, prefixes, moments, *found


def memit_update(C: torch.Tensor, K: torch.Tensor, R: torch.Tensor, lam: float) -> torch.Tensor:
    """MEMIT's per-layer solve: Delta = R K^T (lam C + K K^T)^-1 ([d_model, d_mlp]; K [d_mlp, keys], R [d_model, keys])."""
    return torch.linalg.solve(lam * C.double() + K @ K.T, K @ R.T).T


def _fact_dict(f: Fact) -> dict:
    return f.__dict__ | {"paraphrases": list(f.paraphrases), "neighborhood": list(f.neighborhood)}


def memit(model, facts: list[Fact], layers: list[int] | None = None, *, prefixes: list[str] | None = None,
          n_prefixes: int = 10, steps: int = 25, lr: float = 0.5, kl_factor: float = 0.0625,
          weight_decay: float = 0.5, clamp: float = 4.0, lam: float = 1000.0, stats_tokens: int = 32768,
          moments: dict | None = None, seed: int = 0, prompt_key: bool = False, targets: dict | None = None) -> Plan:
    """Many facts at once, spread over `layers` (default: 5 layers ending at the traced layer of the first fact).

    lam weighs the preserved keys (C) against the new ones; both scale with the keys squared, so it is
    scale-free but model-dependent: MEMIT used 15000 on GPT-J; on SmolLM2 that leaves edits too weak
    (efficacy 1/4 on four facts over layers 1-5) where 1000 gives 3/4 with the fourth a near tie.
    `moments` ({layer: (C, count)}, from second_moments) and `prefixes` skip recomputing them (sequential edits).
    prompt_key: each fact also contributes its bare prompt's key and residual (see rome).
    targets: a dict that keeps the optimised targets by what determines them (the model, facts, last layer,
    prefixes and optimiser settings): edits of the same facts on the same model with other solves optimise once.
    """
    if not facts:
        raise PlanError("MEMIT needs at least one Fact.")
    layers, prefixes, moments, rows, Z, opt_losses = prepare(
        model, facts, layers, prefixes, moments, n_prefixes=n_prefixes, stats_tokens=stats_tokens, seed=seed,
        steps=steps, lr=lr, kl_factor=kl_factor, weight_decay=weight_decay, clamp=clamp, prompt_key=prompt_key,
        targets=targets)
    edits, _ = spread(model, rows, Z, layers, lambda L, K, R: memit_update(moments[L][0], K, R, lam),
                      f"MEMIT {len(facts)} facts:")
    settings = {"layers": layers, "facts": [_fact_dict(f) for f in facts],
                "prefixes": prefixes, "lam": lam, "losses": opt_losses, "prompt_key": Z.shape[1] > len(facts),
                "stats_tokens": {L: moments[L][1] for L in layers}, "steps": steps, "lr": lr,
                "kl_factor": kl_factor, "weight_decay": weight_decay, "clamp": clamp, "seed": seed}
    return Plan(edits=edits, method="memit", fingerprint=model.fingerprint, settings=settings)


# ---------------------------------------------------------------- neurons
def neuron_edit(model, sites, factor: float = 0.0, k: int | None = None) -> Plan:
    """Scale (0 = zero) FFN neurons in the weights: the down_proj column of each `L.neuron{j}`.

    sites: names, or located Scores (their top k neuron sites). The result equals scaling the neuron's
    activation with a hook (tested), and it is saved with the model.
    """
    if isinstance(sites, Scores):
        sites = list(dict.fromkeys(s for s, _, _ in sites.top(k or 10)))
    cols: dict[int, list[int]] = {}
    for s in sites:
        site = model.check(s)
        if site.kind != "neuron" or site.index is None:
            raise PlanError(f"neuron_edit takes single FFN neurons like 'L3.neuron17', got {s!r}.")
        cols.setdefault(site.layer, []).append(site.index)
    edits = []
    for L, js in sorted(cols.items()):
        mod, name = _down(model, L)
        W = model.arch.down_weight(mod).detach()
        js = sorted(set(js))
        new = W[:, js] * factor
        index = ([*js], None) if model.arch.conv1d else (None, [*js])
        edits.append(WeightEdit(name, new.T.clone() if model.arch.conv1d else new.clone(), index=index,
                                note=f"L{L}: neurons {js} x {factor}"))
    return Plan(edits=edits, method="neuron_edit", fingerprint=model.fingerprint,
                settings={"sites": [str(s) for s in sites], "factor": factor})

