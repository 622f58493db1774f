"""One dictionary's optimisation: init from data, losses per architecture, Adam, decoder norms, dead latents.

Inputs are scaled so E||x|| = sqrt(d_in) (outputs likewise for transcoders); the factors are folded into
the weights when training ends, so saved files need no normalisation. Losses (on scaled values,
squared error summed over the vector and averaged over tokens):
  relu      ||e||^2 + l1 * sum_i a_i ||W_dec,i||          (Anthropic's April 2024 L1 form, decoder free)
  topk      ||e||^2 + aux * AuxK                           (Gao et al. 2024; decoder rows kept at norm 1)
  batchtopk ||e||^2 + aux * AuxK, top k*B over the batch   (Bussmann et al. 2024; threshold = running mean
                                                            of the smallest kept activation, SAELens's rule)
  jumprelu  ||e||^2 + l0 * L0 via a straight-through step  (Rajamanoharan et al. 2024; log-threshold learnt;
                                                            bandwidth 0.05 on unit-scale inputs, since the
                                                            paper's 0.001 leaves thresholds frozen for
                                                            billions of tokens, SAELens issue 494)
Dead latents (not fired for `dead_after` tokens): topk/batchtopk reconstruct the residual with their top
k_aux (AuxK); relu/jumprelu ones are resampled at the worst-reconstructed tokens of the batch (`_resample`).
Under torch.distributed each rank computes the loss of its block of each batch's rows and DistributedDataParallel
sums the gradients; what needs the whole batch (fired latents, AuxK's normaliser, BatchTopK's selection, the
rows a resampling draws) is reduced first, so every rank takes the one-process step and keeps the same weights.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mechanic import distributed as D
from mechanic.features.dictionary import Dictionary
from mechanic.features.errors import FeaturesError
from mechanic.features.saelens import fold_scale

DEFAULT_COEF = {"relu": 5.0, "jumprelu": 0.5, "topk": 1 / 32, "batchtopk": 1 / 32}


@dataclass
class DictConfig:
    """What to train: where (site, out_site for a transcoder), which architecture, how wide, how sparse."""

    site: str
    architecture: str = "topk"
    expansion: int = 16
    d_sae: int | None = None
    k: int = 32
    out_site: str | None = None
    skip: bool = False
    lr: float | None = None           # default 2e-4 * sqrt(2^14 / d_sae) (Gao et al. scaling)
    coef: float | None = None          # l1 (relu), l0 (jumprelu) or AuxK (topk, batchtopk) weight; DEFAULT_COEF
    dead_after: int = 1_000_000        # tokens without firing before a latent counts as dead
    bandwidth: float = 0.05            # jumprelu straight-through width
    init_threshold: float = 0.1        # jumprelu
    name: str | None = None

    def __post_init__(self):
        if self.architecture not in DEFAULT_COEF:
            raise FeaturesError(f"mechanic trains {', '.join(DEFAULT_COEF)} dictionaries; gated ones load and save "
                                f"but do not train (got {self.architecture!r}).")
        if self.skip and self.out_site is None:
            raise FeaturesError("skip=True is a transcoder's skip connection; give out_site too (e.g. L3.mlp_out).")

    def latents(self, d_in: int) -> int:
        """d_sae: given, or expansion x the input width."""
        return self.d_sae or self.expansion * d_in

    @property
    def label(self) -> str:
        where = self.site + (f"-{self.out_site}" if self.out_site else "")
        return self.name or f"{where}.{self.architecture}"

    def to_json(self) -> dict:
        return asdict(self)


class _Step(torch.autograd.Function):
    """Heaviside step of (x - theta) with a rectangle straight-through gradient to theta only."""

    @staticmethod
    def forward(ctx, x, theta, bw):
        ctx.save_for_backward(x, theta)
        ctx.bw = bw
        return (x > theta).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, theta = ctx.saved_tensors
        rect = ((x - theta).abs() < ctx.bw / 2).to(x.dtype)
        return None, (-(1.0 / ctx.bw) * rect * g).sum(tuple(range(g.dim() - 1))), None


class _JumpReLU(torch.autograd.Function):
    """x * H(x - theta): gradient to x through the mask, to theta by the rectangle estimator."""

    @staticmethod
    def forward(ctx, x, theta, bw):
        ctx.save_for_backward(x, theta)
        ctx.bw = bw
        return x * (x > theta).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, theta = ctx.saved_tensors
        rect = ((x - theta).abs() < ctx.bw / 2).to(x.dtype)
        return (x > theta).to(x.dtype) * g, (-(theta / ctx.bw) * rect * g).sum(tuple(range(g.dim() - 1))), None


class _PreAt(torch.autograd.Function):
    """Pre-activations `pre` (= s @ W_enc + b_enc, computed without a graph) at latents `idx` [B, k], with gradients
    to s, W_enc and b_enc that touch only those latents: O(B k d) instead of two dense [B, d] x [d, d_sae] products
    (a TopK step's gradient is zero at every latent it did not keep)."""

    @staticmethod
    def forward(ctx, pre, s, W_enc, b_enc, idx):
        ctx.save_for_backward(s, W_enc, idx)
        return pre.gather(-1, idx)

    @staticmethod
    def backward(ctx, g):
        s, W_enc, idx = ctx.saved_tensors
        n, k = idx.shape
        d_sae = W_enc.shape[1]
        g = g.contiguous()
        grad_s = grad_W = grad_b = None
        if ctx.needs_input_grad[1]:   # row b: sum_j g[b, j] W_enc[:, idx[b, j]]
            grad_s = F.embedding_bag(idx, W_enc.t().contiguous(), per_sample_weights=g, mode="sum")
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            flat = idx.reshape(-1)
            order = torch.argsort(flat, stable=True)   # CSR of g^T [d_sae, B]: latents in order, tokens within
            counts = torch.bincount(flat, minlength=d_sae)
            if ctx.needs_input_grad[2]:
                crow = torch.zeros(d_sae + 1, dtype=torch.long)
                torch.cumsum(counts, 0, out=crow[1:])
                rows = torch.div(order, k, rounding_mode="floor")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")   # "sparse CSR support is in beta"
                    gt = torch.sparse_csr_tensor(crow, rows, g.reshape(-1)[order], (d_sae, n))
                grad_W = (gt @ s).t().contiguous()
            if ctx.needs_input_grad[3]:
                grad_b = torch.zeros(d_sae, dtype=g.dtype).index_add_(0, flat, g.reshape(-1))
        return None, grad_s, grad_W, grad_b, None


def _summed(t: torch.Tensor) -> torch.Tensor:
    """t summed over ranks (all_reduce) under torch.distributed; t itself in one process."""
    if D.active():
        t = t.clone()
        dist.all_reduce(t)
    return t


def _sum_hook(state, bucket):
    """DDP communication hook: gradients summed over ranks, not averaged (each rank's loss already divides by
    the whole batch's size, so the sum is the one-process gradient even when shards differ in size)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


class _Objective(torch.nn.Module):
    """The trained parameters as one module whose forward is Trainer._loss: what DistributedDataParallel wraps (the
    dictionary's BatchTopK/JumpReLU threshold is set by rule, not by gradient, so it is left out)."""

    def __init__(self, trainer: "Trainer"):
        super().__init__()
        self.trained = torch.nn.ParameterList(trainer.params())
        self.loss = trainer._loss

    def forward(self, x, y, n):
        return self.loss(x, y, n)


class Trainer:
    """Trains one Dictionary on (x, y) batches; y is x for an SAE and the output site for a transcoder."""

    def __init__(self, cfg: DictConfig, d_in: int, d_out: int, total_tokens: int, batch_size: int, seed: int):
        self.cfg = cfg
        self.d_sae = cfg.latents(d_in)
        arch = cfg.architecture
        self.dict = Dictionary(d_in, self.d_sae, arch, k=cfg.k if arch in ("topk", "batchtopk") else None,
                               site=cfg.site, out_site=cfg.out_site, d_out=d_out, skip=cfg.skip,
                               transcoder=cfg.out_site is not None)
        if arch == "jumprelu":
            self.log_threshold = torch.nn.Parameter(torch.full((self.d_sae,), math.log(cfg.init_threshold)))
        self.coef = DEFAULT_COEF[arch] if cfg.coef is None else cfg.coef
        self.lr = cfg.lr or 2e-4 * math.sqrt(2 ** 14 / self.d_sae)
        self.total_steps = max(1, total_tokens // batch_size)
        self.step_no = 0
        self.s_in = self.s_out = 1.0
        self.since_fired = torch.zeros(self.d_sae, dtype=torch.long)
        self.batch_threshold = 0.0
        self.seed = seed
        self.opt: torch.optim.Adam | None = None   # fused: one pass over the weights (10x the default on CPU)
        self._ddp = None                            # DistributedDataParallel over the trained parameters, when used
        self.stats = {"fvu": float("nan"), "l0": float("nan"), "dead": 0.0}

    # ---- setup -----------------------------------------------------------
    def params(self) -> list[torch.nn.Parameter]:
        ps = [p for p in self.dict.parameters() if p is not self.dict._parameters.get("threshold")]
        return ps + ([self.log_threshold] if hasattr(self, "log_threshold") else [])

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Scale factors, b_dec = mean output, decoder rows random unit vectors, encoder = decoder transpose."""
        d = self.dict
        self.s_in = float(math.sqrt(d.d_in) / x.norm(dim=-1).mean().clamp_min(1e-12))
        self.s_out = self.s_in if not d.transcoder else float(math.sqrt(d.d_out) / y.norm(dim=-1).mean().clamp_min(1e-12))
        g = torch.Generator().manual_seed(self.seed)
        W = torch.randn(self.d_sae, d.d_out, generator=g)
        d.W_dec.copy_(W / W.norm(dim=-1, keepdim=True))
        if d.transcoder:
            E = torch.randn(d.d_in, self.d_sae, generator=g)
            d.W_enc.copy_(E / E.norm(dim=0, keepdim=True))
        else:
            d.W_enc.copy_(d.W_dec.T)
        d.b_dec.copy_((y * self.s_out).mean(0))
        if self.cfg.architecture == "relu":   # small decoder, as in the April update, so L1 is not gamed early
            d.W_dec.mul_(0.1)
            d.W_enc.mul_(0.1)
        self.opt = torch.optim.Adam(self.params(), lr=self.lr, betas=(0.9, 0.999), fused=True)

    def lr_at(self, step: int) -> float:
        """Linear warm-up over the first 1% of steps, linear decay to 0 over the last 20%."""
        warm = max(1, self.total_steps // 100)
        decay_from = int(self.total_steps * 0.8)
        f = min(1.0, (step + 1) / warm)
        if step >= decay_from:
            f *= max(0.0, (self.total_steps - step) / max(1, self.total_steps - decay_from))
        return self.lr * f

    # ---- one step --------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """One optimiser step on the batch (x, y). Under torch.distributed every rank is given the same whole batch,
        computes the loss terms of its contiguous block of rows (divided by the whole batch's size), and DDP sums
        the gradients, so every rank takes the same step as one process on the whole batch (sums reordered)."""
        d, arch, n = self.dict, self.cfg.architecture, x.shape[0]
        x, y = x * self.s_in, y * self.s_out
        lo, hi = D.bounds(n) if D.active() else (0, n)
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step_no)
        self.opt.zero_grad(set_to_none=True)
        loss, err, dead, info = self._objective()(x[lo:hi], y[lo:hi], n)
        loss.backward()
        if arch in ("topk", "batchtopk") and d.W_dec.grad is not None:   # keep rows on the unit sphere
            with torch.no_grad():
                W = d.W_dec
                d.W_dec.grad -= (d.W_dec.grad * W).sum(-1, keepdim=True) * W
        self.opt.step()
        with torch.no_grad():
            if arch in ("topk", "batchtopk"):
                d.W_dec.div_(d.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            if arch == "batchtopk":
                d.threshold.fill_(self.batch_threshold)
            if arch == "jumprelu":
                d.threshold.copy_(self.log_threshold.exp())
        if arch in ("relu", "jumprelu") and dead.any():   # the same decision on every rank (dead is global)
            self._resample(dead, x, D.gather_rows(err) if D.active() else err)
        self.step_no += 1
        with torch.no_grad():
            var = (y - y.mean(0)).pow(2).sum(-1).mean()
            total = _summed(loss.detach().reshape(1))
            self.stats = {"fvu": float(info["err2"] / n / var.clamp_min(1e-12)), "l0": float(info["l0"] / n),
                          "dead": float(dead.float().mean()), "loss": float(total[0])}
        return self.stats

    def _objective(self):
        """The loss function: plain in one process; under torch.distributed, wrapped once in DistributedDataParallel,
        which all-reduces the gradients of the trained parameters in buckets as backward produces them."""
        if not D.active():
            return self._loss
        if self._ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            # no buffer syncing: the trained parameters have no buffers, and every rank already holds the same weights.
            # Gradients are views into DDP's all-reduce buckets, not a second copy of them held between steps (the
            # weights are bit-identical either way)
            self._ddp = DistributedDataParallel(_Objective(self), forward_sync_buffers=False,
                                                gradient_as_bucket_view=True)
            self._ddp.register_comm_hook(None, _sum_hook)
        return self._ddp

    def _loss(self, x: torch.Tensor, y: torch.Tensor, n: int):
        """(loss terms of these rows / n, their errors, the dead mask, global counts) for rows of a batch of n.

        What depends on the whole batch is reduced over ranks before it is used: which latents fired (so
        `since_fired`, dead latents, AuxK and resampling agree everywhere), the squared error AuxK divides by,
        and BatchTopK's top k*n over the batch (`_batch_keep`)."""
        d, cfg, arch = self.dict, self.cfg, self.cfg.architecture
        if arch == "topk":   # dense pre-activations without a graph; gradients only where latents are kept
            s = d.sae_in(x)
            with torch.no_grad():
                pre = torch.addmm(d.b_enc, s, d.W_enc)
        else:
            pre = d.pre(x)
        aux = torch.zeros(())
        if arch == "topk":
            idx = pre.topk(cfg.k, dim=-1, sorted=False).indices
            vals = _PreAt.apply(pre, s, d.W_enc, d.b_enc, idx).relu()
            recon = F.embedding_bag(idx, d.W_dec, per_sample_weights=vals, mode="sum") + d.b_dec
            fired = torch.zeros(self.d_sae, dtype=torch.bool).index_fill_(0, idx[vals > 0].unique(), True)
            l0 = (vals > 0).sum()
        else:
            acts = pre.relu()
            if arch == "batchtopk":
                acts = acts * self._batch_keep(acts.detach(), cfg.k * n)
            elif arch == "relu":
                aux = (acts * d.W_dec.norm(dim=-1)).sum() / n
            else:  # jumprelu
                theta = self.log_threshold.exp()
                aux = _Step.apply(pre, theta, cfg.bandwidth).sum() / n
                acts = _JumpReLU.apply(acts, theta, cfg.bandwidth)
            recon = acts @ d.W_dec + d.b_dec
            fired = (acts > 0).any(0)
            l0 = (acts > 0).sum()
        recon = recon + d.skip(x)
        err = y - recon
        err2 = err.pow(2).sum(-1)
        mse = err2.sum() / n
        counts = _summed(torch.cat([fired.double(), err2.detach().sum().double().reshape(1), l0.double().reshape(1)]))
        fired, info = counts[:-2] > 0, {"err2": counts[-2], "l0": counts[-1]}
        self.since_fired += n
        self.since_fired[fired] = 0
        dead = self.since_fired >= cfg.dead_after
        if arch in ("topk", "batchtopk") and dead.any():
            k_aux = min(int(dead.sum()), max(1, d.d_in // 2))
            masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
            av, ai = masked.topk(k_aux, dim=-1, sorted=False)
            if arch == "topk":
                av = _PreAt.apply(pre, s, d.W_enc, d.b_enc, ai)
            aux_recon = F.embedding_bag(ai, d.W_dec, per_sample_weights=av.relu(), mode="sum")
            e = err.detach()
            aux = (e - aux_recon).pow(2).sum() / n / (info["err2"].float() / n).clamp_min(1e-12)
        return mse + self.coef * aux, err.detach(), dead, info

    def _batch_keep(self, acts: torch.Tensor, keep: int) -> torch.Tensor:
        """BatchTopK's mask: the `keep` largest activations of the whole batch (rows on every rank), and the running
        threshold's update from the smallest positive one kept. Each rank offers its own top `keep`; every rank
        takes the top `keep` of all offers, so the mask is the one-process top k*B (up to exact ties)."""
        flat = acts.flatten()
        offer = flat.topk(min(keep, flat.numel()), sorted=False).values
        every = D.gather_rows(offer) if D.active() else offer
        top = every if every.numel() <= keep else every.topk(keep, sorted=False).values
        kept = top[top > 0]
        if kept.numel():   # first batch sets it, then a running mean (SAELens's topk_threshold_lr = 0.01)
            low = float(kept.min())
            first, old = self.step_no == 0, self.batch_threshold
            self.batch_threshold = low if first else old + 0.01 * (low - old)
        return (acts >= top.min()).to(acts.dtype)

    @torch.no_grad()
    def _resample(self, dead: torch.Tensor, x: torch.Tensor, err: torch.Tensor) -> None:
        """Dead relu/jumprelu latents start again at the batch's worst-reconstructed tokens (Anthropic, 2023): each
        takes a token drawn with probability proportional to its squared error (a generator seeded by seed and
        step, so a resumed run draws the same); encoder column along the token's input at 0.2x the mean live
        column norm, decoder row along its error at the mean live row norm, bias (and threshold) and their Adam
        moments reset."""
        d, idx = self.dict, dead.nonzero().squeeze(1)
        weight = err.pow(2).sum(-1)
        if not float(weight.sum()) > 0:
            return
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step_no)
        rows = torch.multinomial(weight, len(idx), replacement=True, generator=g)
        live = ~dead
        unit = lambda v: v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
        enc_norm = float(d.W_enc[:, live].norm(dim=0).mean()) if live.any() else 1.0
        dec_norm = float(d.W_dec[live].norm(dim=-1).mean()) if live.any() else 1.0
        d.W_enc[:, idx] = (unit(d.sae_in(x[rows])) * 0.2 * enc_norm).T
        d.W_dec[idx] = unit(err[rows]) * dec_norm
        d.b_enc[idx] = 0.0
        touched = [(d.W_enc, (slice(None), idx)), (d.W_dec, (idx,)), (d.b_enc, (idx,))]
        if hasattr(self, "log_threshold"):
            self.log_threshold[idx] = math.log(self.cfg.init_threshold)
            d.threshold.copy_(self.log_threshold.exp())
            touched.append((self.log_threshold, (idx,)))
        for p, where in touched:
            for name in ("exp_avg", "exp_avg_sq"):
                if name in self.opt.state.get(p, {}):
                    self.opt.state[p][name][where] = 0.0
        self.since_fired[idx] = 0

    # ---- finishing -------------------------------------------------------
    def finished(self) -> Dictionary:
        """A copy of the dictionary in raw (unscaled) units, ready to save or splice in."""
        import copy

        out = copy.deepcopy(self.dict)
        with torch.no_grad():
            if self.cfg.architecture == "batchtopk":
                out.threshold.fill_(self.batch_threshold)
            # scaled input x' = s_in x: pre-activations see the same values after folding s_in into W_enc,
            # except b_dec (applied to the input of an SAE), which is divided with the output scale.
            fold_scale(out, self.s_in, self.s_out)
        out.metadata.update({"scale_in": self.s_in, "scale_out": self.s_out})
        return out

    # ---- state (checkpoints, no pickle) ------------------------------------
    def state(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"{prefix}.p.{n}": p.detach().clone() for n, p in self.dict.named_parameters()}
        if hasattr(self, "log_threshold"):
            tensors[f"{prefix}.log_threshold"] = self.log_threshold.detach().clone()
        tensors[f"{prefix}.since_fired"] = self.since_fired.clone()
        sd = self.opt.state_dict() if self.opt is not None else {"state": {}, "param_groups": []}
        for i, st in sd["state"].items():
            for name, t in st.items():
                tensors[f"{prefix}.opt.{i}.{name}"] = t.detach().clone() if torch.is_tensor(t) else torch.tensor(t)
        scalars = {"step_no": self.step_no, "s_in": self.s_in, "s_out": self.s_out,
                   "batch_threshold": self.batch_threshold, "param_groups": sd["param_groups"],
                   "initialised": self.opt is not None}
        return tensors, scalars

    def load_state(self, prefix: str, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        with torch.no_grad():
            for n, p in self.dict.named_parameters():
                p.copy_(tensors[f"{prefix}.p.{n}"])
            if hasattr(self, "log_threshold"):
                self.log_threshold.copy_(tensors[f"{prefix}.log_threshold"])
        self.since_fired = tensors[f"{prefix}.since_fired"].clone()
        self.step_no, self.s_in, self.s_out = scalars["step_no"], scalars["s_in"], scalars["s_out"]
        self.batch_threshold = scalars["batch_threshold"]
        if scalars["initialised"]:
            self.opt = torch.optim.Adam(self.params(), lr=self.lr, betas=(0.9, 0.999), fused=True)
            state: dict = {}
            for key, t in tensors.items():
                if key.startswith(f"{prefix}.opt."):
                    i, name = key[len(prefix) + 5:].split(".", 1)
                    state.setdefault(int(i), {})[name] = t.clone()
            self.opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})
