"""`mechanic graph "PROMPT" --transcoders DIR -o graph.html`: one prompt's attribution graph, its viewer page, and
optionally circuit-tracer's JSON and a validation by intervention (the work is in mechanic.locate.graph and
mechanic.report.graph_viewer / graph_json)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from mechanic.cli.common import app, console, emit_json
from mechanic.cli.locate import JSON, MODEL
from mechanic.cli.sae import sae_errors
from mechanic.locate.graph.attribute import MAX_FEATURE_NODES


@app.command()
@sae_errors
def graph(prompt: str = typer.Argument(..., help="The prompt whose next-token prediction the graph explains."),
          transcoders: Path = typer.Option(..., "--transcoders", help="Directory with one transcoder per layer "
                                           "(SAELens subdirectories, as `mechanic sae train --out-site` writes); "
                                           "layers without one are all error nodes."),
          out: Path = typer.Option(Path("graph.html"), "-o", "--out", help="The viewer page to write."),
          model: str = MODEL,
          node_threshold: float = typer.Option(0.8, help="Viewer: keep nodes holding this share of the influence."),
          edge_threshold: float = typer.Option(0.98, help="Viewer: keep edges holding this share of the influence."),
          logit_mass: float = typer.Option(0.95, help="Logit nodes: the most probable tokens up to this mass."),
          max_logits: int = typer.Option(10, help="At most this many logit nodes."),
          batch_size: int = typer.Option(64, help="Target rows per backward pass."),
          max_feature_nodes: int = typer.Option(MAX_FEATURE_NODES, help="Keep this many features, the most "
                                                 "influential on the logits (0: none; -1: every active feature)."),
          keep_first: bool = typer.Option(False, "--keep-first", help="Keep feature nodes at position 0 (by "
                                          "default its MLP outputs are error nodes: it is the attention sink)."),
          export: Optional[Path] = typer.Option(None, "--export", help="Also write circuit-tracer / Neuronpedia "
                                                "graph JSON to this file (its directory gets graph-metadata.json)."),
          save: Optional[Path] = typer.Option(None, "--save", help="Also save the whole graph (Graph.save) here."),
          validate: int = typer.Option(0, "--validate", help="Ablate the N most influential features in the real "
                                       "model and compare each logit's change with the graph's prediction."),
          as_json: bool = JSON):
    """Attribution graph of one prompt (transcoders replace the MLPs; attention and norms frozen): writes the
    interactive viewer page, reports the replacement and completeness scores."""
    import mechanic
    from mechanic.locate.graph import attribute, load_transcoders
    from mechanic.locate.graph import validate as check
    from mechanic.locate.graph import GraphError
    from mechanic.report import graph_json, graph_viewer

    if max_feature_nodes < -1:
        raise GraphError(f"--max-feature-nodes is a count of features (or -1 for all of them); got {max_feature_nodes}.")
    for name, v in (("--node-threshold", node_threshold), ("--edge-threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:      # checked before the (minutes-long on a real model) graph is built
            raise GraphError(f"{name} is a fraction of the total influence, between 0 and 1; got {v}.")
    m = mechanic.load(model)
    tcs, where = load_transcoders(m, transcoders)
    g = attribute(m, tcs, prompt, logit_mass=logit_mass, max_logits=max_logits, batch_size=batch_size,
                  max_feature_nodes=None if max_feature_nodes == -1 else max_feature_nodes, zero_first=not keep_first)
    graph_viewer.write(g, out, node_threshold=node_threshold, edge_threshold=edge_threshold, tokenizer=m.tokenizer)
    info = {"page": str(out), "prompt": prompt, "model": m.name, "transcoder_layers": sorted(where),
            "nodes": {k: g.count(k) for k in ("feature", "error", "token", "logit")}, "scores": g.scores,
            "logits": [{"token": int(t), "text": m.tokenizer.decode([int(t)]) if m.tokenizer is not None else None,
                        "prob": float(p)} for t, p in zip(g.logit_tokens, g.logit_probs)],
            "cpu_seconds": g.meta.get("cpu_seconds", {}).get("total")}
    if export is not None:
        graph_json.write(g, export.parent, slug=export.stem, node_threshold=node_threshold,
                         edge_threshold=edge_threshold, tokenizer=m.tokenizer)
        info["export"] = str(export.parent / f"{export.stem}.json")
    if save is not None:
        info["saved"] = str(g.save(save))
    if validate:
        v = check(m, tcs, g, top=validate)
        info["validation"] = v.to_dict()
    if as_json:
        emit_json(info)
        return
    tops = ", ".join(f"{x['text']!r} {x['prob']:.3f}" for x in info["logits"])
    console.print(Text(f"{g!r}\nlogits: {tops}"), highlight=False)
    if validate:
        a = v.agreement
        table = Table(title=Text(f"Ablating the top {len(v.nodes)} features: predicted vs measured change of each "
                                 f"demeaned logit (pearson {a['pearson']:.3f}, spearman {a['spearman']:.3f}, "
                                 f"sign {a['sign']:.2f})"))
        for col in ("feature", "logit", "predicted", "measured"):
            table.add_column(col)
        text = {x["token"]: x["text"] for x in info["logits"]}
        for r in v.rows():
            table.add_row(r["label"], repr(text[r["logit_token"]]), f"{r['predicted']:+.4f}", f"{r['measured']:+.4f}")
        console.print(table)
    console.print(f"wrote {out}" + (f" and {info['export']}" if export is not None else ""), markup=False,
                  highlight=False)
