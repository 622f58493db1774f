"""Sparse dictionaries (SAEs and transcoders): load/save the SAELens format, train, evaluate.

    from mechanic.features import Dictionary, load, save
    sae = load("my_sae_dir").check(model)        # cfg.json + sae_weights.safetensors
    acts = sae.encode(x); x_hat = sae.decode(acts)
    attach(model, sae)                            # sites L3.resid_post.sae[f], L3.resid_post.sae_error
"""

from mechanic.features.attach import attach, attached, detach
from mechanic.features.dictionary import ARCHITECTURES, Dictionary
from mechanic.features.errors import FeaturesError
from mechanic.features.saelens import load, save

__all__ = ["ARCHITECTURES", "Dictionary", "FeaturesError", "attach", "attached", "detach", "load", "save"]
