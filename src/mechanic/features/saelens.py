"""Load and save dictionaries in the SAELens on-disk format (cfg.json + sae_weights.safetensors), safetensors only.

Reads SAELens 6 configs and the older flat ones (hook_point, activation_fn_kwargs.k, boolean
normalize_activations, scaling_factor); writes the 6.x layout so SAELens's `SAE.load_from_disk` reads
mechanic's files. Architectures: standard (= mechanic relu), topk, jumprelu, gated, and the
transcoders transcoder / skip_transcoder / jumprelu_transcoder / jumprelu_skip_transcoder; BatchTopK
is written as JumpReLU with its threshold, as SAELens does. TopK transcoders are written as
`topk_transcoder` / `topk_skip_transcoder`, which only mechanic reads (SAELens has no such class).
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib import metadata as md
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mechanic.features.dictionary import Dictionary
from mechanic.features.errors import FeaturesError
from mechanic.features.hooknames import hook_from_site, parse_site, site_from_hook

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
FORMAT_VERSION = "6.0.0"   # the SAELens config layout written (metadata block), not the writer's version

# SAELens architecture -> (mechanic architecture, transcoder, skip)
ARCH_IN = {
    "standard": ("relu", False, False), "relu": ("relu", False, False),
    "topk": ("topk", False, False), "batchtopk": ("batchtopk", False, False),
    "jumprelu": ("jumprelu", False, False), "gated": ("gated", False, False),
    "transcoder": ("relu", True, False), "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False), "jumprelu_skip_transcoder": ("jumprelu", True, True),
    "topk_transcoder": ("topk", True, False), "topk_skip_transcoder": ("topk", True, True),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _version() -> str:
    try:
        return md.version("mechanic")
    except md.PackageNotFoundError:
        return "unknown"


def arch_out(d: Dictionary) -> str:
    """The SAELens architecture name a dictionary is written as."""
    base = {"relu": "standard", "batchtopk": "jumprelu"}.get(d.architecture, d.architecture)
    if not d.transcoder:
        return base
    base = "" if base == "standard" else base + "_"
    return f"{base}{'skip_' if d.W_skip is not None else ''}transcoder"


# ---------------------------------------------------------------- load
def _read_cfg(path: Path) -> dict:
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"No dictionary at {path}: expected a directory with {CFG} and {WEIGHTS} "
                                "(the SAELens format).")
    if not (path / CFG).is_file() or not (path / WEIGHTS).is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing"
        hint = (" It looks like an EleutherAI sparsify directory (sae.safetensors), which mechanic does not read "
                "yet." if (path / "sae.safetensors").exists() else "")
        raise FeaturesError(f"{path} is not a SAELens dictionary directory: it needs {CFG} and {WEIGHTS} "
                            f"(found {found}). Pickled .pt files are never loaded.{hint}")
    try:
        return json.loads((path / CFG).read_text())
    except json.JSONDecodeError as e:
        raise FeaturesError(f"{path / CFG} is not valid JSON ({e}).") from None


def _flatten(cfg: dict) -> dict:
    """One flat dict from a 6.x (metadata block) or older (flat, hook_point) config."""
    flat = {**cfg.get("metadata", {}), **{k: v for k, v in cfg.items() if k != "metadata"}}
    if "hook_point" in flat and "hook_name" not in flat:
        flat["hook_name"] = flat["hook_point"]
    if "hook_point_head_index" in flat and "hook_head_index" not in flat:
        flat["hook_head_index"] = flat["hook_point_head_index"]
    if flat.get("k") is None and isinstance(flat.get("activation_fn_kwargs"), dict):
        flat["k"] = flat["activation_fn_kwargs"].get("k")
    if "architecture" not in flat:
        flat["architecture"] = "topk" if flat.get("activation_fn", flat.get("activation_fn_str")) == "topk" else "standard"
    norm = flat.get("normalize_activations")
    flat["normalize_activations"] = ("expected_average_only_in" if norm is True else
                                     "none" if norm in (None, False) else norm)
    return flat


def load(path, site: str | None = None, out_site: str | None = None, dtype: torch.dtype | None = None) -> Dictionary:
    """A Dictionary from a SAELens-format directory. `site`/`out_site` override the hook names in cfg.json."""
    path = Path(path).expanduser()
    flat = _flatten(_read_cfg(path))
    if path.is_file():
        path = path.parent
    arch = flat["architecture"]
    if arch not in ARCH_IN:
        raise FeaturesError(f"{path}: architecture {arch!r} is not supported; mechanic reads "
                            f"{', '.join(sorted(ARCH_IN))}.")
    architecture, transcoder, skip = ARCH_IN[arch]
    if flat.get("hook_head_index") is not None:
        raise FeaturesError(f"{path}: the dictionary reads one head ({flat.get('hook_name')}, head "
                            f"{flat['hook_head_index']}); mechanic reads z of all heads only (hook_z).")
    norm = flat["normalize_activations"]
    fold = None
    if norm == "expected_average_only_in":
        fold = flat.get("norm_scaling_factor")   # applied below if the file gives it (SAELens folds it too)
        norm = "none"
    if norm == "covariance_whitening":
        raise FeaturesError(f"{path}: normalize_activations='covariance_whitening' needs the whitening files of "
                            "SAELens training; fold them into the weights (SAELens fold_activation_whitening) first.")
    try:
        weights = load_file(str(path / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types
        raise FeaturesError(f"{path / WEIGHTS} cannot be read as safetensors ({e}).") from None
    for old, new in (("log_threshold", "threshold"), ("topk_threshold", "threshold")):
        if old in weights and "threshold" not in weights:
            t = weights.pop(old)
            weights["threshold"] = t.exp() if old == "log_threshold" else t.expand(weights["W_enc"].shape[1]).clone()
    if architecture == "batchtopk":
        architecture = "jumprelu" if "threshold" in weights else "topk"
    want = {"W_enc", "W_dec", "b_dec"} | ({"b_gate", "b_mag", "r_mag"} if architecture == "gated" else {"b_enc"})
    want |= {"threshold"} if architecture == "jumprelu" else set()
    want |= {"W_skip"} if skip else set()
    missing = sorted(want - set(weights))
    if missing:
        raise FeaturesError(f"{path / WEIGHTS} lacks {', '.join(missing)} for a {arch} dictionary (it holds "
                            f"{', '.join(sorted(weights))}).")
    d_in, d_sae = weights["W_enc"].shape
    d_out = weights["W_dec"].shape[1]
    for key, val in (("d_in", d_in), ("d_sae", d_sae)):
        if flat.get(key) is not None and int(flat[key]) != val:
            raise FeaturesError(f"{path}: cfg.json says {key}={flat[key]} but W_enc is {tuple(weights['W_enc'].shape)}.")
    if dtype is None:
        dtype = DTYPES.get(str(flat.get("dtype", "float32")).replace("torch.", ""), torch.float32)
    if site is None and flat.get("hook_name") is not None:
        site = flat.get("mechanic_site") or site_from_hook(flat["hook_name"])
    if transcoder and out_site is None and flat.get("hook_name_out") is not None:
        out_site = flat.get("mechanic_out_site") or site_from_hook(flat["hook_name_out"])
    if transcoder and out_site is None and site is not None and parse_site(site)[1] in ("mlp_in", "resid_mid"):
        out_site = f"L{parse_site(site)[0]}.mlp_out"
    k = flat.get("k")
    if architecture == "topk" and k is None:
        raise FeaturesError(f"{path}: a topk dictionary needs k in cfg.json.")
    d = Dictionary(d_in, d_sae, architecture, k=int(k) if architecture == "topk" else None, site=site,
                   out_site=out_site if transcoder else None, d_out=d_out, skip=skip, transcoder=transcoder,
                   apply_b_dec_to_input=bool(flat.get("apply_b_dec_to_input", not transcoder)) and not transcoder,
                   normalize=norm, rescale_acts_by_decoder_norm=bool(flat.get("rescale_acts_by_decoder_norm", False)),
                   dtype=dtype, metadata={k_: v for k_, v in flat.items() if _jsonable(v)})
    state = {n: weights[n].to(dtype) for n in want}
    d.load_state_dict(state, strict=False)
    if "scaling_factor" in weights and not torch.allclose(weights["scaling_factor"], torch.ones(1)):
        d.scaling_factor = weights["scaling_factor"].to(dtype)
    if fold is not None:
        fold_scale(d, float(fold))
    return d


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


@torch.no_grad()
def fold_scale(d: Dictionary, s_in: float, s_out: float | None = None) -> None:
    """Fold input scaling x' = s_in·x (and output y' = s_out·y) used in training into the weights."""
    s_out = s_in if s_out is None else s_out
    d.W_enc.mul_(s_in)
    d.W_dec.div_(s_out)
    d.b_dec.div_(s_out)
    if d.W_skip is not None:
        d.W_skip.mul_(s_in / s_out)


# ---------------------------------------------------------------- save
def cfg_dict(d: Dictionary, model_name: str | None = None) -> dict:
    """The cfg.json contents for a dictionary."""
    dtype = str(d.W_enc.dtype).replace("torch.", "")
    cfg = {"architecture": arch_out(d), "d_in": d.d_in, "d_sae": d.d_sae, "dtype": dtype, "device": "cpu",
           "apply_b_dec_to_input": d.apply_b_dec_to_input, "normalize_activations": d.normalize,
           "reshape_activations": "hook_z" if d.site and d.site.endswith("head.z") else "none"}
    if d.architecture == "topk":
        cfg["k"] = int(d.k)
        cfg["rescale_acts_by_decoder_norm"] = d.rescale_acts_by_decoder_norm
    if d.transcoder:
        cfg["d_out"] = d.d_out
    keep = {k: v for k, v in d.metadata.items() if k not in cfg and k not in ("architecture", "hook_point")}
    meta = {**keep, "model_name": model_name or keep.get("model_name"),
            "hook_name": hook_from_site(d.site) if d.site else None, "hook_head_index": None,
            "mechanic_site": d.site, "mechanic_version": _version(), "sae_lens_version": FORMAT_VERSION,
            "sae_lens_training_version": keep.get("sae_lens_training_version") or FORMAT_VERSION}
    if d.transcoder:
        meta["hook_name_out"] = hook_from_site(d.out_site) if d.out_site else None
        meta["hook_head_index_out"] = None
        meta["mechanic_out_site"] = d.out_site
    if d.architecture == "batchtopk":
        meta["training_architecture"] = "batchtopk"
        meta["k"] = d.k
    cfg["metadata"] = meta
    return cfg


def state_dict_out(d: Dictionary) -> dict[str, torch.Tensor]:
    """The tensors written to sae_weights.safetensors (contiguous, detached)."""
    names = ["W_enc", "W_dec", "b_dec"] + (["b_gate", "b_mag", "r_mag"] if d.architecture == "gated" else ["b_enc"])
    names += ["threshold"] if d.architecture in ("jumprelu", "batchtopk") else []
    names += ["W_skip"] if d.W_skip is not None else []
    out = {n: getattr(d, n).detach().contiguous().cpu() for n in names}
    if d.scaling_factor is not None:
        out["scaling_factor"] = d.scaling_factor.detach().contiguous().cpu()
    return out


def save(d: Dictionary, path, model_name: str | None = None, overwrite: bool = False) -> Path:
    """Write cfg.json + sae_weights.safetensors into directory `path` (each file replaced atomically)."""
    path = Path(path).expanduser()
    if not overwrite and ((path / CFG).exists() or (path / WEIGHTS).exists()):
        raise FileExistsError(f"{path} already holds a dictionary; choose another directory or pass overwrite=True.")
    path.mkdir(parents=True, exist_ok=True)
    cfg = cfg_dict(d, model_name)
    if cfg["metadata"].get("sae_lens_version") and d.scaling_factor is not None:
        cfg["finetuning_scaling_factor"] = True
    for name, write in ((WEIGHTS, lambda p: save_file(state_dict_out(d), p)),
                        (CFG, lambda p: Path(p).write_text(json.dumps(cfg, indent=1) + "\n"))):
        fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{name}.")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path / name)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path
