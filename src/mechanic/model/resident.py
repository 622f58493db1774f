"""Offloaded weights made resident: every parameter accelerate offloaded becomes a real tensor in its module.

accelerate keeps an offloaded module's parameters on the meta device and reads their values from a
weights map at each forward. Anything that reads or writes a parameter outside a forward (weight
edits and their undo, ROME statistics, fingerprints, readouts, saving) would see meta tensors. Here
each offloaded value gets a home instead: CPU-offloaded values stay the CPU tensors accelerate
holds; disk-offloaded values become copy-on-write memory maps of files on disk (the checkpoint's own
safetensors entry, as transformers maps it for an undispatched load, or a copy converted to the
loaded dtype once in offload_folder), so pages load on demand and an edit changes memory, never a file.
The module's parameter is that home tensor. A module whose execution device is the CPU needs no
hook work; on another execution device the hook copies the home values there for the forward and
puts the same home Parameter objects back afterwards (`HomeHook`).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}  # numpy stand-ins of each element size


def mapped(path: str | Path, offset: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """A tensor over bytes [offset, ...) of a file, mapped copy-on-write (writes stay in memory)."""
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    size = torch.empty(0, dtype=dtype).element_size()
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    raw = np.memmap(path, dtype=RAW[size], mode="c", offset=offset, shape=(n,))
    if raw.ctypes.data % size:  # an unaligned entry: torch kernels need aligned data, so read it into memory
        return torch.from_numpy(np.array(raw)).view(dtype).reshape(shape)
    return torch.from_numpy(raw).view(dtype).reshape(shape)


def _header(path: str, cache: dict) -> tuple[int, dict]:
    if path not in cache:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            cache[path] = (8 + n, json.loads(f.read(n)))
    return cache[path]


def _from_safetensors(path: str, name: str, cache: dict) -> torch.Tensor:
    start, header = _header(path, cache)
    entry = header[name]
    begin, _ = entry["data_offsets"]
    return mapped(path, start + begin, ST_DTYPES[entry["dtype"]], tuple(entry["shape"]))


def _from_dat(folder: str, key: str, info: dict) -> torch.Tensor:
    """accelerate's raw offload format (offload_state_dict): <key>.dat, bf16 stored as int16, scalars as [1]."""
    dtype = getattr(torch, info["dtype"])
    shape = tuple(info["shape"])
    return mapped(Path(folder) / f"{key}.dat", 0, dtype, shape or (1,)).reshape(shape)


class Homes:
    """Finds the home tensor of each offloaded weight (tied weights share one); an entry stored in another
    dtype is converted once into the offload folder and mapped from there."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder is not None else None
        self.headers: dict = {}
        self.params: dict[tuple, torch.nn.Parameter] = {}

    def param(self, weights_map, name: str, like: torch.Tensor) -> torch.nn.Parameter:
        """The Parameter holding the value accelerate would load for `name` (dtype and shape of `like`)."""
        loader, key = _source(weights_map, name)
        if loader is None:
            where, load = ("map", id(weights_map), name), lambda: weights_map[name]
        elif key in loader.state_dict:
            where, load = ("state", id(loader), key), lambda: loader.state_dict[key]
        elif loader.index[key].get("safetensors_file") is not None:
            info = loader.index[key]
            file, inner = str(Path(info["safetensors_file"]).resolve()), info.get("weight_name", key)
            where, load = ("file", file, inner), lambda: _from_safetensors(file, inner, self.headers)
        else:
            folder = str(Path(loader.save_folder).resolve())
            where, load = ("dat", folder, key), lambda: _from_dat(folder, key, loader.index[key])
        if where not in self.params:
            value = load()
            if tuple(value.shape) != tuple(like.shape):
                raise ValueError(f"The offloaded value of {key or name} has shape {list(value.shape)}, but the "
                                 f"module expects {list(like.shape)}; the offload folder belongs to another model.")
            if where[0] in ("file", "dat") and value.dtype != like.dtype:
                value = self._converted(value, like.dtype, where)
            elif value.dtype != like.dtype:
                value = value.to(like.dtype)
            self.params[where] = torch.nn.Parameter(value, requires_grad=like.requires_grad)
        return self.params[where]

    def _converted(self, value: torch.Tensor, dtype: torch.dtype, where: tuple) -> torch.Tensor:
        """A mapped entry converted to `dtype`, written once to its own file in the offload folder and mapped from there.

        Mapping the checkpoint's own entries is what transformers does for an undispatched load too (same bytes,
        same addresses modulo 64), so kernels that sum in an alignment-dependent order agree bit for bit.
        """
        import hashlib
        import os

        if self.folder is None:
            raise ValueError(f"Disk-offloaded weights stored in another dtype are converted to {dtype} in offload_folder, "
                             "but none was given; pass offload_folder='some/dir'.")
        src = Path(where[1])
        st = src.stat()
        tag = f"{src}:{st.st_mtime_ns}:{st.st_size}:{where[2]}:{dtype}"
        out = self.folder / f"mechanic-{hashlib.sha256(tag.encode()).hexdigest()[:24]}.bin"
        if not out.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            value.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy().tofile(tmp)
            os.replace(tmp, out)   # a reader mapping an older copy keeps its own inode
        return mapped(out, 0, dtype, tuple(value.shape))


def _source(weights_map, name: str):
    """(OffloadedWeightsLoader, full key) behind an accelerate weights map, or (None, None) for a plain mapping."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    prefix = ""
    while isinstance(weights_map, PrefixedDataset):
        prefix = weights_map.prefix + prefix
        weights_map = weights_map.dataset
    if isinstance(weights_map, OffloadedWeightsLoader):
        return weights_map, prefix + name
    return None, None


