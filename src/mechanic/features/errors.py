"""FeaturesError: a dictionary file, hook name, width or training setting that cannot be used, said in one paragraph."""

from __future__ import annotations


class FeaturesError(ValueError):
    """A sparse dictionary that does not fit the model or the request (unknown hook, wrong width, bad file)."""
