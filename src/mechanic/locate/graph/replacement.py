"""The local replacement model of one prompt (Ameisen et al. 2025, "Circuit Tracing").

Per-layer transcoders replace the MLPs (mlp_in -> mlp_out), attention patterns and normalisation scales
are frozen at the real forward's values, and an error node per (layer, position) holds what the
transcoder missed (real MLP output - transcoder output). Given those, the model is affine in its
*sources*: the residual entering layer 0 per position (token embeddings), the active features'
activations and the error vectors. `Replacement.run` evaluates that affine model, batched, through the
model's own Hugging Face forward (hooks replace norms, attention and MLP writes; nothing is re-implemented
except the frozen norm, which is checked against the real one).
"""

from __future__ import annotations

import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mechanic.features import Dictionary
from mechanic.locate.graph.codes import decoder_rows
from mechanic.locate.graph.errors import GraphError
from mechanic.locate.graph.norms import FrozenNorm, frozen_norm, is_norm
from mechanic.model.attention import attention_pattern
from mechanic.model.hooks import frozen_parameters
from mechanic.model.interfaces import override


@dataclass
class Sources:
    """Values of the source nodes: embed [B, P, d], acts[l] [B, n_l] (active features), errors[l] [B, P, d]."""

    embed: torch.Tensor
    acts: list[torch.Tensor]
    errors: list[torch.Tensor]

    def expand(self, rows: int) -> "Sources":
        """The same values as `rows` identical rows (views; gradients stay per row)."""
        return Sources(self.embed.expand(rows, *self.embed.shape[-2:]),
                       [a.expand(rows, a.shape[-1]) for a in self.acts],
                       [e.expand(rows, *e.shape[-2:]) for e in self.errors])

    def zeros(self) -> "Sources":
        """All sources zero: the replacement then outputs its constant (bias) part."""
        return Sources(torch.zeros_like(self.embed), [torch.zeros_like(a) for a in self.acts],
                       [torch.zeros_like(e) for e in self.errors])

    def leaves(self) -> "Sources":
        """Detached copies that require grad (one leaf per tensor)."""
        f = lambda t: t.detach().clone().requires_grad_()   # noqa: E731
        return Sources(f(self.embed), [f(a) for a in self.acts], [f(e) for e in self.errors])


@dataclass
class Trace:
    """What one run of the replacement computes: each layer's MLP input, the final norm output, the logits."""

    mlp_in: list[torch.Tensor]      # [B, P, d] per layer (what transcoder l reads)
    final: torch.Tensor             # [B, P, d] final norm output
    logits: torch.Tensor            # [B, vocab] unembedding at the last position (before any soft-capping)


@dataclass
class Active:
    """One layer's active features: positions, feature ids, and the decoder rows of the distinct ids."""

    pos: torch.Tensor
    feat: torch.Tensor
    unique: torch.Tensor = field(default=None)
    inverse: torch.Tensor = field(default=None)
    rows: torch.Tensor = field(default=None)       # decoder rows of `unique`
    counts: list[int] = field(default=None)        # active features per position (they are sorted by position)
    pos_rows: list[torch.Tensor] = field(default=None)   # per position: the decoder rows of its active features


