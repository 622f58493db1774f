"""Time pyvene CollectIntervention on every layer's block_output against the plain HF forward, same model instance, one process."""

from _common import (
    load_model, make_batch, parse_args, plain_forward, report, setup_torch,
    time_interleaved, verify,
)


def main() -> None:
    args = parse_args(__doc__)
    setup_torch()
    import pyvene as pv

    hf, tok = load_model(args.model)
    batch = make_batch(tok, args.prompts)
    n_layers = hf.config.num_hidden_layers
    # keep_last_dim=True: collect [batch, seq, d] as is. The default flattens to
    # [batch, seq*d] and keeps the first d * max_number_of_units (=1) values, i.e.
    # only position 0's worth of features reshaped to [batch, seq, d/seq].
    config = pv.IntervenableConfig([
        {"layer": i, "component": "block_output",
         "intervention": pv.CollectIntervention(keep_last_dim=True)}
        for i in range(n_layers)
    ])
    pv_model = pv.IntervenableModel(config, model=hf)
    pv_model.disable_model_gradients()

    def tool():
        # unit_locations=None: no position selection, every token is collected
        (_, collected), _ = pv_model(base=batch, unit_locations=None)
        return collected

    got = tool()
    # pyvene registers its hooks per call and removes them, so `hf` itself is the plain baseline
    assert not any(m._forward_hooks for m in hf.modules()), "pyvene left hooks behind"
    diff, meta = verify(got, hf, batch)

    times = time_interleaved({"plain": lambda: plain_forward(hf, batch), "tool": tool},
                             args.repeats, args.warmup)
    meta["tool_call"] = "IntervenableModel([CollectIntervention(keep_last_dim=True) @ block_output, layer i])(base=batch)"
    report("pyvene", "pyvene", times, diff, meta)


if __name__ == "__main__":
    main()
