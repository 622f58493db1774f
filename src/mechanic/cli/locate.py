"""`mechanic locate ...`: run a locate method on a task and write Scores, a heatmap and a top-k table."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from mechanic.cli.common import app, console, emit_json, user_errors

# options shared by the locate commands
TASK = typer.Option(..., help="Built-in task name (ioi, facts, ...) or a .jsonl/.csv file.")
MODEL = typer.Option("smollm2", help="smollm2, a model directory, a .gguf file or a Hub id.")
FIRST_N = typer.Option(None, help="Use only the first n examples.")
METRIC = typer.Option(None, help="logit_diff, prob, logprob, accuracy (default: the task's).")
JSON = typer.Option(False, "--json", help="Machine-readable output.")
DICTIONARY = typer.Option(None, "--dictionary", help="A SAELens-format dictionary directory (`mechanic sae train` "
                          "writes them) to attach; repeat for several. Its latents and error node become sites of "
                          "kind sae (patch/atp --kind sae) and graph nodes (eap).")
LATENTS = typer.Option(None, help="With --dictionary: patch/EAP only the N latents per dictionary that change most "
                                  "(the rest stay one node), instead of every latent.")


def attach_dictionaries(model, dirs) -> None:
    """Attach each dictionary directory to the model (mechanic.features.attach), so its latents are sites."""
    from mechanic.features import attach, load

    for d in dirs or []:
        attach(model, load(d))

locate_app = typer.Typer(help="Find the components behind a behaviour; every method writes Scores.",
                         no_args_is_help=True)
app.add_typer(locate_app, name="locate")


@locate_app.callback()
def _ranks() -> None:
    """Under torchrun (`torchrun --nproc-per-node N -m mechanic locate ...`) join the process group: patch, atp,
    eap and neurons split their examples over the ranks, trace its restorations, outliers its calibration batches
    and perplexity checks; rank 0 alone writes and prints (main())."""
    from mechanic import distributed as D

    D.init()


def main() -> bool:
    """True on the rank that writes outputs and prints (rank 0 under torchrun; always in one process)."""
    from mechanic import distributed as D

    return D.is_main()


def load_task_spec(spec: str, n: int | None):
    """A built-in suite by name, or a user task file (.jsonl / .csv)."""
    path = Path(spec)
    if path.suffix in (".jsonl", ".csv"):
        from mechanic.tasks import io

        if not path.is_file():
            raise FileNotFoundError(f"No task file at {path}. Expected a .jsonl or .csv file of examples "
                                    "(fields: prompt, answer, wrong, corrupted), or a built-in task name.")
        task = io.from_jsonl(path) if path.suffix == ".jsonl" else io.from_csv(path)
    else:
        from mechanic.tasks.builtin import load_task

        task = load_task(spec)
    return task.subset(n) if n else task


def positions_option(text: str):
    """'all' = layer x position grid, 'none' = all positions at once, or comma-separated columns (-1 = last)."""
    if text == "all":
        return "all"
    if text == "none":
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: use 'all', 'none' or comma-separated integers like '-1,5'.")


def write_outputs(scores, out: Path, k: int, as_json: bool) -> None:
    """scores.json + scores.safetensors + heatmap.html in `out`, then a top-k table (or JSON); rank 0 only."""
    from mechanic.locate.plot import heatmap

    if not main():
        return
    out.mkdir(parents=True, exist_ok=True)
    scores.save(out / "scores.json")
    scores.save(out / "scores.safetensors")
    heatmap(scores, out / "heatmap.html")
    top = scores.top(k)
    if as_json:
        emit_json({"out": str(out), "method": scores.method, "task": scores.task, "metric": scores.metric,
                   "settings": scores.settings,
                   "top": [{"site": s, "pos": p, "value": v} for s, p, v in top]})
        return
    table = Table(title=f"{scores.method}: top {k} ({scores.task}, {scores.metric})")
    for col in ("site", "position", "score"):
        table.add_column(col)
    for s, p, v in top:
        label = "all" if p is None else f"{p}:{scores.positions[p]}" if scores.positions else str(p)
        table.add_row(s, label, f"{v:+.4f}")
    console.print(table)
    console.print(f"wrote {out}/scores.json, scores.safetensors, heatmap.html")


@locate_app.command()
@user_errors
def patch(task: str = TASK,
          model: str = MODEL,
          kind: str = typer.Option("resid_pre", help="resid_pre|resid_mid|resid_post|attn_out|mlp_out|head|neuron|"
                                                     "expert|sae (with --dictionary)"),
          positions: str = typer.Option("all", help="'all' (grid), 'none' (all at once) or columns like '-1,5'."),
          direction: str = typer.Option("denoise", help="denoise (clean into corrupted) or noise."),
          ablation: str = typer.Option(None, help="mean or resample (instead of a corrupted run)."),
          metric: str = METRIC,
          n: int = FIRST_N,
          out: Path = typer.Option(Path("out/patch"), "-o", "--out", help="Output directory."),
          top: int = typer.Option(10, help="How many top sites to print."),
          dictionary: list[Path] = DICTIONARY,
          latents: int = LATENTS,
          as_json: bool = JSON):
    """Activation patching: how much each site restores (denoise) or breaks (noise) the behaviour."""
    import mechanic
    from mechanic.locate.causal import patch as run_patch

    m = mechanic.load(model)
    attach_dictionaries(m, dictionary)
    t = load_task_spec(task, n)
    extra = {"latents": latents} if kind == "sae" and latents is not None else {}
    scores = run_patch(m, t, kind, positions=positions_option(positions), direction=direction, metric=metric,
                       ablation=ablation, progress=not as_json and main(), **extra)
    write_outputs(scores, out, top, as_json)


@locate_app.command()
@user_errors
def trace(prompt: str = typer.Option(..., help="The prompt, e.g. 'The Eiffel Tower is located in the city of'."),
          answer: str = typer.Option(..., help="The answer whose probability is traced, e.g. ' Paris'."),
          subject: str = typer.Option(..., help="The subject: a substring of the prompt, e.g. 'The Eiffel Tower'."),
          model: str = MODEL,
          kind: str = typer.Option("hidden", help="hidden (resid_post), mlp or attn (a window of layers)."),
          samples: int = typer.Option(10, help="Noise samples per restoration."),
          noise: float = typer.Option(3.0, help="Noise std as a multiple of the embedding std."),
          window: int = typer.Option(10, help="Layers restored together for mlp/attn."),
          seed: int = typer.Option(0),
          out: Path = typer.Option(Path("out/trace"), "-o", "--out", help="Output directory."),
          top: int = typer.Option(10, help="How many top cells to print."),
          as_json: bool = JSON):
    """Causal tracing (ROME): noise the subject, restore one clean state at a time, measure P(answer)."""
    import mechanic
    from mechanic.locate.trace import causal_trace

    m = mechanic.load(model)
    scores = causal_trace(m, prompt, answer, subject, kind, samples=samples, noise=noise, window=window,
                          seed=seed, progress=not as_json and main())
    write_outputs(scores, out, top, as_json)


@locate_app.command()
@user_errors
def atp(task: str = TASK,
        model: str = MODEL,
        kind: str = typer.Option("head", help="head|neuron|expert|embed|resid_pre|resid_post|attn_out|mlp_out|sae "
                                                "(with --dictionary)"),
        metric: str = METRIC,
        n: int = FIRST_N,
        out: Path = typer.Option(Path("out/atp"), "-o", "--out", help="Output directory."),
        top: int = typer.Option(10, help="How many top sites to print."),
        dictionary: list[Path] = DICTIONARY,
        as_json: bool = JSON):
    """Attribution patching: a first-order estimate of every site's patching effect from 2 forwards + 1 backward."""
    import mechanic
    from mechanic.locate.gradient import atp as run_atp

    m = mechanic.load(model)
    attach_dictionaries(m, dictionary)
    write_outputs(run_atp(m, load_task_spec(task, n), kind, metric=metric), out, top, as_json)


