"""`mechanic sae train|eval|show`: sparse dictionaries from the command line (the work is in mechanic.features)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from mechanic.cli.common import app, console, emit_json, errors, user_errors
from mechanic.cli.locate import JSON, MODEL

sae_app = typer.Typer(help="Sparse autoencoders and transcoders: train, evaluate, inspect (SAELens format).",
                      no_args_is_help=True)
app.add_typer(sae_app, name="sae")
TEXT = typer.Option(None, "--text", help="Text file(s) (.txt, .jsonl with a 'text' field, or a directory); "
                                         "default: the GCIDE corpus (train split for training, held-out for eval).")


def sae_errors(fn):
    """Dictionary mistakes (bad file, hook, width, setting) as one paragraph and exit 2, like every user error."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mechanic.features.errors import FeaturesError

        try:
            return fn(*args, **kwargs)
        except FeaturesError as e:
            errors.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True, markup=True)
            raise typer.Exit(2)
    return user_errors(wrapper)


def _list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


@sae_app.command()
@sae_errors
def train(site: str = typer.Option(..., help="Site(s) to read, comma-separated (one dictionary each), e.g. "
                                             "'L8.resid_post' or 'L3.mlp_in' for a transcoder."),
          out: Path = typer.Option(..., "-o", "--out", help="Output directory: <label>/cfg.json + "
                                                             "sae_weights.safetensors per dictionary, train.json."),
          model: str = MODEL,
          arch: str = typer.Option("topk", help="topk, batchtopk, jumprelu or relu."),
          out_site: Optional[str] = typer.Option(None, help="Transcoders: where each writes, comma-separated like "
                                                           "--site (e.g. 'L3.mlp_out')."),
          skip: bool = typer.Option(False, help="Transcoders: add a linear skip connection."),
          expansion: int = typer.Option(16, help="Latents per input dimension."),
          k: int = typer.Option(32, help="Active latents per token (topk, batchtopk)."),
          tokens: int = typer.Option(1_000_000, help="Training tokens."),
          text: Optional[list[Path]] = TEXT,
          lr: Optional[float] = typer.Option(None, help="Adam learning rate (default 2e-4*sqrt(16384/latents))."),
          coef: Optional[float] = typer.Option(None, help="Sparsity (relu l1, jumprelu l0) or AuxK weight."),
          batch_size: int = typer.Option(4096, help="Tokens per optimiser step."),
          buffer_tokens: int = typer.Option(65536, help="Shuffle-buffer size in tokens (memory bound)."),
          seq_len: int = typer.Option(128, help="Tokens per text window."),
          forward_batch: int = typer.Option(16, help="Text windows per model forward; 0: the most that fit the "
                                                     "memory budget (settings that do not fit are refused)."),
          checkpoint_every: Optional[int] = typer.Option(None, help="Checkpoint every N tokens; a rerun resumes."),
          seed: int = typer.Option(0),
          as_json: bool = JSON):
    """Train dictionaries on one pass over the text (one truncated forward feeds them all).

    Under torchrun (`torchrun --standalone --nproc-per-node N -m mechanic sae train ...`) the ranks train
    data-parallel (DDP) and rank 0 alone writes and prints."""
    import mechanic
    from mechanic import distributed as D
    from mechanic.features.errors import FeaturesError
    from mechanic.features.train import DictConfig, train as run_train

    sites, outs = _list(site), _list(out_site)
    if outs and len(outs) != len(sites):
        raise FeaturesError(f"--out-site lists {len(outs)} sites but --site lists {len(sites)}; give one output "
                            "site per input site.")
    cfgs = [DictConfig(s, arch, expansion=expansion, k=k, out_site=outs[i] if outs else None, skip=skip, lr=lr,
                       coef=coef) for i, s in enumerate(sites)]
    D.init()
    m = mechanic.load(model)
    run_train(m, cfgs, out, tokens=tokens, text=list(text) if text else None, batch_size=batch_size,
              buffer_tokens=buffer_tokens, seq_len=seq_len, forward_batch=forward_batch or None,
              checkpoint_every=checkpoint_every, seed=seed,
              progress=not as_json)
    if not D.is_main():
        return
    summary = json.loads((out / "train.json").read_text())
    summary.pop("log")
    summary["dictionaries"] = {c.label: str(out / c.label) for c in cfgs}
    if as_json:
        emit_json(summary)
        return
    table = Table(title=f"{summary['tokens_seen']:,} tokens, {summary['tokens_per_s']:,.0f} tokens/s")
    for col in ("dictionary", "FVU", "L0", "dead", "written to"):
        table.add_column(col)
    for label, s in summary["final"].items():
        table.add_row(label, f"{s['fvu']:.3f}", f"{s['l0']:.1f}", f"{s['dead']:.3f}", summary["dictionaries"][label])
    console.print(table)
    console.print("(training-batch values; `mechanic sae eval DIR` measures held-out FVU and CE loss recovered)")


