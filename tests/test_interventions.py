"""Every intervention kind, checked against a naive hand-written hook or weight change on the same inputs."""

import pytest
import torch

import mechanic
from mechanic import add, apply_fn, mean_ablate, project_out, replace, scale, zero
from mechanic.model.interventions import InterventionError
from mechanic.testing.tiny import left_padded, tiny_model
from naive import logits_with_hook

BATCH = left_padded([6, 4])


@pytest.fixture
def llama():
    return mechanic.load(tiny_model("llama"))


def naive(model, module, fn, pre=False):
    return logits_with_hook(model, BATCH, module, fn, pre)


def close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol


def test_zero_neuron_equals_zeroed_weight_column(llama):
    W = llama.layer_module(1, "mlp.down_proj").weight
    run = llama.run(BATCH, interventions=[zero("L1.neuron7")])
    saved = W[:, 7].clone()
    with torch.no_grad():
        W[:, 7] = 0
        ref = llama.hf(**llama.inputs(BATCH), use_cache=False).logits
        W[:, 7] = saved
    assert close(run.logits, ref)


def test_add_vector_at_position_equals_naive_hook(llama):
    v = torch.randn(64)

    def f(x):
        x[:, -1] += 2.0 * v
        return x
    ref = naive(llama, llama.layers[1], f)
    run = llama.run(BATCH, interventions=[add("L1.resid_post", v, coef=2.0, pos=-1)])
    assert close(run.logits, ref)
    # earlier positions are untouched: logits there equal the clean run
    clean = llama.run(BATCH)
    assert close(run.logits[:, :-1], clean.logits[:, :-1], 0.0)


def test_scale_head_equals_scaling_its_z_slice(llama):
    def f(x):
        x[..., 16:32] *= 0.3
        return x
    ref = naive(llama, llama.layer_module(0, "self_attn.o_proj"), f, pre=True)
    for site in ("L0.head1", "L0.head1.z"):
        run = llama.run(BATCH, interventions=[scale(site, 0.3)])
        assert close(run.logits, ref), site


def test_replace_patches_another_runs_value_per_row_and_position(llama):
    other = left_padded([6, 4], seed=5)
    source = llama.run(other, cache=["L2.resid_pre"])["L2.resid_pre"]

    def f(x):
        x[1, 3] = source[1, 3]
        return x
    ref = naive(llama, llama.layers[2], f, pre=True)
    run = llama.run(BATCH, interventions=[replace("L2.resid_pre", source[1, 3], pos=3, rows=1)])
    assert close(run.logits, ref, 0.0)


def test_mean_ablate_and_project_out(llama):
    mean = torch.randn(64)
    d = torch.randn(64)
    u = d / d.norm()

    def f(x):
        x[:] = mean
        return x
    assert close(llama.run(BATCH, interventions=[mean_ablate("L0.mlp_out", mean)]).logits,
                 naive(llama, llama.layer_module(0, "mlp"), f))

    def g(x):
        return x - (x @ u)[..., None] * u
    run = llama.run(BATCH, interventions=[project_out("L1.resid_post", d)], cache=["L1.resid_post"])
    assert close(run.logits, naive(llama, llama.layers[1], g))
    assert run["L1.resid_post"] @ u == pytest.approx(torch.zeros(2, 6), abs=1e-5)


def test_resid_mid_intervention_reaches_residual_and_mlp(llama):
    """Changing resid_mid must change both the MLP input and the residual carried past the MLP."""
    v = torch.randn(64)
    run = llama.run(BATCH, interventions=[add("L1.resid_mid", v)], cache=["L1.resid_mid", "L1.resid_post"])
    clean = llama.run(BATCH, cache=["L1.resid_mid"])
    assert close(run["L1.resid_mid"], clean["L1.resid_mid"] + v)
    layer = llama.layers[1]
    with torch.no_grad():
        expected = run["L1.resid_mid"] + layer.mlp(layer.post_attention_layernorm(run["L1.resid_mid"]))
    assert close(run["L1.resid_post"], expected)


