"""Reference code for tests: plain torch hooks on the HF model, independent of mechanic's engine.

Nothing here imports mechanic's hooks, sites, interventions or locate code: module paths are the Hugging Face
ones (`hf.model.layers[l].self_attn.o_proj` input = the heads' z, `mlp.down_proj` input = the FFN neurons),
values are written with register_forward_hook / register_forward_pre_hook, gradients come from plain
autograd, and metrics are computed by hand from the logits. A `TaskBatch` is only read as data
(clean / corrupted input dicts, answer and wrong token ids).
"""

import itertools

import torch

EPS32 = torch.finfo(torch.float32).eps


def logits_with_hook(model, inputs, module, fn, pre=False):
    """Logits of the plain HF forward with one hook applying fn to a copy of the module's input (pre) or output."""
    if pre:
        h = module.register_forward_pre_hook(lambda m, args: (fn(args[0].clone()),) + args[1:])
    else:
        h = module.register_forward_hook(lambda m, args, out: fn(out.clone()))
    try:
        with torch.no_grad():
            return model.hf(**model.inputs(inputs), use_cache=False).logits
    finally:
        h.remove()


# ---------------------------------------------------------------- where things are in a plain HF model
def blocks(hf):
    """The decoder blocks of a HF causal LM (Llama-style `model.layers`, GPT-2 `transformer.h`, NeoX)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        obj = hf
        try:
            for name in path.split("."):
                obj = getattr(obj, name)
        except AttributeError:
            continue
        return obj
    raise ValueError(f"no decoder blocks found in {type(hf).__name__}")


def _attn(blk):
    for name in ("self_attn", "attention", "attn"):
        if hasattr(blk, name):
            return getattr(blk, name)
    raise ValueError(f"no attention module in {type(blk).__name__}")


def _out_proj(attn):
    for name in ("o_proj", "dense", "c_proj"):
        if hasattr(attn, name):
            return getattr(attn, name)
    raise ValueError(f"no output projection in {type(attn).__name__}")


def point(hf, kind, layer):
    """(module, "in" | "out") holding a site kind of one layer (Llama-style, or GPT-NeoX for attention, mlp, heads);
    heads and neurons are slices of it."""
    blk = blocks(hf)[layer]
    if kind == "resid_pre":
        return blk, "in"
    if kind == "resid_post":
        return blk, "out"
    if kind == "attn_out":
        return _attn(blk), "out"
    if kind == "mlp_out":
        return blk.mlp, "out"
    if kind == "head":
        return _out_proj(_attn(blk)), "in"
    if kind == "neuron":
        return blk.mlp.down_proj, "in"
    raise ValueError(kind)


def n_units(hf, kind):
    """Units per layer: heads, FFN neurons, experts; 1 for residual-type kinds."""
    if kind == "head":
        return hf.config.num_attention_heads
    if kind == "neuron":
        return blocks(hf)[0].mlp.down_proj.in_features
    if kind == "expert":
        return blocks(hf)[0].mlp.experts.num_experts
    return 1


def unit_slice(hf, kind, unit):
    """The last-dimension slice of the point tensor that is one unit (head h: its z columns; neuron j)."""
    if kind == "head":
        dh = _out_proj(_attn(blocks(hf)[0])).in_features // hf.config.num_attention_heads
        return slice(unit * dh, (unit + 1) * dh)
    if kind == "neuron":
        return slice(unit, unit + 1)
    return slice(None)


def unit_name(kind, layer, unit):
    return f"L{layer}.{kind}{unit}" if kind in ("head", "neuron", "expert") else f"L{layer}.{kind}"


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _with_first(out, x):
    return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x


def block_output_logits(m, ids, layer=None, fn=None):
    """Logits of the plain HF forward (no mechanic), optionally with fn applied to decoder block `layer`'s
    hidden-state output."""
    hook = lambda mod, args, out: _with_first(out, fn(_first(out)))  # noqa: E731
    h = blocks(m.hf)[layer].register_forward_hook(hook) if fn else None
    try:
        with torch.no_grad():
            return m.hf(input_ids=ids).logits
    finally:
        if h:
            h.remove()


def hf_logits(hf, inputs, hooks=(), grad=False, last=False):
    """Plain HF forward with hooks [(module, "in" | "out" | "raw", fn)]: fn gets the module's input (first
    argument) or output (first element) and returns the value to use instead ("raw": fn(module, args, output)
    returns the output). Returns the logits (last: only at the last position, HF's logits_to_keep=1)."""
    handles = []
    try:
        for module, where, fn in hooks:
            if where == "raw":
                handles.append(module.register_forward_hook(fn))
            elif where == "in":
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, fn=fn: (fn(args[0]),) + tuple(args[1:])))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, args, out, fn=fn: _with_first(out, fn(_first(out)))))
        with torch.set_grad_enabled(grad):
            return hf(**inputs, use_cache=False, **({"logits_to_keep": 1} if last else {})).logits
    finally:
        for h in handles:
            h.remove()