def _put(module: torch.nn.Module, name: str, value: torch.nn.Parameter | torch.Tensor) -> None:
    """Set a parameter (or buffer) by dotted name relative to `module`, keeping it a Parameter or buffer."""
    *path, last = name.split(".")
    for part in path:
        module = getattr(module, part)
    if last in module._parameters:
        module._parameters[last] = value
    else:
        module._buffers[last] = value


class HomeHook:
    """accelerate's AlignDevicesHook for an execution device other than the home's: the hook copies the home
    values there for the forward (as it would from its weights map), then the home Parameters come back."""

    def __init__(self, inner, homes: dict[str, torch.nn.Parameter]):
        self.inner, self.homes = inner, homes
        inner.weights_map = {name: p.data for name, p in homes.items()}

    def __getattr__(self, name):   # the rest of accelerate's hook interface (execution_device, io_same_device...)
        return getattr(self.__dict__["inner"], name)

    def init_hook(self, module):
        return module

    def pre_forward(self, module, *args, **kwargs):
        for name, p in self.homes.items():   # a weight edited since the last forward is read afresh
            self.inner.weights_map[name] = p.data
        return self.inner.pre_forward(module, *args, **kwargs)

    def post_forward(self, module, output):
        output = self.inner.post_forward(module, output)
        for name, p in self.homes.items():
            _put(module, name, p)
        return output

    def detach_hook(self, module):
        return self.inner.detach_hook(module)


def make_resident(hf: torch.nn.Module, folder: str | Path | None = None) -> int:
    """Give every offloaded parameter of a dispatched model a home tensor (see the module doc); returns how many."""
    from accelerate.hooks import AlignDevicesHook
    from accelerate.utils import named_module_tensors

    homes = Homes(folder)
    count = 0
    for module in hf.modules():
        hook = getattr(module, "_hf_hook", None)
        if not isinstance(hook, AlignDevicesHook) or not hook.offload:
            continue
        placed = {}
        for name, t in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                            recurse=hook.place_submodules, remove_non_persistent=True):
            if t.device.type != "meta":
                continue
            p = homes.param(hook.weights_map, name, t)
            _put(module, name, p if isinstance(t, torch.nn.Parameter) else p.data)
            placed[name] = p
            count += 1
        if torch.device(hook.execution_device).type == "cpu":
            hook.offload, hook.weights_map = False, None   # the home is where it runs: nothing to move
        else:
            module._hf_hook = HomeHook(hook, placed)
    return count


def offloaded_meta(hf: torch.nn.Module) -> list[str]:
    """Names of parameters still on the meta device (none after make_resident)."""
    return [n for n, p in hf.named_parameters() if p.device.type == "meta"]
