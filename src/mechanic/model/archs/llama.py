"""Llama-style decoder (pre-norm, separate q/k/v, gated MLP); Qwen2/3 and Mistral share the layout."""

from mechanic.model.arch import ArchMap

ARCH = ArchMap(model_types=("llama", "qwen2", "qwen3", "mistral"))
