"""Evaluating dictionaries: the splice with the error term is the original model (every family, every site kind),
FVU / L0 / CE recovered against hand-computed values, exact and empty dictionaries at the two ends of the scale."""

import pytest
import torch
import torch.nn.functional as F

import mechanic
from mechanic.features import Dictionary
from mechanic.features.evaluate import evaluate
from mechanic.features.splice import reconstruction, spliced_logits, zero_ablation
from mechanic.testing.tiny import CONFIGS, tiny_model
from conftest import randomized


def rand(d, seed=0):
    return randomized(d, seed, 0.2)


IDS = torch.randint(3, 101, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_splice_with_error_term_equals_original(arch):
    m = mechanic.load(tiny_model(arch))
    orig = m.run(IDS).logits
    D = m.dims.d_model
    dicts = [rand(Dictionary(D, 3 * D, "topk", k=5, site="L1.resid_post")),
             rand(Dictionary(D, 2 * D, "relu", site="L2.mlp_in"), 1),
             rand(Dictionary(D, 2 * D, "jumprelu", site="L0.mlp_in", out_site="L0.mlp_out", skip=True), 2),
             rand(Dictionary(m.dims.n_heads * m.dims.d_head, 64, "relu", site="L1.head.z"), 3)]
    for d in dicts:
        d.check(m)
        with_err = spliced_logits(m, d, IDS, reconstruction(d, error_term=True))
        assert (with_err - orig).abs().max() < 1e-5, (arch, d)
        without = spliced_logits(m, d, IDS, reconstruction(d))
        assert (without - orig).abs().max() > 1e-3, (arch, d)                # the splice is really in the forward
        assert (without[:, 0] - orig[:, 0]).abs().max() < 1e-5                 # position 0 is left alone


def test_transcoder_splice_replaces_the_mlp_output_with_its_prediction():
    m = mechanic.load(tiny_model("llama"))
    d = rand(Dictionary(64, 128, "relu", site="L1.mlp_in", out_site="L1.mlp_out"))
    x = {}
    mlp = m.layers[1].mlp
    h = mlp.register_forward_hook(lambda mod, a, out: x.setdefault("in", a[0]))
    try:
        m.run(IDS)
    finally:
        h.remove()
    pred = d(x["in"])
    ref = {}

    def patch(mod, a, out):   # plain hook reference: the MLP writes the transcoder's prediction (from position 1 on)
        out = out.clone()
        out[:, 1:] = pred[:, 1:]
        return out
    h = mlp.register_forward_hook(patch)
    try:
        ref = m.hf(input_ids=IDS).logits
    finally:
        h.remove()
    assert (spliced_logits(m, d, IDS, reconstruction(d)) - ref).abs().max() < 1e-5


def test_evaluation_numbers_match_hand_computation(word_tokenizer):
    from mechanic.data.text import heldout

    m = mechanic.load(tiny_model("llama", vocab_size=word_tokenizer.vocab_size))
    m.tokenizer = word_tokenizer
    D = 64
    exact = Dictionary(D, 2 * D, "relu", site="L1.resid_post")            # relu(x) - relu(-x) = x: exact
    with torch.no_grad():
        exact.W_enc.copy_(torch.cat([torch.eye(D), -torch.eye(D)], 1))
        exact.W_dec.copy_(torch.cat([torch.eye(D), -torch.eye(D)], 0))
    exact.apply_b_dec_to_input = False
    ev = evaluate(m, exact, text=heldout(), tokens=512, ce_tokens=256, seq_len=64)
    assert ev.fvu < 1e-10 and abs(ev.ce_loss_recovered - 1) < 1e-4 and ev.kl_spliced < 1e-8
    assert ev.dead_fraction == 0 and 0 < ev.l0 <= D
    empty = Dictionary(D, 2 * D, "relu", site="L1.resid_post")            # all zeros: the zero ablation itself
    ev0 = evaluate(m, empty, text=heldout(), tokens=512, ce_tokens=256, seq_len=64)
    assert abs(ev0.ce_loss_recovered) < 1e-6 and ev0.l0 == 0 and ev0.dead_fraction == 1.0
    assert ev0.density_histogram["never_fired"] == 2 * D and abs(ev0.fvu - 1 - ev0.fvu * 0) < 2   # 1 + mean^2/var
    d = rand(Dictionary(D, 4 * D, "topk", k=6, site="L1.resid_post"), 5)
    ev = evaluate(m, d, text=heldout(), tokens=512, ce_tokens=256, seq_len=64)
    # naive: the same windows by hand
    ids = torch.stack([torch.tensor(w) for w in _windows(m, heldout(), 64, 512)])
    x = m.run(ids, cache=["L1.resid_post"])["L1.resid_post"][:, 1:].reshape(-1, D)
    with torch.no_grad():
        r = d(x)
    fvu = float((x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert abs(ev.fvu - fvu) < 1e-4 and ev.l0 == 6.0 and ev.tokens == x.shape[0]
    lp = F.log_softmax(m.run(ids[:4]).logits[:, 1:-1], -1)
    ce = float(-lp.gather(-1, ids[:4, 2:, None]).mean())
    assert abs(ev.ce_original - ce) < 1e-4
    assert ev.max_logit_diff_with_error < 1e-5 and abs(ev.ce_with_error - ev.ce_original) < 1e-5
    lz = F.log_softmax(spliced_logits(m, d, ids[:4], zero_ablation)[:, 1:-1], -1)
    assert abs(ev.ce_zero_ablated - float(-lz.gather(-1, ids[:4, 2:, None]).mean())) < 1e-4


def _windows(m, text, seq_len, tokens):
    ids = m.tokenizer("\n\n".join(text) + "\n\n", add_special_tokens=False)["input_ids"]
    return [ids[i:i + seq_len] for i in range(0, tokens, seq_len)]
