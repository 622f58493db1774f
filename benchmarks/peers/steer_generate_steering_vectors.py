"""steering-vectors side of the steered-generation benchmark (SteeringVector.apply on the decoder block output)."""

from __future__ import annotations

import os

import torch
from _common import load_model
from _steer import COEF, LAYER, NEW, batch, parse_args, run, vector
from steering_vectors import SteeringVector


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))  # benchmarks/run.py --threads
    model, tok = load_model(args.model)
    inputs = batch(tok)
    sv = SteeringVector({LAYER: vector(model.config.hidden_size)}, "decoder_block")
    gen = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id)

    def steered():
        with sv.apply(model, multiplier=COEF):
            return model.generate(**inputs, **gen)
    with torch.no_grad():
        run("steering-vectors", "steering-vectors", lambda: model.generate(**inputs, **gen), steered, args)


if __name__ == "__main__":
    main()
