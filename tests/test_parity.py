"""Exact parity with the plain Hugging Face forward, decompositions that add up, batching, hook hygiene."""

import pytest
import torch

import mechanic
from mechanic.testing.tiny import left_padded, tiny_model

LENGTHS = [6, 3, 5]


def plain(model, batch):
    with torch.no_grad():
        return model.hf(**model.inputs(batch), use_cache=False).logits


def all_sites(model):
    sites = [str(s) for s in model.sites()]
    return sites + ["L0.head1.z", "L1.neuron" if not model.is_moe(1) else "L1.expert"]


def test_no_intervention_run_equals_hf_exactly(tiny):
    batch = left_padded(LENGTHS)
    cached = [s for s in all_sites(tiny) if not s.endswith(("expert", "router"))]
    run = tiny.run(batch, cache=cached)
    assert (run.logits - plain(tiny, batch)).abs().max().item() == 0.0
    if getattr(tiny.hf.config, "final_logit_softcapping", None) is None:  # the logits site is lm_head's output
        assert run["logits"].equal(run.logits)


def test_cached_residuals_match_hidden_states(tiny):
    """Layer outputs equal HF's own hidden_states (the last one is after the final norm in HF)."""
    batch = tiny.inputs(left_padded(LENGTHS))
    with torch.no_grad():
        hs = tiny.hf(**batch, output_hidden_states=True).hidden_states
    run = tiny.run(batch, cache=[f"L{i}.resid_post" for i in range(tiny.dims.n_layers - 1)] + ["L0.resid_pre"])
    for i in range(tiny.dims.n_layers - 1):
        assert run[f"L{i}.resid_post"].equal(hs[i + 1])
    assert run["L0.resid_pre"].equal(hs[0])


def test_heads_sum_to_attention_output(tiny):
    batch = left_padded(LENGTHS)
    run = tiny.run(batch, cache=["L1.head", "L1.attn_out", "L1.head2"])
    o = tiny.layer_module(1, tiny.arch.o_proj)
    bias = o.bias if getattr(o, "bias", None) is not None else 0.0
    total = run["L1.head"].sum(2) + bias
    assert run["L1.head"][:, :, 2].equal(run["L1.head2"])
    if tiny.arch.attn_write == tiny.arch.attn:
        assert (total - run["L1.attn_out"]).abs().max().item() < 1e-5
    else:  # Gemma 2: the residual write is the post-norm of the o_proj output
        norm = tiny.layer_module(1, tiny.arch.attn_write)
        with torch.no_grad():
            assert (norm(total) - run["L1.attn_out"]).abs().max().item() < 1e-5


def test_resid_mid_is_pre_plus_attn(tiny):
    if tiny.parallel:
        with pytest.raises(ValueError, match="parallel residual"):
            tiny.run(left_padded(LENGTHS), cache=["L1.resid_mid"])
        return
    run = tiny.run(left_padded(LENGTHS), cache=["L1.resid_pre", "L1.attn_out", "L1.resid_mid", "L1.mlp_out",
                                                  "L1.resid_post"])
    assert run["L1.resid_mid"].equal(run["L1.resid_pre"] + run["L1.attn_out"])
    assert run["L1.resid_post"].equal(run["L1.resid_mid"] + run["L1.mlp_out"])


def test_experts_weighted_by_router_reproduce_moe_block(tiny_moe):
    """Per-expert outputs x router weights (+ gated shared expert) equal the uninstrumented block output."""
    m = tiny_moe
    batch = left_padded(LENGTHS)
    reference = m.run(batch, cache=["L0.mlp_out", "L0.resid_mid"])
    sites = ["L0.expert", "L0.router", "L0.mlp_out"] + (["L0.shared_expert"] if m.arch.shared_expert else [])
    run = m.run(batch, cache=sites)
    total = (run["L0.expert"] * run["L0.router"][..., None]).sum(2)
    if m.arch.shared_expert:
        gate = m.layer_module(0, m.arch.shared_expert_gate)
        norm = m.layer_module(0, "post_attention_layernorm")
        with torch.no_grad():
            total = total + torch.sigmoid(gate(norm(reference["L0.resid_mid"]))) * run["L0.shared_expert"]
    assert (total - reference["L0.mlp_out"]).abs().max().item() < 1e-5
    assert (run["L0.mlp_out"] - reference["L0.mlp_out"]).abs().max().item() < 1e-5
    assert (run.logits - reference.logits).abs().max().item() < 1e-4
    # top-k routing: exactly k experts per token carry weight
    k = m.hf.config.num_experts_per_tok
    real = m.inputs(batch)["attention_mask"].bool()
    assert ((run["L0.router"] != 0).sum(-1)[real] == k).all()


