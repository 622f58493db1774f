"""GPT-NeoX / Pythia: fused query_key_value, parallel residual when config.use_parallel_residual."""

from mechanic.model.arch import ArchMap

ARCH = ArchMap(
    model_types=("gpt_neox",),
    layers="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    attn="attention",
    o_proj="attention.dense",
    attn_write="attention",
    down_proj="mlp.dense_4h_to_h",
    parallel_attr="use_parallel_residual",
)
