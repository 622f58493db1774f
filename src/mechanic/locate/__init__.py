"""Locate: find the components responsible for a behaviour; every method returns Scores."""

from mechanic.locate.scores import Scores

__all__ = ["Scores"]
