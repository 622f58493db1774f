"""A directory of per-layer transcoders (SAELens-format subdirectories, as `mechanic sae train` writes them,
matched to layers by the site each reads: `L{l}.mlp_in` -> `L{l}.mlp_out`; or circuit-tracer's transcoder_set
format, which save_circuit_tracer writes so circuit-tracer can run on mechanic's transcoders)."""

from __future__ import annotations

from pathlib import Path

from mechanic.locate.graph.errors import GraphError


def load_transcoders(model, path) -> tuple[list, dict[int, Path]]:
    """(one transcoder or None per layer, {layer: its directory}) from `path`'s subdirectories holding a cfg.json,
    or from a circuit-tracer transcoder_set directory (config.yaml + layer_{l}.safetensors)."""
    from mechanic.features import FeaturesError, load

    path = Path(path).expanduser()
    if not path.is_dir():
        raise GraphError(f"--transcoders {path} is not a directory. Give a directory with one SAELens-format "
                         "subdirectory per layer (cfg.json + sae_weights.safetensors), as `mechanic sae train "
                         "--site L3.mlp_in --out-site L3.mlp_out -o DIR` writes them, or a circuit-tracer transcoder set "
                         "(config.yaml + layer_{l}.safetensors).")
    if (path / CT_CONFIG).is_file():
        tcs = load_circuit_tracer(path)
        if len(tcs) != model.dims.n_layers:
            raise GraphError(f"{path / CT_CONFIG} lists {len(tcs)} transcoders but {model.name} has "
                             f"{model.dims.n_layers} layers; it was made for another model.")
        for i, d in enumerate(tcs):
            try:
                d.check(model)
            except FeaturesError as e:
                raise GraphError(f"Transcoder {i} of {path}: {e}") from None
        return tcs, {i: path for i in range(len(tcs))}
    dirs = sorted(p for p in path.iterdir() if (p / "cfg.json").is_file())
    if (path / "cfg.json").is_file():
        dirs = [path]
    if not dirs:
        raise GraphError(f"{path} holds no transcoder: no subdirectory with a cfg.json. Give the directory that "
                         "`mechanic sae train --out-site ...` wrote (one subdirectory per layer).")
    L = model.dims.n_layers
    out: list = [None] * L
    where: dict[int, Path] = {}
    for p in dirs:
        try:
            d = load(p)
        except FeaturesError as e:
            raise GraphError(f"Transcoder {p}: {e}") from None
        site = d.site or ""
        layer = int(site[1:].split(".")[0]) if site.startswith("L") and site.endswith(".mlp_in") else None
        if not d.transcoder or layer is None or d.out_site not in (None, f"L{layer}.mlp_out"):
            raise GraphError(f"{p} is not a per-layer MLP transcoder (it reads {d.site} and writes {d.out_site}); "
                             "an attribution graph needs transcoders reading L{l}.mlp_in and writing L{l}.mlp_out. "
                             "Remove it from the directory or retrain it on those sites.")
        if not 0 <= layer < L:
            raise GraphError(f"{p} is a transcoder for layer {layer}, but {model.name} has layers 0..{L - 1}; "
                             "it was made for another model.")
        if layer in where:
            raise GraphError(f"Two transcoders for layer {layer}: {where[layer]} and {p}. Keep one per layer.")
        try:
            d.check(model)
        except FeaturesError as e:
            raise GraphError(f"Transcoder {p}: {e}") from None
        out[layer], where[layer] = d, p
    return out, where


# ---- circuit-tracer's transcoder_set format --------------------------------------------------
# A directory with config.yaml (model_kind: transcoder_set, feature_input_hook, feature_output_hook, transcoders:
# one file per layer) and layer_{l}.safetensors holding W_enc [d_sae, d_model], W_dec [d_sae, d_model], b_enc,
# b_dec, optionally W_skip [d_model, d_model] and activation_function.threshold (JumpReLU; else ReLU).
# circuit-tracer's files have no TopK: mechanic adds `activation_function: topk` and `k` to config.yaml (circuit-
# tracer ignores unknown keys, so a TopK set must be given its activation when built in circuit-tracer itself).
CT_CONFIG = "config.yaml"
CT_HOOKS = ("mlp.hook_in", "hook_mlp_out")        # circuit-tracer's names for L{l}.mlp_in -> L{l}.mlp_out


