"""Gemma (scaled embeddings) and Gemma 2 (extra post-norms: the residual writes are the post-norm outputs)."""

from mechanic.model.arch import ArchMap

ARCH = ArchMap(model_types=("gemma",), notes="embed is the scaled embedding (embed_tokens output)")
