"""Time TransformerLens TransformerBridge run_with_cache of all resid_post hooks against the plain HF forward, same weights, one process."""

import copy

from _common import (
    load_model, make_batch, parse_args, plain_forward, report, setup_torch,
    shared_weight_twin, time_interleaved, verify,
)


def main() -> None:
    args = parse_args(__doc__)
    setup_torch()
    from transformer_lens.model_bridge import TransformerBridge

    hf, tok = load_model(args.model)
    plain = shared_weight_twin(hf)  # the bridge rewires `hf` in place
    batch = make_batch(tok, args.prompts)
    # TL re-loads the tokenizer with AutoTokenizer(add_bos_token=True) unless it
    # already says add_bos_token; that reload fails on a transformers-5 tokenizer
    # dir under transformers 4. We feed token ids, so the flag changes nothing here.
    tl_tok = copy.deepcopy(tok)
    tl_tok.init_kwargs["add_bos_token"] = True
    # hf_model= reuses our instance (no hub lookup); model_name is only a label then.
    bridge = TransformerBridge.boot_transformers(args.model, hf_model=hf, tokenizer=tl_tok)
    n_layers = bridge.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
    ids = batch["input_ids"]
    kw = {"attention_mask": batch["attention_mask"], "position_ids": batch["position_ids"]}

    def tool():
        _, cache = bridge.run_with_cache(ids, names_filter=names, **kw)
        return [cache[n] for n in names]

    diff, meta = verify(tool(), plain, batch)

    times = {
        "plain": lambda: plain_forward(plain, batch),
        "tool": tool,
        # the bridge's own forward, no hooks attached
        "plain_bridge": lambda: bridge(ids, **kw),
        # the HF module the bridge wraps, called directly (bridge components in its tree)
        "wrapped_hf_forward": lambda: plain_forward(hf, batch),
    }
    times = time_interleaved(times, args.repeats, args.warmup)
    meta["tool_call"] = "TransformerBridge.run_with_cache(ids, names_filter=[blocks.{i}.hook_resid_post])"
    report("transformer_lens", "transformer-lens", times, diff, meta)


if __name__ == "__main__":
    main()
