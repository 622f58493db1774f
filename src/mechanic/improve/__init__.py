"""Improve: measure whether a change made the model better (perplexity, before/after evaluation)."""