def capture(hf, inputs, points):
    """{key: detached copy of the input/output of a module} for points {key: (module, "in" | "out")}."""
    saved = {}

    def keep(key):
        def fn(x):
            saved[key] = x.detach().clone()
            return x
        return fn
    hf_logits(hf, inputs, [(m, w, keep(k)) for k, (m, w) in points.items()], last=True)
    return saved


def rows(inputs, idx):
    """The input dict restricted (and repeated) to rows idx."""
    idx = torch.as_tensor(idx)
    return {k: v[idx] for k, v in inputs.items()}


def logit_diff(logits, answer, wrong):
    """Per row: logit(answer) - logit(wrong) at the last position."""
    last = logits[:, -1]
    r = torch.arange(last.shape[0])
    return last[r, answer] - last[r, wrong]


# ---------------------------------------------------------------- MoE experts (Mixtral-style fused module)
def all_experts(module, x):
    """Every expert's (unweighted) output on every row of x [N, d]: [N, E, d], the plain Mixtral math."""
    gate, up = torch.einsum("nd,efd->nef", x, module.gate_up_proj).chunk(2, dim=-1)
    return torch.einsum("nef,edf->ned", module.act_fn(gate) * up, module.down_proj)


def routed(idx, E):
    """[N, E] bool: the experts each token is routed to."""
    return torch.nn.functional.one_hot(idx, E).sum(1).bool()


def expert_values(hf, inputs, layer):
    """Each expert's output at the tokens routed to it (0 elsewhere), [batch, pos, E, d], by a plain hook."""
    experts = blocks(hf)[layer].mlp.experts
    saved = {}

    def keep(mod, args, out):
        x, idx, _ = args
        saved["y"] = (all_experts(mod, x) * routed(idx, mod.num_experts)[..., None]).detach()
    h = experts.register_forward_hook(keep)
    try:
        with torch.no_grad():
            hf(**inputs, use_cache=False)
    finally:
        h.remove()
    B, P = inputs["input_ids"].shape
    return saved["y"].view(B, P, *saved["y"].shape[1:])


