"""Memory planning: an operation's peak bytes estimated from the model's sizes and the request, before it runs.

Estimates: cache, patching, gradient (AtP), edges (EAP / EAP-IG), training (one step), training_run (a whole
dictionary-training run, per torch.distributed rank, planned by plan_training). Each is an `Estimate`: bytes held
whatever the batch (`fixed`), bytes per batch row (`per_row`), and a batch-independent phase that may be the
peak instead (`floor`, e.g. the unpatched runs of a patching sweep). `plan_batch` picks the largest batch that
fits a budget (by default 80% of `available()` memory on the model's device) or raises `MemoryPlanError`, one
paragraph saying what would fit. The counts follow the Hugging Face forward (what a decoder layer keeps alive at
its widest point, what autograd saves for backward) and are checked against measured peaks in
tests/test_memory.py and benchmarks/memory_planner.py (within 25%).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mechanic import distributed as D

GiB = 2 ** 30
MiB = 2 ** 20
BUDGET_FRACTION = 0.8   # of available memory, leaving room for what the estimates do not count

# Per token, in units of the widths: what one decoder layer keeps alive at its widest point without gradients
# (the MLP's act(gate), up and their product, 3 x d_mlp, 2 for an ungated MLP; the layer input, the residual, the
# normed input and the output, 4 x d_model), and what autograd saves for backward with frozen weights (the two
# norms' inputs, 2 x d_model; SDPA's q, k, v and output with k and v repeated to every head under a padding mask,
# 4 x heads x d_head; the MLP's gate input to the activation, act(gate) and up, 3 x d_mlp, 1 ungated). Counted from
# the Llama / GPT-2 forwards and checked against measured peaks (tests/test_memory.py).
_FWD_D = 4
_FWD_MLP = {True: 3, False: 2}
_SAVE_D = 2
_SAVE_HEADS = 4
_SAVE_MLP = {True: 3, False: 1}


class MemoryPlanError(MemoryError, ValueError):
    """An operation that would not fit in memory even at batch 1 (a ValueError too, so the CLI prints it as one
    paragraph without a traceback)."""


@dataclass(frozen=True)
class Sizes:
    """What the estimates need to know about a model: widths, depth, vocabulary, bytes per value."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int          # dense FFN width (MoE: the routed experts' widths a token uses, plus a shared expert)
    vocab: int
    itemsize: int       # bytes per activation value (the model's floating dtype)
    param_bytes: int
    gated: bool         # gate_proj * up_proj MLP (Llama family) rather than fc -> act -> proj (GPT-2, NeoX)
    eager: bool         # attention materialises [batch, heads, seq, seq] scores


def sizes(model) -> Sizes:
    """The Sizes of a mechanic Model (read off its dims, config and parameters)."""
    d, cfg = model.dims, model.hf.config
    params = list(model.hf.parameters())
    floats = [p for p in params if p.is_floating_point()]
    itemsize = floats[0].element_size() if floats else 4
    if d.d_mlp is not None:
        d_mlp = d.d_mlp
    else:
        top = getattr(cfg, "num_experts_per_tok", 1) or 1
        d_mlp = (d.d_expert or 0) * top + (d.d_shared or 0)
    mlp = model.layer_module(0, model.arch.mlp)
    gated = d.d_mlp is None or any("gate" in n for n, _ in (mlp.named_children() if mlp is not None else ()))
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    return Sizes(d.n_layers, d.d_model, d.n_heads, d.n_kv_heads, d.d_head, d_mlp, d.vocab, itemsize,
                 sum(p.numel() * p.element_size() for p in params), gated, impl == "eager")