@locate_app.command()
@user_errors
def eap(task: str = TASK,
        model: str = MODEL,
        ig_steps: int = typer.Option(5, help="Integrated-gradient steps (EAP-IG); 0 for plain EAP."),
        edges: str = typer.Option("100,1000,5000", help="Circuit sizes (top edges) to measure faithfulness for."),
        metric: str = METRIC,
        n: int = FIRST_N,
        out: Path = typer.Option(Path("out/eap"), "-o", "--out", help="Output directory."),
        top: int = typer.Option(10, help="How many top edges to print."),
        dictionary: list[Path] = DICTIONARY,
        latents: int = LATENTS,
        as_json: bool = JSON):
    """EAP / EAP-IG edge scores, top-n circuits and their faithfulness (fraction of the metric they keep).

    With --dictionary the attached dictionaries' latents and error nodes are graph nodes (a feature circuit);
    faithfulness is then not measured (patching a feature circuit is not built yet)."""
    import mechanic
    from mechanic.locate.circuit import faithfulness_curve
    from mechanic.locate.gradient import eap as run_eap

    m = mechanic.load(model)
    attach_dictionaries(m, dictionary)
    t = load_task_spec(task, n)
    scores = run_eap(m, t, ig_steps=ig_steps or None, metric=metric, features=bool(dictionary), latents=latents)
    curve = [] if dictionary else faithfulness_curve(m, t, scores, [int(x) for x in edges.split(",")], metric=metric)
    scores.settings["faithfulness"] = curve
    write_outputs(scores, out, top, as_json)
    if curve and not as_json and main():
        table = Table(title="faithfulness of the top-n circuits")
        for col in curve[0]:
            table.add_column(str(col))
        for row in curve:
            table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()])
        console.print(table)