# ---------------------------------------------------------------- activation patching / ablation, by hand
def patch_reference(model, batch, kind, positions="all", direction="denoise", ablation=None, donors=None,
                    normalise=True, chunk=256):
    """Activation patching with plain hooks: for every unit (layer x head / neuron / expert, or a residual-type
    layer output) and column, the metric of the target run with that unit's value at that column replaced
    by the source's, mean over examples, optionally normalised to (m - m_corr) / (m_clean - m_corr).

    direction "denoise": clean values into the corrupted run; "noise": corrupted values into the clean run.
    ablation "mean": per column, the mean over the clean rows that are real tokens there, into the clean run;
    "resample": row donors[e]'s clean value into row e of the clean run.
    positions: "all" (every column), None (every column at once), or a list of column indices.
    Returns (values [units, columns] or [units], names). Rows of one forward patch different units; rows
    never interact in a causal LM forward, so this equals one forward per patch up to float rounding.
    """
    hf = model.hf
    n_layers = len(blocks(hf))
    n, P = batch.clean["input_ids"].shape
    if ablation is not None or direction == "noise":
        target = batch.clean
    else:
        target = batch.corrupted
    source = batch.clean if (ablation is not None or direction == "denoise") else batch.corrupted
    cols = list(range(P)) if positions == "all" else [None] if positions is None else [p % P for p in positions]
    U = n_units(hf, kind)
    names = [unit_name(kind, L, u) for L in range(n_layers) for u in range(U)]

    # source values: [batch, pos, ...] per layer
    if kind == "expert":
        src = {L: expert_values(hf, source, L) for L in range(n_layers)}
    elif kind == "resid_mid":
        src = capture(hf, source, {L: (blocks(hf)[L].post_attention_layernorm, "in") for L in range(n_layers)})
    else:
        src = capture(hf, source, {L: point(hf, kind, L) for L in range(n_layers)})
    if ablation == "mean":
        real = batch.clean["attention_mask"].bool()
        for L, v in src.items():
            mean = torch.zeros_like(v[0])
            for p in range(P):
                mean[p] = v[real[:, p], p].mean(0)
            src[L] = mean.expand_as(v)
    elif ablation == "resample":
        src = {L: v[torch.as_tensor(donors)] for L, v in src.items()}

    jobs = [(r, L, u, ci, e) for r, (L, u) in enumerate(itertools.product(range(n_layers), range(U)))
            for ci in range(len(cols)) for e in range(n)]
    totals = torch.zeros(len(names), len(cols))
    for start in range(0, len(jobs), chunk):
        part = jobs[start:start + chunk]
        hooks = []
        for L in sorted({j[1] for j in part}):
            mine = [(i, u, cols[ci], e) for i, (_, L2, u, ci, e) in enumerate(part) if L2 == L]
            hooks += _writers(hf, kind, L, mine, src[L], P)
        logits = hf_logits(hf, rows(target, [j[4] for j in part]), hooks, last=True)
        ex = torch.tensor([j[4] for j in part])
        vals = logit_diff(logits, batch.answer[ex], batch.wrong[ex])
        for (r, _, _, ci, _), v in zip(part, vals.tolist()):
            totals[r, ci] += v
    out = totals / n
    if normalise:
        m_clean = logit_diff(hf_logits(hf, batch.clean, last=True), batch.answer, batch.wrong).mean()
        m_corr = logit_diff(hf_logits(hf, batch.corrupted, last=True), batch.answer, batch.wrong).mean()
        out = (out - m_corr) / (m_clean - m_corr)
    return (out if cols != [None] else out[:, 0]), names


def _writers(hf, kind, L, mine, value, P):
    """Hooks for one layer writing value[e, col, unit] into row i (col None = every column) for (i, unit, col, e)."""
    def cells(col):
        return slice(None) if col is None else slice(col, col + 1)

    if kind == "expert":
        experts = blocks(hf)[L].mlp.experts

        def moe(mod, args, out):
            x, idx, w = args
            E = mod.num_experts
            dense = torch.zeros(x.shape[0], E, dtype=w.dtype).scatter(1, idx, w)
            y = (all_experts(mod, x) * routed(idx, E)[..., None]).view(-1, P, E, x.shape[-1])
            dense = dense.view(-1, P, E)
            out = out.clone().view(-1, P, x.shape[-1])
            for i, u, col, e in mine:
                c = cells(col)
                out[i, c] += dense[i, c, u, None] * (value[e, c, u] - y[i, c, u])
            return out.view(-1, x.shape[-1])
        return [(experts, "raw", moe)]
    if kind == "resid_mid":  # mid = resid_pre + attn_out: write value - resid_pre as the attention output
        blk = blocks(hf)[L]
        pre = {}

        def keep(x):
            pre["x"] = x
            return x

        def attn(x):
            x = x.clone()
            for i, _, col, e in mine:
                c = cells(col)
                x[i, c] = value[e, c] - pre["x"][i, c]
            return x
        return [(blk, "in", keep), (blk.self_attn, "out", attn)]
    module, where = point(hf, kind, L)

    def write(x):
        x = x.clone()
        for i, u, col, e in mine:
            c, s = cells(col), unit_slice(hf, kind, u)
            x[i, c, s] = value[e, c, s]
        return x
    return [(module, where, write)]


