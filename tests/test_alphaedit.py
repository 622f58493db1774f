"""AlphaEdit: the update is the closed form of the null-space-constrained least squares (checked against a reference
solved in a reduced basis from an SVD of the statistics); it barely moves held-out text's keys, and in sequential
editing it moves the earlier edits' keys far less than MEMIT does."""

import pytest
import torch

import mechanic
from mechanic.data.text import heldout
from mechanic.steer import alphaedit as ae
from mechanic.steer.alphaedit import NullSpaces, alphaedit, alphaedit_update, null_space
from mechanic.steer.edit import Fact, _batch, _fact_rows, memit
from mechanic.steer.plan import PlanError
from mechanic.steer.stats import second_moments
from mechanic.testing.tiny import tiny_model

FACTS = [
    Fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Rome", " Paris"),
    Fact("The river Thames flows through the city of", "The river Thames", " Berlin", " London"),
    Fact("The old castle was built by the king of", "The old castle", " Spain", " France"),
]
PREFIXES = ["", "I think so. ", "The weather was fine. "]
LAYERS = [0, 1]
TOKENS = 2000
OPT = dict(prefixes=PREFIXES, steps=4, stats_tokens=TOKENS)
ALPHA = 1e-4  # the tiny model's keys have squared norms near 1e-2: the authors' alpha 10 would swamp them


