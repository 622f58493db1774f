"""mechanic side of the steered-generation benchmark: greedy generate with a vector added at one layer's output."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "peers"))

import torch  # noqa: E402
from _steer import COEF, LAYER, NEW, batch, parse_args, run, vector  # noqa: E402

import mechanic  # noqa: E402
from mechanic.model.interventions import add  # noqa: E402


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))  # benchmarks/run.py --threads
    m = mechanic.load(args.model)
    inputs = batch(m.tokenizer)
    ivs = [add(f"L{LAYER}.resid_post", vector(m.dims.d_model), coef=COEF)]
    gen = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=m.tokenizer.pad_token_id)
    with torch.no_grad():
        run("mechanic", "mechanic", lambda: m.hf.generate(**inputs, **gen),
            lambda: m.generate(inputs, interventions=ivs, **gen), args)


if __name__ == "__main__":
    main()
