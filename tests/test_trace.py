"""Causal tracing (ROME): the reuse-based trace against a naive one-forward-per-restoration loop with plain torch
hooks and against the former full-forward batched trace (every architecture), subject lookup through tokenizer
offsets, clear errors, and the known pattern on SmolLM2."""

import time

import pytest
import torch

import mechanic
from mechanic.locate.trace import TraceError, _window, causal_trace, embedding_std, last_logits, subject_positions
from mechanic.model.interventions import add, replace
from mechanic.testing.tiny import CONFIGS, tiny_model

IDS = torch.randint(3, 101, (5,), generator=torch.Generator().manual_seed(3))
SUBJECT = [1, 2]


def load(arch):
    # larger weights than the default init, so restorations move P(answer) by ~0.1, not ~1e-4
    return mechanic.load(tiny_model(arch, initializer_range=0.2))


def _out(out, fn):
    if isinstance(out, tuple):
        return (fn(out[0].clone()),) + tuple(out[1:])
    return fn(out.clone())


def naive_trace(model, ids, answer, subject, kind, samples, noise_std, seed, window):
    """One HF forward per (layer, position, sample), with plain torch hooks: the reference."""
    a, L = model.arch, model.dims.n_layers
    g = torch.Generator().manual_seed(seed)
    draws = torch.randn(samples, len(subject), model.dims.d_model, generator=g) * noise_std
    module = {"hidden": lambda j: model.layers[j], "mlp": lambda j: model.layer_module(j, a.mlp_write),
              "attn": lambda j: model.layer_module(j, a.attn_write)}[kind]
    # clean states, read by plain hooks
    states, handles = {}, []
    for j in range(L):
        handles.append(module(j).register_forward_hook(
            lambda m, args, out, j=j: states.__setitem__(j, (out[0] if isinstance(out, tuple) else out).clone())))
    with torch.no_grad():
        clean = model.hf(input_ids=ids[None]).logits[0, -1]
    for h in handles:
        h.remove()

    def prob(s, restore):
        def noise(m, args, out):
            out = out.clone()
            out[0, subject] += draws[s]
            return out
        hs = [model.module(a.embed).register_forward_hook(noise)]
        for j, t in restore:
            def put(x, j=j, t=t):
                x[0, t] = states[j][0, t]
                return x
            hs.append(module(j).register_forward_hook(lambda m, args, out, put=put: _out(out, put)))
        try:
            with torch.no_grad():
                logits = model.hf(input_ids=ids[None]).logits[0, -1]
        finally:
            for h in hs:
                h.remove()
        return torch.softmax(logits, -1)[answer].item()

    p_noised = sum(prob(s, []) for s in range(samples)) / samples
    win = 1 if kind == "hidden" else window
    values = torch.zeros(L, ids.numel())
    for l in range(L):
        for t in range(ids.numel()):
            layers = range(max(0, l - win // 2), min(L, l - (-win // 2)))
            values[l, t] = sum(prob(s, [(j, t) for j in layers]) for s in range(samples)) / samples - p_noised
    return values, torch.softmax(clean, -1)[answer].item(), p_noised


def full_forward_trace(model, ids, answer, subj, kind, samples, std, seed, window, layers=None, positions=None,
                       batch_size=128):
    """The former trace, kept as a reference: every restoration a full forward of the whole prompt (batched rows,
    boolean row x position masks); returns (values [layers, positions], p_noised)."""
    L, T, part = model.dims.n_layers, ids.numel(), {"hidden": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}[kind]
    win = 1 if kind == "hidden" else window
    layers = list(range(L)) if layers is None else layers
    positions = list(range(T)) if positions is None else positions
    g = torch.Generator().manual_seed(seed)
    draws = torch.randn(samples, len(subj), model.dims.d_model, generator=g) * std
    need = sorted({j for l in layers for j in _window(l, win, L)})
    clean = model.run(ids[None], cache=[f"L{j}.{part}" for j in need])
    units = [None] + [(l, t) for l in layers for t in positions if t >= min(subj)]
    per, probs = max(1, batch_size // samples), {}
    for chunk in [units[i:i + per] for i in range(0, len(units), per)]:
        B = len(chunk) * samples
        ivs, masks = [add("embed", draws.repeat(len(chunk), 1, 1), pos=subj)], {}
        for u, unit in enumerate(chunk):
            for j in (_window(unit[0], win, L) if unit is not None else ()):
                m = masks.setdefault(j, torch.zeros(B, T, dtype=torch.bool))
                m[u * samples:(u + 1) * samples, unit[1]] = True
        for j, m in sorted(masks.items()):
            ivs.append(replace(f"L{j}.{part}", clean[f"L{j}.{part}"][0, m.nonzero()[:, 1]], pos=m))
        p = torch.softmax(last_logits(model, ids[None].expand(B, T), ivs).float(), -1)[:, answer]
        probs.update(zip(chunk, p.view(len(chunk), samples).mean(1).tolist()))
    values = torch.zeros(len(layers), len(positions))
    for a, l in enumerate(layers):
        for b, t in enumerate(positions):
            if t >= min(subj):
                values[a, b] = probs[(l, t)] - probs[None]
    return values, probs[None]


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_trace_equals_full_forward_trace_every_arch(arch):
    """Reusing the noised run's prefix and lower layers changes nothing: every kind, every architecture."""
    m = load(arch)
    answer = int(m.run(IDS[None]).logits[0, -1].argmax())
    std = 3 * embedding_std(m)
    worst, moved = 0.0, 0.0
    for kind, subj in [("hidden", [1, 2]), ("mlp", [0, 3]), ("attn", [2])]:
        s = causal_trace(m, IDS, answer, subj, kind, samples=3, window=2, seed=5, batch_size=7)
        ref, p_noised = full_forward_trace(m, IDS, answer, subj, kind, 3, std, 5, 2)
        worst = max(worst, (s.values - ref).abs().max().item(), abs(s.settings["p_noised"] - p_noised))
        moved = max(moved, ref.abs().max().item())
    assert worst <= 1e-5
    assert moved > 1e-2  # the check is not vacuous
    assert m.hook_count() == 0 and not any("forward" in layer.__dict__ for layer in m.layers)


@pytest.mark.parametrize("arch,kind", [("llama", "hidden"), ("llama", "mlp"), ("llama", "attn"),
                                       ("gpt2", "hidden"), ("gemma2", "attn"), ("qwen2_moe", "mlp")])
def test_batched_trace_equals_naive_loop(arch, kind):
    m = load(arch)
    answer = int(m.run(IDS[None]).logits[0, -1].argmax())
    std = 3 * embedding_std(m)
    # batch_size 5 with 2 samples: 2 restorations per forward, so chunks split unevenly
    s = causal_trace(m, IDS, answer, SUBJECT, kind, samples=2, window=2, seed=4, batch_size=5)
    ref, p_clean, p_noised = naive_trace(m, IDS, answer, SUBJECT, kind, 2, std, 4, 2)
    assert abs(s.settings["p_clean"] - p_clean) < 1e-5
    assert abs(s.settings["p_noised"] - p_noised) < 1e-5
    assert (s.values - ref).abs().max().item() < 1e-5
    assert ref.abs().max().item() > 1e-2  # the check is not vacuous
    assert s.values.shape == (m.dims.n_layers, IDS.numel())
    assert s.sites == [f"L{l}.{ {'hidden': 'resid_post', 'mlp': 'mlp_out', 'attn': 'attn_out'}[kind]}"
                       for l in range(m.dims.n_layers)]
    assert s.method == f"causal_trace/{kind}"


def test_window_is_roms():
    assert list(_window(0, 10, 30)) == list(range(0, 5))
    assert list(_window(12, 10, 30)) == list(range(7, 17))
    assert list(_window(29, 10, 30)) == list(range(24, 30))
    assert list(_window(1, 3, 3)) == [0, 1, 2]


def test_settings_restricted_grid_and_seed():
    m = load("llama")
    full = causal_trace(m, IDS, 7, SUBJECT, samples=2, seed=1)
    part = causal_trace(m, IDS, 7, [2, 1, 1], samples=2, seed=1, layers=[2, 0], positions=[-1, 2])
    assert part.values.shape == (2, 2) and part.sites == ["L2.resid_post", "L0.resid_post"]
    assert torch.allclose(part.values, full.values[[2, 0]][:, [4, 2]], atol=1e-6)
    st = full.settings
    assert st["subject_positions"] == [1, 2] and st["samples"] == 2 and st["seed"] == 1
    assert st["noise_std"] == pytest.approx(3 * st["sigma_emb"])
    assert full.positions == [str(i) for i in IDS.tolist()]
    assert (full.values[:, 0] == 0).all()  # before the subject: nothing to restore
    other = causal_trace(m, IDS, 7, SUBJECT, samples=2, seed=2)
    assert not torch.equal(other.values, full.values)
    scaled = causal_trace(m, IDS, 7, SUBJECT, samples=2, noise_std=0.5)
    assert scaled.settings["noise_std"] == 0.5
    mlp = causal_trace(m, IDS, 7, SUBJECT, "mlp", samples=2, window=2)
    assert mlp.settings["windows"] == {"0": [0, 0], "1": [0, 1], "2": [1, 2]}


def test_embedding_std_is_remembered_until_the_table_changes():
    """sigma_emb is read once per embedding table; an in-place edit of the table (or a new one) is seen."""
    m = load("llama")
    w = m.module(m.arch.embed).weight
    first = embedding_std(m)
    ref = float(w.detach().double().std())  # the `embed` site of a Llama outputs the table's rows unscaled
    assert first == pytest.approx(ref, rel=1e-12) and embedding_std(m) == first
    with torch.no_grad():
        w.mul_(2)
    try:
        assert embedding_std(m) == pytest.approx(2 * ref, rel=1e-12)
    finally:
        with torch.no_grad():
            w.div_(2)
    assert embedding_std(m) == pytest.approx(ref, rel=1e-12)


def test_scores_round_trip(tmp_path):
    m = load("llama")
    s = causal_trace(m, IDS, 7, SUBJECT, "attn", samples=2)
    back = mechanic.locate.Scores.load(s.save(tmp_path / "trace.json"))
    assert back.settings == s.settings and torch.equal(back.values, s.values) and back.positions == s.positions
    assert m.hook_count() == 0


class WordTokenizer:
    """Whitespace tokenizer with GPT-2 style leading spaces and character offsets (fast-tokenizer interface)."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def _id(self, w):
        return self.vocab.setdefault(w, 3 + len(self.vocab))

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        ids, offsets, i = [], [], 0
        while i < len(text):
            j = i + 1
            while j < len(text) and text[j] != " ":
                j += 1
            ids.append(self._id(text[i:j]))
            offsets.append((i, j))
            i = j
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv[i] for i in ids)


def test_subject_from_text_via_offsets():
    m = load("llama")
    m.tokenizer = WordTokenizer()
    prompt = "The Eiffel Tower is located in"
    assert subject_positions(m, prompt, "The Eiffel Tower") == [0, 1, 2]
    assert subject_positions(m, prompt, "Eiffel Tower") == [1, 2]
    assert subject_positions(m, prompt, "Tow") == [2]  # a partial word marks its whole token
    s = causal_trace(m, prompt, " in", "Eiffel Tower", samples=2)
    assert s.positions == ["The", " Eiffel", " Tower", " is", " located", " in"]
    assert s.settings["subject"] == "Eiffel Tower" and s.settings["answer"] == " in"
    with pytest.raises(TraceError, match="does not occur in the prompt"):
        causal_trace(m, prompt, " in", "Louvre")
    with pytest.raises(TraceError, match="subject is empty"):
        causal_trace(m, prompt, " in", "  ")


def test_clear_errors():
    m = load("llama")
    with pytest.raises(TraceError, match="subject is empty"):
        causal_trace(m, IDS, 7, [])
    with pytest.raises(TraceError, match="out of range"):
        causal_trace(m, IDS, 7, [6])
    with pytest.raises(TraceError, match="Layer 3 is out of range"):
        causal_trace(m, IDS, 7, SUBJECT, layers=[3])
    with pytest.raises(TraceError, match="Unknown trace kind"):
        causal_trace(m, IDS, 7, SUBJECT, kind="resid")
    with pytest.raises(TraceError, match="no tokenizer"):
        causal_trace(m, "The Eiffel Tower", 7, "Eiffel")
    with pytest.raises(TraceError, match="prompt as text"):
        causal_trace(m, IDS, 7, "Eiffel")
    with pytest.raises(TraceError, match="out of range"):
        causal_trace(m, IDS, 101, SUBJECT)
    with pytest.raises(TraceError, match="at least 1"):
        causal_trace(m, IDS, 7, SUBJECT, samples=0)


PROMPT = "The Eiffel Tower is located in the city of"


@pytest.mark.real
def test_eiffel_tower_trace_on_smollm2(smollm2):
    """ROME's pattern on SmolLM2: a subject token restores P(' Paris') from early-middle layers on, the last
    token from late layers on, and the subject's effect hands over to the last token (traced at the two
    last subject tokens and the last token; 5 noise samples to keep the test short)."""
    subj = subject_positions(smollm2, PROMPT, "The Eiffel Tower")
    assert subj == [0, 1, 2, 3]  # The | E | iffel | Tower
    last = len(smollm2.tokenizer(PROMPT)["input_ids"]) - 1
    t0 = time.time()
    s = causal_trace(smollm2, PROMPT, " Paris", "The Eiffel Tower", positions=[2, 3, last], samples=5)
    elapsed = time.time() - t0
    p_clean, p_noised = s.settings["p_clean"], s.settings["p_noised"]
    gap = p_clean - p_noised
    L = smollm2.dims.n_layers
    cols = {name: s.values[:, i] for i, name in enumerate(["iffel", "Tower", "last"])}
    print(f"\nP_clean {p_clean:.4f}  P_noised {p_noised:.4f}  ({elapsed:.1f} s)")
    for name, col in cols.items():
        print(f"{name:6s}", " ".join(f"{v:.2f}" for v in col.tolist()))
    assert s.positions == ["iffel", " Tower", " of"]
    assert p_noised < p_clean - 0.3
    # the strongest subject token peaks in the first 2/3 of the layers, and strongly. On SmolLM2 it is 'iffel'
    # (the fact is recalled there; ' Tower' is predictable from 'The Eiffel' and restoring it does nothing)
    subject = torch.stack([cols["iffel"], cols["Tower"]], 1)
    best = subject.max(0).values.argmax()
    col = subject[:, best]
    assert int(col.argmax()) < 2 * L // 3
    assert col.max() > 0.3 * gap
    assert cols["iffel"].max() > cols["Tower"].max()
    # the subject's effect is gone in the last layers, where the last token carries it instead
    assert col[-3:].max() < 0.2 * col.max()
    assert cols["last"][-5:].min() > 0.5 * gap
    assert cols["last"][: L // 2].max() < 0.1 * gap
    assert int(cols["last"].argmax()) > int(col.argmax())


@pytest.mark.real
def test_great_wall_last_subject_token_on_smollm2(smollm2):
    """With a subject whose last token is not predictable ('Wall'), the last subject token carries the fact:
    its effect peaks in the first 2/3 of the layers (ROME's early site)."""
    prompt = "The Great Wall is located in the country of"
    s = causal_trace(smollm2, prompt, " China", "The Great Wall", positions=[2, -1], samples=5)
    gap = s.settings["p_clean"] - s.settings["p_noised"]
    wall, last = s.values[:, 0], s.values[:, 1]
    print(f"\nP_clean {s.settings['p_clean']:.4f}  P_noised {s.settings['p_noised']:.4f}")
    print("Wall", " ".join(f"{v:.2f}" for v in wall.tolist()))
    print("last", " ".join(f"{v:.2f}" for v in last.tolist()))
    assert s.positions == [" Wall", " of"]
    L = smollm2.dims.n_layers
    assert int(wall.argmax()) < 2 * L // 3 and wall.max() > 0.3 * gap
    assert wall[-3:].max() < 0.2 * wall.max() and last[-5:].min() > 0.5 * gap


@pytest.mark.real
def test_trace_equals_full_forward_trace_on_smollm2(smollm2):
    """On the real model too: an MLP trace (window 10) at the subject's last token and the last token, and a hidden
    trace at three layers (the last among them) and three tokens."""
    prompt, subject = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
    ids = torch.tensor(smollm2.tokenizer(prompt)["input_ids"])
    subj = subject_positions(smollm2, prompt, subject)
    answer = smollm2.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    s = causal_trace(smollm2, prompt, answer, subject, "mlp", samples=3, positions=[subj[-1], -1])
    ref, p_noised = full_forward_trace(smollm2, ids, answer, subj, "mlp", 3, s.settings["noise_std"], 0, 10,
                                       positions=[subj[-1], ids.numel() - 1])
    assert (s.values - ref).abs().max().item() <= 1e-5 and abs(s.settings["p_noised"] - p_noised) <= 1e-5
    assert ref.abs().max().item() > 0.01  # restorations move P(Paris) (by ~0.04 with 3 samples)
    # hidden: each restoration starts one layer above the restored one (the last layer's: no layer runs)
    layers, positions = [0, 8, 29], [subj[1], subj[-1], ids.numel() - 1]
    s = causal_trace(smollm2, prompt, answer, subject, samples=3, layers=layers, positions=positions)
    ref, _ = full_forward_trace(smollm2, ids, answer, subj, "hidden", 3, s.settings["noise_std"], 0, 10,
                                layers=layers, positions=positions)
    assert (s.values - ref).abs().max().item() <= 1e-5 and ref.abs().max().item() > 0.1
