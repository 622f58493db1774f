"""mechanic side of the resid-cache benchmark: cache all layers' resid_post vs the plain HF forward, one process."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "peers"))

import torch  # noqa: E402
from _common import log, make_batch, max_abs_diff, parse_args, reference_layers, report, setup_torch, time_interleaved  # noqa: E402,E501

import mechanic  # noqa: E402


def main() -> None:
    args = parse_args(__doc__)
    setup_torch()
    model = mechanic.load(args.model)
    batch = make_batch(model.tokenizer, args.prompts)
    sites = [f"L{i}.resid_post" for i in range(model.dims.n_layers)]

    def tool():
        return model.run(batch, cache=sites).cache

    times = time_interleaved({"plain": lambda: model.hf(**batch), "tool": tool,
                              "tool_truncated": lambda: model.run(batch, cache=sites[:15], stop_at="auto").cache},
                             args.repeats, args.warmup)
    cache = tool()  # checked after the timed rounds, when every kernel has been warmed up
    ref, _ = reference_layers(model.hf, batch)
    diff = max_abs_diff([cache[s] for s in sites], ref, batch["attention_mask"])
    assert model.run(batch).logits.equal(model.hf(**batch).logits)
    log(f"hooks left: {model.hook_count()}")
    report("mechanic", "mechanic", times, diff, {"sites": len(sites), "batch": list(batch["input_ids"].shape),
                                                 "note": "tool_truncated caches layers 0-14 and stops there"})
    torch.set_grad_enabled(True)


if __name__ == "__main__":
    main()