def patch_tolerance(model, batch, normalise=True, factor=64):
    """Max abs diff allowed between two float32 computations of the same patched metric (batched vs one row,
    another summation order): float32 eps times the logit scale, times a factor for the rounding that
    accumulates over the layers' reductions (measured: about 1 eps x scale on tiny models, so 64 leaves a wide
    margin and still catches any real difference); divided by |m_clean - m_corr| when scores are normalised."""
    hf = model.hf
    with torch.no_grad():
        lc = hf(**batch.clean, use_cache=False).logits[:, -1]
        lx = hf(**batch.corrupted, use_cache=False).logits[:, -1] if batch.corrupted is not None else lc
    scale = max(lc.abs().max().item(), lx.abs().max().item(), 1.0)
    tol = factor * EPS32 * scale
    if normalise:
        denom = abs(logit_diff(lc[:, None], batch.answer, batch.wrong).mean().item()
                    - logit_diff(lx[:, None], batch.answer, batch.wrong).mean().item())
        tol /= denom
    return tol


# ---------------------------------------------------------------- attribution patching (AtP), by plain autograd
def mean_logit_diff(logits, batch):
    return logit_diff(logits, batch.answer, batch.wrong).mean()


def first_order(model, batch, module, where, groups, at="corrupted", metric=mean_logit_diff):
    """d metric / d eps at eps = 0 when `module`'s input ("in") or output ("out") x in the run at `at` becomes
    x + eps_g * (x_clean - x_corrupted) (at "corrupted"; at "clean": x - eps_g * (x_clean - x_corr)) for each cell
    group g: groups(x) gives eps's shape, [positions] (per position), [k] with k dividing d (per slice: heads), or
    [d] (per feature: neurons). That derivative is AtP's score of each group."""
    other = batch.clean if at == "corrupted" else batch.corrupted
    ref = capture(model.hf, other, {"x": (module, where)})["x"]
    eps = torch.zeros(groups(ref), requires_grad=True)

    def move(x):
        diff = (ref - x).detach() if at == "corrupted" else (x - ref).detach()
        return x + _expand(eps, x) * diff

    run_in = batch.corrupted if at == "corrupted" else batch.clean
    logits = hf_logits(model.hf, run_in, [(module, where, move)], grad=True)
    (g,) = torch.autograd.grad(metric(logits, batch), eps)
    return g


def _expand(eps, x):
    """eps [k] against x [b, p, d]: per position (k = p), per head slice (k divides d), per neuron (k = d)."""
    if eps.dim() == 0:
        return eps
    if eps.shape[0] == x.shape[1] and eps.shape[0] != x.shape[-1]:
        return eps[None, :, None]
    return eps.repeat_interleave(x.shape[-1] // eps.shape[0])


def expert_first_order(model, batch, layer, metric=mean_logit_diff):
    """d metric / d eps_e at eps = 0 when expert e's weighted output moves by eps_e * w_e * (y_clean_e - y_corr_e),
    by a plain hook on the fused experts module. An expert's value is 0 at tokens it is not routed to."""
    hf = model.hf
    experts = blocks(hf)[layer].mlp.experts
    E = experts.num_experts
    clean = expert_values(hf, batch.clean, layer)
    clean = clean.reshape(-1, *clean.shape[2:])
    eps = torch.zeros(E, requires_grad=True)

    def move(mod, args, out):
        x, idx, w = args
        dense = torch.zeros(x.shape[0], E, dtype=w.dtype).scatter(1, idx, w)
        y = all_experts(mod, x) * routed(idx, E)[..., None]
        return out + torch.einsum("e,ne,ned->nd", eps, dense, (clean - y).detach())
    logits = hf_logits(hf, batch.corrupted, [(experts, "raw", move)], grad=True)
    (g,) = torch.autograd.grad(metric(logits, batch), eps)
    return g


def llama_pieces(hf, P: int):
    """(heads, kv heads, head dim, P, rope, rms, causal mask) of a tiny Llama, for the explicit forwards written
    out by hand in the EAP tests (rope and RMSNorm as the HF code computes them, no padding)."""
    cfg, lm = hf.config, hf.model
    H, KV, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    freqs = torch.arange(P)[:, None].float() * lm.rotary_emb.inv_freq[None]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    rope = lambda t: t * cos + torch.cat([-t[..., dh // 2:], t[..., :dh // 2]], -1) * sin  # noqa: E731
    rms = lambda t, w: w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))  # noqa: E731
    return H, KV, dh, P, rope, rms, torch.ones(P, P).tril().bool()
