"""The hook engine: the one place that touches torch hooks. Run with caches, interventions, early stop, gradients.

Every site maps to a *hook point* (a module input or output, or an attention/experts function
registered through transformers' AttentionInterface/ExpertsInterface); the map is the site-kind
table, mechanic.model.kinds. All requests at one hook
point share one hook; hooks live only inside a run and are removed in `finally`.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from mechanic.model.dictsites import DictPoint, DictView
from mechanic.model.interventions import Intervention, InterventionError
from mechanic.model.kinds import kind_of
from mechanic.model.select import SKIP, index, local
from mechanic.model.sites import Site


class StopForward(Exception):
    """Raised by a hook after the last layer anything needs (truncated forward)."""


@dataclass
class Run:
    """What a run returns: logits (None when stopped early), cached values and their gradients by site name."""

    logits: torch.Tensor | None
    cache: dict[str, torch.Tensor] = field(default_factory=dict)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    metric: float | None = None
    calls: dict[str, list[tuple[tuple, dict]]] = field(default_factory=dict)  # see capture_calls in run()

    def __getitem__(self, site) -> torch.Tensor:
        return self.cache[str(site)]


class _Point:
    """All requests at one hook point: interventions (in order), dictionary steps, cached reads and taps."""

    def __init__(self):
        self.ivs: list[tuple[Callable, Intervention]] = []
        self.dicts: dict[int, DictPoint] = {}     # by id of the attached codec
        self.reads: list[tuple[str, Callable]] = []
        self.taps: dict[str, Callable] = {}       # values other steps read later in the forward (a codec's source)

    def writes(self, grad: bool) -> bool:
        """Whether processing may replace the hooked tensor."""
        return bool(self.ivs) or any(d.writes(grad) for d in self.dicts.values())

    def process(self, t: torch.Tensor, session: "_Session") -> torch.Tensor:
        if self.ivs:
            t = t.clone(memory_format=torch.contiguous_format)
            for view, iv in self.ivs:
                v = view(t)
                idx = session.where(v, iv)
                if idx is not None:
                    v[idx] = iv.apply(v[idx])
        for step in self.dicts.values():
            t = step.process(t, session)
        if self.reads:
            t = session.track(t)
            for name, view in self.reads:
                session.store(name, view(t), t, view)
        for name, view in self.taps.items():
            session.taps[name] = view(t)
        return t


class _Session:
    """Hooks for one run or one generate call."""

    def __init__(self, model, cache: Iterable[Site], interventions: Iterable[Intervention],
                 pos=None, rows=None, grad: bool = False, stop_layer: int | None = None,
                 cache_device: torch.device | None = None):
        self.model = model
        self.cache_device = cache_device   # where cached values land (None: where the layer ran)
        self.pos, self.rows, self.grad = pos, rows, grad
        self.stop_layer = stop_layer
        self.batch_size: int | None = None
        self.offset = 0          # absolute column of this forward call's first token (generate)
        self.generating = False
        self.row_map: torch.Tensor | None = None  # global row -> row of the current sub-batch
        self.values: dict[str, torch.Tensor] = {}
        self.taps: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.handles: list = []
        self.resid_pre: dict[int, torch.Tensor] = {}
        self.points: dict[tuple, _Point] = defaultdict(_Point)
        self.heads: dict[int, _Point] = defaultdict(_Point)       # head contributions per layer
        self.resid_mid: dict[int, _Point] = defaultdict(_Point)
        self.attn_fn: dict[int, dict] = defaultdict(lambda: {"ivs": [], "reads": []})
        self.experts: dict[int, dict] = defaultdict(lambda: {"ivs": [], "reads": []})
        for iv in [*getattr(model, "steering", ()), *interventions]:  # applied plans first
            self._add(model.check(iv.site), iv=iv)
        for s in cache:
            self._add(model.check(s))

    # -- planning
    def _add(self, s: Site, iv: Intervention | None = None) -> None:
        hook = kind_of(s).hook(self, s)
        bucket = self.bucket(hook.key)
        if isinstance(bucket, dict):
            self._queue(bucket, s, iv)
        elif isinstance(hook.view, DictView):
            dv = hook.view
            step = bucket.dicts.setdefault(id(dv.codec), DictPoint(dv))
            step.add(str(s), dv, iv)
            if dv.source is not None:
                name, src = dv.source
                self.bucket(src.key).taps[name] = src.view
        else:
            self._queue_point(bucket, s, iv, hook.view)

    def bucket(self, key: tuple) -> _Point | dict:
        """The requests at a hook point. Keys: ("fwd", path) output of a model module; ("lfwd" | "lpre", layer,
        path) output / input of a layer module; ("pre" | "post", layer) decoder layer input / output; ("attn" |
        "mlp", layer) the block writes; ("mid", layer) resid_mid; ("heads", layer) head contributions;
        ("attn_fn" | "experts", layer) the instrumented attention / experts functions."""
        kind, L = key[0], key[1]
        if kind == "attn_fn":
            return self.attn_fn[L]
        if kind == "experts":
            return self.experts[L]
        if kind == "heads":
            return self.heads[L]
        if kind == "mid":
            self.points[("pre", L)]  # make sure resid_pre is recorded
            return self.resid_mid[L]
        return self.points[key]

    def _queue_point(self, point: _Point, s: Site, iv, view) -> None:
        if iv is not None:
            point.ivs.append((view, iv))
        else:
            point.reads.append((str(s), view))

    def _queue(self, bucket: dict, s: Site, iv) -> None:
        if iv is not None:
            if s.part == "pattern":
                raise ValueError(f"{s}: attention patterns can be read but not intervened on; intervene on "
                                 "q, k or v, or on the head output instead.")
            bucket["ivs"].append((s, iv))
        else:
            bucket["reads"].append(s)

    # -- selecting
    def where(self, v: torch.Tensor, iv: Intervention) -> tuple | None:
        """The index of the cells an intervention changes in this forward call, or None if there are none."""
        pos = local(iv.pos, v.shape[1], self.offset, self.generating)
        if pos is SKIP:
            return None
        rows = iv.rows
        if self.row_map is not None and rows is not None:  # a sub-batch call (see model.reuse)
            rows = self.row_map[torch.as_tensor(rows, dtype=torch.long)]
        try:
            return index(v.shape[0], v.shape[1], rows, pos, v.device)
        except ValueError as e:   # rows or positions the intervention names are not in this batch
            raise InterventionError(f"The intervention at {iv.site} cannot be applied to this input: {e} "
                                    "Give rows and positions that exist in every batch the plan runs on, or "
                                    "none (all rows, all positions).") from None

    # -- storing
    def track(self, t: torch.Tensor) -> torch.Tensor:
        """In gradient mode make `t` part of the graph (a leaf if nothing upstream needs grad)."""
        if self.grad and not t.requires_grad:
            t = t.detach().requires_grad_()
        return t

    def store(self, name: str, value: torch.Tensor, base: torch.Tensor | None = None, view=None) -> None:
        idx = index(value.shape[0], value.shape[1], self.rows, self.pos, value.device)
        kept = value if self.grad else value.detach()
        if self.rows is not None or self.pos is not None:
            kept = kept[idx].clone()   # a copy, so a view does not keep the whole [batch, pos, ...] tensor alive
        if self.cache_device is not None and not self.grad:   # a gradient run moves its values after backward
            kept = kept.to(self.cache_device)
        self.values[name] = kept
        if self.grad and base is not None and base.requires_grad:
            def save(g, name=name, view=view, idx=idx):
                self.grads[name] = view(g)[idx].detach()
            base.register_hook(save)

    def store_stack(self, name: str, parts: list[torch.Tensor], select) -> None:
        """Store select(stack(parts, dim=1)) for flat [tokens, ...] parts computed in the forward (experts).

        In gradient mode the gradient is assembled from each part's own gradient (zeros for parts that
        are not in the graph), since the stack itself is not part of the forward.
        """
        value = select(torch.stack(parts, 1))
        self.store(name, value)
        if not self.grad:
            return
        grads: list[torch.Tensor | None] = [None if p.requires_grad else torch.zeros_like(p) for p in parts]
        pending = [sum(p.requires_grad for p in parts)]
        idx = index(value.shape[0], value.shape[1], self.rows, self.pos, value.device)

        def save(g, i):
            grads[i] = g
            pending[0] -= 1
            if pending[0] == 0:
                self.grads[name] = select(torch.stack(grads, 1))[idx].detach()
        for i, p in enumerate(parts):
            if p.requires_grad:
                p.register_hook(lambda g, i=i: save(g, i))

    # -- hooks
    def __enter__(self):
        try:
            self._register()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for restore in getattr(self, "_restores", []):
            restore()
        self._restores = []
        self.resid_pre.clear()

    def _register(self) -> None:
        m, a = self.model, self.model.arch
        self._restores = []
        need_pre = set(self.resid_mid)
        for key, point in self.points.items():
            kind = key[0]
            if kind == "fwd":
                self._fwd(m.module(key[1]), point)
            elif kind == "pre":
                need_pre.add(key[1])
            elif kind == "post":
                self._fwd(m.layers[key[1]], point)
            elif kind == "attn":
                pass  # merged with resid_mid below
            elif kind == "mlp":
                self._fwd(m.layer_module(key[1], a.mlp_write), point)
            elif kind == "lpre":
                self._pre(m.layer_module(key[1], key[2]), point)
            elif kind == "lfwd":
                self._fwd(m.layer_module(key[1], key[2]), point)
            else:
                raise ValueError(f"Unknown hook point {key}; see _Session.bucket for the kinds of hook points.")
        for L in need_pre:
            self._layer_pre(L, self.points.get(("pre", L)) or _Point(), L in self.resid_mid)
        for L in set(self.resid_mid) | {k[1] for k in self.points if k[0] == "attn"}:
            self._attn_write(L, self.points.get(("attn", L)) or _Point(), self.resid_mid.get(L))
        for L, point in self.heads.items():
            self._heads(L, point)
        if self.attn_fn:
            from mechanic.model.attention import instrument_attention

            self._restores.append(instrument_attention(self))
        if self.experts:
            from mechanic.model.moe import instrument_experts

            self._restores.append(instrument_experts(self))
        if self.stop_layer is not None:
            def stop(mod, args, out):
                raise StopForward
            self.handles.append(m.layers[self.stop_layer].register_forward_hook(stop))

    def _fwd(self, module, point: _Point) -> None:
        def hook(mod, args, out):
            if isinstance(out, tuple):
                return (point.process(out[0], self),) + out[1:]
            return point.process(out, self)
        self.handles.append(module.register_forward_hook(hook))

    def _pre(self, module, point: _Point) -> None:
        def hook(mod, args, kwargs):
            if args:
                return (point.process(args[0], self),) + args[1:], kwargs
            kwargs["hidden_states"] = point.process(kwargs["hidden_states"], self)
            return args, kwargs
        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _layer_pre(self, L: int, point: _Point, keep: bool) -> None:
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            x = point.process(x, self)
            if keep:
                self.resid_pre[L] = x
            if args:
                return (x,) + args[1:], kwargs
            kwargs["hidden_states"] = x
            return args, kwargs
        self.handles.append(self.model.layers[L].register_forward_pre_hook(hook, with_kwargs=True))

    def _attn_write(self, L: int, point: _Point, mid: _Point | None) -> None:
        """attn_out, and resid_mid = resid_pre + attn_out (changed through attn_out so the residual sees it)."""
        def hook(mod, args, out):
            t = out[0] if isinstance(out, tuple) else out
            t = point.process(t, self)
            if mid is not None and (mid.ivs or mid.reads or mid.dicts or mid.taps):
                pre = self.resid_pre[L]
                if self.row_map is not None and pre.shape[0] != t.shape[0]:  # inside a sub-batch call
                    pre = pre[self.row_map >= 0]
                elif pre.shape[1] != t.shape[1]:   # a packed call computes a prefix of its tokens (model.reuse)
                    pre = pre[:, :t.shape[1]]
                x = pre + t
                if mid.writes(self.grad):
                    new = mid.process(x, self)
                    # a dictionary step alone changes x by exactly its delta (0 when nothing changed): add that
                    t = new - pre if mid.ivs else t + (new - x)
                else:
                    mid.process(x, self)
            return (t,) + out[1:] if isinstance(out, tuple) else t
        module = self.model.layer_module(L, self.model.arch.attn_write)
        self.handles.append(module.register_forward_hook(hook))

    def _heads(self, L: int, point: _Point) -> None:
        """Per-head contributions z_h @ W_O[:, h]^T, computed from the o_proj input; changes go back as a delta."""
        model = self.model
        o = model.layer_module(L, model.arch.o_proj)
        H, dh = model.dims.n_heads, model.dims.d_head

        def hook(mod, args, out):
            z = args[0]
            W = model.arch.o_weight(mod).to(z.device).view(-1, H, dh)   # an offloaded o_proj's weight may live elsewhere
            contrib = torch.einsum("bphk,dhk->bphd", z.view(*z.shape[:-1], H, dh), W)
            if point.ivs:
                new = contrib.clone()
                for _, iv in point.ivs:
                    h = iv.site.index
                    v = new if h is None else new[:, :, h]
                    idx = self.where(v, iv)
                    if idx is not None:
                        v[idx] = iv.apply(v[idx])
                out = out + (new - contrib).sum(2)
                contrib = new
            if point.reads:
                base = self.track(out)
                if base is not out:
                    out = base
                for name, _ in point.reads:
                    h = Site.parse(name).index
                    val = contrib if h is None else contrib[:, :, h]
                    gview = (lambda g: g[:, :, None, :].expand(*g.shape[:2], H, g.shape[-1])) if h is None else (lambda g: g)
                    self.store(name, val, base, gview)
            return out
        self.handles.append(o.register_forward_hook(hook))


# ---------------------------------------------------------------- captured calls
def _detached(obj):
    """obj with every tensor inside (tuples, lists, dicts) detached from the graph."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detached(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    return obj


