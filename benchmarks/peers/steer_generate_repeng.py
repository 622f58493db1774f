"""repeng side of the steered-generation benchmark (ControlModel.set_control on one layer)."""

from __future__ import annotations

import os

import torch
from _common import load_model, shared_weight_twin
from _steer import COEF, LAYER, NEW, batch, parse_args, run, vector
from repeng import ControlModel, ControlVector


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))  # benchmarks/run.py --threads
    model, tok = load_model(args.model)
    inputs = batch(tok)
    gen = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    twin = shared_weight_twin(model)  # repeng wraps the layers in place; the plain baseline runs untouched
    cm = ControlModel(model, [LAYER])
    cv = ControlVector(model_type=model.config.model_type, directions={LAYER: vector(model.config.hidden_size).numpy()})
    cm.set_control(cv, COEF)
    with torch.no_grad():
        run("repeng", "repeng", lambda: twin.generate(**inputs, **gen), lambda: cm.generate(**inputs, **gen), args)


if __name__ == "__main__":
    main()
