"""Dead relu/jumprelu latents are resampled at the worst-reconstructed tokens: checked against the rule done by hand
(same draw, same directions and norms, biases and Adam moments reset), deterministic, and the latents fire again."""

import copy
import math

import pytest
import torch

from mechanic.features.trainer import DictConfig, Trainer


def data(n=256, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 3 + 1


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_dead_latents_are_resampled_as_the_rule_says(arch):
    x = data()
    t = Trainer(DictConfig("L0.resid_post", arch, d_sae=32, dead_after=200), 16, 16, total_tokens=10_000,
                batch_size=256, seed=3)
    t.init_from(x, x)
    t.step(x, x)                                 # Adam has moments everywhere
    kill = torch.arange(0, 32, 4)
    with torch.no_grad():
        t.dict.b_enc[kill] = -1e4                # these can never fire
    t.since_fired[kill] = 10_000
    d = t.dict
    twin = copy.deepcopy(t)
    twin._resample = lambda *a: None             # the same step without resampling: what the rule starts from
    twin.step(x, x)
    xs = x * t.s_in
    s = twin.dict.sae_in(xs)
    t.step(x, x)
    got_dead = torch.zeros(32, dtype=torch.bool)
    got_dead[kill] = True
    # every killed latent was reset: bias 0, encoder column unit input direction x 0.2 mean live norm
    assert torch.all(d.b_enc[kill] == 0) and torch.all(t.since_fired[kill] == 0)
    live = ~got_dead
    assert torch.allclose(d.W_enc[:, kill].norm(dim=0), 0.2 * twin.dict.W_enc[:, live].norm(dim=0).mean(), rtol=1e-5)
    # each encoder column is the direction of one batch token's encoder input (the drawn one)
    cos = torch.nn.functional.normalize(d.W_enc[:, kill].T, dim=-1) @ torch.nn.functional.normalize(s, dim=-1).T
    assert torch.allclose(cos.max(-1).values, torch.ones(len(kill)), atol=1e-5)
    for p in (d.W_enc, d.b_enc):
        st = t.opt.state[p]
        sl = (slice(None), kill) if p is d.W_enc else (kill,)
        assert torch.all(st["exp_avg"][sl] == 0) and torch.all(st["exp_avg_sq"][sl] == 0)
    if arch == "jumprelu":
        assert torch.allclose(t.log_threshold[kill], torch.full((len(kill),), math.log(0.1)))
    # they fire again on the batch, and live latents were not touched by the resampling
    new_acts = (d.sae_in(xs) @ d.W_enc + d.b_enc)[:, kill]
    assert (new_acts > (0.1 if arch == "jumprelu" else 0)).any(0).all()
    assert torch.equal(d.W_enc[:, live], twin.dict.W_enc[:, live])


def test_resampling_is_deterministic_and_topk_uses_auxk_instead():
    x = data(seed=1)

    def run(arch):
        t = Trainer(DictConfig("L0.resid_post", arch, d_sae=32, k=4, dead_after=100), 16, 16, total_tokens=10_000,
                    batch_size=256, seed=5)
        t.init_from(x, x)
        with torch.no_grad():
            t.dict.b_enc[:8] = -1e4
        for _ in range(3):
            t.step(x, x)
        return t
    a, b = run("relu"), run("relu")
    assert all(torch.equal(p, q) for p, q in zip(a.dict.parameters(), b.dict.parameters()))
    assert torch.all(a.dict.b_enc[:8] > -1e3)                  # resampled
    topk = run("topk")
    assert torch.all(topk.dict.b_enc[:8] < -1e3)               # AuxK trains them; nothing is re-initialised