@locate_app.command()
@user_errors
def neurons(task: str = TASK,
            model: str = MODEL,
            n: int = typer.Option(4, help="Use only the first n examples (each costs ~neurons x vocab projections)."),
            layers: str = typer.Option(None, help="Comma-separated layers to score (default all), e.g. '20,21,29'."),
            target: str = typer.Option("answer", help="answer (the task's answer token) or predicted (top-1)."),
            out: Path = typer.Option(None, "-o", "--out", help="Write scores.json, scores.safetensors, heatmap.html."),
            top: int = typer.Option(20, help="How many top neurons to print."),
            as_json: bool = JSON):
    """Rank FFN neurons by log-probability increase of the answer (Yu & Ananiadou), with the tokens they promote."""
    import mechanic
    from mechanic.locate.neurons import neuron_attribution, promoted_tokens
    from mechanic.locate.plot import heatmap

    if target not in ("answer", "predicted"):
        raise typer.BadParameter(f"{target!r}: use 'answer' or 'predicted'.", param_hint="--target")
    m = mechanic.load(model)
    t = load_task_spec(task, n)
    chosen = None
    if layers:
        try:
            chosen = [int(x) for x in layers.split(",")]
        except ValueError:
            raise typer.BadParameter(f"{layers!r}: give comma-separated layer numbers like '20,21,29'.",
                                     param_hint="--layers")
        if any(not 0 <= x < m.dims.n_layers for x in chosen):
            raise typer.BadParameter(f"{layers!r}: this model has layers 0..{m.dims.n_layers - 1}.",
                                     param_hint="--layers")
    scores = neuron_attribution(m, t, "neuron", target=target, layers=chosen)["neuron"]
    best = scores.top(top, by="max")
    acts = m.run(t.tokenize(m).clean, cache=sorted({s.split(".")[0] + ".neuron" for s, _, _ in best}), pos=-1)
    act = [float(acts[s.split(".")[0] + ".neuron"][:, int(s.split("neuron")[1])].mean()) for s, _, _ in best]
    tokens = promoted_tokens(m, [s for s, _, _ in best], act, k=3)
    rows = [{"site": s, "logprob_increase": v, "activation": a, "promotes": tk}
            for (s, _, v), a, tk in zip(best, act, tokens)]
    if not main():
        return
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        scores.save(out / "scores.json")
        scores.save(out / "scores.safetensors")
        heatmap(scores, out / "heatmap.html")
    if as_json:
        emit_json({"out": str(out) if out else None, "method": scores.method, "task": scores.task,
                   "settings": scores.settings, "top": rows})
        return
    table = Table(title=f"neurons by log-probability increase ({scores.task}, {scores.settings['n_examples']} examples)")
    for col in ("site", "log-prob increase", "activation", "promotes"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["site"], f"{r['logprob_increase']:+.4f}", f"{r['activation']:+.2f}", " ".join(r["promotes"]))
    console.print(table)
    if out is not None:
        console.print(f"wrote {out}/scores.json, scores.safetensors, heatmap.html")