@sae_app.command("eval")
@sae_errors
def eval_(path: Path = typer.Argument(..., help="Dictionary directory (cfg.json + sae_weights.safetensors)."),
          model: str = MODEL,
          text: Optional[list[Path]] = TEXT,
          tokens: int = typer.Option(32768, help="Held-out tokens for reconstruction statistics."),
          ce_tokens: int = typer.Option(8192, help="Held-out tokens for CE loss recovered and KL (full forwards)."),
          seq_len: int = typer.Option(128, help="Tokens per text window."),
          site: Optional[str] = typer.Option(None, help="Override the site from cfg.json."),
          out: Optional[Path] = typer.Option(None, "-o", "--out", help="Also write the evaluation as JSON here."),
          as_json: bool = JSON):
    """FVU, L0, dead/dense latents, CE loss recovered and KL when spliced in (with and without the error term)."""
    import mechanic
    from mechanic.features import load
    from mechanic.features.evaluate import evaluate

    d = load(path, site=site)
    m = mechanic.load(model)
    ev = evaluate(m, d, text=list(text) if text else None, tokens=tokens, ce_tokens=ce_tokens, seq_len=seq_len)
    data = {"dictionary": str(path), **ev.to_json()}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1) + "\n")
    if as_json:
        emit_json(data)
        return
    table = Table(title=f"{d!r} on {ev.tokens:,} held-out tokens")
    table.add_column("measure")
    table.add_column("value")
    rows = [("FVU", ev.fvu), ("L0", ev.l0), ("dead fraction", ev.dead_fraction), ("dense fraction", ev.dense_fraction),
            ("CE original", ev.ce_original), ("CE spliced", ev.ce_spliced), ("CE zero-ablated", ev.ce_zero_ablated),
            ("CE loss recovered", ev.ce_loss_recovered), ("KL spliced", ev.kl_spliced),
            ("CE with error term", ev.ce_with_error), ("max |logit diff| with error term", ev.max_logit_diff_with_error)]
    for name, v in rows:
        table.add_row(name, "-" if v is None else f"{v:.4g}")
    console.print(table)


@sae_app.command()
@sae_errors
def show(path: Path = typer.Argument(..., help="Dictionary directory (cfg.json + sae_weights.safetensors)."),
         model: Optional[str] = typer.Option(None, help="Also check the sites and widths against this model."),
         as_json: bool = JSON):
    """What a dictionary is: architecture, sites, sizes, sparsity setting, decoder norms, training record."""
    from mechanic.features import load
    from mechanic.features.saelens import arch_out

    d = load(path)
    if model is not None:
        import mechanic

        d.check(mechanic.load(model))
    norms = d.W_dec.detach().norm(dim=-1)
    info = {"path": str(path), "kind": d.kind, "architecture": d.architecture, "saelens_architecture": arch_out(d),
            "site": d.site, "out_site": d.out_site, "d_in": d.d_in, "d_sae": d.d_sae, "d_out": d.d_out, "k": d.k,
            "skip": d.W_skip is not None, "apply_b_dec_to_input": d.apply_b_dec_to_input, "normalize": d.normalize,
            "hook_name": d.metadata.get("hook_name"), "hook_name_out": d.metadata.get("hook_name_out"),
            "model_name": d.metadata.get("model_name"),
            "decoder_norm": {"min": float(norms.min()), "mean": float(norms.mean()), "max": float(norms.max())},
            "trained_tokens": d.metadata.get("trained_tokens"), "checked_against_model": model}
    if hasattr(d, "threshold"):
        info["threshold"] = {"min": float(d.threshold.min()), "mean": float(d.threshold.mean()),
                             "max": float(d.threshold.max())}
    if as_json:
        emit_json(info)
        return
    table = Table(title=repr(d))
    table.add_column("field")
    table.add_column("value")
    for key, v in info.items():
        table.add_row(key, json.dumps(v) if isinstance(v, dict) else str(v))
    console.print(table)
