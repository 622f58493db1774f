"""Big models: check load options and spread a model over devices and disk with transformers/accelerate.

`plan` turns device_map ("auto", "balanced", "balanced_low_0", "sequential" or a dict) and max_memory
into a complete dict map with transformers' own planner; `dispatch` places an already built model
with accelerate's dispatch_model; both end with `resident.make_resident`, so no parameter stays on
the meta device.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from mechanic.model.load import LoadError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


class DispatchError(LoadError):
    """Load options for a big model (dtype, device_map, max_memory, offload_folder) that cannot work as given."""


def as_dtype(dtype) -> torch.dtype | None:
    """torch.float32 / bfloat16 / float16 (or their names); None stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    if dtype in set(DTYPES.values()):
        return dtype
    raise DispatchError(f"dtype={dtype!r} is not a dtype mechanic loads models in. Pass torch.float32 (the default, "
                        "exact), torch.bfloat16 or torch.float16 (half the memory; results match float32 within the "
                        "tolerances in docs/ENGINE.md, 'Big models'), or one of the names "
                        f"{', '.join(sorted(DTYPES))}.")


def check_options(device_map, max_memory, offload_folder, device) -> None:
    """The option combinations load() accepts, refused with one paragraph each otherwise."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise DispatchError("max_memory and offload_folder only apply to a dispatched model: pass device_map "
                                "('auto', 'balanced', 'balanced_low_0', 'sequential' or a dict of module name -> "
                                "device) as well, e.g. load(spec, device_map='auto', max_memory={'cpu': '2GiB'}, "
                                "offload_folder='offload').")
        return
    if device is not None:
        raise DispatchError(f"Pass either device={device!r} (the whole model on one device) or device_map "
                            "(spread over devices and disk), not both.")
    if isinstance(device_map, str) and device_map not in STRATEGIES:
        raise DispatchError(f"device_map={device_map!r} is not a placement strategy. Use one of {', '.join(STRATEGIES)}, "
                            "a dict of module name -> device (e.g. {'model.embed_tokens': 0, 'model.layers.0': 0, "
                            "..., 'lm_head': 'disk'}), or device='cuda:0' for the whole model on one device.")
    if not isinstance(device_map, (str, dict)):
        raise DispatchError(f"device_map must be a strategy name ({', '.join(STRATEGIES)}) or a dict of module "
                            f"name -> device, got {type(device_map).__name__} {device_map!r}.")
    if max_memory is not None and not isinstance(max_memory, dict):
        raise DispatchError(f"max_memory must be a dict of device -> budget, e.g. {{0: '20GiB', 'cpu': '60GiB'}}, "
                            f"got {max_memory!r}.")
    if max_memory is not None and isinstance(device_map, dict):
        raise DispatchError("max_memory guides a placement strategy ('auto', 'balanced', ...); with an explicit "
                            "device_map dict every module's place is already given. Drop one of the two.")


def _device_ok(value) -> str | None:
    """Why a device_map value is unusable here, or None when it is fine."""
    if value in ("disk", "cpu", "meta"):
        return "the meta device holds no values" if value == "meta" else None
    try:
        d = torch.device(value)
    except (RuntimeError, TypeError):
        return "not a device name (expected 'cpu', 'disk', an accelerator index like 0, or 'cuda:1')"
    if d.type == "cpu":
        return None
    if not torch.accelerator.is_available() or d.type != torch.accelerator.current_accelerator().type:
        return f"this machine has no {d.type} device"
    if d.index is not None and d.index >= torch.accelerator.device_count():
        return f"this machine has {torch.accelerator.device_count()} {d.type} device(s)"
    return None


def check_map(hf: torch.nn.Module, device_map: dict, offload_folder) -> dict:
    """A dict device_map that names existing modules, covers every parameter and uses devices this machine has."""
    names = dict(hf.named_modules())
    bad_names = [k for k in device_map if not isinstance(k, str) or (k and k not in names)]
    if bad_names:
        top = ", ".join(n for n, _ in hf.named_children())
        raise DispatchError(f"device_map names modules this model does not have: {bad_names[:5]}. Keys are dotted "
                            f"module paths from the model root (top level here: {top}; e.g. 'model.layers.0'), or "
                            "'' for the whole model.")
    bad_values = [(k, v, why) for k, v in device_map.items() if (why := _device_ok(v))]
    if bad_values:
        k, v, why = bad_values[0]
        raise DispatchError(f"device_map[{k!r}] = {v!r}: {why}. Values are 'cpu', 'disk' (needs offload_folder), "
                            "or an accelerator index or name such as 0 or 'cuda:1'.")
    keys = sorted((k for k in device_map), key=len, reverse=True)
    missing = [n for n, _ in hf.named_parameters()
               if not any(k == "" or n == k or n.startswith(k + ".") for k in keys)]
    if missing:
        raise DispatchError(f"device_map leaves {len(missing)} parameters without a device, e.g. {missing[:3]}; "
                            "give a place to every top-level module (or use device_map='auto').")
    if "disk" in device_map.values() and offload_folder is None:
        raise DispatchError("device_map puts modules on 'disk' but no offload_folder was given; pass "
                            "offload_folder='some/dir' (converted and offloaded weights are written there; your "
                            "checkpoint files are never changed).")
    return tie_places(hf, device_map)


def _place(device_map: dict, name: str):
    """Where device_map puts module `name`: the value of its longest matching key."""
    keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return device_map[max(keys, key=len)] if keys else None


def tie_places(hf: torch.nn.Module, device_map: dict) -> dict:
    """Tied input and output embeddings are one tensor, so they get one place: a map that splits them puts the output
    embedding with the input embedding (transformers' own planner never splits them; accelerate cannot load a tied
    weight split between disk and memory, and on two devices an edit would reach only one copy)."""
    if not _tied(hf):
        return device_map
    names = {id(m): n for n, m in hf.named_modules()}
    inp, out = names[id(hf.get_input_embeddings())], names[id(hf.get_output_embeddings())]
    here, there = _place(device_map, inp), _place(device_map, out)
    if here == there:
        return device_map
    if out not in device_map:
        raise DispatchError(f"device_map puts the tied embeddings in two places ({inp} on {here!r}, {out} on "
                            f"{there!r}); they are one tensor. Give {out!r} its own key with the same place as "
                            f"{inp!r}.")
    warnings.warn(f"{out} is tied to {inp} (one tensor): placed with it on {here!r}, not on {there!r}.", stacklevel=3)
    return {**device_map, out: here}


def _tied(hf: torch.nn.Module) -> bool:
    """The model's input and output embeddings share one weight."""
    if not hasattr(hf, "get_output_embeddings") or hf.get_output_embeddings() is None:
        return False
    return hf.get_output_embeddings().weight is hf.get_input_embeddings().weight