def test_expert_neurons_reproduce_expert_output(tiny_moe):
    m = tiny_moe
    run = m.run(left_padded(LENGTHS), cache=["L0.expert2", "L0.expert2.neuron"])
    W = m.layer_module(0, m.arch.experts).down_proj[2]
    with torch.no_grad():
        assert (run["L0.expert2.neuron"] @ W.T - run["L0.expert2"]).abs().max().item() < 1e-5


def test_batch_equals_prompts_alone(tiny):
    """Left-padded batch of different lengths: last-token logits equal each prompt run alone (nnsight #672)."""
    batch = left_padded(LENGTHS)
    run = tiny.run(batch)
    for i, n in enumerate(LENGTHS):
        alone = batch["input_ids"][i:i + 1, -n:]
        single = tiny.run(alone)
        assert (run.logits[i, -1] - single.logits[0, -1]).abs().max().item() < 1e-4


def test_ragged_token_id_lists_are_left_padded():
    m = mechanic.load(tiny_model("llama"))
    batch = left_padded(LENGTHS)
    rows = [r[mask.bool()].tolist() for r, mask in zip(batch["input_ids"], batch["attention_mask"])]
    got = m.inputs(rows)
    assert torch.equal(got["attention_mask"], batch["attention_mask"].to(got["attention_mask"].dtype))
    assert torch.equal(m.run(rows).logits[:, -1], m.run(batch).logits[:, -1])


def test_hooks_removed_after_exception_and_interrupt(tiny):
    """After a failing run: no hooks, and transformers' attention/experts registries are as before."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from mechanic import apply_fn

    batch = left_padded(LENGTHS)
    registries = dict(ALL_ATTENTION_FUNCTIONS._local_mapping), dict(ALL_EXPERTS_FUNCTIONS._local_mapping)

    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        def explode(x, exc=exc):
            raise exc

        with pytest.raises(type(exc)):
            tiny.run(batch, cache=["L0.resid_post", "L1.head", "L1.head.q"] + (["L0.expert"] if tiny.is_moe(0) else []),
                     interventions=[apply_fn("L1.neuron3" if not tiny.is_moe(1) else "L1.mlp_out", explode)])
        assert tiny.hook_count() == 0
        assert (dict(ALL_ATTENTION_FUNCTIONS._local_mapping), dict(ALL_EXPERTS_FUNCTIONS._local_mapping)) == registries
    assert (tiny.run(batch).logits - plain(tiny, batch)).abs().max().item() == 0.0


@pytest.mark.real
def test_smollm2_parity(smollm2):
    prompts = ["The capital of France is", "When Mary and John went to the store, John gave a drink to",
               "1 2 3 4 5"]
    batch = smollm2.inputs(prompts)
    with torch.no_grad():
        ref = smollm2.hf(**batch, use_cache=False).logits
    run = smollm2.run(prompts, cache=[f"L{i}.resid_post" for i in range(30)] + ["L7.head", "L7.attn_out",
                                                                                "L7.neuron", "L7.head3.pattern"])
    assert (run.logits - ref).abs().max().item() == 0.0
    assert (run["L7.head"].sum(2) - run["L7.attn_out"]).abs().max().item() < 1e-5
    for i, p in enumerate(prompts):
        alone = smollm2.run(p)
        assert (run.logits[i, -1] - alone.logits[0, -1]).abs().max().item() < 1e-4
    assert smollm2.tokenizer.decode(run.logits[0, -1].argmax()) .strip() == "Paris"
    assert smollm2.hook_count() == 0
