"""mechanic: locate, steer and improve the behaviour of Hugging Face causal LMs."""

from mechanic.model.interventions import (Intervention, add, apply_fn, mean_ablate, project_out, replace, scale,
                                          zero)
from mechanic.model.load import load
from mechanic.model.model import Model
from mechanic.model.sites import Site

__version__ = "0.1.0"
__all__ = ["Intervention", "Model", "Site", "add", "apply_fn", "load", "mean_ablate", "project_out", "replace",
           "scale", "zero"]
