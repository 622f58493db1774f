"""`mechanic features SAE_DIR -o features.html`: feature pages of a sparse dictionary (the work is in
mechanic.locate.feature_pages and mechanic.report.feature_pages)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from mechanic.cli.common import app, console, emit_json
from mechanic.cli.locate import JSON, MODEL
from mechanic.cli.sae import TEXT, sae_errors


def parse_features(spec: str) -> int | list[int]:
    """'top:N' -> N (the N most frequently firing latents); '3,17,42' -> [3, 17, 42]."""
    from mechanic.features.errors import FeaturesError

    spec = spec.strip()
    try:
        if spec.lower().startswith("top:"):
            return int(spec[4:])
        return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise FeaturesError(f"--features takes comma-separated latent ids (e.g. 3,17,42) or top:N for the N most "
                            f"frequently firing latents (e.g. top:16); got {spec!r}.") from None


@app.command()
@sae_errors
def features(path: Path = typer.Argument(..., help="Dictionary directory (cfg.json + sae_weights.safetensors)."),
             out: Path = typer.Option(Path("features.html"), "-o", "--out", help="The HTML page to write."),
             model: str = MODEL,
             text: Optional[list[Path]] = TEXT,
             feature_ids: str = typer.Option("top:16", "--features", help="Latent ids, comma-separated (3,17,42), "
                                                                          "or top:N for the N most frequently firing."),
             tokens: int = typer.Option(32768, help="Held-out tokens to read."),
             contexts: int = typer.Option(10, help="Top-activating contexts per feature."),
             logits: int = typer.Option(10, help="Promoted and suppressed tokens per feature."),
             seq_len: int = typer.Option(128, help="Tokens per text window."),
             site: Optional[str] = typer.Option(None, help="Override the site from cfg.json."),
             as_json: bool = JSON):
    """Feature pages: top contexts with per-token highlighting, activation histogram and logit effect per feature,
    in one self-contained HTML page."""
    import mechanic
    from mechanic.features import load
    from mechanic.locate.feature_pages import feature_pages
    from mechanic.report.feature_pages import build_page

    chosen = parse_features(feature_ids)
    d = load(path, site=site)
    m = mechanic.load(model)
    data = feature_pages(m, d, text=list(text) if text else None, features=chosen, tokens=tokens, contexts=contexts,
                         logits=logits, seq_len=seq_len)
    data["dictionary"]["path"] = str(path)
    build_page(data, out)
    if as_json:
        emit_json({"page": str(out), **data})
        return
    table = Table(title=Text(f"{len(data['features'])} features of {d!r} on {data['tokens']:,} tokens ({data['selection']})"))
    for col in ("feature", "fires on", "max", "promotes"):
        table.add_column(col)
    for f in data["features"]:
        table.add_row(str(f["id"]), f"{f['frequency']:.2%}", f"{f['max']:.3g}",
                      Text(" ".join(repr(t["token"]) for t in f["logits"]["promoted"][:4])))
    console.print(table)
    console.print(f"wrote {out}", markup=False, highlight=False)
