"""Plans: what every steer method returns. A value to inspect, apply, undo, save and load.

A plan holds hook interventions (active in every mechanic run and generate while it is applied) and
weight edits (new values for slices of parameters; the old values are kept at apply time, so undo
restores the weights bit for bit). `with model.applied(plan): ...` applies and undoes around a block;
`plan.apply(model)` returns a handle whose `undo()` does the same later.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mechanic.model.interventions import Intervention
from mechanic.files import atomic_path
from mechanic.steer.fns import FNS


class PlanError(ValueError):
    """A plan that cannot be applied, saved or loaded as given."""


def _mesh(shape: torch.Size, index) -> tuple:
    """Broadcastable index tensors selecting param[index]: one entry per dim, None = the whole dim, else a list."""
    if index is None:
        return tuple(torch.arange(n).view(*[-1 if i == d else 1 for i in range(len(shape))])
                     for d, n in enumerate(shape))
    if len(index) != len(shape):
        raise PlanError(f"A weight-edit index needs one entry per dimension of the parameter ({len(shape)}), "
                        f"got {len(index)}: use None for a whole dimension and a list of indices otherwise.")
    out = []
    for d, (n, ix) in enumerate(zip(shape, index)):
        t = torch.arange(n) if ix is None else torch.as_tensor(ix, dtype=torch.long).reshape(-1)
        if t.numel() and (int(t.min()) < -n or int(t.max()) >= n):
            raise PlanError(f"Weight-edit index {ix} is out of range for dimension {d} of size {n}.")
        out.append(t.view(*[-1 if i == d else 1 for i in range(len(shape))]))
    return tuple(out)


@dataclass(eq=False)
class WeightEdit:
    """Set param[index] to `value` (index: one None-or-list entry per dim, or None for the whole tensor)."""

    param: str
    value: torch.Tensor
    index: tuple | None = None
    note: str = ""

    def _target(self, model) -> torch.nn.Parameter:
        params = dict(model.hf.named_parameters())
        if self.param not in params:
            near = [n for n in params if n.split(".")[-1] == self.param.split(".")[-1]][:3]
            raise PlanError(f"This model has no parameter {self.param!r} (similar: {', '.join(near) or 'none'}); "
                            "a plan's weight edits name parameters as model.hf.named_parameters() does.")
        return params[self.param]

    def apply(self, model) -> torch.Tensor:
        """Write the new values; return the old ones (for undo)."""
        p = self._target(model)
        try:
            mesh = _mesh(p.shape, self.index)
            old = p.data[mesh].clone()
        except (IndexError, TypeError, ValueError, RuntimeError) as e:
            raise PlanError(f"Weight edit of {self.param} (shape {list(p.shape)}) selects {self.index!r}, which "
                            f"does not index it ({e}); the plan was made for another model or is damaged.") from None
        if tuple(self.value.shape) != tuple(old.shape):
            raise PlanError(f"Weight edit of {self.param}: the new values have shape {list(self.value.shape)} but "
                            f"the selected slice has shape {list(old.shape)}.")
        p.data[mesh] = self.value.to(device=p.device, dtype=p.dtype)
        return old

    def restore(self, model, old: torch.Tensor) -> None:
        """Put the old values back, exactly."""
        p = self._target(model)
        p.data[_mesh(p.shape, self.index)] = old

    def to_file(self, i: int) -> tuple[dict, dict]:
        return {"kind": "set", "param": self.param, "index": self.index, "note": self.note}, {f"edit{i}": self.value}


@dataclass(eq=False)
class Orthogonalize(WeightEdit):
    """Remove a direction from what a parameter writes: along dimension `dim` (the d_model one),
    W <- W - d (d . W), with d the unit `value`. The plan file holds only the direction."""

    dim: int = 0

    def apply(self, model) -> torch.Tensor:
        p = self._target(model)
        if not isinstance(self.dim, int) or not -p.dim() <= self.dim < p.dim():
            raise PlanError(f"Cannot orthogonalize {self.param} (shape {list(p.shape)}) along dimension {self.dim!r}.")
        if not torch.is_floating_point(self.value):
            raise PlanError(f"Cannot orthogonalize {self.param}: the direction must be floating point, got "
                            f"{self.value.dtype}; save it as float32.")
        if not float(self.value.norm()) > 0:
            raise PlanError(f"Cannot orthogonalize {self.param} against a zero direction.")
        if p.shape[self.dim] != self.value.numel():
            raise PlanError(f"Cannot orthogonalize {self.param} (shape {list(p.shape)}) against a direction of size "
                            f"{self.value.numel()} along dimension {self.dim}.")
        old = p.data.clone()
        d = (self.value / self.value.norm()).to(device=p.device, dtype=p.dtype)
        w = p.data.movedim(self.dim, -1)
        p.data.copy_((w - (w @ d)[..., None] * d).movedim(-1, self.dim))
        return old

    def restore(self, model, old: torch.Tensor) -> None:
        self._target(model).data.copy_(old)

    def to_file(self, i: int) -> tuple[dict, dict]:
        return {"kind": "orthogonalize", "param": self.param, "dim": self.dim, "note": self.note}, \
            {f"edit{i}": self.value}


@dataclass(eq=False)
class Untie:
    """Give the unembedding its own copy of a tied embedding matrix, so an edit of one leaves the other."""

    note: str = "untie input and output embeddings"

    def apply(self, model):
        inp, out = model.hf.get_input_embeddings(), model.hf.get_output_embeddings()
        if out is None or out.weight is not inp.weight:
            return None  # not tied: nothing to do, nothing to undo
        out.weight = torch.nn.Parameter(inp.weight.detach().clone(), requires_grad=inp.weight.requires_grad)
        model.hf.config.tie_word_embeddings = False
        return True

    def restore(self, model, old) -> None:
        if old:
            model.hf.get_output_embeddings().weight = model.hf.get_input_embeddings().weight
            model.hf.config.tie_word_embeddings = True

    def to_file(self, i: int) -> tuple[dict, dict]:
        return {"kind": "untie", "note": self.note}, {}


@dataclass(eq=False)
class Plan:
    """Hook interventions plus weight edits, with the method and settings that made them."""

    interventions: list[Intervention] = field(default_factory=list)
    edits: list[WeightEdit] = field(default_factory=list)
    method: str = ""
    fingerprint: str | None = None   # of the model the plan was made for
    settings: dict = field(default_factory=dict)

    def __add__(self, other: Plan) -> Plan:
        """Both plans, this one's steps first."""
        return Plan(self.interventions + other.interventions, self.edits + other.edits,
                    " + ".join(x for x in (self.method, other.method) if x),
                    self.fingerprint or other.fingerprint, {"parts": [self.settings, other.settings]})

    def __repr__(self) -> str:
        ivs = ", ".join(f"{iv.op} {iv.site}" for iv in self.interventions[:4])
        more = "..." if len(self.interventions) > 4 else ""
        return (f"Plan({self.method or 'custom'}: {len(self.interventions)} interventions [{ivs}{more}], "
                f"{len(self.edits)} weight edits)")

    def apply(self, model, check: bool = True) -> Applied:
        """Make the plan active on `model` until the returned handle's undo()."""
        if check and self.fingerprint and self.fingerprint != model.fingerprint:
            raise PlanError(f"This plan was made for a model with fingerprint {self.fingerprint}, but this model's "
                            f"is {model.fingerprint}. Apply it to the model it was made for, or pass check=False "
                            "if you know the sites and parameters match.")
        for iv in self.interventions:
            model.check(iv.site)
            _check_width(iv, model)
        done: list[tuple[WeightEdit, torch.Tensor]] = []
        try:
            for e in self.edits:
                done.append((e, e.apply(model)))
        except Exception:
            for e, old in reversed(done):
                e.restore(model, old)
            raise
        model.steering.extend(self.interventions)
        return Applied(model, self, done)

    # ---- files
    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file: tensors (intervention values, edit values) plus the rest as JSON metadata."""
        path = Path(path)
        tensors, ivs, edits = {}, [], []
        for i, iv in enumerate(self.interventions):
            fn = None
            if iv.op == "fn":
                if not isinstance(iv.value, tuple(FNS.values())):
                    raise PlanError(f"Intervention {i} ({iv.site}) is a Python function, which cannot be saved; "
                                    "express it as replace/add/scale/mean/project with a tensor value, or use a "
                                    f"function class from mechanic.steer.fns ({', '.join(FNS)}).")
                params, fn_tensors = iv.value.state()
                fn = {"name": iv.value.NAME, "params": params}
                tensors.update({f"iv{i}.{k}": v.detach().cpu().clone() for k, v in fn_tensors.items()})
            if not _jsonable(iv.pos) or not _jsonable(iv.rows):
                raise PlanError(f"Intervention {i} ({iv.site}) selects positions/rows with tensors; saved plans "
                                "take None, ints, lists, 'prompt' or 'generated'.")
            value = None if fn else iv.value
            if torch.is_tensor(value):
                tensors[f"iv{i}"] = value.detach().cpu().clone()
                value = None
            ivs.append({"site": str(iv.site), "op": iv.op, "value": value, "coef": iv.coef, "pos": iv.pos,
                        "rows": iv.rows, "fn": fn})
        for i, e in enumerate(self.edits):
            meta_e, t = e.to_file(i)
            tensors.update({k: v.detach().cpu().clone() for k, v in t.items()})
            edits.append(meta_e)
        meta = {"format": "mechanic.plan/1", "method": self.method, "fingerprint": self.fingerprint,
                "settings": self.settings, "interventions": ivs, "edits": edits}
        with atomic_path(path) as tmp:
            save_file(tensors or {"_empty": torch.zeros(0)}, tmp, metadata={"plan": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a plan written by `save`."""
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("plan", "null") or "null")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # missing file, not safetensors, bad JSON: one message
            raise PlanError(f"{path} is not a readable plan file ({e}); plans are written by Plan.save.") from e
        if not isinstance(meta, dict) or meta.get("format") != "mechanic.plan/1":
            raise PlanError(f"{path} is a safetensors file but not a mechanic plan (no 'plan' metadata).")
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise PlanError(f"{path}: tensor(s) {bad[:5]} hold NaN or inf values; a plan's values must be finite.")
        try:
            return cls._from_meta(meta, tensors)
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:   # a damaged or foreign file
            raise PlanError(f"{path} has damaged plan metadata ({type(e).__name__}: {e}); plans are written by "
                            "Plan.save.") from None

    @classmethod
    def _from_meta(cls, meta: dict, tensors: dict) -> Plan:
        ivs = []
        for i, d in enumerate(meta["interventions"]):
            value = tensors.get(f"iv{i}", d["value"])
            if d.get("fn"):
                own = {k[len(f"iv{i}."):]: v for k, v in tensors.items() if k.startswith(f"iv{i}.")}
                value = FNS[d["fn"]["name"]].from_state(d["fn"]["params"], own)
            _check_saved(i, d, value)
            ivs.append(Intervention(d["site"], d["op"], value, coef=d["coef"], pos=d["pos"], rows=d["rows"]))
        edits = []
        for i, d in enumerate(meta["edits"]):
            if d["kind"] != "untie" and not (isinstance(d["param"], str) and torch.is_tensor(tensors[f"edit{i}"])):
                raise PlanError(f"Weight edit {i} of this plan file is damaged (param {d['param']!r}).")
            if d["kind"] == "orthogonalize" and (isinstance(d["dim"], bool) or not isinstance(d["dim"], int)):
                raise PlanError(f"Weight edit {i} of this plan file is damaged (dim {d['dim']!r}).")
            if d["kind"] == "untie":
                edits.append(Untie(d["note"]))
            elif d["kind"] == "orthogonalize":
                edits.append(Orthogonalize(d["param"], tensors[f"edit{i}"], note=d["note"], dim=d["dim"]))
            else:
                edits.append(WeightEdit(d["param"], tensors[f"edit{i}"],
                                        None if d["index"] is None else tuple(d["index"]), d["note"]))
        if not isinstance(meta["method"], str) or not isinstance(meta["settings"], dict) or \
                not isinstance(meta["fingerprint"], (str, type(None))):
            raise TypeError("method must be a string, settings an object and fingerprint a string or null")
        return cls(ivs, edits, meta["method"], meta["fingerprint"], meta["settings"])


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _numbers(x) -> bool:
    """A finite number, or a (nested) non-empty list of them: the non-tensor values Plan.save writes as JSON."""
    if isinstance(x, list):
        return bool(x) and all(_numbers(v) for v in x)
    return _number(x)