def test_boolean_mask_positions_and_user_function(llama):
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2] = mask[1, 5] = True

    def f(x):
        x[0, 2] = x[0, 2] * -1
        x[1, 5] = x[1, 5] * -1
        return x
    run = llama.run(BATCH, interventions=[apply_fn("L0.attn_out", lambda x: -x, pos=mask)])
    h = llama.layer_module(0, "self_attn").register_forward_hook(lambda m, a, o: (f(o[0].clone()),) + o[1:])
    try:
        with torch.no_grad():
            ref = llama.hf(**llama.inputs(BATCH), use_cache=False).logits
    finally:
        h.remove()
    assert close(run.logits, ref)


def mixtral_logits_with(edit):
    """Logits of a fresh tiny Mixtral after editing its layer-1 expert weights in place."""
    m = mechanic.load(tiny_model("mixtral"))
    with torch.no_grad():
        edit(m.layer_module(1, m.arch.experts))
        return m.hf(**m.inputs(BATCH), use_cache=False).logits


def test_expert_and_expert_neuron_ablation_equal_zeroed_weights():
    m = mechanic.load(tiny_model("mixtral"))
    run = m.run(BATCH, interventions=[zero("L1.expert2")])
    assert close(run.logits, mixtral_logits_with(lambda ex: ex.down_proj.data[2].zero_()))
    run = m.run(BATCH, interventions=[zero("L1.expert.neuron5")])
    assert close(run.logits, mixtral_logits_with(lambda ex: ex.down_proj.data[:, :, 5].zero_()))
    run = m.run(BATCH, interventions=[zero("L1.expert3.neuron5")])
    assert close(run.logits, mixtral_logits_with(lambda ex: ex.down_proj.data[3, :, 5].zero_()))


def test_value_patch_on_q_matches_naive_attention():
    """Zeroing head 1's query makes its attention uniform over the visible keys."""
    m = mechanic.load(tiny_model("llama"))
    run = m.run(BATCH, interventions=[zero("L0.head1.q")], cache=["L0.head1.pattern", "L0.head0.pattern"])
    pat = run["L0.head1.pattern"]
    mask = m.inputs(BATCH)["attention_mask"]
    for b in range(2):
        for p in range(6):
            if not mask[b, p]:
                continue
            visible = mask[b, : p + 1].sum().item()
            row = pat[b, p, : p + 1][mask[b, : p + 1].bool()]
            assert torch.allclose(row, torch.full_like(row, 1 / visible), atol=1e-6)
    clean = m.run(BATCH, cache=["L0.head0.pattern"])
    assert close(run["L0.head0.pattern"], clean["L0.head0.pattern"], 1e-6)


def test_pattern_matches_eager_weights():
    sd = mechanic.load(tiny_model("qwen2"))
    eager = mechanic.load(tiny_model("qwen2", attn_implementation="eager"))
    a = sd.run(BATCH, cache=["L1.head.pattern"])["L1.head.pattern"]
    b = eager.run(BATCH, cache=["L1.head.pattern"])["L1.head.pattern"]
    real = sd.inputs(BATCH)["attention_mask"].bool()
    assert close(a[real], b[real], 1e-6)


def test_bad_intervention_is_clear(llama):
    with pytest.raises(ValueError, match="choose one of"):
        mechanic.Intervention("L0.resid_post", "multiply", 2)
    with pytest.raises(InterventionError, match="out of range"):
        llama.run(BATCH, interventions=[zero("L0.resid_post", pos=9)])
    with pytest.raises(InterventionError, match="Row .* out of range"):   # found by the plan-file fuzzer
        llama.run(BATCH, interventions=[scale("L0.head1", 0.0, rows=len(BATCH))])
    with pytest.raises(ValueError, match="can be read but not"):
        llama.run(BATCH, interventions=[zero("L0.head1.pattern")])
