"""Architecture maps: where each site lives in a Hugging Face model family, declared as data."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ArchMap:
    """Module paths for one model family. Layer-relative paths start at one decoder layer.

    A new family is one small file in `mechanic/model/archs/` that defines `ARCH = ArchMap(...)`.
    """

    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    unembed: str = "lm_head"
    attn: str = "self_attn"              # attention module (the AttentionInterface caller)
    o_proj: str = "self_attn.o_proj"     # its input is z (all heads concatenated)
    attn_write: str = "self_attn"        # output is what the attention block adds to the residual
    mlp: str = "mlp"
    mlp_write: str = "mlp"               # output is what the MLP block adds to the residual
    down_proj: str = "mlp.down_proj"     # its input is the FFN neuron activations
    conv1d: bool = False                 # GPT-2 style Conv1D weights stored [in, out]
    parallel_attr: str | None = None     # config flag for a parallel residual (attn and mlp read resid_pre)
    router: str | None = None            # MoE: router module, returns (logits, weights, indices)
    experts: str | None = None           # MoE: fused experts module (3-D gate_up_proj/down_proj)
    shared_expert: str | None = None     # MoE: an ordinary MLP module run on every token
    shared_expert_gate: str | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def o_weight(self, module: torch.nn.Module) -> torch.Tensor:
        """The o_proj weight as [d_model, n_heads * d_head]."""
        return module.weight.T if self.conv1d else module.weight

    def down_weight(self, module: torch.nn.Module) -> torch.Tensor:
        """The down_proj weight as [d_model, d_mlp]."""
        return module.weight.T if self.conv1d else module.weight


class UnknownArchitecture(ValueError):
    """A model family with no map."""


def _load_maps() -> dict[str, ArchMap]:
    from mechanic.model import archs

    maps: dict[str, ArchMap] = {}
    for info in pkgutil.iter_modules(archs.__path__):
        arch = importlib.import_module(f"{archs.__name__}.{info.name}").ARCH
        for t in arch.model_types:
            maps[t] = arch
    return maps


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """Follow a dotted path (`model.layers`) from a module."""
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def arch_for(hf_model: torch.nn.Module) -> ArchMap:
    """The map of a loaded HF model, or a clear error naming what was found and how to add a map."""
    config = hf_model.config
    model_type = getattr(config, "model_type", None)
    maps = _load_maps()
    if model_type in maps:
        return maps[model_type]
    found = [n for n, _ in hf_model.named_modules() if n and n.count(".") <= 3][:40]
    raise UnknownArchitecture(
        f"mechanic has no architecture map for {type(hf_model).__name__} (model_type={model_type!r}). "
        f"Known families: {', '.join(sorted(maps))}. Module paths found: {', '.join(found)}. "
        "To add it, create src/mechanic/model/archs/<family>.py with "
        "`ARCH = ArchMap(model_types=(...), layers=..., embed=..., ...)` naming these paths "
        "(see archs/llama.py), then run the parity tests in tests/test_parity.py."
    )