def plan(hf: torch.nn.Module, device_map, max_memory, offload_folder) -> dict:
    """A complete dict device_map: a strategy resolved by transformers' planner (with max_memory), then checked."""
    if isinstance(device_map, str):
        from transformers.integrations.accelerate import _get_device_map

        try:
            device_map = _get_device_map(hf, device_map, max_memory, None)
        except (ValueError, KeyError) as e:
            raise DispatchError(f"Could not plan device_map={device_map!r} with max_memory={max_memory!r}: {e}. "
                                "Budgets are per device, e.g. {0: '20GiB', 'cpu': '60GiB'}.") from e
    return check_map(hf, dict(device_map), offload_folder)


def dispatch(hf: torch.nn.Module, device_map, max_memory=None, offload_folder=None) -> torch.nn.Module:
    """Place an already built model by device_map with accelerate (modules on 'disk' written to offload_folder)."""
    from accelerate import dispatch_model

    device_map = plan(hf, device_map, max_memory, offload_folder)
    if len(set(device_map.values())) > 1 or "disk" in device_map.values():
        folder = None if offload_folder is None else str(Path(offload_folder))
        with quiet():
            dispatch_model(hf, device_map=device_map, offload_dir=folder)
        hf.hf_device_map = device_map
    else:
        hf.to(_one(next(iter(device_map.values()))))
    settle(hf, offload_folder)
    return hf


@contextmanager
def quiet():
    """Without accelerate's notice that offloaded parameters sit on the meta device (settle moves them off it)."""
    log = logging.getLogger("accelerate.big_modeling")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def settle(hf: torch.nn.Module, offload_folder) -> torch.nn.Module:
    """Make offloaded weights resident (see mechanic.model.resident) and keep tied embeddings tied."""
    from mechanic.model.resident import make_resident, offloaded_meta

    try:
        make_resident(hf, offload_folder)
    except ValueError as e:
        raise DispatchError(str(e)) from e
    left = offloaded_meta(hf)
    if left:
        raise DispatchError(f"{len(left)} parameters stayed on the meta device after dispatch (e.g. {left[:3]}); "
                            "their offloaded values could not be found.")
    _retie(hf)
    return hf


def _retie(hf: torch.nn.Module) -> None:
    """accelerate offloads tied weights as separate copies; tie them again so an edit reaches both."""
    cfg = getattr(hf, "config", None)
    tied = getattr(cfg, "tie_word_embeddings", False) if cfg is not None else False
    if not tied or not hasattr(hf, "get_output_embeddings"):
        return
    inp, out = hf.get_input_embeddings(), hf.get_output_embeddings()
    if out is not None and out.weight is not inp.weight and out.weight.device == inp.weight.device:
        if not torch.equal(out.weight, inp.weight):
            raise DispatchError("The tied input and output embeddings have different values after dispatch.")
        out.weight = inp.weight


def _one(value):
    return "cpu" if value == "disk" else (torch.device(value) if not isinstance(value, int) else value)
