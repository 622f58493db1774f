"""Gemma 2: attention and MLP outputs pass a post-norm before the residual add."""

from mechanic.model.arch import ArchMap

ARCH = ArchMap(
    model_types=("gemma2",),
    attn_write="post_attention_layernorm",
    mlp_write="post_feedforward_layernorm",
    notes=("heads sum to the o_proj output; attn_out is that after post_attention_layernorm; "
           "the logits site is lm_head's output, before the final soft-capping"),
)
