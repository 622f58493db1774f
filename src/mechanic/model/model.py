"""Model: a Hugging Face causal LM as it is, plus its architecture map, sizes and site table."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from mechanic.model.arch import ArchMap, arch_for, get_module
from mechanic.model.dictsites import Codec
from mechanic.model.sites import FEATURE_BASES, Site, SiteError, as_site


@dataclass(frozen=True)
class Dims:
    """Sizes read off the loaded modules (not guessed from config names)."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int | None       # dense FFN width (None when every layer is MoE)
    n_experts: int
    d_expert: int | None
    d_shared: int | None
    vocab: int


class Model:
    """The wrapped model. Never re-implements the forward: every site is read or changed by hooks."""

    def __init__(self, hf_model, tokenizer=None, name: str | None = None):
        self.hf = hf_model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
        self.arch: ArchMap = arch_for(hf_model)
        self.layers = get_module(hf_model, self.arch.layers)
        self.dims = self._dims()
        self.steering: list = []  # interventions of applied plans, active in every run (see mechanic.steer.plan)
        self.dictionaries: dict[str, Codec] = {}  # attached sparse dictionaries by site (see attach)

    # ---- structure -------------------------------------------------------
    def layer_module(self, layer: int, path: str) -> torch.nn.Module | None:
        """A module inside decoder layer `layer` by layer-relative path, or None if absent."""
        try:
            return get_module(self.layers[layer], path)
        except AttributeError:
            return None

    def module(self, path: str) -> torch.nn.Module:
        return get_module(self.hf, path)

    def is_moe(self, layer: int) -> bool:
        return self.arch.experts is not None and self.layer_module(layer, self.arch.experts) is not None

    @property
    def parallel(self) -> bool:
        a = self.arch.parallel_attr
        return bool(a and getattr(self.hf.config, a, False))

    def _dims(self) -> Dims:
        cfg = self.hf.config.get_text_config() if hasattr(self.hf.config, "get_text_config") else self.hf.config
        a = self.arch
        n_heads = cfg.num_attention_heads
        o = self.layer_module(0, a.o_proj)
        z_width = a.o_weight(o).shape[1]
        d_mlp = d_expert = d_shared = None
        n_experts = 0
        for i in range(len(self.layers)):
            if self.is_moe(i):
                ex = self.layer_module(i, a.experts)
                n_experts, d_expert = ex.down_proj.shape[0], ex.down_proj.shape[-1]
                if a.shared_expert:
                    d_shared = self.layer_module(i, a.shared_expert).down_proj.in_features
            elif d_mlp is None:
                d_mlp = a.down_weight(self.layer_module(i, a.down_proj)).shape[1]
        return Dims(
            n_layers=len(self.layers),
            d_model=a.o_weight(o).shape[0],
            n_heads=n_heads,
            n_kv_heads=n_heads // getattr(self.layer_module(0, a.attn), "num_key_value_groups", 1),
            d_head=z_width // n_heads,
            d_mlp=d_mlp,
            n_experts=n_experts,
            d_expert=d_expert,
            d_shared=d_shared,
            vocab=self.module(a.unembed).weight.shape[0],
        )

    # ---- sites -------------------------------------------------------------
    def check(self, site: str | Site) -> Site:
        """Parse and validate a site against this model: layer range, then the kind's own check (mechanic.model.kinds)."""
        from mechanic.model.kinds import kind_of

        s = as_site(site)
        kind = kind_of(s)
        if kind.layered and not 0 <= s.layer < self.dims.n_layers:
            raise SiteError(f"Layer {s.layer} in {s} is out of range: this model has layers 0..{self.dims.n_layers - 1}.")
        kind.check(self, s)
        return s

    # ---- dictionaries ------------------------------------------------------
    def attach(self, codec: Codec) -> Site:
        """Attach a sparse dictionary at its site, so `<site>.sae[f]` and `<site>.sae_error` exist.

        `codec` implements mechanic.model.dictsites.Codec; mechanic.features.attach(model, dictionary)
        builds one from a Dictionary and checks its widths. One dictionary per site: detach the old one first.
        """
        base = self.check(codec.site)
        name = str(base)
        if not any(name.endswith("." + b) for b in FEATURE_BASES) or base.kind in ("sae", "sae_error"):
            raise SiteError(f"A dictionary cannot be attached at {name}; attach it at one of "
                            f"{', '.join(FEATURE_BASES)} (e.g. L3.resid_post; all heads' z is L3.head.z).")
        if codec.source is not None:
            self.check(codec.source)
        if name in self.dictionaries:
            raise SiteError(f"A dictionary is already attached at {name}; detach it first (model.detach({name!r})).")
        self.dictionaries[name] = codec
        return base

    def detach(self, site: str | Site):
        """Remove the dictionary attached at `site` and return it."""
        name = str(as_site(site))
        if name not in self.dictionaries:
            raise SiteError(f"No dictionary is attached at {name} (attached: {', '.join(self.dictionaries) or 'none'}).")
        return self.dictionaries.pop(name)

    def dictionary(self, site: str | Site):
        """The dictionary attached at `site`, or None."""
        return self.dictionaries.get(str(as_site(site)))

    def sites(self, kind: str | None = None) -> list[Site]:
        """Every site of one kind (`resid_post`, `head`, `neuron`, `expert`, `sae`, ...) or the layer-level table."""
        d = self.dims
        out: list[Site] = []
        if kind in (None, "embed"):
            out.append(Site("embed"))
        for layer in range(d.n_layers):
            moe = self.is_moe(layer)
            if kind is None:
                for k in ("resid_pre", "resid_mid", "attn_out", "mlp_out", "resid_post"):
                    if not (k == "resid_mid" and self.parallel):
                        out.append(Site(k, layer))
                out.append(Site("head", layer))
                if moe:
                    out += [Site("router", layer), Site("expert", layer)]
                    if self.arch.shared_expert:
                        out.append(Site("shared_expert", layer))
                else:
                    out.append(Site("neuron", layer))
            elif kind == "head":
                out += [Site("head", layer, h) for h in range(d.n_heads)]
            elif kind == "neuron" and not moe:
                out += [Site("neuron", layer, j) for j in range(d.d_mlp)]
            elif kind == "expert" and moe:
                out += [Site("expert", layer, e) for e in range(d.n_experts)]
            elif kind in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
                if not (kind == "resid_mid" and self.parallel):
                    out.append(Site(kind, layer))
            elif kind in ("router", "shared_expert") and moe:
                out.append(Site(kind, layer))
        if kind in ("sae", "sae_error"):   # the latents / error nodes of every attached dictionary
            for base, codec in self.dictionaries.items():
                b = as_site(base)
                part = str(b).split(".", 1)[1]
                idx = range(codec.width) if kind == "sae" else [None]
                out += [Site(kind, b.layer, f, part) for f in idx]
        if kind in (None, "final"):
            out.append(Site("final"))
        if kind in (None, "logits"):
            out.append(Site("logits"))
        return out

    def shape(self, site: str | Site, batch: int | str = "batch", seq: int | str = "pos") -> tuple:
        """The tensor shape of a site for a batch, known before running."""
        from mechanic.model.kinds import kind_of

        s = self.check(site)
        return kind_of(s).shape(self, s, batch, seq)

    @property
    def fingerprint(self) -> str:
        """A short hash of the config and weights (names, shapes, dtypes, sampled values): ties outputs to a model."""
        import hashlib

        h = hashlib.sha256(self.hf.config.to_json_string(use_diff=False).encode())
        for name, p in self.hf.state_dict().items():
            flat = p.detach().reshape(-1)
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(torch.cat([flat[:64], flat[-64:]]).float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    # ---- running -------------------------------------------------------
    def inputs(self, inputs):
        """Tokenized, left-padded inputs with position_ids (see mechanic.model.inputs.prepare)."""
        from mechanic.model.inputs import prepare

        return prepare(self.tokenizer, inputs, device=self.device)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def run(self, inputs, **kwargs):
        """Run the model with caches, interventions, early stop and gradients (see mechanic.model.hooks.run)."""
        from mechanic.model.hooks import run

        return run(self, inputs, **kwargs)

    def generate(self, inputs, interventions=(), **kwargs):
        """`generate` with interventions active (steering while sampling)."""
        from mechanic.model.hooks import generate

        return generate(self, inputs, interventions=interventions, **kwargs)

    @contextmanager
    def applied(self, plan, check: bool = True):
        """`with model.applied(plan): ...` runs the block with the plan applied, undone afterwards (even on
        errors). Any plan value works: `plan.apply(model, check)` returns a handle with `undo()`
        (mechanic.steer.plan.Plan is one); the engine knows no steering method."""
        handle = plan.apply(self, check=check)
        try:
            yield self
        finally:
            handle.undo()

    def save(self, path) -> Path:
        """Write the model as it is now (weight edits included) to a NEW directory that plain transformers
        loads: safetensors weights, config, tokenizer. Never writes into an existing non-empty directory."""
        import shutil
        import tempfile

        path = Path(path).expanduser()
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"{path} already exists and is not empty; mechanic saves edited models to a new "
                                  "directory only (so no checkpoint is ever overwritten). Choose another path.")
        if self.steering:
            raise ValueError(f"{len(self.steering)} hook interventions of an applied plan are active; they live in "
                             "hooks, not in the weights, so a saved model would not contain them. Save the plan "
                             "(Plan.save) or use its weight-baked form, then save the model.")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + "."))
        try:
            self.hf.save_pretrained(tmp, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            if path.exists():
                path.rmdir()
            tmp.rename(path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return path

    def hook_count(self) -> int:
        """Number of mechanic's torch hooks on the model (0 outside a run; HF's own capture hooks not counted)."""
        n = 0
        for m in self.hf.modules():
            for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks):
                n += sum(getattr(f, "__module__", "").startswith("mechanic.") for f in hooks.values())
        return n

    def __repr__(self) -> str:
        return f"Model({self.name!r}, arch={self.hf.config.model_type}, dims={self.dims})"

