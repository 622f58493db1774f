"""Draw benchmarks/results/editing_sequential.json as one SVG: each editing method's scores over the number of
sequential edits (ES, PS, NS, locality, perplexity, fluency panels; 95% CI bands where the run recorded them; the
unedited model dashed). Reads the JSON only, runs no model: `python benchmarks/plot_editing.py [JSON] [-o SVG]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PANELS = [("es", "Efficacy (ES)", "fraction of facts"), ("ps", "Paraphrase (PS)", "fraction of paraphrases"),
          ("ns", "Neighbourhood (NS)", "fraction kept true"), ("locality", "Locality (EasyEdit)", "tokens unchanged"),
          ("ppl", "Held-out perplexity", "perplexity"), ("fluency", "Fluency (n-gram entropy)", "bits")]
COLOURS = {"alphaedit": "#d62728", "memit": "#1f77b4", "rome": "#2ca02c", "ft": "#9467bd", "lora": "#ff7f0e"}
NAMES = {"alphaedit": "AlphaEdit", "memit": "MEMIT", "rome": "ROME", "ft": "FT-L", "lora": "LoRA"}


def series(curve: list[dict], key: str) -> tuple[list, list, list | None, list | None]:
    """(edits, values, CI lows, CI highs) of one score along a curve; CIs None when the run has none."""
    pts = [p for p in curve if p.get(key) is not None]
    x, y = [p["edits"] for p in pts], [p[key] for p in pts]
    if pts and all((p.get("ci") or {}).get(key) for p in pts):
        return x, y, [p["ci"][key][0] for p in pts], [p["ci"][key][1] for p in pts]
    return x, y, None, None


def draw(result: dict, out: Path) -> Path:
    """The figure of one benchmark result, written as SVG to `out`."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("plot_editing.py draws with matplotlib, which is not installed here: `pip install matplotlib` "
                 "(the mechanic package itself does not need it).")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "mechanic"          # stable element ids: the same JSON gives the same file
    methods = result.get("methods") or {}
    if not methods:
        sys.exit("This result has no methods' curves (its 'methods' is empty); run benchmarks/editing_sequential.py "
                 "first.")
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), sharex=True)
    before = result.get("before") or {}
    bands = False
    for ax, (key, title, unit) in zip(axes.flat, PANELS):
        drawn = False
        for name, r in methods.items():
            x, y, lo, hi = series(r.get("curve", []), key)
            if not x:
                continue
            c = COLOURS.get(name)
            ax.plot(x, y, marker="o", ms=3, lw=1.6, color=c, label=NAMES.get(name, name))
            if lo is not None:
                ax.fill_between(x, lo, hi, color=c, alpha=0.15, lw=0)
                bands = True
            drawn = True
        if isinstance(before.get(key), (int, float)) and drawn:
            ax.axhline(before[key], color="0.4", ls="--", lw=1, label="unedited")
        if not drawn:
            ax.text(0.5, 0.5, "not recorded in this run", ha="center", va="center", transform=ax.transAxes,
                    color="0.5")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
        ax.grid(alpha=0.3)
        if key in ("es", "ps", "ns", "locality"):
            ax.set_ylim(-0.03, 1.03)
    for ax in axes[-1]:
        ax.set_xlabel("facts edited (sequential batches)")
    handles, labels = next(((h, lab) for h, lab in (a.get_legend_handles_labels() for a in axes.flat) if h), ([], []))
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    n, b = len(result.get("facts", [])), result.get("batch")
    fig.suptitle(f"Sequential editing on {result.get('model', '?')} ({result.get('suite', 'facts')}): {n} facts in "
                 f"batches of {b}; scores over the facts edited so far"
                 + (", 95% bootstrap CI bands" if bands else " (this run recorded no CIs)"), fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="svg", metadata={"Date": None})
    plt.close(fig)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("json", nargs="?", default=str(ROOT / "benchmarks" / "results" / "editing_sequential.json"))
    p.add_argument("-o", "--out", default=str(ROOT / "docs" / "figures" / "editing_sequential.svg"))
    args = p.parse_args()
    path = Path(args.json)
    if not path.is_file():
        sys.exit(f"No result at {path}; run benchmarks/editing_sequential.py first (it writes that JSON).")
    print(draw(json.loads(path.read_text()), Path(args.out)))


if __name__ == "__main__":
    main()
