"""Tiny random models of every supported architecture (built from HF configs, no download)."""

from __future__ import annotations

import torch
import transformers as T

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=101, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              max_position_embeddings=128)
MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

CONFIGS = {
    "llama": (T.LlamaConfig, {}),
    "qwen2": (T.Qwen2Config, {}),
    "qwen3": (T.Qwen3Config, {}),
    "mistral": (T.MistralConfig, {}),
    "gemma": (T.GemmaConfig, {}),
    "gemma2": (T.Gemma2Config, {}),
    "phi3": (T.Phi3Config, {}),
    "gpt2": (T.GPT2Config, dict(n_embd=64, n_layer=3, n_head=4, n_positions=128)),
    "gpt_neox": (T.GPTNeoXConfig, dict(use_parallel_residual=True)),
    "gpt_neox_seq": (T.GPTNeoXConfig, dict(use_parallel_residual=False)),
    "mixtral": (T.MixtralConfig, MOE),
    "qwen2_moe": (T.Qwen2MoeConfig, dict(MOE, shared_expert_intermediate_size=48, mlp_only_layers=[1])),
    "qwen3_moe": (T.Qwen3MoeConfig, dict(MOE, norm_topk_prob=True)),
    "olmoe": (T.OlmoeConfig, MOE),
}


def tiny_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A small random HF causal LM of family `name` (see CONFIGS), in eval mode, fp32."""
    cls, extra = CONFIGS[name]
    kwargs = {**COMMON, **extra, **overrides}
    if name.startswith(("gpt2", "gpt_neox")):
        kwargs.pop("num_key_value_heads")
    config = cls(**kwargs)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init leaves some norms at exactly 1/0; perturb so every weight matters
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def left_padded(lengths: list[int], vocab: int = 101, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids for prompts of the given lengths, left padded (pad id 0), with the attention mask."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.zeros(len(lengths), P, dtype=torch.long)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, P - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, P - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def word_tokenizer(vocab_size: int = 8192):
    """A byte-level BPE tokenizer trained on mechanic's shipped prose: real words for tiny models, without SmolLM2.

    Training is deterministic (same text, same merges) and takes a fraction of a second, so `make test-fast`
    never needs the default model or its converted cache.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mechanic.data.text import passages

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(passages(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
