"""Scores: the one output type of every locate method (sites x optional positions, with provenance)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mechanic.model.sites import Site
from mechanic.files import atomic_path


@dataclass
class Scores:
    """values[i] (or values[i, p]) is the score of site `sites[i]` (at position p).

    `positions` labels the second axis (e.g. the clean prompt's tokens); `method`, `task`, `metric`,
    `model`, `fingerprint` and `settings` say how the numbers were made.
    """

    values: torch.Tensor
    sites: list[str]
    method: str
    positions: list[str] | None = None
    task: str | None = None
    metric: str | None = None
    model: str | None = None
    fingerprint: str | None = None
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        self.sites = [str(Site.parse(s)) for s in self.sites]
        self.values = self.values.detach().float().cpu()
        if self.values.shape[0] != len(self.sites):
            raise ValueError(f"Scores: {len(self.sites)} sites but values have shape {list(self.values.shape)}.")
        if self.positions is not None and (self.values.dim() != 2 or self.values.shape[1] != len(self.positions)):
            raise ValueError(f"Scores: {len(self.positions)} position labels but values have shape "
                             f"{list(self.values.shape)}.")

    # ---- selection
    def top(self, k: int = 10, by: str = "abs") -> list[tuple[str, int | None, float]]:
        """The k largest entries as (site, position or None, value); by = abs | max | min."""
        flat = self.values.reshape(-1)
        key = {"abs": flat.abs(), "max": flat, "min": -flat}[by]
        idx = key.argsort(descending=True)[:k].tolist()
        return [self._entry(i) for i in idx]

    def threshold(self, t: float, by: str = "abs") -> list[tuple[str, int | None, float]]:
        """Every entry whose score passes t (|v| >= t, v >= t, or v <= -t), largest first."""
        flat = self.values.reshape(-1)
        key = {"abs": flat.abs(), "max": flat, "min": -flat}[by]
        idx = [i for i in key.argsort(descending=True).tolist() if key[i] >= t]
        return [self._entry(i) for i in idx]

    def _entry(self, i: int) -> tuple[str, int | None, float]:
        if self.values.dim() == 1:
            return self.sites[i], None, float(self.values[i])
        n = self.values.shape[1]
        return self.sites[i // n], i % n, float(self.values.reshape(-1)[i])

    def to_dict(self) -> dict:
        return {"method": self.method, "task": self.task, "metric": self.metric, "model": self.model,
                "fingerprint": self.fingerprint, "settings": self.settings, "sites": self.sites,
                "positions": self.positions, "values": self.values.tolist()}

    # ---- files (written atomically)
    def save(self, path: str | os.PathLike) -> Path:
        """JSON (.json) or safetensors with the metadata in its header (.safetensors)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            if path.suffix == ".json":
                Path(tmp).write_text(json.dumps(self.to_dict(), indent=1))
            else:
                meta = {k: v for k, v in self.to_dict().items() if k != "values"}
                save_file({"values": self.values.contiguous()}, tmp, metadata={"scores": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        path = Path(path)
        if path.suffix == ".json":
            d = json.loads(path.read_text())
            return cls(values=torch.tensor(d.pop("values")), **d)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["scores"])
        return cls(values=load_file(str(path))["values"], **meta)

    def to_pandas(self):
        """Long format: one row per (site, position) with its value."""
        import pandas as pd

        rows = []
        for i, s in enumerate(self.sites):
            if self.values.dim() == 1:
                rows.append({"site": s, "value": float(self.values[i])})
            else:
                for p in range(self.values.shape[1]):
                    label = self.positions[p] if self.positions else p
                    rows.append({"site": s, "pos": p, "token": label, "value": float(self.values[i, p])})
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return (f"Scores({self.method}, task={self.task}, metric={self.metric}, {len(self.sites)} sites"
                + (f" x {len(self.positions)} positions" if self.positions else "") + ")")
