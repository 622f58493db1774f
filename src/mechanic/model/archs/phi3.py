"""Phi-3: fused qkv_proj and gate_up_proj; the residual layout is Llama's."""

from mechanic.model.arch import ArchMap

ARCH = ArchMap(model_types=("phi3",))
