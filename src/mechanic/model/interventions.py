"""Interventions as plain values: what to do (replace, add, scale, mean, project, fn) at which site, rows, positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from mechanic.model.select import Pos, Rows
from mechanic.model.sites import Site, as_site

OPS = ("replace", "add", "scale", "mean", "project", "fn")


class InterventionError(ValueError):
    """An intervention whose value cannot be applied to its site's values."""


@dataclass(frozen=True, eq=False)
class Intervention:
    """Change a site's value on the selected rows and positions while the model runs.

    `value` is the patch (replace), the vector (add, times `coef`), the factor (scale), the mean
    (mean), the direction (project: removed), or a function of the selected values (fn).
    Values broadcast against the selected slice, e.g. a [d_model] vector against [rows, pos, d_model].
    """

    site: Site
    op: str
    value: Any = None
    coef: float = 1.0
    pos: Pos = None
    rows: Rows = None

    def __post_init__(self):
        object.__setattr__(self, "site", as_site(self.site))
        if self.op not in OPS:
            raise ValueError(f"Unknown intervention {self.op!r}; choose one of {', '.join(OPS)}.")
        if self.op == "fn" and not callable(self.value):
            raise ValueError("A 'fn' intervention needs a callable value: fn(selected_values) -> new_values.")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The new values for the selected slice `x` (a value that does not fit it: an InterventionError)."""
        if self.op == "fn":
            out = self.value(x)          # a user function's own errors pass through; only its result is checked
        else:
            try:
                out = self._apply(x)
            except (RuntimeError, TypeError) as e:
                raise self._unfit(x, e) from None
        try:
            if torch.broadcast_shapes(out.shape, x.shape) != x.shape:    # it is assigned back into x's place
                raise RuntimeError(f"the result has shape {list(out.shape)}")
            return out
        except (RuntimeError, TypeError, AttributeError) as e:
            raise self._unfit(x, e) from None

    def _unfit(self, x: torch.Tensor, e: Exception) -> InterventionError:
        shape = list(self.value.shape) if torch.is_tensor(self.value) else type(self.value).__name__
        return InterventionError(f"The {self.op} intervention at {self.site} has a value ({shape}) that does not "
                                 f"fit the selected values of shape {list(x.shape)} ({e}); values broadcast "
                                 "against [rows, positions, width] of the site.")

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        op, v = self.op, self.value
        if op == "scale":
            return x * v
        v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
        if op in ("replace", "mean"):
            return v.expand_as(x)
        if op == "add":
            return x + self.coef * v
        d = v / v.norm()
        return x - (x @ d)[..., None] * d


def replace(site, value, pos: Pos = None, rows: Rows = None) -> Intervention:
    """Patch in a value (a tensor, or another run's cached value) at the selected cells."""
    return Intervention(site, "replace", value, pos=pos, rows=rows)


def add(site, vector, coef: float = 1.0, pos: Pos = None, rows: Rows = None) -> Intervention:
    """Add coef x vector (steering)."""
    return Intervention(site, "add", vector, coef, pos=pos, rows=rows)


def scale(site, factor: float, pos: Pos = None, rows: Rows = None) -> Intervention:
    """Multiply by a factor; 0 is zero-ablation."""
    return Intervention(site, "scale", factor, pos=pos, rows=rows)


def zero(site, pos: Pos = None, rows: Rows = None) -> Intervention:
    """Zero-ablate."""
    return scale(site, 0.0, pos=pos, rows=rows)


def mean_ablate(site, mean, pos: Pos = None, rows: Rows = None) -> Intervention:
    """Replace by a mean activation (computed over a reference set)."""
    return Intervention(site, "mean", mean, pos=pos, rows=rows)


def project_out(site, direction, pos: Pos = None, rows: Rows = None) -> Intervention:
    """Remove the component along a direction: x - (x.d) d with d normalised."""
    return Intervention(site, "project", direction, pos=pos, rows=rows)


def apply_fn(site, fn: Callable[[torch.Tensor], torch.Tensor], pos: Pos = None, rows: Rows = None) -> Intervention:
    """Any user function of the selected values."""
    return Intervention(site, "fn", fn, pos=pos, rows=rows)
