"""Helpers shipped with the package so users can validate mechanic on their own models."""
