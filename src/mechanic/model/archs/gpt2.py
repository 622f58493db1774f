"""GPT-2: Conv1D weights stored [in, out], learned position embeddings (embed = token embeddings only)."""

from mechanic.model.arch import ArchMap

ARCH = ArchMap(
    model_types=("gpt2",),
    layers="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    attn="attn",
    o_proj="attn.c_proj",
    attn_write="attn",
    down_proj="mlp.c_proj",
    conv1d=True,
)
