"""Qwen2-MoE: routed experts plus a sigmoid-gated shared expert (an ordinary MLP module)."""

from mechanic.model.arch import ArchMap

ARCH = ArchMap(
    model_types=("qwen2_moe",),
    router="mlp.gate",
    experts="mlp.experts",
    shared_expert="mlp.shared_expert",
    shared_expert_gate="mlp.shared_expert_gate",
)
