"""The sparse dictionary a feature recipe works through: a SAELens directory, or one the runner trains and caches.

    locate: {method: feature_attribution, dictionary: runs/sae/L6.resid_post.topk}          # bring one
    locate: {method: feature_attribution, dictionary: {train: {site: L6.resid_post, k: 32}}}  # or train one

A `train` spec becomes the runner's `dictionary` stage (content-addressed like every stage: same model,
settings and seed -> the finished stage is reused, so a re-run never retrains); the locate stage then
receives the trained directory's path in place of the spec. Training uses mechanic.features.train, the
trainer `mechanic sae train` calls.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from pydantic import Field

from mechanic.recipes.methods import StageOut, table
from mechanic.recipes.schema import RecipeError, Strict


class TrainSpec(Strict):
    """What the runner trains when the recipe brings no dictionary (defaults as `mechanic sae train`)."""

    site: str
    arch: str = Field("topk", pattern="^(topk|batchtopk|jumprelu|relu)$")
    expansion: int = Field(16, ge=1)
    k: int = Field(32, ge=1)
    tokens: int = Field(1_000_000, ge=256)
    batch_size: int = Field(4096, ge=16)
    buffer_tokens: int = Field(65536, ge=64)
    seq_len: int = Field(128, ge=8)


class TrainDictionary(Strict):
    """`dictionary: {train: {...}}` in a locate method's settings."""

    train: TrainSpec


def train_spec(locate_spec) -> TrainSpec | None:
    """The locate stage's `dictionary.train` settings, or None when it brings a directory (or no dictionary)."""
    d = locate_spec.model_dump().get("dictionary")
    return TrainDictionary.model_validate(d).train if isinstance(d, dict) else None


def digest(path, field: str = "dictionary") -> str:
    """sha256 over a dictionary directory's files (subdirectories included: a transcoder per layer), so replacing
    its weights invalidates the stages that read it."""
    p = Path(path).expanduser()
    if not p.is_dir():
        hint = ("a SAELens-format directory (cfg.json + sae_weights.safetensors), or `dictionary: {train: {site: "
                "L6.resid_post}}` to train one" if field == "dictionary" else
                "a directory with one transcoder subdirectory per layer (as `mechanic sae train --out-site` writes)")
        raise RecipeError(f"{field}: {p} is not a directory; give {hint}.")
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(f.relative_to(p).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def train_stage(model, spec: TrainSpec, out: Path, seed: int) -> StageOut:
    """Train one dictionary into `out/<label>` with mechanic.features.train; data["path"] is where it is."""
    import json

    from mechanic.features.train import DictConfig, train

    cfg = DictConfig(spec.site, spec.arch, expansion=spec.expansion, k=spec.k)
    train(model, [cfg], out, tokens=spec.tokens, batch_size=spec.batch_size, buffer_tokens=spec.buffer_tokens,
          seq_len=spec.seq_len, seed=seed, progress=False)
    summary = json.loads((out / "train.json").read_text())
    s = summary["final"][cfg.label]
    text = (f"Trained a {spec.arch} dictionary on {spec.site} ({spec.expansion}x expansion, k = {spec.k}) on "
            f"{summary['tokens_seen']:,} tokens of the default corpus: FVU {s['fvu']:.3f}, L0 {s['l0']:.1f}, "
            f"dead fraction {s['dead']:.3f} (training statistics, not held-out).")
    fig = table("dictionary_training", "Dictionary training (last step)", ["site", "tokens", "FVU", "L0", "dead"],
                [[spec.site, summary["tokens_seen"], float(s["fvu"]), float(s["l0"]), float(s["dead"])]])
    return StageOut(text, [fig], {"path": cfg.label, "fvu": s["fvu"], "l0": s["l0"]},
                    {"dictionary": f"{cfg.label}/sae_weights.safetensors"})


def paths(dictionary) -> list[str]:
    """A locate stage's `dictionary`: one directory, or a list of them (graph_features with `layer: all`)."""
    return [str(dictionary)] if isinstance(dictionary, (str, Path)) else [str(p) for p in dictionary]


def attach_dir(model, path) -> str:
    """Attach the dictionary saved at `path` (unless an equal one is attached there); returns its site."""
    from mechanic.features import FeaturesError, attach, attached, detach, load

    try:
        d = load(path).check(model)
    except FeaturesError as e:
        raise RecipeError(f"dictionary {path}: {e}") from None
    site = d.out_site if d.transcoder else d.site
    if site in model.dictionaries:
        have = attached(model, site)
        if have.W_dec.shape == d.W_dec.shape and torch.equal(have.W_dec, d.W_dec) and torch.equal(have.W_enc, d.W_enc):
            return site
        detach(model, site)
    return str(attach(model, d))
