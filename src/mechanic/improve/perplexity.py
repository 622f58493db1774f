"""Perplexity as an improve-stage measurement: the computation lives in the engine room
(mechanic.model.perplexity) so that locate (magnitude's super-weight check) can use it too."""

from mechanic.model.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
