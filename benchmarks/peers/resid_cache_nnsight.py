"""Time nnsight trace with .save() of every decoder layer's output against the plain HF forward, same weights, one process."""

import warnings

from _common import (
    load_model, make_batch, parse_args, plain_forward, report, setup_torch,
    shared_weight_twin, time_interleaved, verify,
)


def main() -> None:
    args = parse_args(__doc__)
    setup_torch()
    import nnsight
    from nnsight import TransformersModel

    hf, tok = load_model(args.model)
    plain = shared_weight_twin(hf)  # nnsight installs a controller forward on every module of `hf`
    batch = make_batch(tok, args.prompts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformersModel(hf, tokenizer=tok, task="text-generation")
    layers = model.model.layers
    ids = batch["input_ids"]
    kw = {"attention_mask": batch["attention_mask"], "position_ids": batch["position_ids"]}

    def tool():
        with model.trace(ids, **kw):
            # only .save()d objects leave the block; save the list of layer outputs
            saved = nnsight.save([layer.output for layer in layers])
        return saved

    diff, meta = verify(tool(), plain, batch)

    times = {
        "plain": lambda: plain_forward(plain, batch),
        "tool": tool,
        # nnsight's own forward with no trace body (input assembly, no interventions)
        "nnsight_forward": lambda: model.trace(ids, trace=False, **kw),
        # the HF module nnsight wraps, called directly (controllers inert outside a trace)
        "wrapped_hf_forward": lambda: plain_forward(hf, batch),
    }
    times = time_interleaved(times, args.repeats, args.warmup)
    meta["tool_call"] = "with model.trace(ids, ...): nnsight.save([model.model.layers[i].output])"
    report("nnsight", "nnsight", times, diff, meta)


if __name__ == "__main__":
    main()
