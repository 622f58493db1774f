"""Time TransformerLens get_act_patch_resid_pre (layers x positions, one clean/corrupted pair) on the
TransformerBridge, with the same repeats and warm-up as the mechanic side and a plain HF forward of the corrupted
prompt (on a shared-weight twin the bridge does not rewire) right before each run."""

import argparse
import copy
import json
from importlib.metadata import version

import torch
from _common import load_model, setup_torch, shared_weight_twin, time_against_plain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--pair", required=True, help="JSON with clean_ids, corrupted_ids, answer_id, wrong_id")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    setup_torch()
    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge

    pair = json.load(open(args.pair))
    hf, tok = load_model(args.model)
    plain = shared_weight_twin(hf)  # the bridge rewires `hf` in place
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
    times, outs = time_against_plain(lambda: plain(corr),
                                     {"tool": lambda: patching.get_act_patch_resid_pre(bridge, corr, clean_cache, metric)},
                                     args.repeats, args.warmup)
    print(json.dumps({"peer": "transformer_lens", "version": version("transformer-lens"),
                      "transformers": version("transformers"), "torch": torch.__version__,
                      "repeats": args.repeats, "warmup": args.warmup, "plain_s": times["plain"],
                      "tool_s": times["tool"], "values": outs["tool"].tolist()}))


if __name__ == "__main__":
    main()
