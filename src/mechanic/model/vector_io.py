"""Vector files: safetensors with metadata in the header, and llama.cpp control vectors (GGUF), written atomically.

llama.cpp layer convention (read in ggml-org/llama.cpp):
- common/common.cpp, `common_control_vector_load_one`: a tensor `direction.N` is parsed to
  layer_idx = N; N = 0 is refused ("invalid (zero) direction tensor layer index"); its data goes to
  offset n_embd * (N - 1) of the buffer ("layer 1 at [0]"), scaled by the --control-vector-scaled strength.
- src/llama-adapter.cpp (commit 0650ea8c), `llama_adapter_cvec::init` line 65: tensors[0] is always null
  ("there's never a tensor for layer 0"); `apply` line 127: for il = 1 .. n_layer-1, tensors[il] gets the
  buffer at n_embd * (il - 1), i.e. `direction.il`; `apply_to` (lines 22-29) adds tensors[il] to `cur`.
- src/models/llama.cpp (and every other model graph), the layer loop `for (il = 0; il < n_layer; ++il)`:
  `cur = ggml_add(ctx0, cur, ffn_inp)` (the layer's residual output) then `cur = build_cvec(cur, il)`
  then `cb(cur, "l_out", il)`.

So `direction.N` is added to the output of 0-based decoder layer N: exactly mechanic's `LN.resid_post`
(HF `model.layers[N]` output, `hidden_states[N + 1]`). The index is the same number, no shift. Layer 0's
output cannot be steered by llama.cpp, so export refuses a vector with a layer-0 direction. The
`--control-vector-layer-range A B` option keeps layers A..B inclusive, in the same numbering.
`controlvector.layer_count` is written as the number of direction tensors (as repeng and llama.cpp's
cvector-generator do); llama.cpp itself does not read it, nor `controlvector.model_hint`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mechanic.files import atomic_path
from mechanic.model.vector import Vector, VectorError

FORMAT = "mechanic-vector/1"
META_KEY = "mechanic.vector"          # safetensors header key, and an extra GGUF string key (ignored by llama.cpp)
ARCH = "controlvector"


def save(vector: Vector, path) -> Path:
    """safetensors (`direction.{L}` tensors, metadata JSON in the header), or GGUF for a .gguf path."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return to_gguf(vector, path)
    from safetensors.torch import save_file

    tensors = {f"direction.{L}": d.contiguous() for L, d in vector.directions.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT, META_KEY: json.dumps(vector.metadata())})
    return path


