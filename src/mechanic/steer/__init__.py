"""Steer: change what located sites do. Steering vectors (CAA, PCA, ActAdd, probe directions) and their files."""

from mechanic.model.vector_io import from_gguf, to_gguf
from mechanic.steer.vectors import (Vector, VectorError, actadd, caa, extract, from_probe, pairs_from_task,
                                    pca_center, pca_diff)

__all__ = ["Vector", "VectorError", "actadd", "caa", "extract", "from_gguf", "from_probe", "pairs_from_task",
           "pca_center", "pca_diff", "to_gguf"]