@pytest.fixture
def model(word_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("MECHANIC_CACHE", str(tmp_path))
    return mechanic.load(tiny_model("llama", vocab_size=len(word_tokenizer)), tokenizer=word_tokenizer)


def down(m, L):
    return m.arch.down_weight(m.layer_module(L, m.arch.down_proj)).detach().double()


def keys(m, facts, L):
    """Each fact's down_proj input at the subject's last token, averaged over PREFIXES (written here, not imported)."""
    out = []
    for f in facts:
        texts, ends = _fact_rows(m, f, PREFIXES)
        inputs, last, _ = _batch(m, texts[:len(PREFIXES)], ends[:len(PREFIXES)])
        acts = m.run(inputs, cache=[f"L{L}.neuron"])[f"L{L}.neuron"]
        out.append(acts[torch.arange(len(PREFIXES)), last].mean(0).double())
    return torch.stack(out, 1)


def reference(C, threshold, K, R, Kp, alpha):
    """argmin over D = X U^T (rows in the null space) of ||D K - R||^2 + ||D Kp||^2 + alpha ||D||^2, solved for X."""
    U, S, _ = torch.linalg.svd(C.double())
    U = U[:, S < threshold]
    A = U.T @ (K @ K.T + Kp @ Kp.T) @ U + alpha * torch.eye(U.shape[1], dtype=torch.float64)
    X = torch.linalg.lstsq(A, U.T @ K @ R.T).solution.T
    return X @ U.T


def threshold_at(C, q):
    """The eigenvalue threshold leaving a fraction q of C's eigenvalues below it."""
    return float(torch.quantile(torch.linalg.eigvalsh(C.double()), q))


def test_alphaedit_equals_the_reference_closed_form(model, monkeypatch):
    m = model
    C = {L: second_moments(m, [L], max_tokens=TOKENS)[L][0] for L in LAYERS}
    thr = threshold_at(C[0], 0.5)
    residuals = []
    real = ae.alphaedit_update
    monkeypatch.setattr(ae, "alphaedit_update", lambda P, K, R, prev, a: residuals.append(R) or real(P, K, R, prev, a))
    state = NullSpaces(thr)
    first = alphaedit(m, FACTS[:1], LAYERS, threshold=thr, alpha=ALPHA, state=state, **OPT)
    with m.applied(first):  # the second batch is computed on the model with the first applied
        Kp = {L: keys(m, FACTS[:1], L) for L in LAYERS}
        W1 = {L: down(m, L) for L in LAYERS}
        residuals.clear()
        second = alphaedit(m, FACTS[1:], LAYERS, threshold=thr, alpha=ALPHA, state=state, **OPT)
        K = {0: keys(m, FACTS[1:], 0)}
        with m.applied(type(second)(edits=second.edits[:1])):  # layer 1's keys are read with layer 0 edited
            K[1] = keys(m, FACTS[1:], 1)
        with m.applied(second):
            W2 = {L: down(m, L) for L in LAYERS}
    for L, R in zip(LAYERS, residuals):
        want = reference(C[L], thr, K[L], R, Kp[L], ALPHA)
        got = W2[L] - W1[L]
        assert want.abs().max().item() > 0
        assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item(), L
    for L in LAYERS:
        assert first.settings["null_dims"][L] == int((torch.linalg.eigvalsh(C[L].double()) < thr).sum())


def test_update_formula_against_reduced_basis():
    g = torch.Generator().manual_seed(0)
    d, n, out = 12, 3, 5
    X = torch.randn(200, d, generator=g, dtype=torch.float64) * torch.linspace(0.05, 2, d, dtype=torch.float64)
    C = X.T @ X / 200
    thr = threshold_at(C, 0.4)
    K, Kp = torch.randn(d, n, generator=g, dtype=torch.float64), torch.randn(d, 4, generator=g, dtype=torch.float64)
    R = torch.randn(out, n, generator=g, dtype=torch.float64)
    P, dim = null_space(C, thr)
    got = alphaedit_update(P, K, R, Kp @ Kp.T, 0.3)
    want = reference(C, thr, K, R, Kp, 0.3)
    assert dim == 5  # eigenvalues below the 40% quantile of 12 (interpolated between the 5th and 6th)
    assert (got - want).abs().max().item() < 1e-10
    assert (got @ P - got).abs().max().item() < 1e-10  # Delta = Delta P: the paper's W + Delta P is the same update


def test_preserved_keys_barely_move(model):
    """Per unit of update (||Delta||_F^2), the mean squared change of held-out text's outputs is at most about the
    threshold, far below the same closed form without the projection (threshold above every eigenvalue)."""
    m = model
    L = 0
    C = second_moments(m, [L], max_tokens=TOKENS)[L][0].double()
    thr = threshold_at(C, 0.3)
    ids = m.tokenizer(" ".join(heldout())[:4000], add_special_tokens=False)["input_ids"][:512]
    K0 = m.run(torch.tensor([ids]), cache=[f"L{L}.neuron"])[f"L{L}.neuron"][0].double().T  # preserved keys
    W0 = down(m, L)

    def gain(plan):
        with m.applied(plan):
            D = down(m, L) - W0
        return float((D @ K0).norm() ** 2 / K0.shape[1] / D.norm() ** 2)

    top = float(torch.linalg.eigvalsh(C)[-1]) * 2
    projected = gain(alphaedit(m, FACTS[1:], [L], threshold=thr, alpha=ALPHA, **OPT))
    free = gain(alphaedit(m, FACTS[1:], [L], threshold=top, alpha=ALPHA, **OPT))
    print(f"\nheld-out output change per unit update: projected {projected:.3g}, unprojected {free:.3g}, "
          f"threshold {thr:.3g}")
    assert projected < 1.5 * thr
    assert projected < 0.5 * free


def test_earlier_edits_keys_move_far_less_than_with_memit(model):
    """Batch two's update moves batch one's keys (relative to its own keys) far less with AlphaEdit's accumulated
    Kp than with MEMIT or with AlphaEdit starting afresh, at the same edit strength."""
    m = model
    L = 0
    thr = threshold_at(second_moments(m, [L], max_tokens=TOKENS)[L][0], 0.5)
    state = NullSpaces(thr)
    first = alphaedit(m, FACTS[:1], [L], threshold=thr, alpha=ALPHA, state=state, **OPT)
    with m.applied(first):
        Kp, K, W1 = keys(m, FACTS[:1], L), keys(m, FACTS[1:], L), down(m, L)

        def moved(plan):
            with m.applied(plan):
                D = down(m, L) - W1
            return float((D @ Kp).norm() / (D @ K).norm()), float((D @ K).norm())

        (seq, s1), (fresh, s2), (mem, s3) = [moved(p) for p in (
            alphaedit(m, FACTS[1:], [L], threshold=thr, alpha=ALPHA, state=state, **OPT),
            alphaedit(m, FACTS[1:], [L], threshold=thr, alpha=ALPHA, **OPT),
            memit(m, FACTS[1:], [L], lam=1.0, **OPT))]
    print(f"\nearlier keys moved / new keys moved: AlphaEdit {seq:.4f}, afresh {fresh:.4f}, MEMIT {mem:.4f}")
    assert seq < 0.2 * mem and seq < 0.2 * fresh
    assert min(s1, s2) > 0.5 * s3  # the new facts' keys move about as much: the edits are as strong


def test_alphaedit_errors(model):
    C = torch.eye(4)
    with pytest.raises(PlanError, match="null space is\\s+empty"):
        null_space(C, 0.5)
    with pytest.raises(PlanError, match="threshold"):
        alphaedit(model, FACTS[:1], [1], threshold=0.1, state=NullSpaces(0.2), **OPT)
    with pytest.raises(PlanError, match="at least one"):
        alphaedit(model, [], [1])


def test_energy_rule_keeps_the_smallest_eigenvalues_within_the_share():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 10, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 10, dtype=torch.float64)
    C = X.T @ X / 300
    vals = torch.linalg.eigvalsh(C)
    P, dim = null_space(C, 0.0, energy=0.05)
    assert vals[:dim].sum() <= 0.05 * vals.sum() < vals[:dim + 1].sum()
    assert (P @ P - P).abs().max().item() < 1e-10 and abs(torch.trace(P).item() - dim) < 1e-10
    assert torch.trace(P @ C).item() <= 0.05 * torch.trace(C).item() + 1e-12   # the energy the update can reach


