"""Data shipped with mechanic: real natural-language text for calibration and held-out perplexity."""