@locate_app.command()
@user_errors
def outliers(model: str = MODEL,
             tokens: int = typer.Option(2048, help="Calibration tokens for massive activations and sinks."),
             detect_tokens: int = typer.Option(512, help="Calibration tokens for each super-weight search pass."),
             verify_tokens: int = typer.Option(512, help="Held-out tokens for each perplexity measurement."),
             max_iter: int = typer.Option(5, help="Super-weight search passes (zero, re-run, next spike)."),
             n_random: int = typer.Option(3, help="Magnitude-matched random scalars per super-weight candidate."),
             top: int = typer.Option(10, help="How many sink heads to print."),
             out: Path = typer.Option(None, "-o", "--out", help="Write the Scores (JSON) to this directory."),
             as_json: bool = JSON):
    """Massive activations, super weights (or super experts) with their perplexity effect, and sink heads."""
    import time

    import mechanic
    from mechanic.data import text
    from mechanic.data.windows import TextError
    from mechanic.locate import magnitude as mg

    try:
        m = mechanic.load(model)
        cal, held = text.calibration(), text.heldout()
        t0 = time.perf_counter()
        massive = mg.massive_activations(m, cal, max_tokens=tokens, k=1)
        moe = any(m.is_moe(layer) for layer in range(m.dims.n_layers))
        weights = experts = None
        if not all(m.is_moe(layer) for layer in range(m.dims.n_layers)):
            weights = mg.super_weights(m, cal, held, detect_tokens=detect_tokens, verify_tokens=verify_tokens,
                                       max_iter=max_iter, n_random=n_random)
        if moe:
            experts = mg.super_experts(m, cal, held, max_tokens=tokens, prune_tokens=verify_tokens)
        sinks = mg.attention_sinks(m, held, max_tokens=tokens)
        seconds = time.perf_counter() - t0
    except (TextError, mg.MagnitudeError) as e:
        from mechanic.cli.common import fail

        fail(str(e))
    results = {"massive_activations": massive.scores, "super_weights": weights and weights.scores,
               "super_experts": experts and experts.scores, "attention_sinks": sinks}
    if not main():
        return
    if out is not None:
        for name, scores in results.items():
            if scores is not None:
                scores.save(Path(out) / f"{name}.json")
    sink_top = [{"head": s, "first_token_mass": v} for s, _, v in sinks.top(top, by="max")]
    summary = {"model": m.name, "seconds": round(seconds, 1), "tokens": massive.settings["tokens"],
               "massive": massive.massive, "top_per_layer": massive.top,
               "super_weights": weights and weights.settings["candidates"],
               "baseline_ppl": weights and weights.baseline_ppl,
               "super_experts": experts and {"super": experts.super, "pruning": experts.pruning,
                                             "baseline": experts.baseline},
               "sink_heads": sink_top, "mean_first_token_mass": sinks.settings["mean_first_mass"],
               "out": str(out) if out is not None else None}
    if as_json:
        emit_json(summary)
        return
    _print_outliers(massive, weights, experts, sink_top, summary)


def _print_outliers(massive, weights, experts, sink_top, summary) -> None:
    """Rich tables for `locate outliers`."""
    t = Table(title=f"largest |residual| per layer ({summary['tokens']} tokens; massive: > "
                    f"{massive.settings['min_value']:g} and >= {massive.settings['ratio']:g}x median)")
    for col in ("layer", "dim", "value", "token (pos)", "median", "x median", "massive"):
        t.add_column(col)
    for e in massive.top:
        t.add_row(str(e["layer"]), str(e["dim"]), f"{e['value']:.1f}", f"{e['token']!r} ({e['position']})",
                  f"{e['median']:.3f}", f"{e['ratio']:.0f}", "yes" if e["massive"] else "")
    console.print(t)
    if weights is not None:
        t = Table(title="super-weight candidates: down_proj\\[row, col] "
                        f"(held-out ppl {weights.baseline_ppl or 0:.2f})")
        for col in ("layer", "row", "col", "weight", "|in|", "|out|", "ppl zeroed", "worst random", "verified"):
            t.add_column(col)
        for c in weights.candidates:
            base = weights.baseline_ppl or 0.0
            worst = max(c.ppl_random, key=lambda p: abs(p - base), default=None)
            t.add_row(str(c.layer), str(c.row), str(c.col), f"{c.weight:.3f}", f"{c.max_input:.1f}",
                      f"{c.max_output:.1f}", f"{c.ppl:.2f}" if c.ppl is not None else "-",
                      f"{worst:.2f}" if worst is not None else "-", "yes" if c.verified else "no")
        console.print(t if weights.candidates else "no super-weight candidate (no down_proj output spike)")
    if experts is not None:
        t = Table(title=f"super experts (baseline ppl {experts.baseline.get('ppl', 0):.2f}, "
                        f"sink mass {experts.baseline.get('sink', 0):.3f})")
        for col in ("expert", "max |out|", "prune", "ppl", "sink mass"):
            t.add_column(col)
        for p in experts.pruning:
            value = next(s["value"] for s in experts.super if s["site"] == p["site"])
            t.add_row(p["site"], f"{value:.1f}", p["mode"], f"{p['ppl']:.2f}", f"{p['sink']:.3f}")
        console.print(t if experts.pruning else "no super expert")
    t = Table(title=f"sink heads (first-token attention; mean {summary['mean_first_token_mass']:.3f})")
    for col in ("head", "mass"):
        t.add_column(col)
    for s in sink_top:
        t.add_row(s["head"], f"{s['first_token_mass']:.3f}")
    console.print(t)
    console.print(f"{summary['seconds']} s" + (f"; wrote {summary['out']}/" if summary["out"] else ""))
