"""The engine on the real default model (SmolLM2-135M-Instruct): interventions, gradients, early stop, steering."""

import pytest
import torch

from mechanic import add, scale, zero
from naive import logits_with_hook

pytestmark = pytest.mark.real
PROMPTS = ["The capital of France is", "When Mary and John went to the store, John gave a drink to"]


def plain_with_hook(model, module, fn, pre=False):
    return logits_with_hook(model, PROMPTS, module, fn, pre)


def test_head_ablation_and_steering_equal_naive_hooks(smollm2):
    def zero_head(z):
        z[..., 4 * 64:5 * 64] = 0
        return z
    ref = plain_with_hook(smollm2, smollm2.layer_module(12, "self_attn.o_proj"), zero_head, pre=True)
    run = smollm2.run(PROMPTS, interventions=[zero("L12.head4")])
    assert (run.logits - ref).abs().max().item() < 1e-4
    v = torch.randn(576)

    def steer(x):
        x[:, -1] += 4 * v
        return x
    ref = plain_with_hook(smollm2, smollm2.layers[10], steer)
    run = smollm2.run(PROMPTS, interventions=[add("L10.resid_post", v, coef=4.0, pos=-1)])
    assert (run.logits - ref).abs().max().item() < 1e-4


def test_gradient_at_residual_equals_autograd(smollm2):
    tok = smollm2.tokenizer
    paris = tok(" Paris")["input_ids"][0]

    def metric(logits):
        return logits[:, -1, paris].sum()
    run = smollm2.run(PROMPTS, cache=["L15.resid_post", "L20.neuron"], grad=metric)
    saved = {}

    def keep(module, args, out):
        out.retain_grad()
        saved["x"] = out
    h = smollm2.layers[15].register_forward_hook(keep)
    try:
        metric(smollm2.hf(**smollm2.inputs(PROMPTS), use_cache=False).logits).backward()
    finally:
        h.remove()
        smollm2.hf.zero_grad(set_to_none=True)
    assert (run.grads["L15.resid_post"] - saved["x"].grad).abs().max().item() < 1e-5
    assert run.grads["L20.neuron"].shape == (2, run["L20.neuron"].shape[1], 1536)


def test_truncated_forward_and_scaled_mlp(smollm2):
    full = smollm2.run(PROMPTS, cache=["L5.resid_post"])
    early = smollm2.run(PROMPTS, cache=["L5.resid_post"], stop_at="auto")
    assert early.logits is None and early["L5.resid_post"].equal(full["L5.resid_post"])
    doubled = smollm2.run(PROMPTS, interventions=[scale("L3.mlp_out", 2.0)], cache=["L3.mlp_out"])
    base = smollm2.run(PROMPTS, cache=["L3.mlp_out"])
    assert (doubled["L3.mlp_out"] - 2 * base["L3.mlp_out"]).abs().max().item() < 1e-5


def test_steered_generation_changes_text_and_leaves_no_hooks(smollm2):
    kw = dict(max_new_tokens=12, do_sample=False)
    plain = smollm2.generate(PROMPTS[:1], **kw)
    run = smollm2.run(["I love this, it is wonderful and happy", "I hate this, it is awful and sad"],
                      cache=["L12.resid_post"], pos=-1)
    direction = run["L12.resid_post"][1] - run["L12.resid_post"][0]
    steered = smollm2.generate(PROMPTS[:1], interventions=[add("L12.resid_post", direction, coef=3.0)], **kw)
    assert not steered.equal(plain)
    assert smollm2.hook_count() == 0
