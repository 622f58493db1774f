"""Time TransformerLens get_act_patch_resid_pre (layers x positions, one IOI pair) on the TransformerBridge."""

import copy
import json
import time

import torch
from _common import load_model, log, setup_torch


def main() -> None:
    import argparse
    from importlib.metadata import version

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--pair", required=True, help="JSON with clean_ids, corrupted_ids, answer_id, wrong_id")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    setup_torch()
    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge

    pair = json.load(open(args.pair))
    hf, tok = load_model(args.model)
    tl_tok = copy.deepcopy(tok)
    tl_tok.init_kwargs["add_bos_token"] = True  # we feed token ids; avoids a tokenizer reload (see resid_cache_*)
    bridge = TransformerBridge.boot_transformers(args.model, hf_model=hf, tokenizer=tl_tok)
    clean = torch.tensor([pair["clean_ids"]])
    corr = torch.tensor([pair["corrupted_ids"]])
    a, w = pair["answer_id"], pair["wrong_id"]

    def ld(logits):
        return logits[0, -1, a] - logits[0, -1, w]
    clean_logits, clean_cache = bridge.run_with_cache(clean)
    clean_ld, corr_ld = ld(clean_logits), ld(bridge(corr))

    def metric(logits):
        return (ld(logits) - corr_ld) / (clean_ld - corr_ld)
    times, result = [], None
    for _ in range(args.repeats):
        t = time.perf_counter()
        result = patching.get_act_patch_resid_pre(bridge, corr, clean_cache, metric)
        times.append(time.perf_counter() - t)
        log(f"get_act_patch_resid_pre: {times[-1]:.1f} s")
    print(json.dumps({"peer": "transformer_lens", "version": version("transformer-lens"),
                      "transformers": version("transformers"), "torch": torch.__version__,
                      "tool_s": times, "values": result.tolist()}))


if __name__ == "__main__":
    main()