@contextmanager
def _capture(model, paths: list[str]):
    """Record (args, kwargs) of every call of the modules at `paths` (dotted paths from the HF model root)."""
    calls: dict[str, list[tuple[tuple, dict]]] = {p: [] for p in paths}
    handles = []
    try:
        for p in paths:
            try:
                module = model.module(p)
            except AttributeError:
                raise ValueError(f"capture_calls: the model has no module at {p!r}; give dotted paths from the "
                                 f"Hugging Face model root, e.g. '{model.arch.layers}.0'.") from None

            def hook(mod, args, kwargs, p=p):
                calls[p].append((tuple(args), dict(kwargs)))
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield calls
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- public
def _stop_layer(model, sites: list[Site], interventions: list[Intervention], stop_at) -> int | None:
    if stop_at is None:
        return None
    if stop_at == "auto":
        layers = [s.layer for s in sites + [iv.site for iv in interventions] if s.layer is not None]
        if not layers or any(s.layer is None and s.kind != "embed" for s in sites):
            return None
        return max(layers)
    if not 0 <= int(stop_at) < model.dims.n_layers:
        raise ValueError(f"stop_at={stop_at} is out of range: layers are 0..{model.dims.n_layers - 1}.")
    return int(stop_at)


@contextmanager
def frozen_parameters(module: torch.nn.Module):
    """Parameters without grad for the duration (gradients flow to site values only)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def run(model, inputs, cache: Iterable = (), interventions: Iterable[Intervention] = (),
        stop_at: int | str | None = None, grad: Callable[[torch.Tensor], torch.Tensor] | None = None,
        pos=None, rows=None, capture_calls: Iterable[str] = (), last_only: bool | int = False,
        cache_device: str | torch.device | None = None) -> Run:
    """Run the model once.

    cache: sites to record (at positions `pos` and rows `rows`, default all).
    interventions: changes applied in order while running.
    stop_at: a layer index, or "auto" to stop after the last layer any site needs (logits are None then).
    grad: metric(logits) -> scalar; gradients of it w.r.t. every cached site land in `Run.grads`.
    Parameters get no gradients and nothing upstream of the first cached site is kept for backward.
    last_only: compute logits at the last position only (shape [batch, 1, vocab]), or at the last k
    positions when an int k; the unembedding is often the largest matmul of a short prompt, and most
    metrics read only the last position (or a short target at the end).
    capture_calls: dotted module paths (e.g. "model.layers.3"); `Run.calls[path]` lists the (args, kwargs)
    of each call of that module (tensors detached), so a module can be called again exactly as the model did.
    cache_device: where cached values (and gradients) land, e.g. "cpu" for a model on accelerators; default:
    the device of the layer that computed them.
    """
    batch = model.inputs(inputs)
    sites = [model.check(s) for s in (cache if not isinstance(cache, (str, Site)) else [cache])]
    interventions = list(interventions) if not isinstance(interventions, Intervention) else [interventions]
    if grad is not None and stop_at is not None:
        raise ValueError("A gradient run needs the logits; do not combine grad= with stop_at=.")
    stop_layer = _stop_layer(model, sites, interventions, stop_at)
    session = _Session(model, sites, interventions, pos, rows, grad is not None, stop_layer,
                       _device(cache_device))
    session.batch_size = batch["input_ids"].shape[0]
    logits, metric = None, None
    keep = {"logits_to_keep": int(last_only)} if last_only else {}
    paths = [capture_calls] if isinstance(capture_calls, str) else list(capture_calls)
    with session, _capture(model, paths) as calls:
        if grad is None:
            with torch.no_grad():
                try:
                    logits = model.hf(**batch, use_cache=False, **keep).logits
                except StopForward:
                    logits = None
        else:
            with frozen_parameters(model.hf), torch.enable_grad():
                logits = model.hf(**batch, use_cache=False, **keep).logits
                value = grad(logits)
                value.backward()
                metric = float(value.detach())
                logits = logits.detach()
                to = (lambda v: v) if session.cache_device is None else (lambda v: v.to(session.cache_device))
                session.values = {k: to(v.detach()) for k, v in session.values.items()}
                session.grads = {k: to(v) for k, v in session.grads.items()}
    return Run(logits, session.values, session.grads, metric, {p: _detached(c) for p, c in calls.items()})


def _device(device) -> torch.device | None:
    """A cache device from its name, or a one-paragraph error."""
    if device is None or isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"cache_device={device!r} is not a device ({e}). Give a torch device or its name, "
                         "e.g. 'cpu', 'cuda:0' or 'mps'.") from None


def generate(model, inputs, interventions: Iterable[Intervention] = (), **kwargs) -> torch.Tensor:
    """hf.generate with interventions active on the prompt and on every generated token.

    Positions: None = every token; "prompt" / "generated" = only those; a non-negative int or list =
    absolute columns of the (left-padded) sequence; -1 = the newest token of each step.
    """
    batch = model.inputs(inputs)
    batch.pop("position_ids")  # generate derives them from the attention mask
    interventions = list(interventions) if not isinstance(interventions, Intervention) else [interventions]
    kwargs.setdefault("pad_token_id", getattr(model.tokenizer, "pad_token_id", None))
    session = _Session(model, [], interventions)
    session.batch_size = batch["input_ids"].shape[0] * kwargs.get("num_beams", 1) * kwargs.get("num_return_sequences", 1)
    seen = {"tokens": 0}
    session.generating = True

    def count(mod, args, kwargs_):
        ids = args[0] if args else kwargs_.get("input_ids")
        session.offset = seen["tokens"]
        seen["tokens"] += ids.shape[1]
    with session, torch.no_grad():
        session.handles.append(model.module(model.arch.embed).register_forward_pre_hook(count, with_kwargs=True))
        return model.hf.generate(**batch, **kwargs)
