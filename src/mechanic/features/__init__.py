"""Sparse dictionaries (SAEs and transcoders): load/save the SAELens format, train, evaluate.

    from mechanic.features import Dictionary, load, save
    sae = load("my_sae_dir").check(model)        # cfg.json + sae_weights.safetensors
    acts = sae.encode(x); x_hat = sae.decode(acts)
"""

from mechanic.features.dictionary import ARCHITECTURES, Dictionary
from mechanic.features.errors import FeaturesError
from mechanic.features.saelens import load, save

__all__ = ["ARCHITECTURES", "Dictionary", "FeaturesError", "load", "save"]
