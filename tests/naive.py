"""Reference code for tests: plain torch hooks on the HF model, independent of mechanic's engine."""

import torch


def logits_with_hook(model, inputs, module, fn, pre=False):
    """Logits of the plain HF forward with one hook applying fn to a copy of the module's input (pre) or output."""
    if pre:
        h = module.register_forward_pre_hook(lambda m, args: (fn(args[0].clone()),) + args[1:])
    else:
        h = module.register_forward_hook(lambda m, args, out: fn(out.clone()))
    try:
        with torch.no_grad():
            return model.hf(**model.inputs(inputs), use_cache=False).logits
    finally:
        h.remove()
