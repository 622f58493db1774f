"""Activation store: stream site activations to safetensors shards with a bounded buffer, resumably; read them lazily.

Layout of `out_dir`: `shard-00000.safetensors`, ... (each a contiguous range of rows, one tensor per site,
plus `token_index` and `prompt_index` when storing every token) and `manifest.json`. Shards and the manifest
are written to a temporary file and moved into place with os.replace, so a crash never leaves a torn file;
only shards listed in the manifest count, and a rerun with the same arguments continues after them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

MB = 2 ** 20
MANIFEST = "manifest.json"
FORMAT = 1
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


# ---------------------------------------------------------------- writing
def stream(model, prompts, sites, out_dir, batch_size: int = 8, pos=-1, buffer_mb: float = 256,
           shard_mb: float = 512) -> "ActivationStore":
    """Run prompts in batches, buffer the sites' values (at `pos`; None = every real token) and flush them to shards.

    prompts: strings (needs a tokenizer) or token-id lists. The buffer is flushed when it holds more than
    `buffer_mb`; a flush writes shards of at most `shard_mb` (whole batches, so at least one batch each).
    RAM stays at about buffer_mb plus one batch. Rerunning with the same model, prompts, sites and pos
    resumes after the last finished shard; different arguments on an existing store raise.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = _normalize(prompts)
    sites = list(dict.fromkeys(str(model.check(s)) for s in ([sites] if isinstance(sites, str) else sites)))
    pos = _check_pos(pos)
    man = _start(out, model, prompts, sites, pos)
    buffer, size = [], 0
    for first in range(man["prompts_done"], len(prompts), batch_size):
        chunk = _collect(model, prompts[first:first + batch_size], first, sites, pos)
        _check_shapes(man, chunk)
        buffer.append(chunk)
        size += _nbytes(chunk)
        if size > buffer_mb * MB:
            _flush(out, man, buffer, shard_mb)
            buffer, size = [], 0
    _flush(out, man, buffer, shard_mb)
    man["complete"] = True
    _save_manifest(out, man)
    return ActivationStore(out)


def _normalize(prompts) -> list:
    """Prompts as a list of strings or a list of int lists (hashable into the manifest, checked for emptiness)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    out = [p if isinstance(p, str) else [int(t) for t in (p.tolist() if isinstance(p, torch.Tensor) else p)]
           for p in prompts]
    if len({isinstance(p, str) for p in out}) > 1:
        raise TypeError("Prompts must be all strings or all token-id lists, not a mix.")
    if any(len(p) == 0 for p in out):
        raise ValueError("Empty prompt: every prompt needs at least one token.")
    return out


def _check_pos(pos):
    """pos as stored in the manifest: None (every real token), an int, or a list of ints."""
    if pos is None or isinstance(pos, int):
        return pos
    if isinstance(pos, (list, tuple)) and all(isinstance(p, int) for p in pos):
        return list(pos)
    raise TypeError(f"stream() takes pos=None, an int or a list of ints (the same for every prompt); got {pos!r}.")


def _hash(prompts: list) -> str:
    """A fingerprint of the prompts, so a resume with other prompts is refused."""
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


def _start(out: Path, model, prompts: list, sites: list[str], pos) -> dict:
    """The manifest to continue from (checked against these arguments), after removing stale tmp/unlisted shards."""
    meta = {"model": model.name, "sites": sites, "pos": pos, "per_token": pos is None,
            "prompts_hash": _hash(prompts), "n_prompts": len(prompts)}
    path = out / MANIFEST
    if path.exists():
        man = json.loads(path.read_text())
        diff = [k for k in meta if man.get(k) != meta[k]]
        if diff:
            raise ValueError(f"{out} already holds a stream with a different {', '.join(diff)}; "
                             "use another out_dir or delete this one.")
    else:
        man = {"format": FORMAT, **meta, "shapes": {}, "dtype": {}, "rows": 0, "prompts_done": 0,
               "complete": False, "shards": []}
    listed = {s["file"] for s in man["shards"]}
    for f in list(out.glob("*.tmp")) + [f for f in out.glob("shard-*.safetensors") if f.name not in listed]:
        f.unlink()
    man["complete"] = man["prompts_done"] == len(prompts)
    _save_manifest(out, man)
    return man


def _inputs(model, prompts: list) -> dict:
    """Left-padded model inputs (attention mask, position_ids) for strings or token-id lists."""
    if isinstance(prompts[0], str):
        tok = model.tokenizer
        if tok is not None and getattr(tok, "padding_side", "left") != "left":
            raise ValueError("stream() needs a left-padding tokenizer (mechanic.load sets one).")
        return model.inputs(prompts)
    n = max(len(p) for p in prompts)
    pad = getattr(model.tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (getattr(model.hf.config, "pad_token_id", None) or 0)
    ids = torch.full((len(prompts), n), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, n - len(p):] = 1
    return model.inputs({"input_ids": ids, "attention_mask": mask})


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous CPU copy (a cached value may be a view that keeps the whole site tensor alive)."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t.detach())


def _collect(model, prompts: list, first: int, sites: list[str], pos) -> dict:
    """One batch: run it and keep each site's rows (per prompt, or per real token when pos is None) on the CPU."""
    batch = _inputs(model, prompts)
    run = model.run(batch, cache=sites, pos=pos, stop_at="auto")
    if pos is None:
        mask = batch["attention_mask"].bool()
        tensors = {s: _cpu(run.cache[s][mask]) for s in sites}
        rows = torch.arange(first, first + len(prompts), device=mask.device)[:, None].expand_as(mask)
        tensors["token_index"] = _cpu(batch["position_ids"][mask])
        tensors["prompt_index"] = _cpu(rows[mask])
    else:
        tensors = {s: _cpu(run.cache[s]) for s in sites}
    del run
    n = len(next(iter(tensors.values())))
    return {"tensors": tensors, "rows": n, "prompts": [first, first + len(prompts)]}