@dataclass(frozen=True)
class Estimate:
    """Peak bytes of one operation as a function of its batch b: max(floor, fixed + b x per_row + b x spanned
    layers x per_row_layer, each other phase's fixed + b x per_row), where a batch of b rows spans min(layers,
    ceil(b / rows_per_layer) + 1) layers (a patching sweep's batch copies the stored outputs of each layer its rows
    start below)."""

    what: str
    fixed: int
    per_row: int
    floor: int = 0
    rows: int = 1                   # rows of the whole request (the batch never exceeds it)
    parts: dict = field(default_factory=dict)   # named contributions, for the error message and the docs
    per_row_layer: int = 0
    rows_per_layer: int = 1
    layers: int = 0
    phases: tuple = ()              # other phases whose peak also grows with the batch: (fixed, per_row) pairs

    def at(self, batch: int) -> int:
        """Peak bytes with batches of `batch` rows."""
        b = max(1, min(batch, self.rows))
        span = min(self.layers, -(-b // max(1, self.rows_per_layer)) + 1)
        return max(self.floor, self.fixed + self.per_row * b + self.per_row_layer * b * span,
                   *(f + p * b for f, p in self.phases))


# ---------------------------------------------------------------- pieces
def _layer_work(s: Sizes, seq: int) -> int:
    """Bytes one row keeps alive inside a decoder layer at its widest point (no gradients)."""
    scores = s.n_heads * seq if s.eager else 0       # eager attention's [heads, seq, seq] scores, per token
    return seq * s.itemsize * (_FWD_D * s.d_model + _FWD_MLP[s.gated] * s.d_mlp + scores)


def _forward(s: Sizes, seq: int, logits: int) -> int:
    """Bytes one row's forward keeps alive at its peak: the widest layer, or the logits of `logits` positions
    next to the final hidden states."""
    return max(_layer_work(s, seq), logits * s.vocab * s.itemsize + 2 * seq * s.d_model * s.itemsize)


def _saved(s: Sizes, seq: int, layers: int) -> int:
    """Bytes autograd keeps for backward, per row, through `layers` decoder layers (weights frozen)."""
    per_tok = _SAVE_D * s.d_model + _SAVE_HEADS * s.n_heads * s.d_head + _SAVE_MLP[s.gated] * s.d_mlp
    scores = s.n_heads * seq if s.eager else 0       # eager keeps the softmax output
    return layers * seq * s.itemsize * (per_tok + scores)


def _kv(s: Sizes, seq: int, layers: int) -> int:
    """Bytes of one row's key/value cache."""
    return 2 * layers * s.n_kv_heads * s.d_head * seq * s.itemsize


def _site_bytes(model, sites, positions: int, itemsize: int, alias: bool = False) -> int:
    """Bytes of one row of each site at `positions` positions, summed. alias: skip the sites that are a decoder
    layer's output or input (resid_post, resid_pre after layer 0), which a run keeping every layer's output holds
    anyway."""
    total = 0
    for site in sites:
        s = model.check(site)
        if alias and (s.kind == "resid_post" or (s.kind == "resid_pre" and s.layer > 0)):
            continue
        total += math.prod(model.shape(s, 1, positions))
    return total * itemsize


def _grad_bytes(model, sites, seq: int, itemsize: int) -> int:
    """Bytes of one row's gradients at `sites`: a head contribution's is a view of its layer's attention-output
    gradient."""
    total = 0
    for site in sites:
        s = model.check(site)
        contribution = s.kind == "head" and s.part is None
        total += seq * model.dims.d_model if contribution else math.prod(model.shape(s, 1, seq))
    return total * itemsize


def _last_layer(model, sites) -> int | None:
    """The last layer any site needs (None: a site needs the whole forward, e.g. logits)."""
    layers = []
    for site in sites:
        s = model.check(site)
        if s.layer is None and s.kind != "embed":
            return None
        layers.append(s.layer or 0)
    return max(layers, default=0)


def _positions(pos, seq: int) -> int:
    """How many positions a cache keeps per row: every one (None), one (an int) or the listed ones."""
    if pos is None:
        return seq
    if isinstance(pos, int):
        return 1
    if isinstance(pos, slice):
        return len(range(*pos.indices(seq)))
    return len(pos)


# ---------------------------------------------------------------- estimates
def cache(model, sites, rows: int, seq: int, pos=None, dtype: torch.dtype | None = None,
          stop: bool = True) -> Estimate:
    """Caching `sites` for `rows` prompts of `seq` tokens (at `pos`), in batches (mechanic.model.parallel.collect):
    the whole cache held (in `dtype`, default the model's), plus one batch's forward (stopped after the last layer a
    site needs when `stop`, else with full logits) and that batch's own values."""
    s = sizes(model)
    sites = [str(x) for x in ([sites] if isinstance(sites, str) else sites)]
    keep = _positions(pos, seq)
    out_item = torch.empty((), dtype=dtype).element_size() if dtype is not None else s.itemsize
    row_out = _site_bytes(model, sites, keep, out_item)
    row_run = _site_bytes(model, sites, keep, s.itemsize)
    last = _last_layer(model, sites) if stop else None
    work = _forward(s, seq, 0 if last is not None else seq)
    parts = {"cache": rows * row_out, "batch forward, per row": work, "batch values, per row": row_run}
    return Estimate(f"cache of {len(sites)} site(s) x {rows} rows x {keep} positions", rows * row_out,
                    work + row_run, rows=rows, parts=parts)


def patching(model, n: int, seq: int, sites=(), corrupted: bool = True, rows_per_layer: int | None = None,
             full_logits: bool = False) -> Estimate:
    """A patching sweep (mechanic.locate.causal.patch) over `n` examples of `seq` tokens. Held throughout: the
    unpatched runs it reuses (key/value cache, every layer's output, the patched sites' values, and their logits:
    at the last position, or at every one with full_logits; clean and corrupted). Per patched row, counted as a forward from column 0 (the widest): the new keys/values of
    every layer, one layer's forward, last-position logits, and a copy of the stored output of each layer the
    batch's rows start below (a batch of b rows spans about b / rows_per_layer layers; rows_per_layer is the
    patched runs per layer, by default n: one unit per layer at one column)."""
    s = sizes(model)
    L = s.n_layers
    logits = (seq if full_logits else 1) * s.vocab * s.itemsize
    held_row = _kv(s, seq, L) + L * seq * s.d_model * s.itemsize + logits \
        + _site_bytes(model, list(sites), seq, s.itemsize, alias=True)
    runs = 2 if corrupted else 1
    held = runs * n * held_row
    floor = held - n * logits + n * _forward(s, seq, seq if full_logits else 1)   # the last unpatched run at its peak
    per_row = _kv(s, seq, L) + _layer_work(s, seq) + s.vocab * s.itemsize
    return Estimate(f"patching sweep over {n} examples x {seq} positions", held, per_row, floor, rows=10 ** 9,
                    parts={"unpatched runs": held, "patched forward, per row": per_row},
                    per_row_layer=seq * s.d_model * s.itemsize, rows_per_layer=rows_per_layer or n, layers=L)


def gradient(model, sites, rows: int, seq: int) -> Estimate:
    """Attribution patching (mechanic.locate.gradient.atp) over `rows` examples of `seq` tokens, in batches. Per row:
    a run without gradients (its site values and full logits kept) and a run with gradients at its peak, the start
    of backward: autograd's saved tensors from the first cached layer on, the logits and their gradient, the
    sites' values and gradients (a head contribution also saves its layer's z). atp caches `L{l}.head.z` for heads."""
    s = sizes(model)
    sites = [str(x) for x in ([sites] if isinstance(sites, str) else sites)]
    first = min((model.check(x).layer or 0 for x in sites), default=0)
    vals = _site_bytes(model, sites, seq, s.itemsize)
    logits = seq * s.vocab * s.itemsize
    heads = sum(model.check(x).kind == "head" and model.check(x).part is None for x in sites) \
        * seq * s.n_heads * s.d_head * s.itemsize
    clean = vals + logits
    graph = _saved(s, seq, s.n_layers - first) + heads + 2 * logits + vals + _grad_bytes(model, sites, seq, s.itemsize)
    per_row = clean + graph
    return Estimate(f"attribution patching of {len(sites)} site(s) x {seq} positions", 0, per_row, rows=rows,
                    parts={"run without gradients, per row": clean, "gradient run, per row": graph})


def _graph_run(s: Sizes, seq: int, padded: bool) -> int:
    """Bytes per row of one gradient run of the component graph (mechanic.locate.gradient.receiver_grads) at its
    peak: the senders' outputs, the receivers' inputs, their gradients and the gradients' copy (4 x [nodes, seq,
    d_model]); what autograd saves, per layer, for the heads' run on H copies of the residual (q and the attention
    output, k and v, repeated to every head under a padding mask; rotary cos and sin) and for the MLP's run (its
    input and _SAVE_MLP x d_mlp); and what the measured peak holds beyond those tensors (not a Python-visible or
    collectable object; 70-110 MiB on SmolLM2 for 4 IOI prompts of 14 tokens, varying from run to run), counted as
    each head copy's normed input and, in the MLP's call, its normed input, q, k, v, attention output and zeroed
    projection. Checked against measured peaks in tests/test_memory.py."""
    H, dh = s.n_heads, s.d_head
    nodes = 1 + s.n_layers * (H + 1)
    kv = H if padded else s.n_kv_heads
    scores = H * seq if s.eager else 0
    heads = H * (2 * H * dh + 2 * kv * dh + 2 * dh + scores + s.d_model)
    mlp = s.d_model + _SAVE_MLP[s.gated] * s.d_mlp + 2 * s.d_model + 2 * H * dh + 2 * s.n_kv_heads * dh
    return seq * s.itemsize * (4 * nodes * s.d_model + s.n_layers * (heads + mlp))


def edges(model, rows: int, seq: int, ig_steps: int | None = None, ig_batch: int = 1, padded: bool = True) -> Estimate:
    """EAP / EAP-IG over the component graph (mechanic.locate.gradient.eap) for `rows` examples of `seq` tokens, in
    chunks of examples. Per example, held through its chunk: the clean and corrupted runs' full logits, the layer
    calls captured from the clean run (each layer's input), and one run's sender outputs [nodes, seq, d_model] (EAP);
    plus the gradient run of the graph (_graph_run). EAP-IG runs ig_batch points at a time as extra rows (each with
    its own copy of the layer calls), and while a later run goes on it also holds the other run's sender outputs,
    the summed gradients and the previous run's gradients (ig_batch x [nodes, seq, d_model]). padded: the prompts
    are left padded (attention under a mask repeats k and v to every head)."""
    s = sizes(model)
    item, d, L = s.itemsize, s.d_model, s.n_layers
    block = (1 + L * (s.n_heads + 1)) * seq * d * item            # one [nodes, seq, d_model] per row
    k = 1 if ig_steps is None else min(ig_batch, ig_steps)
    held = 2 * seq * s.vocab * item + L * seq * d * item           # full logits of both runs, captured layer inputs
    tiled = L * k * seq * (d + 2 * s.d_head) * item if k > 1 else 0
    run = k * _graph_run(s, seq, padded) + tiled
    if ig_steps is None or ig_steps <= k:
        outs = block                                               # the other run's sender outputs
    else:
        outs = 3 * block + k * block                               # both runs' outputs, summed and previous gradients
    per_row = held + outs + run
    what = "EAP" if ig_steps is None else f"EAP-IG ({ig_steps} points, {k} per run)"
    return Estimate(f"{what} over the component graph x {seq} positions", 0, per_row, rows=rows,
                    parts={"logits and layer calls, per example": held, "graph outputs, per example": outs,
                           "graph gradient run, per example": run})


# [batch, d_sae] tensors alive at a training step's peak, by architecture (see training)
_WIDE = {"topk": 1, "batchtopk": 6, "relu": 4, "jumprelu": 7}


def _dict_params(d_in: int, d_sae: int, d_out: int, architecture: str, skip: bool = False) -> int:
    """Values of one trained dictionary's parameters (encoder, decoder, biases, a transcoder's skip, a JumpReLU's
    threshold)."""
    return d_in * d_sae + d_sae * d_out + d_sae + d_out + (d_in * d_out if skip else 0) \
        + (d_sae if architecture == "jumprelu" else 0)


def training(d_in: int, d_sae: int, batch: int, d_out: int | None = None, architecture: str = "topk",
             itemsize: int = 4, skip: bool = False, moments: bool = False) -> Estimate:
    """One step of dictionary training (mechanic.features.trainer.Trainer, Adam), weights included: the first
    (moments=False) or a later one, with Adam's two moments held from the steps before (moments=True). Its peak is
    the backward (weights and their gradients, 2 x the parameters, plus the batch's [batch, d_sae] tensors, and a
    few [batch, d_in] copies: scaled inputs, the reconstruction, its error), or Adam's step (weights, gradients and
    two moments: 4 x the parameters). [batch, d_sae] tensors alive at the peak: one for TopK, whose backward is
    sparse; for the dense backwards, pre-activations, latents and their gradients (and BatchTopK's mask, JumpReLU's
    step), counted from measured steps of a 256 -> 4096 dictionary (batch 2048): 6 BatchTopK, 4 ReLU, 7 JumpReLU."""
    d_out = d_out or d_in
    params = _dict_params(d_in, d_sae, d_out, architecture, skip) * itemsize
    per_row = (_WIDE.get(architecture, 7) * d_sae + 2 * d_in + 2 * d_out) * itemsize
    held = (4 if moments else 2) * params
    return Estimate(f"{architecture} dictionary training step ({d_in} -> {d_sae}, batch {batch})", held,
                    per_row, floor=4 * params, rows=batch,
                    parts={"weights and gradients" + (" and Adam moments" if moments else ""): held,
                           "batch, per row": per_row, "Adam step (weights, gradients, moments)": 4 * params})


def _split(per_item: int, ranks: int) -> tuple[int, int]:
    """(fixed, per item) with fixed + b x per item >= ceil(b / ranks) x per_item: a rank's block of b items, bounded
    linearly in b (exact when ranks divides b)."""
    return -(-per_item * (ranks - 1) // ranks), -(-per_item // ranks)


def _rank_step(d_in: int, d_sae: int, d_out: int, architecture: str, skip: bool, batch: int, ranks: int) -> int:
    """Bytes a later training step adds (training(moments=True).per_row x batch in one process). Under
    torch.distributed a rank scales the whole batch (its [batch, d_in] and [batch, d_out] copies) and computes the rest
    on its block of rows; while DistributedDataParallel copies each fresh gradient into its all-reduce bucket (the
    gradients held between steps are views of the buckets) one more copy of a gradient exists: measured, the largest
    weight's for TopK (its sparse backward makes W_dec's and W_enc's gradients one after the other), every weight's
    for the dense backwards; a relu/jumprelu resampling joins the batch's errors (D.gather_rows: the whole, every
    rank's padded block, its own)."""
    est = training(d_in, d_sae, batch, d_out, architecture, 4, skip, moments=True)
    if ranks == 1:
        return est.per_row * batch
    whole = (d_in + d_out) * 4
    mine = -(-batch // ranks)
    grads = 4 * (max(d_in, d_out) * d_sae if architecture == "topk" else _dict_params(d_in, d_sae, d_out, architecture,
                                                                                       skip))
    resample = (2 * batch + 2 * mine) * d_out * 4 if architecture in ("relu", "jumprelu") else 0
    return whole * batch + max((est.per_row - whole) * mine + grads, resample)


def training_run(model, dictionaries, widths, batch: int, buffer: int, seq: int, skip_first: int = 1,
                 checkpoint: bool = False, ranks: int | None = None, rank: int | None = None) -> Estimate:
    """A whole dictionary-training run (mechanic.features.train.train) as a function of its forward batch (windows
    of `seq` tokens per forward), on rank `rank` of `ranks` data-parallel ranks (ranks None: the torch.distributed
    world and this process's rank when train would split its work, else 1; rank None: 0, the rank that writes files
    and has the largest peak). `dictionaries`: one (d_in, d_sae, d_out, architecture, skip) per
    dictionary; `widths`: the widths of the sites the buffer keeps. Held throughout: every dictionary's weights,
    gradients and Adam moments (4 x its parameters). The shuffle buffer's float32 rows reach `buffer` plus one
    forward's tokens. The peak is the largest of: a forward of the windows (stopped after the deepest site: its
    widest layer and the sites' values) next to a buffer not yet full; the shuffle (old rows, both halves' copies
    and the permutation: twice the buffer); a later training step of the widest dictionary (training(moments=True))
    next to the shuffled buffer; with `checkpoint`, a checkpoint (weights and moments cloned next to the kept half
    of the buffer; safetensors writes from the tensors' memory); the end (every dictionary copied for saving, one
    more copy while rank 0 writes it). With ranks > 1 every rank holds the whole buffer and the dictionaries; each
    forward is of the rank's block of the windows, whose rows are then joined (D.gather_rows: the rank's own rows,
    the joined ones, and of the site being joined its padded block and every rank's copy of it); a step is
    _rank_step's. DistributedDataParallel's one-time setup (buckets and the broadcast of the weights, before Adam's
    moments exist) and BatchTopK's gathered top values stay below these."""
    s = sizes(model)
    here = ranks is None and D.active()            # this process's run under torch.distributed
    ranks = D.world() if here else ranks or 1
    writes = (D.rank() if here and rank is None else rank or 0) == 0   # checkpoints and the saved files
    row = 4 * sum(widths)                          # one buffered token: every site's float32 values
    w = max(1, seq - skip_first)                   # tokens one window adds to the buffer
    params = [_dict_params(*d) * 4 for d in dictionaries]
    held = 4 * sum(params)
    step = max(_rank_step(*d, batch, ranks) for d in dictionaries)
    before = buffer - 1                            # rows before the forward that fills the buffer, at most
    fixed, forward = _split(_forward(s, seq, 0) + seq * sum(widths) * s.itemsize, ranks)
    shuffle = (held + before * (2 * row + 8), w * (2 * row + 8))
    stepping = (held + before * (row + 8) + step, w * (row + 8))
    kept = (before + 2 * batch) // 2 * row         # the half of the buffer kept after a shuffle, at most
    end = (held + sum(params) + writes * max(params) + kept, w * row // 2)
    phases = (shuffle, stepping, end) + (((held + 3 * sum(params) + kept, w * row // 2),) if checkpoint and writes
                                         else ())
    if ranks > 1:                                  # joining a forward's rows: own rows, padded blocks (split), whole
        jf, jp = _split(w * row + (1 + ranks) * w * 4 * max(widths), ranks)
        phases += ((held + before * row + jf, jp + w * row),)
    n = len(dictionaries)
    on = f", on each of {ranks} ranks" if ranks > 1 else ""
    return Estimate(f"training run of {n} dictionar{'y' if n == 1 else 'ies'} (batch {batch}, buffer {buffer} "
                    f"tokens, windows of {seq}{on})", held + before * row + fixed, forward,
                    rows=max(1, -(-buffer // w)), phases=phases,
                    parts={"dictionaries (weights, gradients, Adam moments)": held,
                           "activation buffer": buffer * row,
                           "forward, per window" + (" (a rank's share)" if ranks > 1 else ""): forward,
                           "training step": step})


# ---------------------------------------------------------------- what is there
def _cgroup_free() -> int | None:
    """Bytes this process may still use under its cgroup's memory limit (v2 or v1), or None without one."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap = Path(limit).read_text().strip()
            used = int(Path(usage).read_text())
        except (OSError, ValueError):
            continue
        if cap != "max" and int(cap) < 2 ** 60:
            return max(0, int(cap) - used)
    return None


def available(device: str | torch.device | None = None) -> int:
    """Bytes free for new tensors on `device` now: CUDA's free memory, or the system's available memory (psutil or
    /proc/meminfo) capped by a cgroup limit."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        free = psutil.virtual_memory().available
    except ImportError:
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable"))
        free = int(line.split()[1]) * 1024
    cg = _cgroup_free()
    return free if cg is None else min(free, cg)


def budget(device: str | torch.device | None = None) -> int:
    """The default budget: BUDGET_FRACTION of available() (MECHANIC_MEMORY_BUDGET, in bytes or e.g. '4GiB',
    overrides it)."""
    env = os.environ.get("MECHANIC_MEMORY_BUDGET")
    if env:
        return parse_bytes(env)
    return int(BUDGET_FRACTION * available(device))


def parse_bytes(text: str | int) -> int:
    """Bytes from an int or a string such as '512MiB', '4GiB', '2GB'."""
    if isinstance(text, int):
        return text
    t = text.strip().lower().replace(" ", "")
    for unit, mult in (("gib", GiB), ("mib", MiB), ("kib", 2 ** 10), ("gb", 10 ** 9), ("mb", 10 ** 6),
                       ("kb", 10 ** 3), ("b", 1)):
        if t.endswith(unit):
            return int(float(t[:-len(unit)]) * mult)
    return int(float(t))


def _fmt(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


# ---------------------------------------------------------------- planning
def _largest(fits, lo: int, hi: int) -> int:
    """The largest x in [lo, hi] with fits(x), for fits true up to some x and false after (lo - 1 if none)."""
    lo -= 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def plan_batch(est: Estimate, budget_bytes: int | None = None, device=None, hints: str = "") -> int:
    """The largest batch (at most est.rows) whose estimated peak fits the budget; MemoryPlanError if not even 1."""
    cap = budget(device) if budget_bytes is None else int(budget_bytes)
    if est.at(1) <= cap:
        hi = min(est.rows, max(1, (cap - est.fixed) // max(1, est.per_row)))
        return _largest(lambda b: est.at(b) <= cap, 1, hi)
    parts = "; ".join(f"{k} {_fmt(v)}" for k, v in est.parts.items())
    raise MemoryPlanError(
        f"Not enough memory for the {est.what}: even one row at a time needs about {_fmt(est.at(1))} ({parts}), and "
        f"the budget is {_fmt(cap)}. What would fit: {hints or 'fewer sites, rows or positions'}; a smaller dtype (load the model with "
        "dtype=torch.bfloat16 halves every activation); or a model spread over devices and disk "
        "(mechanic.load(..., device_map='auto', max_memory=..., offload_folder=...)). Set a larger budget with "
        "MECHANIC_MEMORY_BUDGET only if the memory is really there.")


def plan_training(model, dictionaries, widths, batch: int, buffer: int, seq: int, forward_batch: int | None = None,
                  skip_first: int = 1, checkpoint: bool = False, budget_bytes: int | None = None, device=None,
                  ranks: int | None = None, rank: int | None = None) -> int:
    """The forward batch of a dictionary-training run (training_run, of rank `rank` of `ranks`): `forward_batch` if
    the run's estimated peak fits the budget, the largest that fits when it is None; otherwise MemoryPlanError, one
    paragraph naming the forward batch, buffer size or batch size that would fit with the other settings unchanged."""
    cap = budget(device) if budget_bytes is None else int(budget_bytes)

    def run(b: int, n: int) -> Estimate:
        return training_run(model, dictionaries, widths, b, n, seq, skip_first, checkpoint, ranks, rank)
    est = run(batch, buffer)
    if forward_batch:
        fb, fits_now = forward_batch, est.at(forward_batch) <= cap
    else:                                   # the largest that fits (each candidate's peak estimated once)
        fb = _largest(lambda f: est.at(f) <= cap, 1, est.rows)
        fb, fits_now = max(1, fb), fb >= 1
    if fits_now:
        return fb
    fits = [f"forward_batch={f}" for f in [_largest(lambda f: est.at(f) <= cap, 1, fb - 1)] if f >= 1]
    fits += [f"buffer_tokens={n:,}" for n in [_largest(lambda n: run(batch, n).at(fb) <= cap, 2 * batch, buffer - 1)]
             if n >= 2 * batch]
    fits += [f"batch_size={b:,}" for b in [_largest(lambda b: run(b, buffer).at(fb) <= cap, 1, batch - 1)] if b >= 1]
    parts = "; ".join(f"{k} {_fmt(v)}" for k, v in est.parts.items())
    raise MemoryPlanError(
        f"Not enough memory for the {est.what}: with forward_batch={fb} it needs about {_fmt(est.at(fb))} at its peak "
        f"({parts}), and the budget is {_fmt(cap)}. What would fit, the other settings unchanged: "
        f"{' or '.join(fits) if fits else 'no smaller forward_batch, buffer_tokens or batch_size alone'}; fewer or "
        "narrower dictionaries (a smaller expansion or d_sae) shrink what is held throughout. Set a larger budget "
        "with MECHANIC_MEMORY_BUDGET only if the memory is really there.")


__all__ = ["Estimate", "MemoryPlanError", "Sizes", "available", "budget", "cache", "edges", "gradient",
           "parse_bytes", "patching", "plan_batch", "plan_training", "sizes", "training",
           "training_run"]