def load(path) -> Vector:
    """A Vector from a file written by `save` or any llama.cpp control vector (.gguf)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No vector file at {path}.")
    if path.suffix.lower() == ".gguf":
        return from_gguf(path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
            if META_KEY not in header:
                raise VectorError(f"{path} is a safetensors file but not a mechanic vector (no {META_KEY!r} "
                                  "metadata); write vectors with Vector.save.")
            dirs = {_layer(path, k): f.get_tensor(k) for k in f.keys() if k.startswith("direction.")}
        meta = json.loads(header[META_KEY])
    except VectorError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or corrupted file, bad JSON: one message
        raise VectorError(f"{path} is not a readable vector file ({type(e).__name__}: {e}); vectors are written by "
                          "Vector.save (safetensors) or are llama.cpp control vectors (.gguf).") from None
    return _from_meta(dirs, meta, path)


def _layer(path, name: str) -> int:
    try:
        layer = int(name.split(".", 1)[1])
    except ValueError:
        raise VectorError(f"{path}: tensor {name!r} does not name a layer (expected direction.N).") from None
    if layer < 0 or str(layer) != name.split(".", 1)[1]:
        raise VectorError(f"{path}: tensor {name!r} does not name a layer (expected direction.N, N >= 0).")
    return layer


KINDS_OF = {"site": str, "method": str, "read": str, "model": (str, type(None)), "model_type": (str, type(None)),
            "fingerprint": (str, type(None)), "operation": str, "norm": str, "layer_convention": str,
            "settings": dict}


def _from_meta(dirs: dict[int, torch.Tensor], meta, path="the vector file") -> Vector:
    if not isinstance(meta, dict):
        raise VectorError(f"{path}: the vector metadata is a JSON {type(meta).__name__}, not an object.")
    bad = [k for k, t in KINDS_OF.items() if k in meta and not isinstance(meta[k], t)]
    if bad:
        raise VectorError(f"{path}: vector metadata field(s) {bad} have the wrong type "
                          f"({', '.join(f'{k}={meta[k]!r}' for k in bad)}).")
    return Vector(dirs, **{k: meta[k] for k in KINDS_OF if k in meta})


def to_gguf(vector: Vector, path, coefficient: float = 1.0, model_hint: str | None = None) -> Path:
    """Write a llama.cpp control vector: arch `controlvector`, `direction.{L}` F32 tensors (times coefficient).

    Only `add` vectors at `resid_post` fit llama.cpp's hook point (the decoder layer's output), and
    layer 0 cannot be steered there. The full mechanic metadata rides along as an extra string key.
    """
    import gguf
    import numpy as np

    if vector.site != "resid_post" or vector.operation != "add":
        raise VectorError(f"llama.cpp adds control vectors to each decoder layer's output (resid_post); this vector is "
                          f"{vector.site}/{vector.operation}. Extract it at site='resid_post' with operation 'add'.")
    if 0 in vector.directions:
        raise VectorError("llama.cpp never steers layer 0 (it refuses a direction.0 tensor); drop it first with "
                          f"vector.select({[L for L in vector.layers if L != 0]}).")
    path = Path(path)
    hint = model_hint or vector.model_type or vector.model or "unknown"
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(vector.directions))
        meta = dict(vector.metadata(), gguf_coefficient=float(coefficient))
        writer.add_string(META_KEY, json.dumps(meta))
        for L in vector.layers:
            data = (vector.directions[L] * float(coefficient)).numpy().astype(np.float32)
            writer.add_tensor(f"direction.{L}", data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _string(reader, key: str) -> str | None:
    f = reader.get_field(key)
    if f is None or not len(f.parts):
        return None
    return bytes(f.parts[f.data[0]]).decode("utf-8")


def from_gguf(path) -> Vector:
    """Read a llama.cpp control vector (ours, repeng's, cvector-generator's): direction.N -> layer N, resid_post, add.

    A file written by `to_gguf` gets its full metadata back (directions divided by the coefficient it was
    exported with); any other file gets method "gguf" and the model hint as model_type.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No control vector file at {path}.")
    try:
        reader = gguf.GGUFReader(str(path))
        arch = _string(reader, "general.architecture")
        tensors = list(reader.tensors)
        raw = _string(reader, META_KEY)
        hint = _string(reader, f"{ARCH}.model_hint")
    except Exception as e:  # noqa: BLE001 - truncated or corrupted GGUF header: one message
        raise VectorError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); a llama.cpp control "
                          "vector is a GGUF file of architecture 'controlvector'.") from None
    if arch != ARCH:
        raise VectorError(f"{path} is a GGUF file of architecture {arch!r}, not a llama.cpp control vector "
                          f"({ARCH!r}); a model GGUF loads with mechanic.load instead.")
    dirs = {}
    for t in tensors:
        name = t.name
        if not name.startswith("direction."):
            raise VectorError(f"{path}: unexpected tensor {name!r}; a control vector holds only direction.N tensors.")
        layer = _layer(path, name)
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise VectorError(f"{path}: {name} must be a 1-D F32 tensor (llama.cpp's rule).")
        dirs[layer] = torch.from_numpy(t.data.copy()).to(torch.float32)
    if not dirs:
        raise VectorError(f"{path} holds no direction tensors.")
    if raw is not None:
        try:
            meta = json.loads(raw)
            c = float(meta.pop("gguf_coefficient", 1.0))
        except Exception as e:  # noqa: BLE001
            raise VectorError(f"{path}: its {META_KEY!r} metadata is not a vector's ({type(e).__name__}: {e}).") from None
        if not math.isfinite(c) or c == 0:
            raise VectorError(f"{path}: its export coefficient is {c}; it must be a finite non-zero number.")
        if c != 1.0:
            dirs = {L: d / c for L, d in dirs.items()}
        return _from_meta(dirs, meta, path)
    return Vector(dirs, site="resid_post", method="gguf", read="unknown", model_type=hint, operation="add",
                  settings={"source": str(path)})
