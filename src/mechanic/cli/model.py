"""Model commands: inspect a model's sites, check parity on it."""

from __future__ import annotations

import typer
from rich.table import Table

from mechanic.cli.common import app, console, emit_json, user_errors


def describe(model) -> dict:
    """Architecture, sizes and the layer-level site table of a model, as plain data."""
    d = model.dims
    layer_sites = {}
    for s in model.sites():
        key = "global" if s.layer is None else f"L{s.layer}"
        layer_sites.setdefault(key, []).append({"site": str(s), "shape": list(model.shape(s))})
    params = sum(p.numel() for p in model.hf.parameters())
    return {
        "name": model.name,
        "class": type(model.hf).__name__,
        "model_type": model.hf.config.model_type,
        "dtype": str(next(model.hf.parameters()).dtype).replace("torch.", ""),
        "parameters": params,
        "dims": d.__dict__,
        "parallel_residual": model.parallel,
        "moe_layers": [i for i in range(d.n_layers) if model.is_moe(i)],
        "attn_implementation": model.hf.config._attn_implementation,
        "sites": layer_sites,
        "grammar": "L{layer}.{resid_pre|resid_mid|resid_post|attn_out|mlp_out|head[h][.q|k|v|z|pattern]"
                   "|neuron[j]|expert[e][.neuron[j]]|shared_expert[.neuron[j]]|router} | embed | final | logits",
    }


@app.command()
@user_errors
def inspect(model: str = typer.Argument("smollm2", help="smollm2, a model directory, a .gguf file or a Hub id"),
            as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
            layers: int = typer.Option(2, help="How many layers to show in the site table (all in --json)."),
            trust_remote_code: bool = typer.Option(False, help="Allow the model's own Python code (off by default).")):
    """Print a model's architecture, sizes and site table."""
    import mechanic

    m = mechanic.load(model, trust_remote_code=trust_remote_code)
    info = describe(m)
    if as_json:
        emit_json(info)
        return
    d = m.dims
    console.print(f"[bold]{info['name']}[/]  {info['class']} ({info['model_type']}), {info['parameters'] / 1e6:.1f}M "
                  f"parameters, {info['dtype']}, attention: {info['attn_implementation']}")
    sizes = Table(title="sizes", show_header=False)
    for k, v in info["dims"].items():
        if v not in (None, 0):
            sizes.add_row(k, str(v))
    sizes.add_row("parallel residual", str(info["parallel_residual"]))
    if info["moe_layers"]:
        sizes.add_row("MoE layers", ", ".join(map(str, info["moe_layers"])))
    console.print(sizes)
    table = Table(title=f"sites (shapes for batch x pos; first {layers} of {d.n_layers} layers)")
    table.add_column("site")
    table.add_column("shape")
    for key, rows in info["sites"].items():
        if key != "global" and int(key[1:]) >= layers:
            continue
        for row in rows:
            table.add_row(row["site"], " x ".join(map(str, row["shape"])))
    console.print(table)
    console.print(f"grammar: {info['grammar']}", highlight=False, markup=False)


@app.command()
@user_errors
def check(model: str = typer.Argument("smollm2", help="smollm2, a model directory, a .gguf file or a Hub id"),
          as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
          trust_remote_code: bool = typer.Option(False, help="Allow the model's own Python code (off by default).")):
    """Validate mechanic on a model: exact parity with the HF forward, heads add up, batching is consistent."""
    import mechanic
    from mechanic.model.validate import validate

    results = validate(mechanic.load(model, trust_remote_code=trust_remote_code))
    if as_json:
        emit_json(results)
    else:
        table = Table(title="mechanic check")
        for col in ("check", "max abs diff", "tolerance", "ok"):
            table.add_column(col)
        for r in results:
            table.add_row(r["check"], f"{r['max_abs_diff']:.3g}", f"{r['tolerance']:.0e}",
                          "[green]yes[/]" if r["ok"] else "[red]NO[/]")
        console.print(table)
    if not all(r["ok"] for r in results):
        raise typer.Exit(1)
