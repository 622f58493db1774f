"""Mixtral, Qwen3-MoE and OLMoE: top-k router plus one fused experts module per layer."""

from mechanic.model.arch import ArchMap

ARCH = ArchMap(
    model_types=("mixtral", "qwen3_moe", "olmoe"),
    router="mlp.gate",
    experts="mlp.experts",
)
