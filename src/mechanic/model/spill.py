"""A cache larger than its memory budget: each site's rows written to a safetensors file batch by batch, and read
back as memory-mapped tensors (pages load from disk when touched), indexed like the in-memory cache.

One file per site, `<site>.safetensors`, holding one tensor named after the site, shape [rows, ...]. The header
is written with the first batch (its shape gives every row's), the rows follow in order; each file is written
to a temporary name and moved into place only when every row is in (mechanic.files.atomic_path), so a crash
never leaves a file that looks whole. Read back copy-on-write: an in-place change stays in memory.
"""

from __future__ import annotations

import json
import struct
import tempfile
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import torch

from mechanic.files import atomic_path
from mechanic.model.resident import _from_safetensors
from mechanic.model.store import _ST_DTYPES


def _bytes(t: torch.Tensor) -> memoryview:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


class SpillWriter:
    """Writes `rows` rows of each site, batch after batch in row order; `finish()` returns the SpilledCache."""

    def __init__(self, folder: str | Path | None, rows: int):
        self._tmp = tempfile.TemporaryDirectory(prefix="mechanic-cache-") if folder is None else None
        self.folder = Path(self._tmp.name if folder is None else folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows = rows
        self._stack = ExitStack()
        self._files: dict[str, tuple] = {}    # site -> (open file, rows written)

    def write(self, site: str, value: torch.Tensor) -> None:
        """Append `value`'s rows (dim 0) to the site's file."""
        if site not in self._files:
            tmp = self._stack.enter_context(atomic_path(self.folder / f"{site}.safetensors"))
            f = self._stack.enter_context(open(tmp, "wb"))
            shape = [self.rows, *value.shape[1:]]
            nbytes = self.rows * value[:1].numel() * value.element_size()
            head = json.dumps({site: {"dtype": _ST_DTYPES[value.dtype], "shape": shape,
                                      "data_offsets": [0, nbytes]}}).encode()
            head += b" " * (-len(head) % 8)     # data starts 8-byte aligned
            f.write(struct.pack("<Q", len(head)) + head)
            self._files[site] = (f, 0)
        f, done = self._files[site]
        f.write(_bytes(value))
        self._files[site] = (f, done + value.shape[0])

    def finish(self) -> "SpilledCache":
        """Close every file (moving each into place) and map them back."""
        short = {s: n for s, (_, n) in self._files.items() if n != self.rows}
        if short:
            self.abort()
            raise RuntimeError(f"Spilled cache incomplete: {short} rows written of {self.rows}.")
        self._stack.close()
        return SpilledCache(self.folder, list(self._files), self._tmp)

    def abort(self) -> None:
        """Drop the partial files (after an error)."""
        err = RuntimeError("aborted")
        try:
            self._stack.__exit__(RuntimeError, err, None)   # each atomic_path removes its temporary file
        except RuntimeError:
            pass
        if self._tmp is not None:
            self._tmp.cleanup()


class SpilledCache(Mapping):
    """{site: tensor [rows, ...]} whose tensors are memory-mapped from `<folder>/<site>.safetensors`: index, slice and
    compute with them like the in-memory cache; only the pages touched are read. A cache spilled to a temporary
    directory removes it when this object is garbage-collected (tensors already taken stay readable)."""

    def __init__(self, folder: str | Path, sites: list[str] | None = None, _tmp=None):
        self.folder = Path(folder)
        self.sites = sites if sites is not None else sorted(p.name[:-len(".safetensors")]
                                                            for p in self.folder.glob("*.safetensors"))
        self._tmp = _tmp
        self._mapped: dict[str, torch.Tensor] = {}

    def __getitem__(self, site) -> torch.Tensor:
        name = str(site)
        if name not in self.sites:
            raise KeyError(f"{name} is not in this cache; it holds {', '.join(self.sites) or 'nothing'}.")
        if name not in self._mapped:
            self._mapped[name] = _from_safetensors(str(self.folder / f"{name}.safetensors"), name, {})
        return self._mapped[name]

    def __iter__(self):
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __repr__(self) -> str:
        return f"SpilledCache({str(self.folder)!r}, sites={self.sites})"


__all__ = ["SpillWriter", "SpilledCache"]
