"""The engine: load a Hugging Face causal LM, name its sites, run it with hooks (no steering method lives here)."""
