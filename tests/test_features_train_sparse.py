"""The TopK trainer's sparse gradient (only the kept latents) equals dense autograd through the full pre-activations,
for one gather and for whole training runs with AuxK on."""

import copy

import torch

from mechanic.features import trainer as trainer_mod
from mechanic.features.trainer import DictConfig, Trainer, _PreAt


class _DensePreAt:
    """The naive reference: gather from s @ W_enc + b_enc with autograd through the dense product."""

    @staticmethod
    def apply(pre, s, W_enc, b_enc, idx):
        return (s @ W_enc + b_enc).gather(-1, idx)


def test_sparse_gather_gradients_equal_dense_autograd():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(37, 12, generator=g, requires_grad=True)
    W = torch.randn(12, 50, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True)
    with torch.no_grad():
        pre = s @ W + b
    idx = pre.topk(5, dim=-1).indices
    idx[3] = idx[4]                                 # repeated latents across rows accumulate
    w = torch.randn(37, 5, generator=g)
    grads = []
    for fn in (_PreAt, _DensePreAt):
        for t in (s, W, b):
            t.grad = None
        out = fn.apply(pre, s, W, b, idx)
        (out * w).sum().backward()
        grads.append((out.detach(), s.grad.clone(), W.grad.clone(), b.grad.clone()))
    for a, r in zip(*grads):
        assert (a - r).abs().max() < 1e-5
    assert grads[0][2].abs().sum() > 0 and (grads[0][2] != 0).sum() < W.numel()   # sparse, not empty


def test_topk_training_equals_dense_reference(monkeypatch):
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 16, generator=g) * 3 + 1 for _ in range(12)]
    # dead_after=64: latents that miss one batch count as dead, so AuxK runs on most steps
    fresh = Trainer(DictConfig("L1.resid_post", "topk", d_sae=96, k=4, lr=3e-3, dead_after=64), 16, 16,
                    total_tokens=64 * 12, batch_size=64, seed=0)
    runs = []
    for impl in (_PreAt, _DensePreAt):
        monkeypatch.setattr(trainer_mod, "_PreAt", impl)
        t = copy.deepcopy(fresh)
        t.init_from(batches[0], batches[0])
        fvus = [t.step(x, x)["fvu"] for x in batches]
        runs.append((t.finished(), fvus, float(t.since_fired.max())))
    (a, fa, da), (r, fr, dr) = runs
    assert da == dr and max(abs(x - y) for x, y in zip(fa, fr)) < 1e-5
    for (n, p), (_, q) in zip(a.named_parameters(), r.named_parameters()):
        assert (p - q).abs().max() < 1e-5, n
    assert fa[-1] < fa[0]                            # it learnt
