"""A directory of per-layer transcoders (SAELens-format subdirectories, as `mechanic sae train` writes them),
matched to layers by the site each reads: `L{l}.mlp_in` -> `L{l}.mlp_out`."""

from __future__ import annotations

from pathlib import Path

from mechanic.locate.graph.errors import GraphError


def load_transcoders(model, path) -> tuple[list, dict[int, Path]]:
    """(one transcoder or None per layer, {layer: its directory}) from `path`'s subdirectories holding a cfg.json."""
    from mechanic.features import FeaturesError, load

    path = Path(path).expanduser()
    if not path.is_dir():
        raise GraphError(f"--transcoders {path} is not a directory. Give a directory with one SAELens-format "
                         "subdirectory per layer (cfg.json + sae_weights.safetensors), as `mechanic sae train "
                         "--site L3.mlp_in --out-site L3.mlp_out -o DIR` writes them.")
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


__all__ = ["load_transcoders"]
