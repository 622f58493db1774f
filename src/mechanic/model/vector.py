"""The Vector value: per-layer directions at one residual-width site kind, with how they were made.

A value type shared by locate (probe directions) and steer (steering vectors, conditional steering), so
it lives in the engine room; it only knows sites and interventions. Files: mechanic.model.vector_io
(safetensors with the metadata in the header, llama.cpp control vectors as GGUF).

Hook point: a vector of site kind `resid_post` at layer L is added to the **output of decoder layer L**
(0-based, `model.layers[L]`), i.e. Hugging Face's `hidden_states[L + 1]` for L < n_layers - 1 (HF's
last hidden state has the final norm applied; ours does not). That is also where llama.cpp adds a
control vector's `direction.L` (see mechanic.model.vector_io and docs/STEERING.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable

import torch

from mechanic.model.interventions import Intervention, add, project_out

KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
OPERATIONS = ("add", "project")
METHODS = ("caa", "pca_diff", "pca_center", "actadd")
LAYER_CONVENTION = "decoder-layer"  # key L = 0-based index of model.layers[L]; resid_post = that layer's output


class VectorError(ValueError):
    """A vector or a set of contrastive pairs that cannot be used as given."""


@dataclass
class Vector:
    """Per-layer directions at one site kind, with how they were made.

    directions: {layer: [d_model] float32}; layer = 0-based decoder layer index (LAYER_CONVENTION).
    site: the site kind the direction lives at; `resid_post` (default) = the output of decoder layer L.
    operation: `add` (x + c v) or `project` (remove the component along v).
    norm: `raw` (in activation units, as extracted) or `unit` (every direction has norm 1).
    read: the read position the activations were taken at; model / model_type / fingerprint tie the
    vector to the model it came from; settings holds the method's options and diagnostics.
    """

    directions: dict[int, torch.Tensor]
    site: str = "resid_post"
    method: str = "caa"
    read: str = "last"
    model: str | None = None
    model_type: str | None = None
    fingerprint: str | None = None
    operation: str = "add"
    norm: str = "raw"
    layer_convention: str = LAYER_CONVENTION
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.site not in KINDS:
            raise VectorError(f"Vector site kind {self.site!r} is not supported; use one of {', '.join(KINDS)} "
                              "(per-layer sites of width d_model).")
        if self.operation not in OPERATIONS:
            raise VectorError(f"Unknown vector operation {self.operation!r}; use 'add' or 'project'.")
        if not self.directions:
            raise VectorError("A Vector needs at least one layer's direction.")
        dirs, width = {}, None
        for layer, d in sorted(self.directions.items()):
            d = torch.as_tensor(d).detach().to(torch.float32).cpu().contiguous()
            if d.dim() != 1 or int(layer) < 0:
                raise VectorError(f"Direction for layer {layer} must be a 1-D [d_model] tensor at a layer >= 0; "
                                  f"got shape {list(d.shape)}.")
            if d.numel() == 0 or not bool(torch.isfinite(d).all()):
                raise VectorError(f"Direction for layer {layer} is empty or holds NaN/inf values; a direction must be "
                                  "a finite [d_model] tensor.")
            if self.operation == "project" and not float(d.norm()) > 0:
                raise VectorError(f"Direction for layer {layer} is zero; a 'project' vector removes a direction, "
                                  "so each needs a non-zero norm.")
            if width is not None and d.numel() != width:
                raise VectorError(f"Directions have different widths ({width} and {d.numel()} at layer {layer}); "
                                  "all layers of one vector must share d_model.")
            width = d.numel()
            dirs[int(layer)] = d
        self.directions = dirs

    # ---- views
    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    @property
    def d_model(self) -> int:
        return next(iter(self.directions.values())).numel()

    def norms(self) -> dict[int, float]:
        """The L2 norm of each layer's direction."""
        return {L: float(d.norm()) for L, d in self.directions.items()}

    def unit(self) -> Vector:
        """The same vector with every direction scaled to norm 1."""
        return self._with({L: d / d.norm().clamp_min(1e-12) for L, d in self.directions.items()}, norm="unit")

    def select(self, layers: Iterable[int]) -> Vector:
        """Only the given layers."""
        layers = [int(L) for L in layers]
        self._check_layers(layers)
        return self._with({L: self.directions[L] for L in layers})

    def cosine(self, other: Vector) -> dict[int, float]:
        """Cosine similarity with another vector at every layer both have."""
        return {L: float(torch.nn.functional.cosine_similarity(self.directions[L], other.directions[L], dim=0))
                for L in self.layers if L in other.directions}

    def _with(self, directions: dict[int, torch.Tensor], **changes) -> Vector:
        return replace(self, directions=directions, settings=dict(self.settings), **changes)

    def _check_layers(self, layers) -> None:
        missing = [L for L in layers if L not in self.directions]
        if missing:
            raise VectorError(f"This vector has no direction at layer(s) {missing}; it has layers {self.layers}.")

    # ---- arithmetic (same site and operation; the result keeps self's metadata)
    def __mul__(self, c: float) -> Vector:
        return self._with({L: d * float(c) for L, d in self.directions.items()}, norm="raw")

    __rmul__ = __mul__

    def __neg__(self) -> Vector:
        return self * -1.0

    def __add__(self, other: Vector) -> Vector:
        if not isinstance(other, Vector):
            return NotImplemented
        if (other.site, other.operation) != (self.site, self.operation):
            raise VectorError(f"Cannot add a {other.site}/{other.operation} vector to a {self.site}/{self.operation} "
                              "vector; both must live at the same site kind with the same operation.")
        dirs = dict(self.directions)
        for L, d in other.directions.items():
            dirs[L] = dirs[L] + d if L in dirs else d
        return self._with(dirs, norm="raw")

    def __sub__(self, other: Vector) -> Vector:
        return self + (-other)

    # ---- use
    def interventions(self, coefficient: float = 1.0, layers: Iterable[int] | None = None,
                      positions=None) -> list[Intervention]:
        """Engine interventions that steer: add coefficient x v at `L{layer}.{site}` (or project v out).

        positions: as for any intervention (None = every token; "prompt"/"generated" during generate;
        an int, list, slice or mask). For operation "project" the coefficient must be 1 (full removal).
        """
        layers = self.layers if layers is None else [int(L) for L in layers]
        self._check_layers(layers)
        if self.operation == "project":
            if coefficient != 1.0:
                raise VectorError("A 'project' vector removes its direction; the coefficient must be 1.0.")
            return [project_out(f"L{L}.{self.site}", self.directions[L], pos=positions) for L in layers]
        return [add(f"L{L}.{self.site}", self.directions[L], coef=float(coefficient), pos=positions) for L in layers]

    def check(self, model, any_model: bool = False) -> Vector:
        """Refuse a vector that does not fit `model`: made for another model (its fingerprint differs; pass
        any_model=True to use it anyway, e.g. on a fine-tune of that model), or of the wrong width or layers.
        Returns self."""
        if not any_model and self.fingerprint and self.fingerprint != model.fingerprint:
            raise VectorError(f"This vector was made for a model with fingerprint {self.fingerprint} "
                              f"({self.model or 'unnamed'}), but this model's is {model.fingerprint}. Use it on the "
                              "model it was made for, or pass any_model=True if you know the residual streams match "
                              "(for instance a fine-tune of the same base).")
        if self.d_model != model.dims.d_model:
            raise VectorError(f"This vector has width {self.d_model} but the model's d_model is {model.dims.d_model}; "
                              "it was made for another model.")
        bad = [L for L in self.layers if L >= model.dims.n_layers]
        if bad:
            raise VectorError(f"Layers {bad} do not exist in this model (layers 0..{model.dims.n_layers - 1}).")
        return self

    # ---- files
    def metadata(self) -> dict:
        """Everything but the tensors, JSON-ready."""
        return {"site": self.site, "method": self.method, "read": self.read, "model": self.model,
                "model_type": self.model_type, "fingerprint": self.fingerprint, "operation": self.operation,
                "norm": self.norm, "layer_convention": self.layer_convention, "settings": self.settings,
                "layers": self.layers, "d_model": self.d_model}

    def save(self, path):
        """Write safetensors with the metadata in its header, or a llama.cpp control vector for a .gguf path."""
        from mechanic.model import vector_io

        return vector_io.save(self, path)

    @classmethod
    def load(cls, path) -> Vector:
        """Read a file written by `save` (safetensors or .gguf, including llama.cpp / repeng control vectors)."""
        from mechanic.model import vector_io

        return vector_io.load(path)

    def __repr__(self) -> str:
        norms = ", ".join(f"L{L}:{n:.3g}" for L, n in self.norms().items())
        return f"Vector({self.method}, {self.site}, {self.operation}, read={self.read}, norms={{{norms}}})"