def as_layers(model, transcoders) -> list[Dictionary | None]:
    """Transcoders as a list with one entry per layer (None: no transcoder, the layer's MLP is all error)."""
    L = model.dims.n_layers
    if isinstance(transcoders, dict):
        bad = [k for k in transcoders if not (isinstance(k, int) and 0 <= k < L)]
        if bad:
            raise GraphError(f"Transcoders are keyed by layer index 0..{L - 1}; got keys {bad}. Pass "
                             "{layer: Dictionary} or a list with one entry (or None) per layer.")
        out = [transcoders.get(i) for i in range(L)]
    else:
        out = list(transcoders)
        if len(out) != L:
            raise GraphError(f"Got {len(out)} transcoders for a model with {L} layers. Pass one per layer "
                             "(None where a layer has none) or a dict {layer: Dictionary}.")
    d_model = model.dims.d_model
    for i, d in enumerate(out):
        if d is None:
            continue
        where = f"The transcoder for layer {i} ({d!r})" if isinstance(d, Dictionary) else f"Layer {i}'s entry"
        if not isinstance(d, Dictionary) or not d.transcoder:
            raise GraphError(f"{where} is not a mechanic transcoder. An attribution graph replaces each MLP with a "
                             "transcoder (mlp_in -> mlp_out): load or train one with mechanic.features "
                             "(site='L{l}.mlp_in', out_site='L{l}.mlp_out').")
        if (d.site not in (None, f"L{i}.mlp_in")) or (d.out_site not in (None, f"L{i}.mlp_out")):
            raise GraphError(f"{where} reads {d.site} and writes {d.out_site}; a replacement MLP of layer {i} must "
                             f"read L{i}.mlp_in and write L{i}.mlp_out. Pass it at its own layer, or retrain it "
                             "on those sites.")
        if d.d_in != d_model or d.d_out != d_model:
            raise GraphError(f"{where} maps {d.d_in} -> {d.d_out} but this model's residual width is {d_model}; "
                             "it was made for another model.")
        if d.normalize != "none":
            raise GraphError(f"{where} normalises its input ({d.normalize!r}), which is not linear, so the "
                             "replacement model would not be either. Fold the normalisation into the weights "
                             "(or train with normalize='none').")
    return out


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, x):
    if args:
        return (x,) + tuple(args[1:]), kwargs
    kwargs["hidden_states"] = x
    return args, kwargs