def _check_saved(i: int, d: dict, value) -> None:
    """A saved intervention's fields have the types Plan.save writes (a damaged file fails here, not mid-run)."""
    pos, rows = d["pos"], d["rows"]
    ok_pos = pos in (None, "prompt", "generated") or (_jsonable(pos) and not isinstance(pos, str))
    ok_rows = rows is None or (_jsonable(rows) and not isinstance(rows, str))
    ok_value = torch.is_tensor(value) or _numbers(value) or (d.get("fn") and callable(value))
    if not (_number(d["coef"]) and ok_pos and ok_rows and ok_value and isinstance(d["site"], str)):
        raise PlanError(f"Intervention {i} of this plan file is damaged (site {d['site']!r}, op {d['op']!r}, value "
                        f"{type(value).__name__}, coef {d['coef']!r}, pos {pos!r}, rows {rows!r}); plans are "
                        "written by Plan.save.")


RESIDUAL = ("embed", "final", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def _check_width(iv: Intervention, model) -> None:
    """A tensor value at a residual-width site must end in d_model (or 1, broadcast): refused here, at apply,
    rather than deep inside a forward pass."""
    v = iv.value
    if iv.site.kind in RESIDUAL and torch.is_tensor(v) and v.dim() >= 1 and v.shape[-1] not in (1, model.dims.d_model):
        raise PlanError(f"The intervention at {iv.site} has a value of shape {list(v.shape)}, but that site has "
                        f"width {model.dims.d_model} (d_model); the plan was made for another model.")


def _jsonable(x) -> bool:
    return x is None or isinstance(x, (int, str)) or (isinstance(x, (list, tuple)) and all(isinstance(v, int) for v in x))


class Applied:
    """An applied plan; undo() removes its interventions and restores every edited weight bit for bit."""

    def __init__(self, model, plan: Plan, done: list):
        self.model, self.plan, self._done = model, plan, done
        self.active = True

    def undo(self) -> None:
        """Undo the plan (a second call does nothing)."""
        if not self.active:
            return
        for e, old in reversed(self._done):
            e.restore(self.model, old)
        for iv in self.plan.interventions:  # one occurrence each: the same plan may be applied twice
            i = next(i for i, x in enumerate(self.model.steering) if x is iv)
            del self.model.steering[i]
        self.active = False