def test_preserved_prompts_barely_move(model):
    """With `preserve`, per unit of update the preserved prompts' keys change by at most 2 x energy of their mean
    squared norm (the null space of C + w E holds at most energy x 2 trace(C) = energy x 2 w trace(E)); without it,
    by over 20 times more."""
    m = model
    L = 0
    kept = ["The Louvre is located in the city of", "The river Seine flows through the city of"]
    E = m.run(kept[0], cache=[f"L{L}.neuron"])[f"L{L}.neuron"][0].double().T
    E = torch.cat([E, m.run(kept[1], cache=[f"L{L}.neuron"])[f"L{L}.neuron"][0].double().T], 1)  # [d_mlp, tokens]
    W0 = down(m, L)

    def gain(plan):
        with m.applied(plan):
            D = down(m, L) - W0
        return float((D @ E).norm() ** 2 / (E.norm() ** 2) / D.norm() ** 2)

    energy = 0.05
    kept_gain = gain(p := alphaedit(m, FACTS[:2], [L], energy=energy, preserve=kept, alpha=ALPHA, **OPT))
    free_gain = gain(alphaedit(m, FACTS[:2], [L], energy=energy, alpha=ALPHA, **OPT))
    print(f"\npreserved prompts' change per unit update: preserved {kept_gain:.3g}, not {free_gain:.3g}")
    assert p.settings["energy"] == energy and p.settings["preserved_prompts"] == 2
    assert kept_gain <= 2 * energy
    assert kept_gain < 0.05 * free_gain


def test_energy_and_preserve_errors(model):
    with pytest.raises(PlanError, match="between 0\\s+and 1"):
        null_space(torch.eye(3), 0.0, energy=1.5)
    with pytest.raises(PlanError, match="list of prompts"):
        alphaedit(model, FACTS[:1], [1], preserve="The Louvre is in", **OPT)
    with pytest.raises(PlanError, match="energy"):
        alphaedit(model, FACTS[:1], [1], energy=0.1, state=NullSpaces(2e-2), **OPT)