def _nbytes(chunk: dict) -> int:
    """Bytes held by one buffered batch."""
    return sum(t.numel() * t.element_size() for t in chunk["tensors"].values())


def _check_shapes(man: dict, chunk: dict) -> None:
    """Record per-row shape and dtype from the first batch; refuse later batches that differ."""
    for name, t in chunk["tensors"].items():
        shape, dtype = list(t.shape[1:]), str(t.dtype).removeprefix("torch.")
        if name not in man["shapes"]:
            man["shapes"][name], man["dtype"][name] = shape, dtype
        elif (man["shapes"][name], man["dtype"][name]) != (shape, dtype):
            raise ValueError(f"{name}: rows have shape {shape} {dtype} in prompts {chunk['prompts']} but "
                             f"{man['shapes'][name]} {man['dtype'][name]} before; a store needs one row shape "
                             "per site (sites whose size depends on the prompt length cannot be streamed).")


def _flush(out: Path, man: dict, chunks: list, shard_mb: float) -> None:
    """Write buffered batches as shards of at most shard_mb each (at least one batch per shard)."""
    group, size = [], 0
    for chunk in chunks:
        n = _nbytes(chunk)
        if group and size + n > shard_mb * MB:
            _write_shard(out, man, group)
            group, size = [], 0
        group.append(chunk)
        size += n
    if group:
        _write_shard(out, man, group)


def _write_shard(out: Path, man: dict, group: list) -> None:
    """Write one shard atomically, then record it (and the prompts it finishes) in the manifest."""
    name = f"shard-{len(man['shards']):05d}.safetensors"
    parts = {k: [c["tensors"][k] for c in group] for k in group[0]["tensors"]}
    _write_safetensors(out / name, parts)
    rows = sum(c["rows"] for c in group)
    man["shards"].append({"file": name, "rows": rows, "prompts": [group[0]["prompts"][0], group[-1]["prompts"][1]]})
    man["rows"] += rows
    man["prompts_done"] = group[-1]["prompts"][1]
    _save_manifest(out, man)


def _write_safetensors(path: Path, parts: dict[str, list[torch.Tensor]]) -> None:
    """Save {name: pieces to join on dim 0} as one safetensors file, piece by piece (no concatenated copy in RAM)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, pieces in parts.items():
        nbytes = sum(t.numel() * t.element_size() for t in pieces)
        rows = sum(len(t) for t in pieces)
        header[name] = {"dtype": _ST_DTYPES[pieces[0].dtype], "shape": [rows, *pieces[0].shape[1:]],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for pieces in parts.values():
            for t in pieces:
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_manifest(out: Path, man: dict) -> None:
    """Write manifest.json atomically (tmp file + os.replace)."""
    tmp = out / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(man, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST)


# ---------------------------------------------------------------- reading
class ActivationStore:
    """Read side of a stream: rows of each site across the finished shards, read lazily with safe_open."""

    def __init__(self, out_dir):
        self.dir = Path(out_dir)
        self.manifest = json.loads((self.dir / MANIFEST).read_text())

    def __len__(self) -> int:
        """Rows stored (prompts, or real tokens when pos was None)."""
        return self.manifest["rows"]

    @property
    def sites(self) -> list[str]:
        return self.manifest["sites"]

    def __getitem__(self, site) -> torch.Tensor:
        """Every row of one site (or of token_index / prompt_index), read shard by shard into one tensor."""
        name = str(site)
        if name not in self.manifest["shapes"]:
            if name in self.sites or name in ("token_index", "prompt_index"):
                return torch.empty(0)
            held = ", ".join(self.manifest["shapes"]) or "nothing yet"
            raise KeyError(f"{name} is not in this store; it holds {held}.")
        dtype = getattr(torch, self.manifest["dtype"][name])
        out = torch.empty((len(self), *self.manifest["shapes"][name]), dtype=dtype)
        i = 0
        for shard in self.manifest["shards"]:
            with safe_open(str(self.dir / shard["file"]), framework="pt") as f:
                out[i:i + shard["rows"]] = f.get_tensor(name)
            i += shard["rows"]
        return out

    def iter(self, site, batch_rows: int = 1024):
        """Yield one site's rows in blocks of batch_rows (last may be shorter), reading only those rows from disk."""
        name, pending, have = str(site), [], 0
        for shard in self.manifest["shards"]:
            with safe_open(str(self.dir / shard["file"]), framework="pt") as f:
                piece, i, n = f.get_slice(name), 0, shard["rows"]
                while i < n:
                    take = min(batch_rows - have, n - i)
                    pending.append(piece[i:i + take])
                    have, i = have + take, i + take
                    if have == batch_rows:
                        yield pending[0] if len(pending) == 1 else torch.cat(pending)
                        pending, have = [], 0
        if pending:
            yield pending[0] if len(pending) == 1 else torch.cat(pending)

    def __repr__(self) -> str:
        m = self.manifest
        return (f"ActivationStore({str(self.dir)!r}, rows={len(self)}, sites={m['sites']}, "
                f"shards={len(m['shards'])}, complete={m['complete']})")