def save_circuit_tracer(transcoders, path, scan: str | None = None) -> Path:
    """Write one transcoder per layer in circuit-tracer's transcoder_set format (so circuit-tracer can build graphs
    with mechanic's transcoders); each file written atomically. Returns the config.yaml path."""
    import yaml
    from safetensors.torch import save_file

    from mechanic.files import atomic_path, write_text

    tcs = list(transcoders)
    if not tcs or any(d is None for d in tcs):
        raise GraphError("circuit-tracer needs a transcoder on every layer 0..n-1; got "
                         f"{'none' if not tcs else [i for i, d in enumerate(tcs) if d is None]} missing. Train "
                         "the missing layers (mechanic sae train --site L{l}.mlp_in --out-site L{l}.mlp_out).")
    kinds = {d.architecture for d in tcs}
    for i, d in enumerate(tcs):
        why = _ct_unsupported(d, i)
        if why:
            raise GraphError(f"The transcoder of layer {i} ({d!r}) cannot be written in circuit-tracer's format: {why}.")
    if len(kinds) > 1 or len({d.d_sae for d in tcs}) > 1 or len({d.k for d in tcs}) > 1:
        raise GraphError("circuit-tracer needs one architecture and one width on every layer; got "
                         f"{sorted(kinds)} with widths {sorted({d.d_sae for d in tcs})}.")
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    files = []
    for i, d in enumerate(tcs):
        w = {"W_enc": d.W_enc.T, "W_dec": d.W_dec, "b_enc": d.b_enc, "b_dec": d.b_dec}
        if d.W_skip is not None:
            w["W_skip"] = d.W_skip
        if d.architecture in ("jumprelu", "batchtopk"):
            w["activation_function.threshold"] = d.threshold
        with atomic_path(path / f"layer_{i}.safetensors", suffix=".safetensors") as tmp:
            save_file({k: v.detach().float().contiguous().cpu() for k, v in w.items()}, tmp)
        files.append(str((path / f"layer_{i}.safetensors").resolve()))
    cfg = {"model_kind": "transcoder_set", "feature_input_hook": CT_HOOKS[0], "feature_output_hook": CT_HOOKS[1],
           "scan": scan or path.name, "transcoders": files}
    if tcs[0].architecture == "topk":
        cfg |= {"activation_function": "topk", "k": int(tcs[0].k)}
    return write_text(path / CT_CONFIG, yaml.safe_dump(cfg, sort_keys=False))


def load_circuit_tracer(path) -> list:
    """Per-layer transcoders from a circuit-tracer transcoder_set directory (local files; as save_circuit_tracer
    writes, or circuit-tracer's own ReLU/JumpReLU sets)."""
    import yaml
    from safetensors.torch import load_file

    from mechanic.features import Dictionary

    path = Path(path).expanduser()
    try:
        cfg = yaml.safe_load((path / CT_CONFIG).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise GraphError(f"{path / CT_CONFIG} cannot be read as circuit-tracer's config.yaml ({e}).") from None
    if not isinstance(cfg, dict) or cfg.get("model_kind") != "transcoder_set" or \
            tuple(cfg.get(k) for k in ("feature_input_hook", "feature_output_hook")) != CT_HOOKS:
        raise GraphError(f"{path / CT_CONFIG} is not a per-layer transcoder set reading {CT_HOOKS[0]} and writing "
                         f"{CT_HOOKS[1]} (model_kind: transcoder_set); mechanic reads only those.")
    files = cfg.get("transcoders") or sorted(path.glob("layer_*.safetensors"), key=lambda p: int(p.stem[6:]))
    out = []
    for i, f in enumerate(files):
        f = Path(f) if Path(f).is_absolute() else path / f
        if str(f).startswith("hf:") or not f.is_file():
            raise GraphError(f"{path / CT_CONFIG}: layer {i}'s file {f} is not on disk (mechanic never downloads "
                             "it); download the set first and list local files.")
        w = load_file(str(f))
        arch = "topk" if cfg.get("activation_function") == "topk" else (
            "jumprelu" if "activation_function.threshold" in w else "relu")
        d_sae, d_in = w["W_enc"].shape
        d = Dictionary(d_in, d_sae, arch, k=cfg.get("k"), site=f"L{i}.mlp_in", out_site=f"L{i}.mlp_out",
                       skip="W_skip" in w, transcoder=True, metadata={"circuit_tracer_scan": cfg.get("scan")})
        state = {"W_enc": w["W_enc"].T, "W_dec": w["W_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"]}
        state |= {"W_skip": w["W_skip"]} if "W_skip" in w else {}
        state |= {"threshold": w["activation_function.threshold"]} if arch == "jumprelu" else {}
        d.load_state_dict({k: v.float() for k, v in state.items()})
        out.append(d)
    return out


def _ct_unsupported(d, layer: int) -> str | None:
    """Why a mechanic transcoder has no exact circuit-tracer equivalent (None when it has one)."""
    if not getattr(d, "transcoder", False) or d.site != f"L{layer}.mlp_in" or d.out_site != f"L{layer}.mlp_out":
        return f"it must be a transcoder reading L{layer}.mlp_in and writing L{layer}.mlp_out"
    if d.architecture == "gated":
        return "circuit-tracer has no gated transcoders"
    if d.normalize != "none" or d.rescale_acts_by_decoder_norm or d.scaling_factor is not None:
        return "fold its input normalisation / activation rescaling into the weights first"
    if d.architecture in ("jumprelu", "batchtopk") and bool((d.threshold < 0).any()):
        return "a negative JumpReLU threshold acts differently in circuit-tracer (it keeps negative activations)"
    return None


__all__ = ["load_circuit_tracer", "load_transcoders", "save_circuit_tracer"]