class Replacement:
    """The frozen, linear-in-the-residual replacement of `model` on one prompt (built by a real forward)."""

    def __init__(self, model, transcoders, prompt, *, zero_first: bool = True):
        """zero_first: no feature nodes at position 0; its MLP outputs are error nodes (see attribute)."""
        self.model = model
        self.zero_first = bool(zero_first)
        self.transcoders = as_layers(model, transcoders)
        batch = model.inputs(prompt)
        if batch["input_ids"].shape[0] != 1:
            raise GraphError(f"An attribution graph explains one prompt; got a batch of {batch['input_ids'].shape[0]}. "
                             "Build one graph per prompt.")
        if not bool(batch["attention_mask"].all()):
            raise GraphError("The prompt has padding; pass one unpadded prompt (a string or a [1, pos] id tensor).")
        if model.steering:
            raise GraphError(f"{len(model.steering)} hook interventions of an applied plan are active on this model; "
                             "the replacement reads the model's own forward and would not see them. Undo the plan "
                             "(or bake it into the weights) before building a graph.")
        self.batch = batch
        self.ids = batch["input_ids"][0]
        a = model.arch
        L = model.dims.n_layers
        self._mlp = [model.layer_module(i, a.mlp) for i in range(L)]
        self._write = [model.layer_module(i, a.mlp_write) for i in range(L)]
        self._attn = {id(model.layer_module(i, a.attn)): i for i in range(L)}
        skip = {id(m) for m in self._write}
        self._norms = [(n, m) for n, m in model.hf.named_modules() if is_norm(m) and id(m) not in skip]
        self._final = model.module(a.final_norm)
        self._unembed = model.module(a.unembed)
        self._record()

    # ---- the real forward ----------------------------------------------------------------
    def _record(self) -> None:
        """Run the real model once: norm scales, attention patterns, MLP inputs/outputs, features, errors."""
        m = self.model
        L = m.dims.n_layers
        seen: dict = {"norm": {}, "pattern": {}, "mlp_in": {}, "mlp_out": {}}
        impl = m.hf.config._attn_implementation
        registered = ALL_ATTENTION_FUNCTIONS.get(impl, None) if impl != "eager" else None

        def attention(module, query, key, value, attention_mask, **kwargs):
            base = registered or sys.modules[type(module).__module__].eager_attention_forward
            out, weights = base(module, query, key, value, attention_mask, **kwargs)
            layer = self._attn.get(id(module))
            if layer is not None:
                p = attention_pattern(module, query, key, attention_mask, kwargs) if weights is None else weights
                seen["pattern"][layer] = p.detach()
                check = _apply_pattern(p, value).to(out.dtype)
                err = (check - out).abs().max().item()
                if not err <= 1e-4 * (1.0 + out.abs().max().item()):
                    raise GraphError(
                        f"Layer {layer}'s attention does not equal softmax(q k^T) v as mechanic reconstructs it "
                        f"(max difference {err:.3g}); it may use a feature mechanic does not freeze yet (attention "
                        "sinks, a sliding window shorter than the prompt). Use a prompt shorter than the window, "
                        "or load the model with attn_implementation='eager'.")
            return out, weights

        with ExitStack() as stack:
            stack.callback(override(ALL_ATTENTION_FUNCTIONS, impl, attention))
            hook = lambda mod, fn, **kw: stack.callback(mod.register_forward_hook(fn, **kw).remove)  # noqa: E731
            pre = lambda mod, fn: stack.callback(mod.register_forward_pre_hook(fn, with_kwargs=True).remove)  # noqa: E731
            for name, mod in self._norms:
                def keep(mod, args, kwargs, out, name=name):
                    if name in seen["norm"]:
                        raise GraphError(f"The norm {name} ran twice in one forward; mechanic freezes each norm "
                                         "once per forward and cannot build a graph for this model.")
                    seen["norm"][name] = (_hidden(args, kwargs).detach(), out.detach())
                hook(mod, keep, with_kwargs=True)
            for i in range(L):
                pre(self._mlp[i], lambda mod, args, kwargs, i=i: seen["mlp_in"].__setitem__(i, _hidden(args, kwargs).detach()))
                hook(self._write[i], lambda mod, args, out, i=i:
                     seen["mlp_out"].__setitem__(i, (out[0] if isinstance(out, tuple) else out).detach()))
            pre(m.layers[0], lambda mod, args, kwargs: seen.__setitem__("embed", _hidden(args, kwargs).detach()))
            hook(self._unembed, lambda mod, args, out: seen.__setitem__("logits", out.detach()))
            with torch.no_grad():
                self.hf_logits = m.hf(**self.batch, use_cache=False).logits[0].detach()

        missing = [i for i in range(L) if i not in seen["pattern"]]
        if missing:
            raise GraphError(f"The attention of layers {missing} did not go through transformers' AttentionInterface, "
                             "so mechanic cannot freeze its pattern; this architecture is not supported by graphs yet.")
        mods = dict(self._norms)
        self.norms: dict[str, FrozenNorm] = {n: frozen_norm(mods[n], x, y, n) for n, (x, y) in seen["norm"].items()}
        self.patterns = [seen["pattern"][i] for i in range(L)]
        self.logits = seen["logits"][0]                 # [P, vocab] unembedding output (before soft-capping)
        self.mlp_in = [seen["mlp_in"][i][0] for i in range(L)]
        self.mlp_out = [seen["mlp_out"][i][0] for i in range(L)]
        self.active: list[Active] = []
        acts, errors = [], []
        with torch.no_grad():
            for i, d in enumerate(self.transcoders):
                x, y = self.mlp_in[i], self.mlp_out[i]
                if d is None:
                    self.active.append(Active(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
                    acts.append(x.new_zeros(0))
                    errors.append(y.clone())
                    continue
                a = d.encode(x).to(x.dtype)
                if self.zero_first:     # position 0 sees only itself: its features become its error node
                    a[0] = 0
                pos, feat = a.nonzero(as_tuple=True)        # row-major: sorted by position, then feature
                unique, inverse = feat.unique(return_inverse=True)
                rows = decoder_rows(d, unique).to(x.dtype)
                counts = torch.bincount(pos, minlength=x.shape[0]).tolist()
                self.active.append(Active(pos, feat, unique, inverse, rows, counts, list(rows[inverse].split(counts))))
                acts.append(a[pos, feat])
                errors.append(y - (d.decode(a.to(d.W_dec.dtype)) + d.skip(x)).to(y.dtype))
        self.sources = Sources(seen["embed"][0], acts, errors)

    # ---- the frozen affine model ---------------------------------------------------------
    @property
    def n_pos(self) -> int:
        return int(self.ids.shape[0])

    def transcoder_write(self, layer: int, x_in: torch.Tensor, acts: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s MLP write in the replacement: features' decoder rows + b_dec + skip(x_in) + error."""
        out = error
        d, act = self.transcoders[layer], self.active[layer]
        if d is None:
            return out.expand(x_in.shape[0], *out.shape[-2:]) if out.dim() == 2 else out
        if len(act.pos):   # position p gets acts at p @ their decoder rows: small matmuls, no [B, n, d] temporaries
            B, d_out = x_in.shape[0], act.rows.shape[-1]
            n = x_in.shape[1]       # a prefix run has the features of the first n positions only
            cols = [a @ r if a.shape[1] else x_in.new_zeros(B, d_out)
                    for a, r in zip(acts.split(act.counts[:n], 1), act.pos_rows[:n])]
            out = out + torch.stack(cols, 1)
        out = out + d.b_dec.detach().to(x_in.dtype)
        if d.W_skip is not None:
            out = out + x_in @ d.W_skip.detach().T.to(x_in.dtype)
        return out

    def prefix(self, sources: Sources, n: int) -> Sources:
        """The sources of the first n positions (views): the replacement of a prompt prefix, exact for them."""
        keep = [sum(a.counts[:n]) if a.counts is not None else 0 for a in self.active]
        return Sources(sources.embed[:, :n], [a[:, :k] for a, k in zip(sources.acts, keep)],
                       [e[:, :n] for e in sources.errors])

    @contextmanager
    def _frozen(self, sources: Sources, trace: dict):
        """Hooks that turn the model's forward into the replacement, reading `sources`, filling `trace`."""
        m = self.model
        impl = m.hf.config._attn_implementation
        n, P = sources.embed.shape[1], self.n_pos
        patterns = [p[:, :, :n, :n] for p in self.patterns]
        norms = {k: f.prefix(n, P) for k, f in self.norms.items()}

        def attention(module, query, key, value, attention_mask, **kwargs):
            layer = self._attn.get(id(module))
            if layer is None:
                raise GraphError("An attention module outside the decoder layers ran during the replacement forward.")
            return _apply_pattern(patterns[layer], value), patterns[layer]

        with ExitStack() as stack:
            stack.callback(override(ALL_ATTENTION_FUNCTIONS, impl, attention))
            stack.enter_context(frozen_parameters(m.hf))
            hook = lambda mod, fn, **kw: stack.callback(mod.register_forward_hook(fn, **kw).remove)  # noqa: E731
            pre = lambda mod, fn: stack.callback(mod.register_forward_pre_hook(fn, with_kwargs=True).remove)  # noqa: E731
            for name, mod in self._norms:
                def norm(mod, args, kwargs, out, f=norms[name], final=mod is self._final):
                    x = _hidden(args, kwargs)
                    y = f(x).to(x.dtype)
                    if final:
                        trace["final"] = y
                    return y
                hook(mod, norm, with_kwargs=True)
            for i in range(m.dims.n_layers):
                def read(mod, args, kwargs, i=i, skip=not m.is_moe(i)):
                    x = trace["mlp_in"][i] = _hidden(args, kwargs)
                    if skip:   # its output is replaced: run the real MLP on no positions (a dense MLP allows it)
                        return _with_hidden(args, kwargs, x[:, :0])
                def write(mod, args, out, i=i):
                    new = self.transcoder_write(i, trace["mlp_in"][i], sources.acts[i], sources.errors[i])
                    return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
                pre(self._mlp[i], read)
                hook(self._write[i], write)
            pre(m.layers[0], lambda mod, args, kwargs: _with_hidden(args, kwargs, sources.embed))
            yield

    def run(self, sources: Sources) -> Trace:
        """Evaluate the replacement at `sources` (batched [B, ...]; a prefix of the prompt when they are
        `prefix(sources, n)`); differentiable in the sources."""
        B, n = sources.embed.shape[:2]
        trace: dict = {"mlp_in": {}}
        batch = {k: v[:, :n].expand(B, -1) for k, v in self.batch.items()}
        with self._frozen(sources, trace):
            self.model.hf(**batch, use_cache=False, logits_to_keep=1)
            if "final" not in trace:
                raise GraphError(f"The final norm ({self.model.arch.final_norm}) did not run in the replacement forward.")
            logits = self._unembed(trace["final"][:, -1])
        return Trace([trace["mlp_in"][i] for i in range(self.model.dims.n_layers)], trace["final"], logits)

    def __repr__(self) -> str:
        n = sum(len(a.pos) for a in self.active)
        return (f"Replacement({self.model.name!r}, {self.n_pos} tokens, {n} active features, "
                f"{sum(d is not None for d in self.transcoders)}/{len(self.transcoders)} layers with transcoders)")


def _apply_pattern(pattern: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Attention output [B, P, H, d_head] from a pattern [b, H, P, P] and values [B, H_kv, P, d_head] (GQA aware)."""
    group = pattern.shape[1] // value.shape[1]
    if group > 1:
        value = value.repeat_interleave(group, dim=1)
    return (pattern.to(value.dtype) @ value).transpose(1, 2).contiguous()
